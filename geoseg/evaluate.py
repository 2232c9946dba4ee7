"""Evaluate a predicted class raster against reference labels, block by block.

The reference is a raster on the same grid (size, geotransform, CRS; otherwise
:class:`~geoseg.errors.GridMismatchError` says which property differs), or vector data
(:func:`evaluate_vector`): field points, each scored on the prediction pixel it falls in, and
polygons, every pixel whose centre they contain, in any CRS. Pixels equal to either
raster's nodata value (255 in a uint8 prediction without one: geoseg's mask nodata), hidden by either
raster's mask band, equal to an ``ignore`` value of the reference, or outside ``region`` are not
counted. Class ids are the values of the rasters (e.g. 1..7; a floating-point reference is taken
when every value is a whole id, as ``geoseg train`` takes one); by default they are the union of
the ids present in the reference and the prediction (minus ignored values), or the class table
geoseg stores in the prediction's tags.

Memory stays bounded: the rasters are read in blocks of rows (``block_rows`` × width).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.card import ClassInfo
from geoseg.config import checked_arguments, plain
from geoseg.errors import (
    EvaluationWarning,
    GeosegError,
    OutputError,
    GridMismatchError,
    NoCRSWarning,
    ParameterError,
    SceneError,
    SceneReadError,
    warn,
)
from geoseg.io import (
    MASK_NODATA,
    NO_LABEL,
    VectorData,
    GeoAreas,
    ProjectedAreas,
    has_mask_band,
    image_values,
    area_units,
    ids_by_text,
    band_class_names,
    means_no_data,
    unmarked_255,
    ogr_path,
    open_raster,
    check_latitudes,
    check_seekable,
    pixel_areas,
    read_classes,
    read_vector,
    whole_class_ids,
)
from geoseg.metrics import ConfusionMatrix, Metrics, StratifiedEstimates, stratified_estimates

if TYPE_CHECKING:
    from geoseg.card import ModelCard

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "SampleResult", "check_card", "draw_sample", "evaluate_rasters", "evaluate_vector",
           "format_table", "parse_pixel_region", "record_in_card"]


@dataclass(frozen=True)
class EvalResult:
    """Metrics plus what was compared."""

    metrics: Metrics
    prediction: Path
    reference: Path
    region: tuple[int, int, int, int] | None
    #: Vector references: what was counted (points, polygons, their pixels) and what was not.
    samples: dict[str, int] | None = None
    #: Area-weighted estimates from a stratified sample of points (``stratified=True``).
    stratified: StratifiedEstimates | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``geoseg evaluate --json``): the paths, ``region``, the metrics' keys
        (:meth:`Metrics.to_dict`) at the top level, and, when there are any, ``reference_samples``
        (:attr:`samples`) and ``stratified``."""
        d = self.metrics.to_dict()
        return plain({"prediction": str(self.prediction), "reference": str(self.reference),
                      "region": list(self.region) if self.region else None,
                      **({"reference_samples": self.samples} if self.samples is not None else {}),
                      **({"stratified": self.stratified.to_dict()} if self.stratified is not None else {}), **d})


