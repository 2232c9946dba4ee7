"""``geoseg predict``: segment one scene into a QGIS-ready land-cover mask."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from geoseg_cli import options as o


@click.command(short_help="Segment a scene into a land-cover mask (COG).")
@o.input_arg
@o.out_opt
@o.model_opt
@o.weights_opt
@o.card_opt
@o.classes_opt
@o.predict_options
@o.overwrite_opt
@click.pass_context
def predict(
    ctx: click.Context, input: Path, out: str | None, model: str | None, weights: Path | None, card: Path | None,
    classes: str | None, overwrite: bool, **predict_opts: Any,
) -> None:
    """Segment INPUT (a GeoTIFF of any size) into <stem>_landcover.tif.

    The mask is a Cloud-Optimized GeoTIFF on exactly the input's grid (CRS, transform, size),
    with a class palette, class names and a QGIS style (<stem>_landcover.qml) beside it;
    nodata (255) wherever the input is nodata. By default the mask is also vectorised into
    <stem>_landcover.gpkg (land-cover polygons, styled for QGIS). Outputs appear atomically.
    INPUT may also be a GDAL virtual path: a scene inside a zip/tar archive or in object storage
    (outputs then default to the current folder).

    \b
    Examples:
      geoseg predict scene.tif --model deeplabv3p --out out/
      geoseg predict /vsizip/downloads/scenes.zip/scene.tif --model unet
      geoseg predict scene.tif --weights my.pdparams --bands 4,3,2 --confidence uint8
      geoseg predict big.tif --tile-size 512 --overlap 128 --batch-size 4 --device gpu --precision fp16
    """
    from geoseg.engine import segment_scene

    # a terminal gets a bar; a log file (cron, a batch queue) a line a minute
    progress = False if ctx.obj.get("quiet", False) else True if sys.stderr.isatty() else "log"
    opts = o.make_predict_options(**predict_opts, overwrite=overwrite, progress=progress)
    result = segment_scene(input, out, model=model, weights=weights, card=card, classes=classes, options=opts)
    click.echo(str(result.mask))
