"""Confusion matrices and segmentation metrics (numpy only).

The confusion matrix ``cm`` is ``K × K`` int64 with rows = reference class and columns =
predicted class, both as indexes ``0..K-1`` into a class list.  Pixels whose reference or
prediction is not one of the classes (nodata, ignore values, ids the model does not know
but the reference does) are counted apart, never in ``cm``.

Per class ``k``: ``TP = cm[k, k]``, ``FP = cm[:, k].sum() - TP``, ``FN = cm[k, :].sum() - TP``;
IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN),
F1 = 2 TP / (2 TP + FP + FN).  A ratio with a zero denominator is NaN (undefined), and NaN
classes are left out of means.  Overall accuracy = trace / total; Cohen's kappa =
(p_o - p_e) / (1 - p_e) with p_e = Σ_k row_k · col_k / total².
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geoseg.errors import ParameterError

__all__ = ["ConfusionMatrix", "Metrics", "StratifiedEstimates", "compute_metrics", "stratified_estimates"]


class ConfusionMatrix:
    """Accumulates a confusion matrix over blocks of class-id arrays.

    Class ids may be any integers (negative ones too): raster values are matched to them by a
    binary search over the sorted ids, so memory is proportional to the number of classes, never
    to the largest value a raster holds.

    Args:
        class_ids: The class ids (values in the rasters) in matrix order.
        ignore_reference: Reference values that are not counted (nodata, unlabelled).
        ignore_prediction: Prediction values that are not counted (nodata): a pixel with one has no
            prediction (:attr:`unpredicted`), even where the value is also a class id.
        add_predicted_classes: Prediction values that are not among ``class_ids`` (and not ignored)
            become classes, appended in increasing order as they are met, so their pixels count as
            errors; without it they count as :attr:`unpredicted`.
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        ignore_reference: Sequence[int] = (),
        ignore_prediction: Sequence[int] = (),
        add_predicted_classes: bool = False,
    ) -> None:
        """Create an empty matrix (see the class docstring)."""
        self.class_ids: tuple[int, ...] = ()
        self.ignore_reference = tuple(int(v) for v in ignore_reference)
        self.ignore_prediction = tuple(int(v) for v in ignore_prediction)
        self.add_predicted_classes = add_predicted_classes
        self.matrix = np.zeros((0, 0), dtype=np.int64)
        #: Counted pixels whose prediction was ignored (nodata) or not a class id.
        self.unpredicted = 0
        #: Pixels whose reference value is not a class id and not ignored.
        self.unknown_reference = 0
        #: Pixels (within ``valid``) not counted because their reference is an ignored value.
        self.ignored_reference = 0
        ids = tuple(int(c) for c in class_ids)
        if len(set(ids)) != len(ids):
            raise ParameterError(f"class ids {list(ids)} name a class twice: give each id once")
        self.add_classes(ids)

    def add_classes(self, class_ids: Sequence[int]) -> None:
        """Append ``class_ids`` that are not classes yet (empty rows and columns), in the order given."""
        new = [int(c) for c in dict.fromkeys(int(c) for c in class_ids) if int(c) not in self.class_ids]
        if not new and self.class_ids:
            return
        self.class_ids = self.class_ids + tuple(new)
        k = len(self.class_ids)
        grown = np.zeros((k, k), dtype=np.int64)
        grown[: self.matrix.shape[0], : self.matrix.shape[1]] = self.matrix
        self.matrix = grown
        # value -> class index: a binary search over the sorted ids (memory O(classes))
        ids = np.array(self.class_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self._sorted, self._order = ids[order], order.astype(np.int64)
        self._luts: dict[np.dtype, np.ndarray] = {}  # per 8/16-bit dtype: a table over its whole range

    def _lut(self, dtype: np.dtype) -> np.ndarray:
        """Class index of every value of a 8- or 16-bit integer ``dtype`` (at most 65,536 entries)."""
        if dtype not in self._luts:
            info = np.iinfo(dtype)
            lut = np.full(int(info.max) - int(info.min) + 1, -1, dtype=np.int64)
            inside = (self._sorted >= info.min) & (self._sorted <= info.max)
            lut[self._sorted[inside] - info.min] = self._order[inside]
            self._luts[dtype] = lut
        return self._luts[dtype]

    def _index(self, values: np.ndarray) -> np.ndarray:
        """Class index of each value (-1: not a class)."""
        values = np.asarray(values)
        if not self.class_ids or values.size == 0:
            return np.full(values.shape, -1, dtype=np.int64)
        if values.dtype.kind in "iu" and values.dtype.itemsize <= 2:
            low = int(np.iinfo(values.dtype).min)
            return self._lut(values.dtype)[values if low == 0 else values.astype(np.int64) - low]
        too_big = None
        if values.dtype.kind == "u" and values.dtype.itemsize == 8:  # uint64 past int64: not a class
            too_big = values > np.iinfo(np.int64).max
        v = values.astype(np.int64, copy=False)
        pos = np.minimum(np.searchsorted(self._sorted, v), len(self._sorted) - 1)
        hit = self._sorted[pos] == v
        if too_big is not None:
            hit &= ~too_big
        return np.where(hit, self._order[pos], -1)

    def update(self, reference: np.ndarray, prediction: np.ndarray, valid: np.ndarray | None = None, *,
               labelled: np.ndarray | None = None, predicted: np.ndarray | None = None) -> None:
        """Add one block.

        Args:
            reference: Reference class ids (any int array).
            prediction: Predicted class ids, same shape.
            valid: Optional bool mask of pixels to count (e.g. a region), same shape.
            labelled: Optional bool mask, False where the reference has no label (a mask band's
                hidden pixels): not counted, as ignored reference values.
            predicted: Optional bool mask, False where there is no prediction (a mask band's hidden
                pixels): as prediction values in ``ignore_prediction``.
        """
        if reference.shape != prediction.shape:
            raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
        keep = ~np.isin(reference, self.ignore_reference) if self.ignore_reference else np.ones(reference.shape, bool)
        if labelled is not None:
            keep &= labelled
        if valid is not None:
            self.ignored_reference += int((valid & ~keep).sum())
            keep &= valid
        else:
            self.ignored_reference += int(keep.size - keep.sum())
        ref = self._index(reference[keep])
        known = ref >= 0
        if not known.all():  # reference values that are not classes: counted apart
            self.unknown_reference += int((~known).sum())
            keep[keep] = known
            ref = ref[known]
        pred_raw = prediction[keep]
        nodata = np.isin(pred_raw, self.ignore_prediction) if self.ignore_prediction else np.zeros(pred_raw.shape, bool)
        if predicted is not None:
            nodata |= ~predicted[keep]
        pred = self._index(pred_raw)
        if self.add_predicted_classes:
            other = (pred < 0) & ~nodata
            if other.any():
                self.add_classes(np.unique(pred_raw[other]).tolist())
                pred = self._index(pred_raw)
        have = (pred >= 0) & ~nodata
        self.unpredicted += int((~have).sum())
        k = len(self.class_ids)
        self.matrix += np.bincount(ref[have] * k + pred[have], minlength=k * k).reshape(k, k)

    def metrics(self, average_over: Sequence[int] | None = None) -> Metrics:
        """Metrics of the accumulated matrix (see :func:`compute_metrics`)."""
        return compute_metrics(self.matrix, self.class_ids, average_over=average_over,
                               unpredicted=self.unpredicted, unknown_reference=self.unknown_reference)


@dataclass(frozen=True)
class Metrics:
    """Segmentation metrics of one confusion matrix. Per-class arrays follow ``class_ids``."""

    class_ids: tuple[int, ...]
    confusion: np.ndarray
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    miou: float
    mean_f1: float
    overall_accuracy: float
    kappa: float
    averaged_classes: tuple[int, ...]
    total: int
    unpredicted: int = 0
    unknown_reference: int = 0
    names: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe; NaN becomes None)."""

        def f(v: float) -> float | None:
            return None if not np.isfinite(v) else round(float(v), 6)

        per_class = {
            str(c): {
                "name": self.names.get(c, f"class_{c}"),
                "iou": f(self.iou[i]), "precision": f(self.precision[i]), "recall": f(self.recall[i]),
                "f1": f(self.f1[i]), "support": int(self.support[i]),
            }
            for i, c in enumerate(self.class_ids)
        }
        return {
            "miou": f(self.miou),
            "mean_f1": f(self.mean_f1),
            "overall_accuracy": f(self.overall_accuracy),
            "kappa": f(self.kappa),
            "miou_classes": list(self.averaged_classes),
            "pixels": self.total,
            "unpredicted_pixels": self.unpredicted,
            "unknown_reference_pixels": self.unknown_reference,
            "per_class": per_class,
            "class_ids": list(self.class_ids),
            "confusion_matrix": self.confusion.tolist(),
        }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def compute_metrics(
    matrix: np.ndarray,
    class_ids: Sequence[int],
    *,
    average_over: Sequence[int] | None = None,
    unpredicted: int = 0,
    unknown_reference: int = 0,
) -> Metrics:
    """Compute per-class and overall metrics from a confusion matrix.

    Args:
        matrix: ``K × K`` counts, rows = reference, columns = prediction.
        class_ids: The ``K`` class ids in matrix order.
        average_over: Class ids whose IoU/F1 enter mIoU and mean F1. Default: the classes
            present in the reference (row sum > 0).
        unpredicted: Reference pixels without a prediction (reported only).
        unknown_reference: Reference pixels with values outside ``class_ids`` (reported only).

    Returns:
        The :class:`Metrics`.
    """
    cm = np.asarray(matrix, dtype=np.int64)
    ids = tuple(int(c) for c in class_ids)
    if cm.shape != (len(ids), len(ids)):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {len(ids)} classes")
    tp = np.diag(cm)
    ref = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    fp, fn = pred - tp, ref - tp
    iou = _ratio(tp, tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    total = int(cm.sum())
    if average_over is None:
        avg = tuple(c for c, n in zip(ids, ref) if n > 0)
    else:
        average_over = list(dict.fromkeys(int(c) for c in average_over))  # (an id given twice counted twice)
        missing = [c for c in average_over if c not in ids]
        if missing:
            raise ParameterError(f"classes {missing} to average over are not among the class ids {list(ids)}: "
                                 "give ids of the prediction's classes (--miou-classes), or --classes to add them")
        # a class with no reference and no predicted pixel has no IoU: it is left out of the mean and
        # of the classes said to be averaged (they named it while the mean was over the others)
        avg = tuple(int(c) for c in average_over if np.isfinite(iou[ids.index(int(c))]))
    sel = [ids.index(c) for c in avg]

    def mean(a: np.ndarray) -> float:
        v = a[sel] if sel else np.array([])
        v = v[np.isfinite(v)]
        # A class in the average that has no reference and no prediction counts as undefined.
        return float(v.mean()) if v.size else float("nan")

    if total > 0:
        po = float(tp.sum()) / total
        pe = float((ref.astype(np.float64) * pred.astype(np.float64)).sum()) / float(total) ** 2
        kappa = (po - pe) / (1.0 - pe) if pe < 1.0 else float("nan")
    else:
        po = kappa = float("nan")
    return Metrics(
        class_ids=ids, confusion=cm, iou=iou, precision=precision, recall=recall, f1=f1, support=ref,
        miou=mean(iou), mean_f1=mean(f1), overall_accuracy=po, kappa=kappa, averaged_classes=avg,
        total=total, unpredicted=unpredicted, unknown_reference=unknown_reference,
    )


# ---- stratified (area-weighted) estimates --------------------------------------------------------
@dataclass(frozen=True)
class StratifiedEstimates:
    """Accuracy and class areas from a stratified random sample of the map classes.

    The estimators of Olofsson et al. (2013, 2014; "Good practices for estimating area and
    assessing accuracy of land change", Remote Sens. Environ. 148: 42-57), with the map classes
    as strata (simple random and systematic samples use them post-stratified). ``*_ci`` are
    half-widths of the ``z`` confidence intervals (1.96: 95 %); areas are in the units of
    ``pixel_area`` (map units² by default). Per class arrays follow ``class_ids``; a class whose
    stratum holds fewer than 2 samples has an undefined (NaN) variance term, counted as 0 as
    in the reference implementations. A stratum with mapped area but no sample (:attr:`unsampled`)
    leaves its share of every reference class unknown: the overall accuracy, the producer's
    accuracies, the class areas (and their intervals) and that class's user's accuracy are then
    undefined (NaN), not estimated as if the stratum were not there or all wrong.
    """

    class_ids: tuple[int, ...]
    samples: np.ndarray  # n_i: sample points per map class (stratum)
    map_pixels: np.ndarray  # N_i: mapped pixels per class
    proportions: np.ndarray  # p_ij: estimated area proportions, rows = map, columns = reference
    overall_accuracy: float
    overall_accuracy_ci: float
    users_accuracy: np.ndarray
    users_accuracy_ci: np.ndarray
    producers_accuracy: np.ndarray
    producers_accuracy_ci: np.ndarray
    area: np.ndarray  # error-adjusted area of each (reference) class
    area_ci: np.ndarray
    mapped_area: np.ndarray
    area_units: str = "map units²"
    #: Map classes (strata) with mapped area but no sample point.
    unsampled: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN → None)."""

        def f(v: Any, of: Any = 0.0) -> Any:  # (the CI of an estimate that is None is None too, not 0.0)
            return None if not (np.isfinite(v) and np.isfinite(of)) else round(float(v), 6)

        return {
            "method": "stratified estimators (Olofsson et al. 2014), strata = map classes, 95 % CI half-widths",
            "overall_accuracy": f(self.overall_accuracy),
            "overall_accuracy_ci": f(self.overall_accuracy_ci, self.overall_accuracy),
            "area_units": self.area_units, "unsampled_classes": list(self.unsampled),
            "per_class": {str(c): {
                "samples": int(self.samples[i]), "map_pixels": int(self.map_pixels[i]),
                "mapped_area": f(self.mapped_area[i]),
                "users_accuracy": f(self.users_accuracy[i]),
                "users_accuracy_ci": f(self.users_accuracy_ci[i], self.users_accuracy[i]),
                "producers_accuracy": f(self.producers_accuracy[i]),
                "producers_accuracy_ci": f(self.producers_accuracy_ci[i], self.producers_accuracy[i]),
                "area": f(self.area[i]), "area_ci": f(self.area_ci[i], self.area[i]),
            } for i, c in enumerate(self.class_ids)},
        }


def stratified_estimates(counts: np.ndarray, map_pixels: Sequence[int] | np.ndarray, class_ids: Sequence[int],
                         pixel_area: float = 1.0, z: float = 1.96,
                         map_area: Sequence[float] | np.ndarray | None = None,
                         area_units: str = "map units²") -> StratifiedEstimates:
    """Olofsson et al. (2014) estimates from sample ``counts`` (rows = **map** class, columns =
    reference class, as in the paper) and each map class's pixel count ``map_pixels``.

    The strata weigh by their mapped areas: ``map_pixels * pixel_area``, or ``map_area`` where
    pixels differ in area (a geographic CRS's rows); the estimators take areas wherever the paper
    has pixel counts (they are ratios of them, so the units cancel).

    A stratum with mapped area and no sample cannot be estimated (the paper's ``n_ij / n_i`` is
    0/0): every figure that sums over the strata (overall accuracy, producer's accuracies,
    areas) and the stratum's own user's accuracy are NaN, and :attr:`StratifiedEstimates.unsampled`
    names those classes. Give every map class with pixels (in the region) its own ``map_pixels``
    entry, even without a sample: a class left out would drop its area from the total.

    Raises:
        ParameterError: shapes disagree, or no map class holds a sample.
    """
    n = np.asarray(counts, np.float64)
    pixels = np.asarray(map_pixels, np.float64)
    N = pixels * pixel_area if map_area is None else np.asarray(map_area, np.float64)  # mapped area per stratum
    k = len(class_ids)
    if n.shape != (k, k) or N.shape != (k,) or pixels.shape != (k,):
        raise ParameterError(f"stratified estimates need a {k}x{k} sample matrix and {k} map class sizes")
    n_i = n.sum(axis=1)
    if not (n_i > 0).any() or N.sum() <= 0:
        raise ParameterError("stratified estimates need sample points in at least one mapped class")
    W = N / N.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n_i[:, None] > 0, n / n_i[:, None], 0.0)  # n_ij / n_i
        p = W[:, None] * frac
        ua = np.diag(p) / p.sum(axis=1)
        pa = np.diag(p) / p.sum(axis=0)
        oa = float(np.trace(p))
        dof = n_i - 1

        def term(x: np.ndarray) -> np.ndarray:  # undefined terms (n_i < 2, 0/0) count as 0
            return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

        var_ua = term(ua * (1 - ua) / dof)
        var_oa = float((W**2 * var_ua).sum())
        N_j = (N[:, None] * frac).sum(axis=0)  # estimated area of each reference class
        var_pa = np.zeros(k)
        for j in range(k):
            own = term(N[j] ** 2 * (1 - pa[j]) ** 2 * ua[j] * (1 - ua[j]) / dof[j])
            others = sum(term(N[i] ** 2 * frac[i, j] * (1 - frac[i, j]) / dof[i]) for i in range(k) if i != j)
            var_pa[j] = term((own + pa[j] ** 2 * others) / N_j[j] ** 2)
        var_p = np.array([term(W**2 * frac[:, j] * (1 - frac[:, j]) / dof).sum() for j in range(k)])
    total_area = N.sum()
    area, area_ci = p.sum(axis=0) * total_area, z * np.sqrt(var_p) * total_area
    oa_ci, ua_ci, pa_ci = z * float(np.sqrt(var_oa)), z * np.sqrt(var_ua), z * np.sqrt(var_pa)
    unsampled = (n_i == 0) & (N > 0)
    if unsampled.any():  # its row of p is unknown: so is every sum over the strata
        p[unsampled] = np.nan
        oa = oa_ci = float("nan")
        ua, ua_ci = ua.copy(), ua_ci.copy()
        ua[unsampled] = ua_ci[unsampled] = np.nan
        pa, pa_ci, area, area_ci = (np.full(k, np.nan) for _ in range(4))
    return StratifiedEstimates(
        class_ids=tuple(int(c) for c in class_ids), samples=n_i.astype(np.int64), map_pixels=pixels.astype(np.int64),
        proportions=p, overall_accuracy=oa, overall_accuracy_ci=oa_ci,
        users_accuracy=ua, users_accuracy_ci=ua_ci, producers_accuracy=pa, producers_accuracy_ci=pa_ci,
        area=area, area_ci=area_ci, mapped_area=N, area_units=area_units,
        unsampled=tuple(int(c) for c, u in zip(class_ids, unsampled) if u),
    )
