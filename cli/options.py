"""Shared Click options and arguments (``*_opt`` / ``*_arg``), with normalising callbacks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click


def _existing_file(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Leave existence checks to the library (one-line errors, same wording as the API); keep a GDAL
    virtual path (``/vsizip//abs/scenes.zip/a.tif``) readable as a Path."""
    from geoseg.io import scene_path

    return scene_path(value)


def _bands(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    try:
        bands = tuple(int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give 1-based band numbers separated by commas, e.g. 4,3,2") from None
    if any(b < 1 for b in bands):
        raise click.BadParameter(f"{value!r}: band numbers start at 1")
    return bands


def _positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} is not allowed: use a number >= 1")
    return value


def _file_out(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """An output that is one file: a name ending in a path separator (a folder, as predict's --out takes it) is
    refused (``--out v/x.gpkg/`` wrote the file v/x.gpkg)."""
    if value is None:
        return None
    if value.endswith(("/", os.sep)) and value.strip("/" + os.sep):
        stem = value.rstrip("/" + os.sep)
        example = f" (e.g. {stem})" if Path(stem).name not in ("", ".", "..") else " (.gpkg, .geojson or .fgb)"
        raise click.BadParameter(f"{value!r} ends with a path separator, as a folder does: this command writes one "
                                 f"file, give its name{example}")
    return Path(value)


def _tile_size(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """A window size as the models take it (:func:`geoseg.tiling.tile_size_problem`): a usage error, as 0 was,
    where 1 and 100 were failures of the run (exit 1)."""
    from geoseg.tiling import tile_size_problem

    problem = None if value is None else tile_size_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


def check_window(tile_size: int | None, overlap: int | None) -> None:
    """--overlap as large as --tile-size, both given: a usage error, as every other bad window value (it was
    exit 1). With --tile-size not given, the card's window decides, and the library checks it."""
    if tile_size is not None and overlap is not None and overlap >= tile_size:
        raise click.BadParameter(f"{overlap} must be smaller than --tile-size {tile_size}: try {tile_size // 4}",
                                 param_hint="'--overlap'")


def _non_negative(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A size, unit or tolerance: a finite number of 0 or more (a usage error; -1, nan or inf failed the run)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value:g} is not allowed: use a number >= 0")
    return value


input_arg = click.argument("input", type=click.Path(), callback=_existing_file)

out_opt = click.option(
    "-o", "--out", "out", type=click.Path(), default=None,  # (a str: a trailing '/' says "a folder")
    help="Output folder (created if its parent exists) or .tif file name. Default: beside the input.",
)
model_opt = click.option(
    "-m", "--model", "model", default=None,
    help="Model name (deeplabv3p, unet) or an exported model folder. Default: the card's architecture, else deeplabv3p.",
)
weights_opt = click.option(
    "-w", "--weights", type=click.Path(path_type=Path), default=None,
    help="Weights file (.pdparams), or a finished geoseg train run's folder (its weights.pdparams); the model card "
         "(same name, .yaml) must lie beside it or be given by --card.",
)
card_opt = click.option("--card", type=click.Path(path_type=Path), default=None, help="Model card (YAML).")
classes_opt = click.option(
    "--classes", default=None, metavar="NAMES|FILE",
    help="Class names for an exported model folder whose deploy.yaml has none (PaddleSeg exports): "
         "comma-separated names (ids 0, 1, ...) or a YAML/JSON list of {id, name, color}.")
tile_size_opt = click.option(
    "--tile-size", type=int, default=None, callback=_tile_size,
    help="Window size in pixels (default: the model card's; 128 for the shipped models).",
)
overlap_opt = click.option(
    "--overlap", type=click.IntRange(min=0), default=None, help="Overlap between windows in pixels (default: the card's; 32 for the shipped models).",
)
batch_size_opt = click.option(
    "--batch-size", type=int, default=None, callback=_positive,
    help="Windows per model call (default: 8 on GPU up to 512 px, 2 at 1024 px; on CPU about 256x256 pixels per "
         "call, at most 8: 1 for windows of about 230 px or more, 4 for 128 px).",
)
device_opt = click.option(
    "--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
    help="auto picks the GPU when paddle has CUDA and sees one.",
)
precision_opt = click.option(
    "--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
    help="fp16 autocasts on GPU (ignored with a warning on CPU).",
)
bands_opt = click.option(
    "--bands", callback=_bands, default=None, metavar="LIST",
    help="1-based input bands to feed the model, in order, e.g. 4,3,2.",
)
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
confidence_opt = click.option(
    "--confidence", type=click.Choice(["none", "uint8", "float32"]), default="none", show_default=True,
    help="Also write <scene>_confidence.tif: max class probability (uint8 0-100 or float32 0-1).",
)
probabilities_opt = click.option(
    "--probabilities", type=click.Choice(["none", "uint8", "float32"]), default="none", show_default=True,
    help="Also write <scene>_probabilities.tif: every class's probability, one band per class in the card's "
         "order (uint8 0-100 or float32 0-1); the mask is their argmax.",
)
aoi_opt = click.option(
    "--aoi", default=None, metavar="FILE|BOX",
    help="Only this area of interest: polygons in a vector file (any CRS) or minx,miny,maxx,maxy in the scene's "
         "CRS. The outputs cover its bounding box on the scene's pixel grid, nodata outside the polygons; windows "
         "outside it are never read.",
)
co_opt = click.option(
    "--co", "creation_options", multiple=True, metavar="NAME=VALUE",
    help="Extra GDAL creation option for the mask COG (repeatable), e.g. --co COMPRESS=ZSTD; one the COG driver "
    "does not take, a lossy codec (JPEG, WEBP, LERC with MAX_Z_ERROR >= 0.5), one that warps (TILING_SCHEME, TARGET_SRS) "
    "or an OVERVIEW_RESAMPLING other than MODE or NEAREST is refused before any work.",
)


blend_opt = click.option(
    "--blend", type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True,
    help="Weighting of overlapping windows.",
)
vector_opt = click.option(
    "--vector", type=click.Choice(["gpkg", "geojson", "fgb", "none"]), default="gpkg", show_default=True,
    help="Also write land-cover polygons <stem>_landcover.<ext> (none: mask only).",
)
min_area_opt = click.option("--min-area", type=float, default=None, callback=_non_negative, help="Polygons: minimum mapping unit in map units², m² on a geographic CRS or Web Mercator (sieve).")
simplify_opt = click.option(
    "--simplify", type=float, default=None, callback=_non_negative,
    help="Polygons: simplification tolerance in map units, m on a geographic CRS or Web Mercator (default one pixel; 0 keeps pixel edges).",
)
def class_list(text: str | None) -> tuple[str, ...] | None:
    """Comma-separated class ids or names (``--vector-classes``, ``vectorize --classes``); None when not given."""
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


vector_classes_opt = click.option(
    "--vector-classes", default=None, metavar="LIST",
    help="Polygons: write those of these classes only (ids or names, e.g. building); the mask keeps every class.",
)

tta_opt = click.option(
    "--tta", is_flag=True,
    help="Average the model over the 8 flips/rotations of each window (8x the model time).",
)

adapt_prior_opt = click.option(
    "--adapt-prior/--no-adapt-prior", "adapt_prior", default=None,
    help="Re-estimate the scene's class mix from the model's own probabilities (EM, no labels) and correct "
         "them for it: for scenes whose land cover differs from the training area's. Default: the model "
         "card's adapt_prior. Adds a first pass over (a sample of) the windows.",
)

#: The options of ``predict`` that ``batch`` shares, in help order.
PREDICT_OPTIONS = (
    aoi_opt, tile_size_opt, overlap_opt, batch_size_opt, device_opt, precision_opt, bands_opt, tta_opt,
    adapt_prior_opt, confidence_opt, probabilities_opt,
    blend_opt, co_opt, vector_opt, min_area_opt, simplify_opt, vector_classes_opt,
)


def predict_options(f: Any) -> Any:
    """Decorate a command with :data:`PREDICT_OPTIONS`."""
    for opt in reversed(PREDICT_OPTIONS):
        f = opt(f)
    return f


def make_predict_options(
    *, tile_size: int | None, overlap: int | None, batch_size: int | None, device: str, precision: str,
    bands: tuple[int, ...] | None, confidence: str, blend: str, creation_options: tuple[str, ...], vector: str,
    min_area: float | None, simplify: float | None, tta: bool = False, adapt_prior: bool | None = None,
    probabilities: str = "none", aoi: str | None = None, vector_classes: str | None = None, **extra: Any,
) -> Any:
    """Build :class:`geoseg.engine.PredictOptions` from the values of :data:`PREDICT_OPTIONS`.

    ``extra`` holds the other PredictOptions fields (overwrite, progress, threads ...).
    """
    from geoseg.blending import BlendMode
    from geoseg.engine import PredictOptions

    check_window(tile_size, overlap)
    return PredictOptions(
        tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=device,  # type: ignore[arg-type]
        precision=precision, bands=bands, blend=BlendMode(blend), confidence=confidence,  # type: ignore[arg-type]
        creation_options=parse_co(creation_options), vector=vector,  # type: ignore[arg-type]
        min_area=min_area, simplify=simplify, tta=tta, adapt_prior=adapt_prior,
        probabilities=probabilities, aoi=aoi,  # type: ignore[arg-type]
        vector_classes=class_list(vector_classes),
        **extra,
    )


def parse_co(values: tuple[str, ...]) -> dict[str, str]:
    """Turn ``("KEY=VAL", ...)`` into a dict, or raise ``click.BadParameter``."""
    out: dict[str, str] = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: use NAME=VALUE", param_hint="--co")
        k, val = v.split("=", 1)
        key = k.strip().upper()
        if not key:  # (GDAL then said "'X' is an unexpected value for  creation option")
            raise click.BadParameter(f"{v!r}: the option has no name: use NAME=VALUE", param_hint="--co")
        if key in out and out[key] != val.strip():  # (the last one won without a word)
            raise click.BadParameter(f"{key} is given twice ({out[key]} and {val.strip()}): give it once",
                                     param_hint="--co")
        out[key] = val.strip()
    return out