def parse_pixel_region(spec: str | Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """``"col_off,row_off,width,height"`` (or a 4-sequence) → a tuple; ``None`` passes through."""
    if spec is None:
        return None
    parts = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    try:
        vals = tuple(int(v) for v in parts)
    except (TypeError, ValueError):
        raise ParameterError(f"region {spec!r}: give col_off,row_off,width,height in pixels") from None
    if len(vals) != 4 or vals[2] < 1 or vals[3] < 1 or vals[0] < 0 or vals[1] < 0:
        raise ParameterError(f"region {spec!r}: give col_off,row_off,width,height in pixels (width, height >= 1)")
    return vals  # type: ignore[return-value]


def _open(path: Path, what: str) -> Any:
    if not path.exists():
        raise SceneReadError(f"{what} {path} does not exist: check the path")
    check_seekable(path, what)
    try:
        ds = open_raster(path)
    except rasterio.errors.RasterioError as exc:
        raise SceneReadError(f"{what} {path} cannot be read: {str(exc).splitlines()[0]}") from None
    try:  # (a degree grid beyond the poles: its stratified areas came out null)
        check_latitudes(f"{what} {path}", path.name, ds.crs, ds.transform, ds.width, ds.height)
    except BaseException:
        ds.close()
        raise
    return ds


def check_class_raster(ds: Any, what: str, *, whole_floats: bool = False, described: bool = False) -> None:
    """Refuse a raster that cannot be a class map: several bands (an image, a probabilities raster),
    floating-point values (with ``whole_floats``, those are checked block by block as they are read
    instead: see :func:`_read_classes`), or an image band: more distinct values than a class raster
    without class names holds (:func:`geoseg.io.image_values`; ``described``: the class ids are given)."""
    name = Path(ds.name).name
    if ds.count > 1:
        hint = ("give the label raster, not the image" if what == "reference" else
                "give the mask geoseg predict wrote (<scene>_landcover.tif), not an image or a probabilities raster")
        raise SceneError(f"{what} {name} has {ds.count} bands, a class raster has one: {hint}")
    floating = np.issubdtype(np.dtype(ds.dtypes[0]), np.floating)
    if not floating and not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
        raise SceneError(f"{what} {name} holds {ds.dtypes[0]} values, a class raster holds integers: give the class map")
    if floating and not whole_floats:
        raise SceneError(f"{what} {name} holds {ds.dtypes[0]} values, a class raster holds integers: give the class "
                         "map (the probabilities' argmax is the mask predict writes), or, if they are whole class ids, "
                         f"convert it first (gdal_translate -ot Int32 {name} {Path(name).stem}_ids.tif; a NaN nodata "
                         "needs -a_nodata first)")
    distinct = None if described else image_values(ds)
    if distinct is not None:  # (a uint16 scene band: a point or a matrix row per grey value)
        ids = ("give --classes with them" if what != "mask" else
               "name them in band 1's CLASSES tag (gdal_edit.py -mo CLASSES=1=forest,2=water,...)")
        raise SceneError(f"{what} {name} has {distinct} distinct values in a sample and no class names: that is an "
                         f"image, not class ids; give the class map, or, if they are class ids, {ids}")


def _read_classes(ds: Any, window: Window) -> np.ndarray:
    """Band 1 of ``ds`` in ``window`` as class ids (:func:`geoseg.io.whole_class_ids`: a floating-point
    reference's nodata and NaN pixels as ``NO_LABEL``, values that are not whole ids refused)."""
    return whole_class_ids(ds.read(1, window=window), ds.nodata, f"reference {Path(ds.name).name} holds",
                           "give the class map (for probabilities, their argmax), or labels whose values are whole "
                           "ids (nodata may be any value)")


def _shown(ds: Any, window: Window) -> np.ndarray | None:
    """Where the mask band of ``ds`` shows the pixels of ``window`` (False: hidden, i.e. nodata, as
    ``geoseg vectorize`` takes them); ``None`` without a mask band."""
    return ds.read_masks(1, window=window) != 0 if has_mask_band(ds) else None


def _reference_nodata(ds: Any) -> list[int]:
    """The reference's nodata as class-id values not to count (see :func:`_read_classes`)."""
    if np.issubdtype(np.dtype(ds.dtypes[0]), np.floating):
        return [NO_LABEL]
    nodata = ds.nodata
    if nodata is None or not (math.isfinite(nodata) and float(nodata).is_integer()):
        return []  # (a nodata of 2.5 matches no class id: int() made it 2, and class 2 vanished)
    return [int(nodata)]


def reference_part(pred: Any, ref: Any) -> tuple[int, int] | None:
    """``(col, row)`` of the grid of ``pred`` in that of ``ref`` when it covers whole pixels of it, but not all
    (a ``predict --aoi`` mask against the scene's label raster, or labels of part of a scene: they were
    refused, "resample one onto the other"), else None: same CRS and pixel size and rotation, and its
    origin on a pixel corner."""
    if pred.crs is None or ref.crs is None or pred.crs != ref.crs:
        return None
    pt, rt = pred.transform, ref.transform
    tol = 1e-6 * max(abs(rt.a), abs(rt.e), 1e-12)
    if any(abs(x - y) > tol for x, y in zip((pt.a, pt.b, pt.d, pt.e), (rt.a, rt.b, rt.d, rt.e))):
        return None
    col, row = ~rt @ (pt.c, pt.f)
    c, r = round(col), round(row)
    if abs(col - c) > 1e-6 or abs(row - r) > 1e-6 or c < 0 or r < 0:
        return None
    if c + pred.width > ref.width or r + pred.height > ref.height or (c, r, pred.width, pred.height) == (
            0, 0, ref.width, ref.height):
        return None
    return int(c), int(r)


class _Part:
    """A dataset read through a window of it (:func:`reference_part`): its reads and masks of a window are
    those of the window moved to ``(col, row)``; the rest is the dataset's."""

    def __init__(self, ds: Any, col: int, row: int, width: int, height: int) -> None:
        self._ds, self._col, self._row, self.width, self.height = ds, col, row, width, height

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def _moved(self, window: Window | None) -> Window:
        w = window if window is not None else Window(0, 0, self.width, self.height)
        return Window(w.col_off + self._col, w.row_off + self._row, w.width, w.height)

    def read(self, *args: Any, window: Window | None = None, **kwargs: Any) -> Any:
        return self._ds.read(*args, window=self._moved(window), **kwargs)

    def read_masks(self, *args: Any, window: Window | None = None, **kwargs: Any) -> Any:
        return self._ds.read_masks(*args, window=self._moved(window), **kwargs)


def check_grids(pred: Any, ref: Any) -> None:
    """Raise :class:`GridMismatchError` naming the first grid property that differs."""
    p, r = Path(pred.name).name, Path(ref.name).name
    if (pred.width, pred.height) != (ref.width, ref.height):
        raise GridMismatchError(
            f"grids do not match: {p} is {pred.width}x{pred.height} pixels but {r} is {ref.width}x{ref.height}; "
            "predict on the reference's grid or resample one onto the other"
        )
    tol = 1e-6 * max(abs(ref.transform.a), abs(ref.transform.e), 1e-12)
    if not pred.transform.almost_equals(ref.transform, precision=tol):
        raise GridMismatchError(
            f"grids do not match: {p} and {r} have different geotransforms "
            f"({tuple(pred.transform)[:6]} vs {tuple(ref.transform)[:6]}): they are shifted or have other pixel sizes"
        )
    if (pred.crs is None) != (ref.crs is None) or (pred.crs is not None and pred.crs != ref.crs):
        raise GridMismatchError(f"grids do not match: {p} has CRS {pred.crs} but {r} has CRS {ref.crs}")
    if pred.count < 1 or ref.count < 1:
        raise GridMismatchError("a raster has no bands")


@checked_arguments
def evaluate_rasters(
    prediction: str | Path,
    reference: str | Path,
    *,
    region: str | Sequence[int] | None = None,
    classes: Sequence[int] | None = None,
    average_over: Sequence[int] | None = None,
    ignore: Sequence[int] | None = None,
    block_rows: int = 256,
) -> EvalResult:
    """Compare a predicted class raster with a reference raster (band 1 of each).

    Args:
        prediction: Class raster (e.g. from ``geoseg predict``). Its nodata value (255 in a uint8
            map without one: geoseg's mask nodata) and the pixels its mask band hides have no prediction and are
            not counted; values that are not among the classes are added to them (counted as
            errors), with a warning.
        reference: Reference labels; its nodata, the pixels its mask band hides and ``ignore``
            values are not counted.
        region: Optional pixel window ``col_off,row_off,width,height`` to restrict the comparison.
        classes: Class ids in matrix order (default: from the prediction's class table, else
            the ids present in either raster).
        average_over: Class ids averaged into mIoU / mean F1 (default: classes present in the
            reference within the region).
        ignore: Reference values that mean "not labelled" (default: 0, unless 0 is one of the
            classes, from ``classes`` or the prediction's class table, as in a cloud mask).
        block_rows: Rows read per block.

    Returns:
        The :class:`EvalResult`.
    """
    pred_path, ref_path = Path(prediction), Path(reference)
    win = parse_pixel_region(region)
    _check_block_rows(block_rows)
    with _open(pred_path, "prediction") as pds, _open(ref_path, "reference") as rds:
        check_class_raster(pds, "prediction", described=classes is not None)
        check_class_raster(rds, "reference", whole_floats=True, described=classes is not None)
        part, labels_part = reference_part(pds, rds), reference_part(rds, pds)
        if part is not None:  # (a predict --aoi mask against the scene's labels)
            log.info("%s covers columns %d-%d, rows %d-%d of %s's grid: compared there", pred_path.name, part[0],
                     part[0] + pds.width - 1, part[1], part[1] + pds.height - 1, ref_path.name)
            rds = _Part(rds, part[0], part[1], pds.width, pds.height)
        elif labels_part is not None:  # (labels of part of the scene)
            log.info("%s covers columns %d-%d, rows %d-%d of %s's grid: compared there", ref_path.name,
                     labels_part[0], labels_part[0] + rds.width - 1, labels_part[1], labels_part[1] + rds.height - 1,
                     pred_path.name)
            pds = _Part(pds, labels_part[0], labels_part[1], rds.width, rds.height)
        else:
            check_grids(pds, rds)
        box = _region_box(win, rds.width, rds.height)
        table = read_classes(pds)
        names = _class_names(table, pds, rds)
        ignore_given = ignore is not None
        ignore = _default_ignore(ignore, classes, table, pds, rds)
        ref_ignore = list(ignore) + _reference_nodata(rds)
        pred_ignore = _prediction_ignore(pds)
        pred_ids, ref_ids = _present_ids(pds if classes is None and not table else None, rds, box, block_rows,
                                         set(pred_ignore), set(ref_ignore))
        if classes is None:
            ids = [c.id for c in table] if table else sorted((set(pred_ids) | set(ref_ids)) - set(ref_ignore)
                                                             - set(pred_ignore))
        else:
            ids = list(dict.fromkeys(int(c) for c in classes))  # (an id given twice counts once: it crashed)
        ids = _with_reference_ids(ids, ref_ids, pred_ignore, given=classes is not None)
        cm = ConfusionMatrix(ids, ignore_reference=ref_ignore, ignore_prediction=pred_ignore,
                             add_predicted_classes=True)
        c0, r0, w, h = box
        for row in range(r0, r0 + h, block_rows):
            nrows = min(block_rows, r0 + h - row)
            window = Window(c0, row, w, nrows)
            cm.update(_read_classes(rds, window), pds.read(1, window=window), labelled=_shown(rds, window),
                      predicted=_shown(pds, window))
        _with_predicted_ids(cm, ids, ignore, ignore_given)
        ref_nodata = "none" if rds.nodata is None else f"{rds.nodata:g}"
    m = _metrics(cm, average_over, table, names)
    _warn_uncounted(m, "pixels")
    if m.total == 0:
        raise ParameterError(_nothing_scored(cm, box if win is not None else None, pred_path, ref_path, ignore,
                                             ref_nodata))
    if m.unpredicted:
        warn(f"{m.unpredicted} labelled reference pixels have no prediction (nodata): not counted", EvaluationWarning)
    return EvalResult(m, pred_path, ref_path, box if win is not None else None)


def _nothing_scored(cm: ConfusionMatrix, region: tuple[int, int, int, int] | None, pred: Path, ref: Path,
                    ignore: Sequence[int], ref_nodata: str) -> str:
    """Why no pixel was scored: how many were unlabelled in the reference, how many had no prediction."""
    where = f"region {','.join(map(str, region))}" if region is not None else "the rasters"
    n = cm.ignored_reference + cm.unpredicted + cm.unknown_reference
    why = []
    if cm.ignored_reference:
        values = f"nodata {ref_nodata}" + (f" or --ignore {','.join(map(str, ignore))}" if ignore else "")
        why.append(f"{cm.ignored_reference} are unlabelled in {ref.name} ({values})")
    if cm.unpredicted:
        why.append(f"{cm.unpredicted} labelled ones have no prediction (nodata in {pred.name})")
    if cm.unknown_reference:
        why.append(f"{cm.unknown_reference} have reference values that are not among the classes")
    return (f"nothing was scored in {where}: of its {n} pixels, {' and '.join(why) or 'none is left'}; "
            + ("choose a region where both rasters have data" if region is not None
               else "check that both rasters cover the same area"))


def _check_block_rows(block_rows: int) -> None:
    if not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1:
        raise ParameterError(f"block_rows {block_rows!r}: give a whole number of rows >= 1")


def _region_box(win: tuple[int, int, int, int] | None, W: int, H: int) -> tuple[int, int, int, int]:
    """``(col, row, width, height)`` of the pixel window ``win`` clipped to a W x H raster (all of it for None)."""
    if win is None:
        return (0, 0, W, H)
    c, r, w, h = win
    if c >= W or r >= H:
        raise ParameterError(f"region {win} lies outside the {W}x{H} raster")
    box = (c, r, min(w, W - c), min(h, H - r))
    if box != tuple(win):
        warn(f"region {','.join(map(str, win))} reaches past the {W}x{H} raster: clipped to {','.join(map(str, box))}",
             EvaluationWarning)
    return box


def _default_ignore(ignore: Sequence[int] | None, classes: Sequence[int] | None, table: Any,
                    *tagged: Any) -> Sequence[int]:
    """Reference values not counted: as given, else 0 unless 0 is one of the classes (of ``classes``,
    else of the prediction's class ``table``, else of the band ``CLASSES`` tags of the ``tagged``
    datasets: another tool's cloud mask says ``0=cloud`` there)."""
    if ignore is not None:
        return ignore
    if classes is not None:
        class_ids = {int(c) for c in classes}
    elif table:
        class_ids = {c.id for c in table}
    else:  # (a tag may name the unlabelled value too: "0=no_data")
        class_ids = {cid for ds in tagged for cid, name in band_class_names(ds).items() if not means_no_data(name)}
    return () if 0 in class_ids else (0,)


def _prediction_ignore(pds: Any) -> list[int]:
    """Prediction values that mean "no prediction": the map's nodata value, 255 (geoseg's mask nodata)
    in a uint8 map without one, unless the map names 255 as a class (:func:`geoseg.io.unmarked_255`, as
    vectorize and sample take it; with another nodata value, or in a wider map, 255 is a class like any
    other), and, without geoseg's class table, values band 1's ``CLASSES`` tag (or category names) names
    as no data."""
    nodata = pds.nodata
    out = [MASK_NODATA] if unmarked_255(pds) else []
    if nodata is not None and np.isfinite(nodata) and float(nodata) == int(nodata) and int(nodata) not in out:
        out.append(int(nodata))
    # a value band 1's CLASSES tag names as no data (another tool's "0=no_data", without a nodata value); not in
    # a map with geoseg's class table, whose classes are all classes (a model's class "none" or "unknown" was
    # left uncounted through the category names of the mask's .aux.xml: a map 9 % wrong scored OA 1)
    if not read_classes(pds):
        out += [v for v, name in band_class_names(pds).items() if means_no_data(name) and v not in out]
    return out


def _ids(values: Sequence[int], most: int = 12) -> str:
    """A list of ids for a message: whole up to ``most``, else its first and last few and how many (a
    map of 4,000 grey values listed every one)."""
    values = list(values)
    if len(values) <= most:
        return str(values)
    head, tail = ", ".join(map(str, values[: most - 2])), ", ".join(map(str, values[-2:]))
    return f"[{head}, ..., {tail}] ({len(values)} in all)"


def _with_predicted_ids(cm: ConfusionMatrix, ids: Sequence[int], ignore: Sequence[int] = (),
                        ignore_given: bool = True) -> None:
    """Say which prediction values ``cm`` took as classes beside ``ids`` (they count as errors); when 0
    is one of them and the reference's 0 was left out by default, say how to count it as a class."""
    extra = list(cm.class_ids[len(ids):])
    if extra:
        zero = (" (if 0 is a class, as in a cloud mask, give --ignore none: the reference's 0 is not counted "
                "by default)") if 0 in extra and 0 in ignore and not ignore_given else ""
        warn(f"prediction values {_ids(extra)} are not among the classes {_ids(ids)}: counted as errors; if they mean "
             f"no prediction, give the map that nodata value (gdal_edit.py -a_nodata V){zero}", EvaluationWarning)


def _warn_uncounted(m: Metrics, what: str) -> None:
    """Warn about reference values that are not classes (not counted)."""
    if m.unknown_reference:
        warn(f"{m.unknown_reference} reference {what} hold values that are not among the classes {_ids(m.class_ids)}: "
             "not counted; give --classes with them", EvaluationWarning)


def _with_reference_ids(ids: list[int], ref_ids: Sequence[int], no_prediction: Sequence[int] = (),
                        given: bool = False) -> list[int]:
    """``ids`` plus the reference ids the prediction cannot produce (they still count, as misses, where the
    map has a prediction; ``no_prediction``: the map's values that mean none), or, when ``ids`` are the
    ``given`` --classes, that these leave out."""
    extra = [i for i in ref_ids if i not in ids]
    if extra and given:  # (it called --classes 99 "the predicted classes [99]" and its classes "errors")
        warn(f"reference classes {_ids(extra)} are not among the classes given {_ids(ids)}: counted as classes too",
             EvaluationWarning)
    elif extra:
        nodata = [i for i in extra if i in no_prediction]
        # (it read as a contradiction beside "... have no prediction (nodata): not counted")
        why = (f" ({', '.join(map(str, nodata))} {'is' if len(nodata) == 1 else 'are'} the prediction's nodata: "
               "it cannot predict them)") if nodata else ""
        warn(f"reference classes {_ids(extra)} are not among the predicted classes {_ids(ids)}: counted as errors where the map "
             f"has a prediction{why}", EvaluationWarning)
    return ids + extra


def _class_names(table: Any, *datasets: Any) -> dict[int, str]:
    """Class names for the table: the prediction's class ``table``, else the names the ``datasets`` carry
    (geoseg's class table, band 1's CLASSES tag or GDAL category names; the first dataset's first), values
    named as no data left out (a 0/255 map named 255=building showed class_0 and class_255, where vectorize
    and sample said background and building)."""
    names: dict[int, str] = {}
    for ds in reversed(datasets):
        tagged = read_classes(ds)
        names.update({c.id: c.name for c in tagged} if tagged else
                     {v: n for v, n in band_class_names(ds).items() if not means_no_data(n)})
    if table:
        names.update({c.id: c.name for c in table})
    return names


def _metrics(cm: ConfusionMatrix, average_over: Sequence[int] | None, table: Any,
             names: dict[int, str] | None = None) -> Metrics:
    """The metrics of ``cm``, mIoU over ``average_over`` (default: the classes the reference holds);
    ``names``: the classes' names (default: the class ``table``'s)."""
    if average_over is None:
        seen = cm.matrix.sum(axis=1) > 0
        average_over = [c for c, p in zip(cm.class_ids, seen) if p]
    m = cm.metrics(average_over=average_over)
    absent = [int(c) for c in average_over if int(c) not in m.averaged_classes]
    if absent:
        warn(f"class{'es' if len(absent) > 1 else ''} {','.join(map(str, absent))} of --miou-classes "
             f"{'have' if len(absent) > 1 else 'has'} no reference and no predicted pixel here: left out of the mIoU "
             f"(over {','.join(map(str, m.averaged_classes)) or 'no class'})", EvaluationWarning)
    if names is None:
        names = {c.id: c.name for c in table} if table else {}
    return Metrics(**{**m.__dict__, "names": names})


@checked_arguments
def evaluate_vector(
    prediction: str | Path,
    reference: str | Path,
    *,
    field: str | None = None,
    region: str | Sequence[int] | None = None,
    classes: Sequence[int] | None = None,
    average_over: Sequence[int] | None = None,
    ignore: Sequence[int] | None = None,
    block_rows: int = 256,
    stratified: bool = False,
    background: int | str | None = None,
) -> EvalResult:
    """Compare a predicted class raster with reference points and/or polygons (any CRS).

    A point (each part of a multi-point) is one sample: the prediction pixel it falls in. A
    polygon contributes every pixel whose centre it contains (where polygons overlap, the later
    one wins), read block by block, so memory stays bounded. Points outside the prediction (or
    ``region``) and features whose class is empty are not counted and are reported in
    :attr:`EvalResult.samples`. Lines are refused.

    Args:
        prediction: Class raster (e.g. from ``geoseg predict``).
        reference: Vector file pyogrio reads (GeoPackage, shapefile, GeoJSON ...), reprojected
            to the prediction's CRS (a file without a CRS is taken to be in it).
        field: Attribute holding each feature's class: whole ids, or class names of the
            prediction's class table (case-insensitive). Default ``class_id`` (as geoseg's own
            polygons carry).
        region, classes, average_over, ignore, block_rows: as :func:`evaluate_rasters`.
        stratified: The points are a stratified random (or simple random, systematic) sample of
            the map: also give area-weighted accuracies and error-adjusted class areas with
            confidence intervals (:func:`geoseg.metrics.stratified_estimates`, strata = the map's
            classes, whose pixels are counted in the region). Points only.
        background: The class (id, or name in the prediction's class table) of every pixel of
            the prediction (or ``region``) outside the polygons: the polygons are then a complete
            map, e.g. building footprints whose surroundings are background, so false positives
            count too. With it and a two-class prediction, ``field`` may be left out (every
            polygon is the other class). Polygons only.
    """
    import shapely
    from rasterio.features import rasterize

    pred_path, ref_path = Path(prediction), Path(reference)
    win = parse_pixel_region(region)
    _check_block_rows(block_rows)
    with _open(pred_path, "prediction") as pds:
        check_class_raster(pds, "prediction", described=classes is not None)
        if pds.crs is None and (pds.transform.is_identity or pds.gcps[0] or pds.rpcs):
            raise GridMismatchError(f"prediction {pred_path.name} is not on a map grid (no geotransform): warp it "
                                    "(gdalwarp -r near) before comparing it with vector data")
        vec = read_vector(ref_path, pds.crs, missing=f"reference {ref_path} does not exist: check the path",
                          unreadable=f"reference {ref_path} cannot be read as vector data")
        if pds.crs is None and vec.crs is not None:  # (a reference without one: read_vector says so)
            warn(f"{pred_path.name} has no CRS: the coordinates of {ref_path.name} are taken as they are", NoCRSWarning)
        table = read_classes(pds)
        names = _class_names(table, pds)
        ignore_given = ignore is not None
        ignore = _default_ignore(ignore, classes, table, pds)
        # the prediction's classes for --background: its class table, else band 1's CLASSES tag (another tool's
        # building map, "0=background,1=building", had "0 classes"), less the values that mean no prediction
        pred_ignore = _prediction_ignore(pds)
        no_prediction = set(pred_ignore)
        classes_of_map = table or [ClassInfo(cid, name, (0, 0, 0)) for cid, name in band_class_names(pds).items()
                                   if cid not in no_prediction]
        fill = None if background is None else _background_id(background, classes_of_map, ignore, pred_path)
        if fill is not None and field is None and "class_id" not in vec.fields:
            ids = [c.id for c in classes_of_map]
            others = [cid for cid in ids if cid != fill]
            if len(others) != 1:
                raise ParameterError(f"reference {ref_path.name}: give --field, the attribute holding each polygon's "
                                     f"class (without it, --background needs a two-class prediction; "
                                     f"{pred_path.name} has {len(ids)} classes"
                                     + ("" if ids else ", and no class table or CLASSES tag") + ")")
            feature_ids = np.full(len(vec.geoms), others[0], np.int64)
        else:
            feature_ids = _reference_classes(vec, field, table, ref_path)
        present = ~shapely.is_missing(vec.geoms) & ~shapely.is_empty(vec.geoms)
        unlabelled = int((present & (feature_ids == _NO_CLASS)).sum())
        # (a field sample without a geometry, NULL, EMPTY or NaN coordinates, vanished without a word)
        no_geometry = int((~present & (feature_ids != _NO_CLASS)).sum())
        keep = present & (feature_ids != _NO_CLASS)
        # single parts (multi-points: one sample per point; collections opened), in file order
        parts, owner = shapely.get_parts(vec.geoms[keep], return_index=True)
        part_ids = feature_ids[keep][owner]
        kinds = shapely.get_type_id(parts)
        if np.isin(kinds, (1, 2)).any():
            raise ParameterError(f"reference {ref_path.name} has lines: give points or polygons (buffer lines into "
                                 "polygons first)")
        is_point, is_poly = kinds == 0, kinds == 3
        if not (is_point.any() or is_poly.any()):
            raise ParameterError(f"reference {ref_path.name} has no points or polygons with a class")
        if fill is not None and is_point.any():
            raise ParameterError(f"--background makes {ref_path.name} a complete map of polygons; it has points: "
                                 "evaluate points without --background")
        if stratified and is_poly.any():
            raise ParameterError(f"--stratified needs sample points; {ref_path.name} has polygons (a polygon is not a "
                                 "sample unit of a stratified random sample)")
        c0, r0, w, h = _region_box(win, pds.width, pds.height)
        if stratified:
            # the strata: every map class with pixels in the region, sampled or not
            # (ground areas: geodesic m² row by row on a geographic CRS, pixel by pixel on Web Mercator; pixels on a
            # grid without a CRS)
            areas = pixel_areas(pds.crs, pds.transform, pds.height, pds.width)  # (ellipsoidal m² on Web Mercator)
            counts, row_area = _value_counts(pds, (c0, r0, w, h), block_rows,
                                             row_area=areas if isinstance(areas, GeoAreas) else None)
            if not ignore_given and 0 in ignore and counts.get(0):
                # 0 is a stratum, a class of the map: a reference 0 is that class, not "unlabelled" (left out,
                # the stratum could never be sampled: the estimates were wrong, overall accuracy 0.47 for 0.89)
                ignore = tuple(v for v in ignore if v != 0)

        # points: one sample each, the pixel they fall in
        pt_ids = part_ids[is_point]
        xy = shapely.get_coordinates(parts[is_point])
        cols_f, rows_f = ~pds.transform @ (xy[:, 0], xy[:, 1])
        cols, rows = np.floor(cols_f).astype(np.int64), np.floor(rows_f).astype(np.int64)
        inside = (cols >= c0) & (cols < c0 + w) & (rows >= r0) & (rows < r0 + h)
        pt_pred = np.full(len(xy), MASK_NODATA, np.int64)
        pt_shown = np.ones(len(xy), bool)  # False: hidden by the prediction's mask band (no prediction)
        for b in np.unique((rows[inside] - r0) // block_rows):
            sel = inside & ((rows - r0) // block_rows == b)
            top = r0 + int(b) * block_rows
            left, right = int(cols[sel].min()), int(cols[sel].max()) + 1
            window = Window(left, top, right - left, min(block_rows, r0 + h - top))
            block, shown = pds.read(1, window=window), _shown(pds, window)
            pt_pred[sel] = block[rows[sel] - top, cols[sel] - left]
            if shown is not None:
                pt_shown[sel] = shown[rows[sel] - top, cols[sel] - left]
        if stratified and "map_class" in vec.fields:  # drawn by geoseg sample: from this map?
            drawn = np.asarray(vec.values[vec.fields.index("map_class")])[keep][owner][is_point]
            other = int((inside & pt_shown & (drawn.astype(np.float64) != pt_pred)).sum())
            if other:
                warn(f"{other} sample points lie on another class than the map_class they were drawn on: the sample "
                     "comes from another map, and the stratified estimates take this map's classes as its strata",
                     EvaluationWarning)

        poly_geoms, poly_ids = parts[is_poly], part_ids[is_poly]
        tree = shapely.STRtree(poly_geoms) if len(poly_geoms) else None

        def polygon_blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
            """``(burned reference ids, prediction, inside a polygon, shown by the prediction's mask band)``
            of each block the polygons meet (with ``background``: of every block, its other pixels burned
            as the background)."""
            if tree is None:
                return
            for row in range(r0, r0 + h, block_rows):
                window = Window(c0, row, w, min(block_rows, r0 + h - row))
                t = pds.window_transform(window)
                corners = np.array([t @ (0, 0), t @ (window.width, 0), t @ (0, window.height),
                                    t @ (window.width, window.height)])
                hits = np.sort(tree.query(shapely.box(*corners.min(0), *corners.max(0))))  # file order: later wins
                shape = (int(window.height), int(window.width))
                if fill is not None:
                    burned = (rasterize(zip(poly_geoms[hits], poly_ids[hits].tolist()), out_shape=shape, transform=t,
                                        fill=fill, dtype="int32") if len(hits) else np.full(shape, fill, np.int32))
                    yield burned, pds.read(1, window=window), np.ones(shape, bool), _shown(pds, window)
                    continue
                if not len(hits):
                    continue
                burned = rasterize(zip(poly_geoms[hits], poly_ids[hits].tolist()),
                                   out_shape=shape, transform=t, fill=_NO_BURN, dtype="int32")
                inside_poly = burned != _NO_BURN
                if inside_poly.any():
                    yield burned, pds.read(1, window=window), inside_poly, _shown(pds, window)

        ref_ids = sorted({int(v) for v in np.concatenate([pt_ids[inside], poly_ids, [] if fill is None else [fill]])}
                         - set(ignore))
        ids = list(dict.fromkeys(int(c) for c in classes)) if classes is not None else [c.id for c in table] if table else None
        if ids is None:  # no class table: the ids either side holds (a first pass over the polygons' pixels)
            predicted = {int(v) for v in pt_pred[inside & pt_shown]}
            for _, pred_block, inside_poly, shown in polygon_blocks():
                predicted.update(int(v) for v in np.unique(pred_block[inside_poly if shown is None
                                                                      else inside_poly & shown]))
            ids = sorted(set(ref_ids) | (predicted - no_prediction))
        ids = _with_reference_ids(ids, ref_ids, pred_ignore, given=classes is not None)
        cm = ConfusionMatrix(ids, ignore_reference=list(ignore), ignore_prediction=pred_ignore,
                             add_predicted_classes=True)
        cm.update(pt_ids[inside], pt_pred[inside], predicted=pt_shown[inside])
        poly_pixels = 0
        for burned, pred_block, inside_poly, shown in polygon_blocks():
            poly_pixels += int(inside_poly.sum())
            cm.update(burned, pred_block, valid=inside_poly, predicted=shown)
        _with_predicted_ids(cm, ids, ignore, ignore_given)
        map_pixels = map_area = None
        if stratified:
            cm.add_classes(sorted(counts))
            map_pixels = np.array([counts.get(c, 0) for c in cm.class_ids], np.int64)
            map_area = (np.array([row_area.get(c, 0.0) for c in cm.class_ids]) if row_area is not None
                        else map_pixels * (1.0 if areas is None else areas))
            units = area_units(pds.crs, ground=isinstance(areas, ProjectedAreas))
    pt_ignored = np.isin(pt_ids[inside], list(ignore))
    samples = {"points": int(inside.sum()), "points_outside": int((~inside).sum()),
               "points_ignored": int(pt_ignored.sum()), "polygons": len(np.unique(owner[is_poly])),
               "polygon_pixels": poly_pixels, "features_without_class": unlabelled,
               "features_without_geometry": no_geometry}
    if samples["points_outside"]:
        warn(f"{samples['points_outside']} reference points lie outside the prediction"
             f"{' region' if win is not None else ''}: not counted", EvaluationWarning)
    if samples["points_ignored"]:
        values = ",".join(str(v) for v in sorted(set(pt_ids[inside][pt_ignored])))
        warn(f"{samples['points_ignored']} reference points have class {values}, an ignored value (unlabelled; see "
             "--ignore): not counted", EvaluationWarning)
    if unlabelled:
        warn(f"{unlabelled} reference features have no class in {field or 'class_id'}: not counted", EvaluationWarning)
    if no_geometry:
        warn(f"{no_geometry} reference features with a class have no geometry (NULL, empty, or NaN coordinates): "
             "not counted", EvaluationWarning)
    m = _metrics(cm, average_over, table, names)
    if m.total == 0:
        why = [f"{n} {what}" for n, what in ((cm.ignored_reference, "have an ignored class"),
                                             (cm.unpredicted, "have no prediction (nodata)")) if n]
        raise ParameterError(f"no reference sample of {ref_path.name} falls on a predicted pixel"
                             + (" in the region" if win is not None else "") + (f" ({', '.join(why)})" if why else "")
                             + (": check --field and --ignore" if cm.ignored_reference and not cm.unpredicted
                                else ": check that both cover the same area"))
    if m.unpredicted:
        warn(f"{m.unpredicted} reference samples (points and polygon pixels) have no prediction (nodata): not counted",
             EvaluationWarning)
    _warn_uncounted(m, "samples")
    strat = None
    if map_pixels is not None:
        strat = stratified_estimates(cm.matrix.T, map_pixels, cm.class_ids, map_area=map_area, area_units=units)
        where = " in the region" if win is not None else ""
        if strat.unsampled:
            warn(f"map classes {_ids(strat.unsampled)} have pixels{where} but no sample point: their share of each "
                 "class is unknown, so the overall accuracy, producer's accuracies and class areas are not estimated "
                 "(shown as -); sample every map class (geoseg sample draws points in each)", EvaluationWarning)
        single = [c for c, n_i, px in zip(cm.class_ids, strat.samples, map_pixels) if px and n_i == 1]
        if single:
            warn(f"map classes {_ids(single)} hold 1 sample point: their accuracy has no variance (counted as 0 in the "
                 "intervals); sample at least 2 points per map class", EvaluationWarning)
    return EvalResult(m, pred_path, ref_path, None if win is None else (c0, r0, w, h), samples, strat)


def _value_counts(ds: Any, box: tuple[int, int, int, int], block_rows: int,
                  row_area: GeoAreas | None = None) -> tuple[dict[int, int], dict[int, float] | None]:
    """Pixels of each value (any integer) in the ``(col, row, width, height)`` box of band 1 of ``ds``,
    leaving out its nodata (:func:`_prediction_ignore`) and the pixels its mask band hides, and (with
    ``row_area``, the dataset's pixel areas) their summed area, in one pass."""
    c0, r0, w, h = box
    skip = _prediction_ignore(ds)
    counts: dict[int, int] = {}
    area: dict[int, float] | None = None if row_area is None else {}
    for row in range(r0, r0 + h, block_rows):
        window = Window(c0, row, w, min(block_rows, r0 + h - row))
        block = ds.read(1, window=window)
        keep = _shown(ds, window)
        if skip:
            keep = ~np.isin(block, skip) if keep is None else keep & ~np.isin(block, skip)
        values, inverse, n = np.unique(block if keep is None else block[keep], return_inverse=True,
                                       return_counts=True)
        for v, k in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + k
        if area is not None and values.size:
            a = row_area.block(row, block.shape[0], c0, w)  # per row, or per pixel on a rotated grid
            a = np.broadcast_to(a[:, None] if a.ndim == 1 else a, block.shape)
            sums = np.bincount(inverse.ravel(), weights=(a if keep is None else a[keep]).ravel(), minlength=values.size)
            for v, x in zip(values.tolist(), sums.tolist()):
                area[v] = area.get(v, 0.0) + x
    return counts, area


def _background_id(background: int | str, table: Sequence[Any] | None, ignore: Sequence[int], path: Path) -> int:
    """The class id of ``background`` (a whole id, or a class name of the prediction's ``table``)."""
    from geoseg.vectorize import resolve_classes

    fill = resolve_classes([background], {c.id: c for c in table or ()}, path.name)[0]
    if fill in ignore:
        raise ParameterError(f"--background {fill} is also an --ignore value, so its pixels would not be counted: "
                             "give --ignore none (or the values that mean unlabelled)")
    return fill


#: A vector reference feature without a class (an empty field). Class ids may be negative (an int16
#: map's classes, which geoseg sample draws), so it is no -1; burnt polygons use :data:`_NO_BURN`.
_NO_CLASS = int(np.iinfo(np.int64).min)
_NO_BURN = int(np.iinfo(np.int32).min)


def _reference_classes(vec: VectorData, field: str | None, table: Sequence[Any] | None, path: Path) -> np.ndarray:
    """Each feature's class id from ``field`` (ids or class names of ``table``); :data:`_NO_CLASS` where empty."""
    name = field or "class_id"
    if name not in vec.fields:
        shown = ", ".join(vec.fields[:12]) + (f" and {len(vec.fields) - 12} more" if len(vec.fields) > 12 else "")
        raise ParameterError(f"reference {path.name} has no field {name!r}: give --field, the attribute holding each "
                             f"feature's class (its fields: {shown or 'none'}), or, when every feature is of one "
                             "class (building footprints), --background with the class of the pixels outside them")
    col = vec.values[vec.fields.index(name)]
    bad = f"reference {path.name}: {name} must hold whole class ids or class names"
    if col.dtype.kind in "iu":
        ids = col.astype(np.int64)
    elif col.dtype.kind == "f":
        ok = np.isfinite(col)
        if np.any(col[ok] != np.round(col[ok])):
            raise ParameterError(bad)
        ids = np.where(ok, np.nan_to_num(col), _NO_CLASS).astype(np.int64)
    else:
        texts = [None if v is None else str(v).strip() for v in col]
        if all(t is None or re.fullmatch(r"[-+]?\d+", t) for t in texts):
            ids = np.array([_NO_CLASS if t is None else int(t) for t in texts], np.int64)
        else:
            ids = _reference_names(texts, table, name, path)
    given = ids[ids != _NO_CLASS]
    if given.size and (given.min() <= _NO_BURN or given.max() > np.iinfo(np.int32).max):
        raise ParameterError(f"{bad} within 32-bit integers (-2147483647 .. 2147483647)")
    return ids


def _reference_names(texts: list[str | None], table: Sequence[Any] | None, name: str, path: Path) -> np.ndarray:
    """Class ids of class names (of the prediction's ``table``), or of whole numbers among them (a
    sample's field typed partly as ids, partly as names); :data:`_NO_CLASS` where empty."""
    limit = int(np.iinfo(np.int32).max)  # (larger ones are refused as ids are, after this)
    by_name = ids_by_text({c.name.lower(): c.id for c in table or ()}, (t for t in texts if t is not None),
                          -limit, limit)
    unknown = sorted({t for t in texts if t is not None and t.lower() not in by_name})
    if unknown:
        hint = (f"the prediction's classes are {', '.join(c.name for c in table)}" if table
                else "the prediction has no class table: give class ids")
        raise ParameterError(f"reference {path.name}: {name} values {', '.join(unknown[:5])} are not class names or "
                             f"ids: {hint}")
    return np.array([_NO_CLASS if t is None else by_name[t.lower()] for t in texts], np.int64)


def _present_ids(pds: Any, rds: Any, box: tuple[int, int, int, int], block_rows: int, pred_ignore: set[int],
                 ref_ignore: set[int]) -> tuple[list[int], list[int]]:
    """The values of the prediction (none for ``pds`` None) and of the reference in the box, less their
    ignored values and the pixels their mask bands hide, in one pass."""
    c0, r0, w, h = box
    seen: tuple[set[int], set[int]] = (set(), set())
    for row in range(r0, r0 + h, block_rows):
        window = Window(c0, row, w, min(block_rows, r0 + h - row))
        for ds, found in zip((pds, rds), seen):
            if ds is None:
                continue
            block, shown = _read_classes(ds, window), _shown(ds, window)
            found.update(int(v) for v in np.unique(block if shown is None else block[shown]))
    return sorted(seen[0] - pred_ignore), sorted(seen[1] - ref_ignore)


def format_table(result: EvalResult) -> str:
    """Human-readable report: per-class table, summary lines and the confusion matrix."""
    m = result.metrics

    def f(v: float) -> str:
        return "   -  " if not np.isfinite(v) else f"{v:6.4f}"

    lines = [f"{'class':>5} {'name':<14} {'IoU':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'pixels':>9}"]
    for i, c in enumerate(m.class_ids):
        lines.append(f"{c:>5} {m.names.get(c, f'class_{c}')[:14]:<14} {f(m.iou[i])} {f(m.precision[i])} "
                     f"{f(m.recall[i])} {f(m.f1[i])} {int(m.support[i]):>9}")
    lines.append("")
    lines.append(f"mIoU           {f(m.miou)}  (classes {','.join(map(str, m.averaged_classes))})")
    lines.append(f"mean F1        {f(m.mean_f1)}")
    lines.append(f"overall acc.   {f(m.overall_accuracy)}")
    lines.append(f"Cohen's kappa  {f(m.kappa)}")
    lines.append(f"pixels         {m.total}")
    if result.samples is not None:
        s = result.samples
        lines.append(f"reference      {s['points']} points, {s['polygons']} polygons ({s['polygon_pixels']} pixels)")
    if result.stratified is not None:
        e = result.stratified
        lines += ["", "area-weighted estimates (stratified by map class, Olofsson et al. 2014; ± 95 % CI):",
                  f"{'class':>5} {'name':<14} {'samples':>7} {'user acc.':>13} {'producer acc.':>13} "
                  f"{'mapped area':>12} {'estimated area':>24}"]
        for i, c in enumerate(e.class_ids):
            lines.append(f"{c:>5} {m.names.get(c, f'class_{c}')[:14]:<14} {int(e.samples[i]):>7} "
                         f"{_pm(e.users_accuracy[i], e.users_accuracy_ci[i], 3):>13} "
                         f"{_pm(e.producers_accuracy[i], e.producers_accuracy_ci[i], 3):>13} "
                         f"{e.mapped_area[i]:>12.6g} {_pm(e.area[i], e.area_ci[i], None):>24}")
        lines.append(f"overall acc.   {_pm(e.overall_accuracy, e.overall_accuracy_ci, 3)}  (areas in {e.area_units})")
    lines.append("")
    lines.append("confusion matrix (rows = reference, columns = prediction):")
    width = max(6, len(str(int(m.confusion.max(initial=0)))) + 1)
    lines.append(" " * 6 + "".join(f"{c:>{width}}" for c in m.class_ids))
    for i, c in enumerate(m.class_ids):
        lines.append(f"{c:>5} " + "".join(f"{int(v):>{width}}" for v in m.confusion[i]))
    return "\n".join(lines)


def _pm(value: float, ci: float, digits: int | None) -> str:
    """``value ± ci`` (``digits`` decimals, or 6 significant digits); ``-`` when undefined."""
    if not np.isfinite(value):
        return "-"
    if digits is None:
        return f"{value:.6g} ± {ci:.3g}"
    return f"{value:.{digits}f} ± {ci:.{digits}f}"


def check_card(card_path: str | Path, prediction: str | Path, averaged_classes: Sequence[int] | None = None
               ) -> ModelCard:
    """Load the model card that figures of ``prediction`` are to be recorded in, and check that they belong there.

    Checked: the file is a model card (an export's ``deploy.yaml`` is refused, naming the card
    to give), the prediction's ``GEOSEG_MODEL`` tag (the card name of the model that predicted
    it) is the card's name, and ``averaged_classes`` (when given) are classes of the card. The
    name is all that identifies the model in a mask: runs of one config (e.g. seeds) share it,
    so this cannot tell their masks apart.

    Returns:
        The :class:`~geoseg.card.ModelCard`.
    """
    from geoseg.card import ModelCard
    from geoseg.config import load_yaml_mapping
    from geoseg.errors import ModelError

    card_path = Path(card_path)
    hint = ("give the card of the weights it was exported from (the weights.yaml beside weights.pdparams, e.g. "
            "runs/NAME/weights.yaml)")
    if card_path.is_dir():
        if (card_path / "deploy.yaml").is_file():
            raise ParameterError(f"{card_path} is an export's folder, not a model card: {hint}")
        raise ParameterError(f"{card_path} is a folder: give the model card file (the weights.yaml beside "
                             "weights.pdparams)")
    folder = card_path.parent if str(card_path.parent) else Path(".")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # (found after the table was printed)
        raise OutputError(f"cannot record in {card_path}: its folder {folder} is not writable (the card is "
                          "rewritten there): copy the card and its weights somewhere writable, or drop --record-card")
    if "Deploy" in load_yaml_mapping(card_path, "model card", ModelError):
        raise ParameterError(f"{card_path} is an export's deploy.yaml, not a model card: {hint}")
    try:
        card = ModelCard.load(card_path)
    except ModelError as exc:
        raise ModelError(f"{exc}: give a model card (the weights.yaml that train and ensemble write beside "
                         "weights.pdparams)") from None
    pred_path = Path(prediction)
    with _open(pred_path, "prediction") as ds:
        made_by = ds.tags().get("GEOSEG_MODEL")  # predict's tag: the card name of the model that wrote it
    if made_by is not None and made_by != card.name:
        raise ParameterError(f"{pred_path.name} was made by model {made_by!r}, not by {card.name!r} "
                             f"({card_path.name}): record its figures in that model's card")
    foreign = sorted(set(averaged_classes or ()) - {c.id for c in card.classes})
    if foreign:
        raise ParameterError(f"{card_path.name} has no class {', '.join(map(str, foreign))}: these figures are "
                             "not of its model (or pass --miou-classes with its classes)")
    return card


def check_record_key(key: str) -> None:
    """Refuse a ``metrics`` key figures cannot be recorded under: an empty one (YAML's ``? ''``), or
    ``validation``, the figures ``geoseg train`` recorded for the checkpoint it kept."""
    if not key.strip():
        raise ParameterError(f"--record-as {key!r}: give a name for the entry, e.g. test")
    if key.strip() == "validation":
        raise ParameterError("--record-as validation: that entry holds what geoseg train measured for the checkpoint "
                             "it kept; record under another name (e.g. test, or val_region)")


def record_in_card(card_path: str | Path, result: EvalResult, key: str = "test") -> Path:
    """Store ``result``'s headline figures under ``metrics[key]`` of a model card (rewritten atomically),
    after :func:`check_card`, replacing an entry of that name with a warning. The entry says which
    prediction was scored and what was checked."""
    check_record_key(key)
    key = key.strip()
    m = result.metrics
    card = check_card(card_path, result.prediction, m.averaged_classes)
    earlier = dict(card.metrics).get(key)
    if earlier is not None:  # (it was replaced without a word)
        was = f" (mIoU {earlier['miou']})" if isinstance(earlier, dict) and "miou" in earlier else ""
        warn(f"{Path(card_path).name}: metrics.{key}{was} is replaced by these figures", EvaluationWarning)
    with _open(result.prediction, "prediction") as ds:
        made_by = ds.tags().get("GEOSEG_MODEL")
    checked = (f"classes; model name {made_by!r} (the mask's GEOSEG_MODEL tag; runs sharing a name, e.g. seeds, "
               "are not told apart)" if made_by is not None else "classes only (the mask has no GEOSEG_MODEL tag)")
    entry = {
        "miou": round(float(m.miou), 4), "overall_accuracy": round(float(m.overall_accuracy), 4),
        "kappa": round(float(m.kappa), 4), "mean_f1": round(float(m.mean_f1), 4),
        "miou_classes": list(m.averaged_classes),
        "per_class_iou": {int(c): (None if not np.isfinite(v) else round(float(v), 4))
                          for c, v in zip(m.class_ids, m.iou) if c in m.averaged_classes},
        "pixels": m.total, "reference": result.reference.name,
        "region": list(result.region) if result.region else None,
        "prediction": result.prediction.name,
        "how": "geoseg evaluate", "checked": checked,
    }
    from geoseg.atomic import write_error

    try:
        return card.replace(metrics={**dict(card.metrics), key: entry}).save(card_path)
    except GeosegError:
        raise
    except OSError as exc:  # (a full disk named no file: "free some space")
        raise write_error(card_path, exc, option="--record-card") from None


# ---- sample design ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleResult:
    """What :func:`draw_sample` wrote: the file, the points per map class and the mapped pixels."""

    path: Path
    points: dict[int, int]
    map_pixels: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, as the other results give (class ids as strings, as JSON keys are)."""
        return plain({"path": str(self.path), "points": self.points, "map_pixels": self.map_pixels})


@checked_arguments
def draw_sample(
    mask: str | Path,
    out: str | Path,
    *,
    per_class: int = 50,
    region: str | Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    block_rows: int = 256,
) -> SampleResult:
    """Draw a stratified random sample of a class raster: ``per_class`` pixels of each class (all of
    a smaller class), uniformly and without replacement, as points at the pixel centres.

    The points carry ``sample_id``, ``map_class`` (and ``map_name`` when the mask has a class
    table) and an empty text field ``reference`` to fill in with each point's true class, as an
    id or a class name (in QGIS, over imagery); then
    ``evaluate_vector(mask, out, field="reference", stratified=True)`` (``geoseg evaluate
    --stratified``) gives the area-weighted accuracies and class areas of Olofsson et al. (2014).
    Two passes over the mask in blocks of rows (memory: the blocks and the sample); nodata (the
    mask's nodata value, 255 in a uint8 mask without one, and the pixels its mask band hides) is never
    drawn; classes are any integer values (negative ones, ids past 65535). Written atomically
    (GeoPackage, GeoJSON or FlatGeobuf, by the extension).
    """
    import sqlite3

    import pyogrio.errors
    import pyogrio.raw
    import shapely

    from geoseg.atomic import atomic_output, check_output, staged_as, write_error
    from geoseg.vectorize import DRIVERS, format_from_path

    out = Path(out)
    _check_block_rows(block_rows)
    if out.is_dir():
        raise ParameterError(f"sample output {out} is a folder: give a file name (.gpkg, .geojson or .fgb)")
    fmt = format_from_path(out)
    if fmt is None:
        raise ParameterError(f"sample output {out.name}: use a .gpkg, .geojson or .fgb file")
    if per_class < 1:
        raise ParameterError(f"--per-class {per_class}: draw at least 1 point per class")
    check_output(out, overwrite)
    mask_path = Path(mask)
    rng = np.random.default_rng(seed)
    with _open(mask_path, "mask") as ds:
        check_class_raster(ds, "mask")  # (an image drew a point per grey value; NaN in floats crashed)
        if ds.crs is None:
            raise ParameterError(f"mask {mask_path.name} has no CRS: points need one (assign it first)")
        table = read_classes(ds)
        c0, r0, w, h = _region_box(parse_pixel_region(region), ds.width, ds.height)
        skip = set(_prediction_ignore(ds))
        ids = [c.id for c in table] if table else None

        def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
            for row in range(r0, r0 + h, block_rows):
                window = Window(c0, row, w, min(block_rows, r0 + h - row))
                yield row, ds.read(1, window=window), _shown(ds, window)

        found, _ = _value_counts(ds, (c0, r0, w, h), block_rows)  # nodata and mask-band pixels left out
        classes = [c for c in (ids if ids is not None else sorted(found)) if c not in skip]
        counts = {c: found.get(c, 0) for c in classes}
        # which occurrence (rank, in reading order) of each class is drawn
        ranks = {c: np.sort(rng.choice(counts[c], min(per_class, counts[c]), replace=False))
                 for c in classes if counts[c]}
        seen = dict.fromkeys(ranks, 0)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        cls: list[np.ndarray] = []
        unmarked = unmarked_255(ds)
        for row, block, shown in blocks():
            if unmarked and (block == MASK_NODATA)[... if shown is None else shown].any():
                unmarked = False
                warn(f"mask {mask_path.name} has no nodata value: its pixels of value 255 are taken as no data, as in "
                     "geoseg's masks (if 255 is a class, give the mask another nodata value: gdal_edit.py -a_nodata V)",
                     EvaluationWarning)
            for c, rk in ranks.items():
                rr, cc = np.nonzero(block == c if shown is None else (block == c) & shown)
                lo, hi = np.searchsorted(rk, [seen[c], seen[c] + rr.size])
                if hi > lo:
                    pick = rk[lo:hi] - seen[c]
                    rows.append(rr[pick] + row)
                    cols.append(cc[pick] + c0)
                    cls.append(np.full(pick.size, c, np.int64))
                seen[c] += rr.size
        transform, crs = ds.transform, ds.crs
        tagged = {v: name for v, name in band_class_names(ds).items() if v not in skip}
    if not cls:
        raise ParameterError(f"mask {mask_path.name} has no classified pixel" + (" in the region" if region else ""))
    r, c, k = np.concatenate(rows), np.concatenate(cols), np.concatenate(cls)
    order = rng.permutation(k.size)  # a random visiting order: no class or area comes first
    r, c, k = r[order], c[order], k[order]
    xs, ys = transform @ (c + 0.5, r + 0.5)
    names = {t.id: t.name for t in table} if table else tagged  # (band 1's CLASSES tag: another tool's names)
    fields = ["sample_id", "map_class", *(["map_name"] if names else []), "reference"]
    data = [np.arange(1, k.size + 1), k, *([np.array([names.get(int(v), "") for v in k], object)] if names else []),
            np.full(k.size, "", object)]
    # reference: a text field, empty (NULL) until labelled, with a class id or a class name
    masks = [None] * (len(fields) - 1) + [np.ones(k.size, bool)]
    points = shapely.points(xs, ys)
    if fmt == "geojson":  # RFC 7946: longitudes/latitudes (WGS 84), as every reader takes a GeoJSON
        from geoseg.vectorize import GEOJSON_OPTIONS, check_geojson_crs, to_wgs84

        check_geojson_crs(crs, f"mask {mask_path.name}", (float(xs[0]), float(ys[0])) if len(xs) else (0.0, 0.0))
        points, crs_out, options = to_wgs84(points, crs), "EPSG:4326", GEOJSON_OPTIONS
    else:
        crs_out, options = crs.to_wkt(), {}
    try:
        with atomic_output(out, overwrite) as tmp, staged_as(tmp, fmt) as work, ogr_path(work) as ogr_work:
            pyogrio.raw.write(ogr_work, shapely.to_wkb(points), data, fields, field_mask=masks, layer="sample",
                              driver=DRIVERS[fmt], geometry_type="Point", crs=crs_out, layer_options=options)
    except GeosegError:
        raise
    except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FeatureError,
            sqlite3.Error) as exc:  # (a full disk ended in "unexpected error: DataSourceError: sqlite3_exec(...")
        raise write_error(out, exc) from None
    drawn = {int(v): int(n) for v, n in zip(*np.unique(k, return_counts=True))}
    small = [cid for cid, n in drawn.items() if n < per_class]
    where = " in the region" if region else ""
    if small:
        warn(f"classes {_ids(small)} have fewer than {per_class} pixels{where}: all of them were drawn", EvaluationWarning)
    absent = [cid for cid in classes if not counts[cid]]
    if absent and ids is not None:  # classes of the map's table (not only the values found)
        warn(f"classes {_ids(absent)} have no pixel{where}: no points for them", EvaluationWarning)
    return SampleResult(out, drawn, {int(cid): int(counts[cid]) for cid in ranks})
