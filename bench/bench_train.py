"""Benchmark ``geoseg train`` on large scenes: memory and the time outside the iterations.

For a 2048² and an 8192² scene (the NC Landsat-7 sample and its labels mirror-tiled to size, in
``bench/_work``), each size runs ``geoseg train`` (the shipped UNet recipe's settings, the whole
scene as training region, no validation region, a few iterations) in its own subprocess and prints:

* seconds to read and normalise the training region, seconds per iteration, and seconds for the
  end of training (the card's class prior: at most 64 windows whatever the region's size),
* peak RSS, and its ratio to ``geoseg.train.region_memory`` (the estimate training checks against
  the available memory before it reads a region; the ratio should stay near or under 1 plus the
  fixed cost of Paddle, about 0.5 GB).

Each size runs twice: ``read_from: memory`` (the region read whole) and ``read_from: disk`` (labels
in memory, each window read from the file), so the two lines compare memory and seconds per
iteration in one run.

Usage: python bench/bench_train.py [--sizes 2048 8192] [--iterations 5] [--read-from memory disk]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import ROOT, WORK, make_scene, mirror_tile  # noqa: E402

LABELS = ROOT / "sample_data" / "nc_landsat7" / "landcover96_labels.tif"
RECIPE = ROOT / "sample_data" / "recipes" / "nc_unet.yaml"


def child(size: int, iterations: int, read_from: str) -> None:
    import geoseg.train as T

    scene = make_scene(size)
    labels = WORK / f"nc_labels_{size}.tif"
    if not labels.exists():
        mirror_tile(LABELS, labels, size)
    cfg = T.TrainConfig.load(RECIPE, explicit={
        "image": str(scene), "labels": str(labels), "train_region": None, "val_region": None,
        "iterations": iterations, "val_every": iterations, "warmup": 1, "out": str(WORK / f"train_{size}_{read_from}"),
        "read_from": read_from,
    })
    t0 = time.perf_counter()
    trainer = T.Trainer(cfg)
    t_load = time.perf_counter() - t0
    prior_s = []
    real = T.Trainer.write_class_prior

    def timed(self, *a, **k):  # the end of training: the card's class prior
        t = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            prior_s.append(time.perf_counter() - t)

    T.Trainer.write_class_prior = timed
    t1 = time.perf_counter()
    trainer.fit()
    t_fit = time.perf_counter() - t1 - prior_s[0]
    estimate = T.region_memory(trainer.train_region, len(trainer.bands), trainer.meta.dtype)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": size, "read_from": trainer.read_from, "load_s": round(t_load, 1), "s_per_it": round(t_fit / iterations, 2),
                      "prior_s": round(prior_s[0], 1), "peak_rss_mb": round(rss), "estimate_mb": round(estimate / 2**20)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--read-from", nargs="+", default=["memory", "disk"], choices=["memory", "disk"])
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.iterations, a.read_from[0])
        return
    for size, mode in ((s, m) for s in a.sizes for m in a.read_from):
        out = subprocess.run([sys.executable, __file__, "--child", str(size), "--iterations", str(a.iterations),
                              "--read-from", mode], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print(f"{size}² {mode}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1])
        print(f"{size}² from {r['read_from']}: read+normalise {r['load_s']} s, {r['s_per_it']} s/iteration, class prior {r['prior_s']} s, "
              f"peak RSS {r['peak_rss_mb']} MB (region estimate {r['estimate_mb']} MB, "
              f"ratio {r['peak_rss_mb'] / max(r['estimate_mb'], 1):.2f})")


if __name__ == "__main__":
    main()
