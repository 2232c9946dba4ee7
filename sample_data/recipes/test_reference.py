"""Test-column figures on the random forest's own pixels (a diagnostic, not part of geoseg).

`rf_folds.py`'s random forest, like most per-pixel baselines, only sees pixels where all six bands
have data: it leaves out the SWIR2 band's wider nodata frame (a third of the scored test pixels),
which geoseg classifies and `geoseg evaluate` scores. This script puts both on the same pixels:

    python sample_data/recipes/test_reference.py runs/eval_unet/image_6band_uint8_landcover.tif ...

prints, for each geoseg prediction, mIoU over classes 1,3,4,5,6,7 and OA on the test columns over
(a) every pixel `geoseg evaluate` scores and (b) the pixels with all six bands; then the random
forest (6 bands + 3x3/5x5/7x7 neighbourhood means, trained on all train columns 0-325) over (b).
It reads the test columns' labels: run it only for shipped weights, after every choice is made
(session 7 of README.md). Needs scikit-learn and scipy (not geoseg dependencies).
"""

from __future__ import annotations

import sys

import numpy as np
import rasterio
from scipy.ndimage import uniform_filter
from sklearn.ensemble import RandomForestClassifier

IMG = "sample_data/nc_landsat7/image_6band_uint8.tif"
REF = "sample_data/nc_landsat7/landcover96_labels.tif"
CLASSES = [1, 3, 4, 5, 6, 7]
TEST_COL = 326


def score(ref: np.ndarray, pred: np.ndarray) -> str:
    cm = np.zeros((256, 256), np.int64)
    np.add.at(cm, (ref, pred), 1)
    tp = np.diag(cm).astype(float)
    iou = tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)
    return (f"mIoU {iou[CLASSES].mean():.3f} OA {tp.sum() / cm.sum():.3f} n={cm.sum()} "
            + " ".join(f"{c}:{iou[c]:.3f}" for c in CLASSES))


def main(preds: list[str]) -> None:
    with rasterio.open(IMG) as ds:
        img = ds.read().astype(np.float32)
    with rasterio.open(REF) as ds:
        lab = ds.read(1)
    cols = np.indices(lab.shape)[1]
    complete = (img != 0).all(axis=0)  # every band has data (the random forest's pixels)
    test = (cols >= TEST_COL) & (lab > 0)
    for path in preds:
        with rasterio.open(path) as ds:
            pred, nodata = ds.read(1), ds.nodata
        scored = test & (pred != nodata)
        print(f"{path}\n  all scored pixels:      {score(lab[scored], pred[scored])}"
              f"\n  all six bands present:  {score(lab[scored & complete], pred[scored & complete])}")
    feats = np.concatenate([img] + [np.stack([uniform_filter(b, s) for b in img]) for s in (3, 5, 7)])
    x = feats.reshape(feats.shape[0], -1).T
    train = (complete & (lab > 0) & (cols < TEST_COL)).ravel()
    rf = RandomForestClassifier(100, min_samples_leaf=2, n_jobs=1, random_state=0).fit(x[train], lab.ravel()[train])
    ev = (complete & test).ravel()
    print(f"random forest (all six bands present): {score(lab.ravel()[ev], rf.predict(x[ev]))}")


if __name__ == "__main__":
    main(sys.argv[1:])
