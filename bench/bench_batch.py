"""Benchmark ``geoseg batch`` over an archive: throughput, the cost of a run with nothing to do, a
local Dask cluster against one process, and batch against a shell loop of ``geoseg predict``.

Builds an archive of N scenes (default 6 of 1024², the NC sample mirror-tiled, in
``bench/_work/batch_archive/``), then runs, each as its own process tree (as cron would):

* **loop**: ``geoseg -q predict SCENE --out DIR`` once per scene (what a script without batch does:
  every scene pays the start-up and the model load);
* **batch**: ``geoseg -q batch ARCHIVE --out DIR`` (scenes in one process, the model loaded once);
* **again**: the same batch command a second time: every scene is unchanged and skipped (the
  nightly run on an archive with nothing new);
* **cluster**: ``geoseg -q batch ARCHIVE --out DIR --workers 2 --force``: a local Dask cluster of
  two worker processes, the cores split between them.

For each it prints the wall seconds, scenes per minute, megapixels/s and the peak of the summed RSS
of the whole process tree (sampled every 50 ms: Dask's scheduler and workers included; shared pages
count once per process, so the sum overstates a little), then the ratios batch / loop and cluster /
batch, and the seconds per skipped scene. Every mask of batch and cluster is checked, pixel for
pixel, against the loop's.

Usage::

    python bench/bench_batch.py [--scenes 6] [--size 1024] [--model deeplabv3p] [--vector gpkg|none]

Polygons are written as the commands' defaults do (GeoPackage) unless ``--vector none``; the mosaic
VRT too (batch's default). The export cache is warmed first, so no run pays the one-off export.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench_predict import SCENE, WORK, mirror_tile


def make_archive(n: int, size: int) -> Path:
    """``n`` scenes of ``size``² in nested folders (batch mirrors the tree in its output)."""
    import rasterio

    base = WORK / f"batch_scene_{size}.tif"
    if not base.exists():
        mirror_tile(SCENE, base, size)
    archive = WORK / f"batch_archive_{n}x{size}"
    if archive.exists() and len(list(archive.rglob("*.tif"))) == n:
        return archive
    shutil.rmtree(archive, ignore_errors=True)
    for i in range(n):
        folder = archive / f"path{i % 2:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base, folder / f"scene_{i:02d}.tif")
    with rasterio.open(base) as ds:
        assert ds.width == size
    return archive


def run_tree(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak summed RSS of its process tree in MB)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            peak[0] = max(peak[0], total / 2**20)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return seconds, peak[0]


def masks(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.rglob("*_landcover.tif")}


def same_masks(a: Path, b: Path) -> bool:
    import rasterio

    ma, mb = masks(a), masks(b)
    if sorted(ma) != sorted(mb):
        return False
    for name, p in ma.items():
        with rasterio.open(p) as x, rasterio.open(mb[name]) as y:
            if x.transform != y.transform or x.crs != y.crs or not np.array_equal(x.read(), y.read()):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="deeplabv3p")
    ap.add_argument("--vector", default="gpkg", choices=["gpkg", "none"])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the cluster run")
    args = ap.parse_args()

    geoseg = str(Path(sys.executable).with_name("geoseg"))  # the console script of this environment
    archive = make_archive(args.scenes, args.size)
    scenes = sorted(archive.rglob("*.tif"))
    out = WORK / "batch_out"
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("warm", *(f"loop/{s.parent.relative_to(archive)}" for s in scenes)):
        (out / sub).mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--vector", args.vector]
    # the export cache (Paddle Inference's model files) is made once per model: not part of any run
    subprocess.run([geoseg, "-q", "predict", str(SCENE), "--out", str(out / "warm"), *common, "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL)

    def row(name: str, seconds: float, peak: float, n: int) -> None:
        mpx = n * args.size**2 / 1e6
        print(f"{name:<8} {n:>3} scenes {seconds:7.1f} s  {60 * n / seconds:6.1f} scenes/min  "
              f"{mpx / seconds:5.2f} Mpx/s  peak tree RSS {peak:6.0f} MB", flush=True)

    loop_s, loop_peak = 0.0, 0.0
    for s in scenes:
        dest = out / "loop" / s.parent.relative_to(archive)
        sec, peak = run_tree([geoseg, "-q", "predict", str(s), "--out", str(dest), *common])
        loop_s += sec
        loop_peak = max(loop_peak, peak)
    row("loop", loop_s, loop_peak, len(scenes))
    batch_cmd = [geoseg, "-q", "batch", str(archive), "--out", str(out / "batch"), *common]
    sec, peak = run_tree(batch_cmd)
    row("batch", sec, peak, len(scenes))
    again_s, again_peak = run_tree(batch_cmd)
    print(f"{'again':<8} {len(scenes):>3} scenes {again_s:7.1f} s  all skipped: "
          f"{again_s / len(scenes):.2f} s per scene with the start-up, peak tree RSS {again_peak:6.0f} MB", flush=True)
    cl_s, cl_peak = run_tree([geoseg, "-q", "batch", str(archive), "--out", str(out / "cluster"), *common,
                              "--workers", str(args.workers), "--force"])
    row("cluster", cl_s, cl_peak, len(scenes))

    print(f"batch / loop = {sec / loop_s:.3f}; cluster ({args.workers} workers) / batch = {cl_s / sec:.3f}")
    ok = same_masks(out / "loop", out / "batch") and same_masks(out / "loop", out / "cluster")
    print(f"masks of batch and cluster identical to the loop's: {'yes' if ok else 'NO'}")
    print(f"model {args.model}, {len(scenes)} scenes of {args.size}², polygons {args.vector}, {os.cpu_count()} CPUs")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
