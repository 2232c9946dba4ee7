"""Session 13's three-fold cross-validation over the NC train columns (see README.md, Session 13).

Row bands of the train columns 0-325; each fold validates on one band and trains on the rest (two
pieces become two ``scenes`` of the same image). Test columns 326-488 are never read: the scene is
predicted as a crop of the train columns, so prior adaptation sees train-column pixels only.

  python sample_data/recipes/cv_folds.py configs sample_data/recipes/nc_unet.yaml runs/cv/unet
      -> runs/cv/unet/P1.yaml, P2.yaml, P3.yaml; then, per fold F and seed S:
  OMP_NUM_THREADS=1 geoseg -q train --config runs/cv/unet/P1.yaml --out runs/cv/unet/s0_P1 --seed 0
  python sample_data/recipes/cv_folds.py score runs/cv/unet 0 1 2
      -> per-fold and pooled mIoU (classes 1, 3, 4, 5, 6, 7) and OA of the seed ensembles, in the
         card's mode (its prior adaptation) and without adaptation (plain), as JSON on stdout.
  python sample_data/recipes/cv_folds.py score runs/cv/unet 0 1 2 -- --overlap 64
      -> the same with extra `geoseg predict` options (prediction-time settings, same fold runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio
import rasterio.enums
import yaml
from rasterio.windows import Window

from geoseg.metrics import compute_metrics

IMG = "sample_data/nc_landsat7/image_6band_uint8.tif"
REF = "sample_data/nc_landsat7/landcover96_labels.tif"
TRAIN_COLS = 326
FOLDS = {  # validation region and training pieces, [col, row, width, height]; every piece >= 171 rows
    "P1": ([0, 0, 326, 171], [[0, 171, 326, 272]]),
    "P2": ([0, 171, 326, 101], [[0, 0, 326, 171], [0, 272, 326, 171]]),
    "P3": ([0, 272, 326, 171], [[0, 0, 326, 272]]),
}
IDS = [1, 2, 3, 4, 5, 6, 7]
AVERAGE = [1, 3, 4, 5, 6, 7]


def configs(config: str, out: str) -> None:
    """Write one config per fold from a shipped config (everything else unchanged)."""
    base = yaml.safe_load(Path(config).read_text())
    Path(out).mkdir(parents=True, exist_ok=True)
    for fold, (val, pieces) in FOLDS.items():
        c = {k: v for k, v in base.items() if k not in ("image", "labels", "train_region", "val_region", "out")}
        c["scenes"] = [{"image": base["image"], "labels": base["labels"], "train_region": p,
                        **({"val_region": val} if i == 0 else {})} for i, p in enumerate(pieces)]
        Path(out, f"{fold}.yaml").write_text(yaml.safe_dump(c, sort_keys=False))


def crop(src: str, path: Path) -> Path:
    """The train columns of ``src``, same grid origin (row/column offsets stay valid)."""
    if not path.exists():
        with rasterio.open(src) as ds:
            win = Window(0, 0, TRAIN_COLS, ds.height)
            profile = {**ds.profile, "width": TRAIN_COLS, "transform": ds.window_transform(win)}
            for key in ("blockxsize", "blockysize", "tiled"):
                profile.pop(key, None)
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(ds.read(window=win))
                dst.descriptions = ds.descriptions
                if ds.count == 1 and ds.colorinterp[0] == rasterio.enums.ColorInterp.palette:
                    dst.write_colormap(1, ds.colormap(1))
    return path


def geoseg(*args: str) -> str:
    return subprocess.run(["geoseg", "-q", *args], check=True, capture_output=True, text=True).stdout


def figures(cm: np.ndarray) -> dict[str, float]:
    m = compute_metrics(cm, IDS, average_over=AVERAGE)
    return {"miou": round(m.miou, 4), "oa": round(m.overall_accuracy, 4)}


def score(runs: str, seeds: list[str], predict_args: list[str] | None = None) -> None:
    """Seed ensembles of each fold predict the train-column crop; confusion matrices summed.

    ``predict_args`` (after ``--`` on the command line, e.g. ``-- --overlap 64``) are passed to
    every ``geoseg predict``: prediction-time settings scored on the same fold runs.
    """
    predict_args = predict_args or []
    out = Path(runs)
    scene, ref = crop(IMG, out / "train_columns.tif"), crop(REF, out / "train_columns_labels.tif")
    pooled = {"card": np.zeros((7, 7), np.int64), "plain": np.zeros((7, 7), np.int64)}
    result: dict[str, object] = {"runs": runs, "seeds": seeds, "predict_args": predict_args}
    for fold, (val, _) in FOLDS.items():
        ens = out / f"ensemble_{''.join(seeds)}_{fold}"
        geoseg("ensemble", *[str(out / f"s{s}_{fold}") for s in seeds], "--out", str(ens), "--float32", "--overwrite")
        for mode, flag in (("card", []), ("plain", ["--no-adapt-prior"])):
            pred = ens / mode
            geoseg("predict", str(scene), "--weights", str(ens / "weights.pdparams"), "--out", f"{pred}/",
                   "--vector", "none", "--overwrite", *flag, *predict_args)
            m = json.loads(geoseg("evaluate", str(pred / "train_columns_landcover.tif"), "--reference", str(ref),
                                  "--region", ",".join(map(str, val)), "--classes", ",".join(map(str, IDS)),
                                  "--json"))
            cm = np.asarray(m["confusion_matrix"], np.int64)
            pooled[mode] += cm
            result[f"{fold}_{mode}"] = figures(cm)
    for mode, cm in pooled.items():
        result[f"pooled_{mode}"] = figures(cm)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "configs":
        configs(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "score":
        args = sys.argv[3:]
        cut = args.index("--") if "--" in args else len(args)
        score(sys.argv[2], args[:cut], args[cut + 1:])
    else:
        sys.exit(__doc__)
