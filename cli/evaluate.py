"""``geoseg evaluate``: accuracy of a predicted class raster against reference labels."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give class ids separated by commas, e.g. 1,3,4") from None


def _ignore_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """None when not given (the library's default), () for 'none' or '', else the ids."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    return _int_list(ctx, param, value)


@click.command(short_help="Confusion matrix, IoU, F1, OA and kappa of a prediction vs. a reference.")
@click.argument("prediction", type=click.Path(path_type=Path))
@click.option("-r", "--reference", type=click.Path(path_type=Path), required=True,
              help="Reference labels: a raster on the same grid as PREDICTION, or points/polygons in any CRS "
                   "(GeoPackage, shapefile, GeoJSON ...; a point is scored on the pixel it falls in, a polygon on "
                   "the pixels whose centres it contains).")
@click.option("--field", default=None, metavar="NAME",
              help="Vector reference: the attribute with each feature's class, as ids or class names "
                   "[default: class_id].")
@click.option("--background", default=None, metavar="CLASS",
              help="Vector reference: the class (id or name) of every pixel outside the polygons, which are then a "
                   "complete map (e.g. 0 around building footprints: false positives count too). With a two-class "
                   "prediction --field may be left out: every polygon is the other class.")
@click.option("--stratified", is_flag=True,
              help="Vector points that are a stratified random (or simple random, systematic) sample of the map: also "
                   "print area-weighted accuracies and error-adjusted class areas with 95 % CIs (Olofsson et al. 2014; "
                   "strata = the map's classes).")
@click.option("--region", default=None, metavar="COL,ROW,WIDTH,HEIGHT",
              help="Only count pixels in this pixel window, e.g. 326,0,163,443 for the NC test columns.")
@click.option("--classes", callback=_int_list, default=None, metavar="IDS",
              help="Class ids of the matrix (default: the prediction's class table, else the ids present).")
@click.option("--miou-classes", callback=_int_list, default=None, metavar="IDS",
              help="Class ids averaged into mIoU (default: those present in the reference in the region).")
@click.option("--ignore", callback=_ignore_list, default=None, metavar="IDS|none",
              help="Reference values that mean unlabelled (the rasters' nodata values are ignored too). "
                   "Default: 0, unless 0 is one of the classes (e.g. cloud in a cloud mask); none for no value.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
@click.option("--record-card", type=click.Path(path_type=Path), default=None, metavar="CARD.yaml",
              help="Also store mIoU, OA, kappa and per-class IoU in this model card (a weights.yaml, not an export's "
                   "deploy.yaml) under metrics.<--record-as>. Checked before anything is printed: the card's classes "
                   "and its name against the model name predict tags the mask with (GEOSEG_MODEL); runs of one config "
                   "(e.g. seeds) share a name, so give the card of the weights that made PREDICTION.")
@click.option("--record-as", default="test", show_default=True, help="Key under the card's metrics for --record-card.")
def evaluate(prediction: Path, reference: Path, field: str | None, background: str | None, stratified: bool, region: str | None,
             classes: tuple[int, ...] | None, miou_classes: tuple[int, ...] | None, ignore: tuple[int, ...] | None,
             as_json: bool, record_card: Path | None, record_as: str) -> None:
    """Compare PREDICTION (e.g. <stem>_landcover.tif from predict) with --reference labels.

    Prints per-class IoU, precision, recall and F1, mIoU, overall accuracy, Cohen's kappa and
    the confusion matrix (rows = reference). Pixels that are nodata in either raster or carry
    an --ignore value in the reference are not counted. A raster reference must be on the same
    grid; field points or polygons may be in any CRS.

    \b
    Examples:
      geoseg evaluate scene_landcover.tif --reference labels.tif --region 326,0,163,443 --json
      geoseg evaluate scene_landcover.tif --reference field_points.gpkg --field landcover
      geoseg evaluate buildings_pred.tif --reference footprints.geojson --background 0
    """
    from geoseg.errors import ParameterError
    from geoseg.evaluate import (
        check_card,
        check_record_key,
        evaluate_rasters,
        evaluate_vector,
        format_table,
        record_in_card,
    )
    from geoseg.io import is_vector_path

    if record_card is not None:  # a card that cannot take these figures is refused before the evaluation runs
        check_record_key(record_as)
        check_card(record_card, prediction)
    if is_vector_path(reference):
        result = evaluate_vector(prediction, reference, field=field, region=region, classes=classes,
                                 average_over=miou_classes, ignore=ignore, stratified=stratified, background=background)
    elif field is not None or stratified or background is not None:
        used = "field" if field is not None else "stratified" if stratified else "background"
        raise ParameterError(f"--{used} is for a vector reference; {reference.name} is read as a raster")
    else:
        result = evaluate_rasters(prediction, reference, region=region, classes=classes, average_over=miou_classes,
                                  ignore=ignore)
    if record_card is not None:  # ... and before anything is printed
        check_card(record_card, prediction, result.metrics.averaged_classes)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(format_table(result))
    if record_card is not None:
        record_in_card(record_card, result, record_as)
