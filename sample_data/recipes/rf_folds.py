"""Random-forest reference on geoseg's validation folds (a diagnostic, not part of geoseg).

A per-pixel random forest on the 6 bands plus their 3x3, 5x5 and 7x7 neighbourhood means (the
kind of baseline the issue's bar describes), trained and scored on the same folds as the CNN
runs in README.md (folds A and B, and session 13's three row folds, pooled). It never reads the test columns 326-488. Needs scikit-learn and scipy, which
geoseg does not depend on:  pip install scikit-learn && python sample_data/recipes/rf_folds.py
"""

from __future__ import annotations

import numpy as np
import rasterio
from scipy.ndimage import uniform_filter
from sklearn.ensemble import RandomForestClassifier

from cv_folds import FOLDS as ROW_FOLDS  # the session-13 folds, defined once (this script's folder)

IMG = "sample_data/nc_landsat7/image_6band_uint8.tif"
REF = "sample_data/nc_landsat7/landcover96_labels.tif"
CLASSES = [1, 3, 4, 5, 6, 7]  # mIoU classes, as for the test columns


def main() -> None:
    with rasterio.open(IMG) as ds:
        img = ds.read().astype(np.float32)
    with rasterio.open(REF) as ds:
        lab = ds.read(1)
    valid = (img != 0).all(axis=0)  # nodata 0 in any band, as predict masks it
    feats = np.concatenate([img] + [np.stack([uniform_filter(b, s) for b in img]) for s in (3, 5, 7)])
    x = feats.reshape(feats.shape[0], -1).T
    y = lab.ravel()
    rows, cols = np.indices(lab.shape)
    rows, cols = rows.ravel(), cols.ravel()
    ok = valid.ravel() & (y > 0) & (cols < 326)  # labelled train-column pixels only
    folds = {
        "A (train cols 0-265, validate cols 266-325)": (cols < 266, cols >= 266),
        "B (train rows 120-442, validate rows 0-119)": (rows >= 120, rows < 120),
    }
    for name, (tr, va) in folds.items():
        report(f"fold {name}", fold_matrix(x, y, ok & tr, ok & va))
    # Session 13: three row bands of the train columns, every labelled pixel validated once;
    # the three confusion matrices are summed (pooled figures).
    pooled = np.zeros((8, 8), np.int64)
    for name, (val, _) in ROW_FOLDS.items():
        r0, r1 = val[1], val[1] + val[3]
        va = (rows >= r0) & (rows < r1)
        cm = fold_matrix(x, y, ok & ~va, ok & va)
        report(f"row fold {name} (validate rows {r0}-{r1 - 1})", cm)
        pooled += cm
    report("row folds P1-P3 pooled", pooled)


def fold_matrix(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray) -> np.ndarray:
    """Confusion matrix (8 x 8, rows = reference) of a forest trained on ``tr``, scored on ``va``."""
    rf = RandomForestClassifier(100, min_samples_leaf=2, n_jobs=1, random_state=0).fit(x[tr], y[tr])
    cm = np.zeros((8, 8), np.int64)
    np.add.at(cm, (y[va], rf.predict(x[va])), 1)
    return cm


def report(name: str, cm: np.ndarray) -> None:
    tp = np.diag(cm).astype(float)
    iou = tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)
    print(f"{name}: mIoU {iou[CLASSES].mean():.3f} OA {tp.sum() / cm.sum():.3f} "
          + " ".join(f"{c}:{iou[c]:.2f}" for c in CLASSES), flush=True)


if __name__ == "__main__":
    main()
