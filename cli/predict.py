"""``geoseg predict``: segment one scene into a QGIS-ready land-cover mask."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geoseg_cli import options as o


@click.command(short_help="Segment a scene into a land-cover mask (COG).")
@o.input_arg
@o.out_opt
@click.option(
    "-m", "--model", default=None,
    help="Model name (deeplabv3p, unet) or an exported model folder. Default: the card's architecture, else deeplabv3p.",
)
@o.weights_opt
@o.card_opt
@click.option("--classes", default=None, metavar="NAMES|FILE",
              help="Class names for an exported model folder whose deploy.yaml has none (PaddleSeg exports): "
                   "comma-separated names (ids 0, 1, ...) or a YAML/JSON list of {id, name, color}.")
@o.tile_size_opt
@o.overlap_opt
@o.batch_size_opt
@o.device_opt
@o.precision_opt
@o.bands_opt
@o.confidence_opt
@click.option("--blend", type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True,
              help="Weighting of overlapping windows.")
@click.option("--vector", type=click.Choice(["gpkg", "geojson", "fgb", "none"]), default="gpkg", show_default=True,
              help="Also write land-cover polygons <stem>_landcover.<ext> (none: mask only).")
@click.option("--min-area", type=float, default=None, help="Polygons: minimum mapping unit in map units² (sieve).")
@click.option("--simplify", type=float, default=None, help="Polygons: simplification tolerance in map units (default one pixel; 0 keeps pixel edges).")
@o.co_opt
@o.overwrite_opt
@click.pass_context
def predict(
    ctx: click.Context, input: Path, out: Path | None, model: str | None, weights: Path | None, card: Path | None,
    classes: str | None,
    tile_size: int | None, overlap: int | None, batch_size: int | None, device: str, precision: str,
    bands: tuple[int, ...] | None, confidence: str, blend: str, vector: str, min_area: float | None,
    simplify: float | None, creation_options: tuple[str, ...], overwrite: bool,
) -> None:
    """Segment INPUT (a GeoTIFF of any size) into <stem>_landcover.tif.

    The mask is a Cloud-Optimized GeoTIFF on exactly the input's grid (CRS, transform, size),
    with a class palette, class names and a QGIS style (<stem>_landcover.qml) beside it;
    nodata (255) wherever the input is nodata. By default the mask is also vectorised into
    <stem>_landcover.gpkg (land-cover polygons, styled for QGIS). Outputs appear atomically.

    \b
    Examples:
      geoseg predict scene.tif --model deeplabv3p --out out/
      geoseg predict scene.tif --weights my.pdparams --bands 4,3,2 --confidence uint8
      geoseg predict big.tif --tile-size 512 --overlap 128 --batch-size 4 --device gpu --precision fp16
    """
    from geoseg.blending import BlendMode
    from geoseg.engine import PredictOptions, segment_scene

    opts = PredictOptions(
        tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device,  # type: ignore[arg-type]
        precision=precision, bands=bands, blend=BlendMode(blend), confidence=confidence,  # type: ignore[arg-type]
        creation_options=o.parse_co(creation_options), overwrite=overwrite,
        vector=vector, min_area=min_area, simplify=simplify,  # type: ignore[arg-type]
        progress=sys.stderr.isatty() and not ctx.obj.get("quiet", False),
    )
    result = segment_scene(input, out, model=model, weights=weights, card=card, classes=classes, options=opts)
    click.echo(str(result.mask))
