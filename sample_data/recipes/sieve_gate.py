"""Session 19's gate: does a minimum mapping unit on the mask gain on the folds? (README.md, Session 19)

  python sample_data/recipes/sieve_gate.py runs/s17/unet 0          # step 1: seed 0's fold runs
  python sample_data/recipes/sieve_gate.py runs/s17/unet 0 1 2      # step 2: the 3-seed ensemble

For each of session 13's folds, the ensemble of the given seeds' fold runs (``RUNS/s<seed>_<fold>``)
predicts the train-column crop in the card's mode (as ``cv_folds.py score`` does); its mask is sieved
with ``rasterio.features.sieve`` at each size and connectivity and scored on the fold's validation
rows; confusion matrices are pooled over the folds. The test columns are never read. Prints JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import sieve

sys.path.insert(0, str(Path(__file__).parent))
from cv_folds import FOLDS, IDS, IMG, REF, crop, figures, geoseg  # noqa: E402

from geoseg.metrics import ConfusionMatrix  # noqa: E402

SIZES = [2, 3, 4, 6, 8, 12]
NODATA = 255


def sieved(mask: np.ndarray, size: int, connectivity: int) -> np.ndarray:
    """``mask`` with regions of fewer than ``size`` pixels merged into neighbours; nodata kept."""
    valid = mask != NODATA
    return np.where(valid, sieve(mask, size, mask=valid, connectivity=connectivity), NODATA).astype(mask.dtype)


def main(runs: str, seeds: list[str]) -> None:
    out = Path(runs)
    scene, ref_path = crop(IMG, out / "train_columns.tif"), crop(REF, out / "train_columns_labels.tif")
    with rasterio.open(ref_path) as ds:
        ref = ds.read(1)
    settings = [("none", 0, 4)] + [(f"{n}px/{c}", n, c) for c in (4, 8) for n in SIZES]
    pooled = {name: ConfusionMatrix(IDS, ignore_reference=[0], ignore_prediction=[NODATA]) for name, _, _ in settings}
    per_fold: dict[str, dict[str, dict[str, float]]] = {}
    for fold, (val, _) in FOLDS.items():
        ens = out / f"sieve_{''.join(seeds)}_{fold}"
        members = [str(out / f"s{s}_{fold}" / "weights.pdparams") for s in seeds]
        if len(members) > 1:
            geoseg("ensemble", *[str(Path(m).parent) for m in members], "--out", str(ens), "--float32", "--overwrite")
            weights = str(ens / "weights.pdparams")
        else:
            weights = members[0]
        (ens / "card").mkdir(parents=True, exist_ok=True)
        geoseg("predict", str(scene), "--weights", weights, "--out", f"{ens}/card/", "--vector", "none", "--overwrite")
        with rasterio.open(ens / "card" / "train_columns_landcover.tif") as ds:
            mask = ds.read(1)
        c0, r0, w, h = val
        region = (slice(r0, r0 + h), slice(c0, c0 + w))
        per_fold[fold] = {}
        for name, n, conn in settings:
            m = mask if n == 0 else sieved(mask, n, conn)
            cm = ConfusionMatrix(IDS, ignore_reference=[0], ignore_prediction=[NODATA])
            cm.update(ref[region], m[region])
            pooled[name].update(ref[region], m[region])
            per_fold[fold][name] = figures(cm.matrix)
    result = {"runs": runs, "seeds": seeds, "pooled": {name: figures(cm.matrix) for name, cm in pooled.items()},
              "per_fold": per_fold}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
