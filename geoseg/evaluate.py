"""Evaluate a predicted class raster against a reference raster, block by block.

Both rasters must be on the same grid (size, geotransform, CRS); otherwise
:class:`~geoseg.errors.GridMismatchError` says which property differs. Pixels equal to either
raster's nodata value, to an ``ignore`` value of the reference, or outside ``region`` are not
counted. Class ids are the values of the rasters (e.g. 1..7); by default they are the union of
the ids present in the reference and the prediction (minus ignored values), or the class table
geoseg stores in the prediction's tags.

Memory stays bounded: the rasters are read in blocks of rows (``block_rows`` × width).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.errors import GridMismatchError, ParameterError, SceneReadError
from geoseg.io import MASK_NODATA, read_classes
from geoseg.metrics import ConfusionMatrix, Metrics

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate_rasters", "format_table", "parse_pixel_region"]


@dataclass(frozen=True)
class EvalResult:
    """Metrics plus what was compared."""

    metrics: Metrics
    prediction: Path
    reference: Path
    region: tuple[int, int, int, int] | None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        d = self.metrics.to_dict()
        return {"prediction": str(self.prediction), "reference": str(self.reference),
                "region": list(self.region) if self.region else None, **d}


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
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioError as exc:
        raise SceneReadError(f"{what} {path} cannot be read: {str(exc).splitlines()[0]}") from None


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
        prediction: Class raster (e.g. from ``geoseg predict``; its nodata, 255, is ignored).
        reference: Reference labels; its nodata and ``ignore`` values are not counted.
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
    with _open(pred_path, "prediction") as pds, _open(ref_path, "reference") as rds:
        check_grids(pds, rds)
        H, W = rds.height, rds.width
        if win is not None:
            c, r, w, h = win
            if c >= W or r >= H:
                raise ParameterError(f"region {win} lies outside the {W}x{H} rasters")
            w, h = min(w, W - c), min(h, H - r)
            box = (c, r, w, h)
        else:
            box = (0, 0, W, H)
        table = read_classes(pds)
        if ignore is None:
            class_ids = [int(c) for c in classes] if classes is not None else [c.id for c in table or ()]
            ignore = () if 0 in class_ids else (0,)
        ref_ignore = list(ignore) + ([int(rds.nodata)] if rds.nodata is not None else [])
        pred_ignore = [MASK_NODATA] + ([int(pds.nodata)] if pds.nodata is not None else [])
        names: dict[int, str] = {c.id: c.name for c in table} if table else {}
        if classes is None:
            if table:
                ids = [c.id for c in table]
            else:
                ids = _present_ids(pds, rds, box, block_rows, set(ref_ignore) | set(pred_ignore))
        else:
            ids = [int(c) for c in classes]
        # Reference ids the prediction cannot produce still count (as misses) when listed.
        ref_ids = _present_ids(None, rds, box, block_rows, set(ref_ignore))
        extra = [i for i in ref_ids if i not in ids]
        if extra:
            log.warning("warning: reference classes %s are not among the predicted classes %s: counted as errors",
                        extra, ids)
            ids = ids + extra
        cm = ConfusionMatrix(ids, ignore_reference=ref_ignore, ignore_prediction=pred_ignore)
        c0, r0, w, h = box
        for row in range(r0, r0 + h, block_rows):
            nrows = min(block_rows, r0 + h - row)
            window = Window(c0, row, w, nrows)
            cm.update(rds.read(1, window=window), pds.read(1, window=window))
    if average_over is None:
        present = cm.matrix.sum(axis=1) > 0
        average_over = [c for c, p in zip(ids, present) if p]
    m = cm.metrics(average_over=average_over)
    m = Metrics(**{**m.__dict__, "names": names})
    if m.unpredicted:
        log.warning("warning: %d labelled reference pixels have no prediction (nodata): not counted", m.unpredicted)
    return EvalResult(m, pred_path, ref_path, win)


def _present_ids(pds: Any, rds: Any, box: tuple[int, int, int, int], block_rows: int, ignored: set[int]) -> list[int]:
    c0, r0, w, h = box
    seen: set[int] = set()
    for row in range(r0, r0 + h, block_rows):
        window = Window(c0, row, w, min(block_rows, r0 + h - row))
        for ds in (pds, rds):
            if ds is not None:
                seen.update(int(v) for v in np.unique(ds.read(1, window=window)))
    return sorted(v for v in seen if v not in ignored)


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
    lines.append("")
    lines.append("confusion matrix (rows = reference, columns = prediction):")
    width = max(6, len(str(int(m.confusion.max(initial=0)))) + 1)
    lines.append(" " * 6 + "".join(f"{c:>{width}}" for c in m.class_ids))
    for i, c in enumerate(m.class_ids):
        lines.append(f"{c:>5} " + "".join(f"{int(v):>{width}}" for v in m.confusion[i]))
    return "\n".join(lines)


def record_in_card(card_path: str | Path, result: EvalResult, key: str = "test") -> Path:
    """Store ``result``'s headline figures under ``metrics[key]`` of a model card (rewritten atomically)."""
    from geoseg.card import ModelCard

    card = ModelCard.load(card_path)
    m = result.metrics
    entry = {
        "miou": round(float(m.miou), 4), "overall_accuracy": round(float(m.overall_accuracy), 4),
        "kappa": round(float(m.kappa), 4), "mean_f1": round(float(m.mean_f1), 4),
        "miou_classes": list(m.averaged_classes),
        "per_class_iou": {int(c): (None if not np.isfinite(v) else round(float(v), 4))
                          for c, v in zip(m.class_ids, m.iou) if c in m.averaged_classes},
        "pixels": m.total, "reference": result.reference.name,
        "region": list(result.region) if result.region else None,
        "how": "geoseg predict (card tile size/overlap) + geoseg evaluate",
    }
    return card.replace(metrics={**dict(card.metrics), key: entry}).save(card_path)
