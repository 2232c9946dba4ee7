"""Does the random forest add anything to the UNet? (session 18's gate; see README.md, Session 18).

On session 13's three row folds of the train columns (the test columns 326-488 are never read, not
even as neighbourhood features): the UNet fold runs' class probabilities (``geoseg predict
--probabilities float32``, card mode, on the train-column crop), a random forest's (``rf_folds.py``'s
forest on bands 1-5 and their 3x3/5x5/7x7 means, trained on the fold's training rows with the labels
moved onto the image grid as ``label_shift: [1, 1]`` moves them), and their blends
w * forest + (1 - w) * UNet, each scored as geoseg's masks are (image grid against the reference as
it lies), pooled over the folds' validation rows. Needs scikit-learn and scipy:

  python sample_data/recipes/rf_blend.py runs/s17/unet [seed]
      -> JSON: pooled mIoU (1, 3, 4, 5, 6, 7) / OA of the UNet, the forest and the blends
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from scipy.ndimage import uniform_filter
from sklearn.ensemble import RandomForestClassifier

from cv_folds import FOLDS, IDS, IMG, REF, TRAIN_COLS, crop, figures, geoseg  # this script's folder

BANDS = [1, 2, 3, 4, 5]  # the UNet's bands
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # forest share; 0 = the UNet alone, 1 = the forest alone


def unet_probabilities(runs: Path, seed: str, fold: str, scene: Path) -> np.ndarray:
    """(7, rows, TRAIN_COLS) class probabilities of a fold run, NaN where predict writes nodata."""
    out = runs / f"blend_s{seed}_{fold}"
    path = out / "train_columns_probabilities.tif"
    if not path.exists():
        geoseg("predict", str(scene), "--weights", str(runs / f"s{seed}_{fold}" / "weights.pdparams"),
               "--out", f"{out}/", "--vector", "none", "--probabilities", "float32", "--overwrite")
    with rasterio.open(path) as ds:
        names = list(ds.descriptions)
        p = ds.read().astype(np.float64)
    assert len(names) == len(IDS), names
    return p


def main(runs: str, seed: str) -> None:
    root = Path(runs)
    scene = crop(IMG, root / "train_columns.tif")
    with rasterio.open(scene) as ds:
        img = ds.read(BANDS).astype(np.float32)  # train columns only
    with rasterio.open(REF) as ds:
        ref = ds.read(1)[:, :TRAIN_COLS].astype(np.int64)
    valid = (img != 0).all(axis=0)
    feats = np.concatenate([img] + [np.stack([uniform_filter(b, s) for b in img]) for s in (3, 5, 7)])
    x = feats.reshape(feats.shape[0], -1).T
    aligned = np.zeros_like(ref)  # label [r, c] describes image pixel [r + 1, c + 1]
    aligned[1:, 1:] = ref[:-1, :-1]
    rows = np.indices(ref.shape)[0]
    pooled = {w: np.zeros((7, 7), np.int64) for w in WEIGHTS}
    for fold, (val, pieces) in FOLDS.items():
        train_rows = np.zeros(ref.shape, bool)
        for c, r, w, h in pieces:
            train_rows[r:r + h, c:c + w] = True
        c, r, w, h = val
        val_rows = (rows >= r) & (rows < r + h)
        fit = (valid & train_rows & (aligned > 0)).ravel()
        rf = RandomForestClassifier(100, min_samples_leaf=2, n_jobs=2, random_state=0).fit(x[fit], aligned.ravel()[fit])
        p_rf = np.zeros((len(IDS), ref.size))
        p_rf[[IDS.index(k) for k in rf.classes_]] = rf.predict_proba(x).T
        p_rf = p_rf.reshape(len(IDS), *ref.shape)
        p_unet = unet_probabilities(root, seed, fold, scene)
        scored = val_rows & (ref > 0) & valid & np.isfinite(p_unet).all(axis=0)
        for wt in WEIGHTS:
            pred = np.asarray(IDS)[np.argmax(wt * p_rf + (1 - wt) * np.nan_to_num(p_unet), axis=0)]
            np.add.at(pooled[wt], (ref[scored] - 1, pred[scored] - 1), 1)
    print(json.dumps({"runs": runs, "seed": seed,
                      **{f"forest_share_{w}": figures(cm) for w, cm in pooled.items()}}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "0")
