"""What the label map's one-pixel offset costs an image-aligned map (session 17; a diagnostic).

The NC labels sit one pixel up-left of the image (session 4): label[r, c] describes image pixel
[r + 1, c + 1]. geoseg trains with ``label_shift: [1, 1]`` and writes its masks on the image's grid,
as a user needs them, but every score compares them with the reference as it lies. This script
scores the cross-validation predictions of ``cv_folds.py score`` both ways, on the folds' validation
rows of the train columns only (the test columns are not read):

  python sample_data/recipes/offset_cost.py runs/s17/unet 0
      (after cv_folds.py score for two or more seeds; one seed is predicted here, card mode)
      -> pooled mIoU (1,3,4,5,6,7) / OA of the seed ensemble's predictions (card mode) as scored
         (image grid), and moved onto the reference's grid (prediction [r + 1, c + 1] against
         reference [r, c]); and the same two scores for a perfect image-aligned map (the labels
         themselves moved by one pixel): the ceiling the offset leaves an image-aligned map.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import rasterio

from cv_folds import FOLDS, IDS, IMG, REF, TRAIN_COLS, crop, figures, geoseg  # this script's folder


def main(runs: str, seeds: list[str]) -> None:
    with rasterio.open(REF) as ds:
        ref = ds.read(1)[:, :TRAIN_COLS].astype(np.int64)
    pooled = {k: np.zeros((7, 7), np.int64) for k in ("as_scored", "on_reference_grid", "perfect_as_scored")}
    for fold, (val, _) in FOLDS.items():
        mask = Path(runs) / f"ensemble_{''.join(seeds)}_{fold}" / "card" / "train_columns_landcover.tif"
        if not mask.exists() and len(seeds) == 1:  # one seed: cv_folds.py makes no ensemble, predict the run itself
            mask.parent.mkdir(parents=True, exist_ok=True)
            geoseg("predict", str(crop(IMG, Path(runs) / "train_columns.tif")), "--weights",
                   str(Path(runs) / f"s{seeds[0]}_{fold}" / "weights.pdparams"), "--out", f"{mask.parent}/",
                   "--vector", "none", "--overwrite")
        with rasterio.open(mask) as ds:
            pred = ds.read(1).astype(np.int64)
        c, r, w, h = val
        rows = np.zeros(ref.shape, bool)
        rows[r:r + h, c:c + w] = True
        # reference [r, c] against prediction [r, c] (as scored) and [r + 1, c + 1] (the pixel it describes)
        ref_in, rows_in = ref[:-1, :-1], rows[:-1, :-1]
        pairs = {"as_scored": (ref_in, pred[:-1, :-1]), "on_reference_grid": (ref_in, pred[1:, 1:]),
                 "perfect_as_scored": (ref_in, ref[1:, 1:])}
        for key, (a, b) in pairs.items():
            ok = rows_in & (a > 0) & np.isin(b, IDS)
            np.add.at(pooled[key], (a[ok] - 1, b[ok] - 1), 1)
    print(json.dumps({"runs": runs, "seeds": seeds, **{k: figures(cm) for k, cm in pooled.items()}}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
