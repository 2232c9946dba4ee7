"""``geoseg sample``: a stratified random sample of a land-cover mask, for an accuracy assessment."""

from __future__ import annotations

from pathlib import Path

import click

from geoseg_cli.options import _file_out


@click.command(short_help="Draw a stratified random sample of a mask's classes (points to label).")
@click.argument("mask", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(), required=True, callback=_file_out,
              help="Points file to write (.gpkg, .geojson or .fgb).")
@click.option("--per-class", type=click.IntRange(min=1), default=50, show_default=True,
              help="Points per map class (all pixels of a smaller class).")
@click.option("--region", default=None, metavar="COL,ROW,WIDTH,HEIGHT", help="Only draw in this pixel window.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (the same seed draws the same points).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def sample(mask: Path, out: Path, per_class: int, region: str | None, seed: int, overwrite: bool) -> None:
    """Draw --per-class random pixels of each class of MASK as points to label.

    The points (at pixel centres, in the mask's CRS) carry sample_id, map_class, map_name and an
    empty `reference` field: open them in QGIS over imagery, fill in each point's true class (id or
    name), then `geoseg evaluate MASK --reference OUT --field reference --stratified` gives the
    area-weighted accuracies and class areas with confidence intervals (Olofsson et al. 2014).

    \b
    Example:
      geoseg sample out/scene_landcover.tif --per-class 100 --out sample.gpkg
    """
    from geoseg.evaluate import draw_sample

    res = draw_sample(mask, out, per_class=per_class, region=region, seed=seed, overwrite=overwrite)
    click.echo(str(res.path))
