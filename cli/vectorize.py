"""``geoseg vectorize``: class raster -> land-cover polygons (GeoPackage, GeoJSON, FlatGeobuf)."""

from __future__ import annotations

from pathlib import Path

import click

from geoseg import vectorize as vec
from geoseg_cli.options import _file_out, _non_negative, class_list, overwrite_opt


@click.command("vectorize", short_help="Turn a class raster into clean land-cover polygons.")
@click.argument("mask", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "out", type=click.Path(), default=None, callback=_file_out,
    help="Output file. Default: <mask stem>.gpkg (or the --format's extension) beside the mask.",
)
@click.option(
    "--format", "fmt", type=click.Choice(vec.FORMATS), default=None,
    help="Output format (default: from the --out extension, which must agree with it; gpkg without --out). "
         "geojson is RFC 7946 (WGS 84).",
)
@click.option("--min-area", type=float, default=None, callback=_non_negative, help="Minimum mapping unit in map units² (m² on a geographic CRS or Web Mercator): smaller regions merge into neighbours.")
@click.option("--min-pixels", type=int, default=None, callback=_non_negative, help="Minimum mapping unit in pixels (instead of --min-area).")
@click.option("--connectivity", type=click.Choice(["4", "8"]), default="4", show_default=True, help="Pixel connectivity of regions.")
@click.option(
    "--simplify", type=float, default=None, callback=_non_negative,
    help="Coverage simplification tolerance in map units, m on a geographic CRS or Web Mercator (default: one pixel; 0 keeps pixel edges).",
)
@click.option("--classes", "keep", default=None, metavar="LIST",
              help="Write the polygons of these classes only (ids or names, e.g. building); the sieve and the "
                   "simplification still see every class.")
@overwrite_opt
def vectorize(
    mask: Path, out: Path | None, fmt: str | None, min_area: float | None, min_pixels: int | None,
    connectivity: str, simplify: float | None, keep: str | None, overwrite: bool,
) -> None:
    """Turn a class raster MASK into topologically clean land-cover polygons.

    Prints the output path on stdout.
    """
    if min_area is not None and min_pixels is not None:
        raise click.BadParameter("give --min-area or --min-pixels, not both", param_hint="--min-area")
    if out is None:
        out = vec.default_out_path(mask, fmt or "gpkg")
    result = vec.vectorize_mask(
        mask, out, fmt=fmt, min_area=min_area, min_pixels=min_pixels,  # type: ignore[arg-type]
        connectivity=int(connectivity), simplify=simplify, overwrite=overwrite,
        keep_classes=class_list(keep),
    )
    click.echo(str(result.path))
