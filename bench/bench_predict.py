"""Benchmark ``geoseg predict`` end to end: peak memory, speed, and overhead over the model.

For a 2048² and an 8192² scene built by mirror-tiling the shipped NC Landsat-7 sample, each size
runs in its own subprocess and prints:

* peak RSS of that process (the 8192² peak must stay within 1.3× the 2048² peak),
* end-to-end seconds, megapixels/s and windows/s,
* the model's own time on the same windows (read and normalised beforehand, untimed), and the
  ratio end-to-end / model (reading, blending and writing should hide behind the model: ≤ 1.15).

Usage::

    python bench/bench_predict.py [--sizes 2048 8192] [--model deeplabv3p] [--batch-size N] [--tile-size 512]
                                  [--overlap 128] [--adapt-prior] [--probabilities uint8|float32]

Windows, overlap and batch size default to what ``geoseg predict`` takes (the card's windows, the
CPU batch size for them): the figures are those a user gets without options.

Prior adaptation is off unless ``--adapt-prior`` is given (whatever the card says), so the
ratio measures the pipeline's own overhead; with ``--adapt-prior`` it includes the sample pass.

The mask only (no polygons: ``bench/bench_vectorize.py`` measures those).

``--sparse N`` measures a mostly empty scene instead: an N × N VRT holding the NC sample at its
centre (an archive mosaic with gaps, a scene's nodata frame), and prints the seconds per skipped
all-nodata window: what predict spends where there is nothing to predict.

``--memory T [T ...]`` checks the memory estimate predict refuses or warns by (the one ``geoseg
info`` prints): ``geoseg -q predict`` (mask only, no prior adaptation) over the 2048² mosaic in
windows of each size T (batch 1; the CPU default batch for the card's window), each run in its own
process, prints its peak RSS beside the estimate (the export cache warmed first).

Uses the shipped weights when they exist, else a random-init model of the same architecture
(speed and memory do not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Scenes and outputs: bench/_work (gitignored), or the folder GEOSEG_BENCH_WORK names (a read-only checkout, a
#: copy of the code under test); bench_batch.py takes it from here.
WORK = Path(os.environ.get("GEOSEG_BENCH_WORK") or ROOT / "bench" / "_work").expanduser()
SCENE = ROOT / "sample_data" / "nc_landsat7" / "image_6band_uint8.tif"
COMPACT = {
    "deeplabv3p": {"backbone_depth": 18, "backbone_width": 0.5, "aspp_channels": 128, "decoder_channels": 128, "separable": True},
    "unet": {"width": 0.25},
}


def make_scene(size: int) -> Path:
    """Mirror-tile the NC sample to size × size (keeps real texture, nodata and dtype)."""
    import rasterio

    out = WORK / f"nc_mosaic_{size}.tif"
    if out.exists():
        with rasterio.open(out) as ds:
            if all(ds.descriptions):
                return out
        out.unlink()  # made before the mosaics carried band names
    return mirror_tile(SCENE, out, size)


def mirror_tile(src: Path, out: Path, size: int) -> Path:
    """Write ``src`` mirror-tiled to size × size at ``out`` (tiled GeoTIFF; same dtype, nodata,
    band names and colormap)."""
    import rasterio

    WORK.mkdir(parents=True, exist_ok=True)
    with rasterio.open(src) as ds:
        a = ds.read()
        profile = ds.profile
        descriptions = ds.descriptions  # the band names the cards pick bands by
        try:
            cmap = ds.colormap(1)
        except ValueError:
            cmap = None
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    tmp = out.with_suffix(".tmp.tif")
    h, w = a.shape[1:]
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = descriptions
        for r0 in range(0, size, 512):
            for c0 in range(0, size, 512):
                rows = np.arange(r0, min(size, r0 + 512))
                cols = np.arange(c0, min(size, c0 + 512))
                ri = np.where((rows // h) % 2 == 0, rows % h, h - 1 - rows % h)
                ci = np.where((cols // w) % 2 == 0, cols % w, w - 1 - cols % w)
                block = a[:, ri][:, :, ci]
                from rasterio.windows import Window

                dst.write(block, window=Window(c0, r0, len(cols), len(rows)))
        if cmap:
            dst.write_colormap(1, cmap)
    os.replace(tmp, out)
    return out


def source_for(model: str):
    """Shipped model source if present, else a random-init compact model."""
    from geoseg.card import default_card
    from geoseg.engine import ModelSource, resolve_model, shipped_models

    if model in shipped_models():
        return resolve_model(model)
    import paddle

    from geoseg.models import build_model

    paddle.seed(0)
    card = default_card(model, 6, 7, params=COMPACT[model])
    return ModelSource(card, layer=build_model(model, **card.model_kwargs()))


def make_sparse(size: int) -> Path:
    """An N × N VRT with the NC sample at its centre, nodata elsewhere (same CRS and pixel size)."""
    import rasterio

    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"sparse_{size}.vrt"
    with rasterio.open(SCENE) as ds:
        off = (size - max(ds.width, ds.height)) // 2
        t = ds.transform
        bands = "".join(
            f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue><Description>{ds.descriptions[b - 1]}'
            f'</Description><SimpleSource><SourceFilename relativeToVRT="0">{SCENE}</SourceFilename>'
            f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>'
            f'<DstRect xOff="{off}" yOff="{off}" xSize="{ds.width}" ySize="{ds.height}"/></SimpleSource></VRTRasterBand>'
            for b in range(1, ds.count + 1))
        out.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{ds.crs.to_wkt()}</SRS>'
                       f"<GeoTransform>{t.c - off * t.a}, {t.a}, 0, {t.f - off * t.e}, 0, {t.e}</GeoTransform>"
                       f"{bands}</VRTDataset>")
    return out


def run_sparse(size: int, model: str) -> dict:
    """Child process: predict the sparse VRT (mask only, no prior adaptation)."""
    from geoseg.engine import PredictOptions, build_predictor, segment_scene

    src = source_for(model)
    predictor, _ = build_predictor(src, "cpu")
    out = WORK / f"out_sparse_{size}"
    out.mkdir(exist_ok=True)
    res = segment_scene(make_sparse(size), out, source=src, predictor=predictor,
                        options=PredictOptions(overwrite=True, vector="none", adapt_prior=False))
    return {"size": size, "windows": res.windows, "skipped": res.windows_skipped, "seconds": res.seconds,
            "model_seconds": res.model_seconds,
            "ms_per_skipped": 1000 * (res.seconds - res.model_seconds) / max(1, res.windows_skipped)}


def run_one(size: int, model: str, batch_size: int | None, tile: int | None, overlap: int | None,
            adapt_prior: bool = False, probabilities: str = "none") -> dict:
    """Child process: predict one scene; then time the model alone on the same windows (None: as
    predict chooses, from the card and the device)."""
    from geoseg.engine import (PredictOptions, _prepare_window, build_predictor, default_batch_size, segment_scene,
                               select_bands)
    from geoseg.io import open_scene
    from geoseg.tiling import batched, make_grid

    scene = WORK / f"nc_mosaic_{size}.tif"
    src = source_for(model)
    predictor, device = build_predictor(src, "cpu")
    tile = tile or src.card.tile_size
    overlap = src.card.overlap if overlap is None else overlap
    batch_size = batch_size or default_batch_size(device, tile)
    # warm-up (oneDNN kernels) with predict's own batch shape: a larger one (this bench warmed up on
    # one 512² window until session 19) raises the peak RSS above what predict ever holds (886 MB
    # against 692 MB for the shipped DeepLabv3+ at 128² batch 4) and hides how memory grows with the scene
    predictor(np.zeros((batch_size, src.card.in_channels, tile, tile), np.float32))
    out = WORK / f"out_{size}"
    out.mkdir(exist_ok=True)
    res = segment_scene(scene, out, source=src, predictor=predictor,
                        options=PredictOptions(overwrite=True, batch_size=batch_size, tile_size=tile, overlap=overlap,
                                               vector="none", adapt_prior=adapt_prior, probabilities=probabilities))
    peak_predict_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    meta = open_scene(scene)
    grid = make_grid(meta.height, meta.width, tile, overlap)
    bands = select_bands(meta, src.card, None)  # as predict picks them (the shipped cards read bands 1-5)
    model_s = 0.0
    for tiles in batched(list(grid.tiles()), batch_size):
        prepared = [_prepare_window(meta, t, bands, src.card, grid.model_shape) for t in tiles]
        keep = [x_t for x_t, _ in prepared if x_t is not None]
        if not keep:
            continue
        x = np.stack(keep)
        t0 = time.perf_counter()
        predictor(x)
        model_s += time.perf_counter() - t0
    return {
        "size": size,
        "device": device,
        "tile": tile,
        "overlap": overlap,
        "batch_size": batch_size,
        "windows": res.windows,
        "seconds": res.seconds,
        "megapixels_per_s": res.megapixels_per_s,
        "windows_per_s": res.windows_per_s,
        "model_seconds_alone": model_s,
        "model_seconds_in_pipeline": res.model_seconds,
        "ratio_end_to_end_over_model": res.seconds / model_s if model_s else float("nan"),
        "peak_rss_mb": peak_predict_mb,
    }


_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(rc)")


def run_memory(tiles: list[int], model: str) -> None:
    """Peak RSS of ``geoseg predict`` runs (each in a fresh process) against the estimate."""
    from geoseg.engine import card_members, default_batch_size, memory_estimate_mb, resolve_model

    card = resolve_model(model).card
    geoseg = [str(Path(sys.executable).with_name("geoseg"))]  # the console script of this environment
    scene = make_scene(2048)
    out = WORK / "out_memory"
    out.mkdir(exist_ok=True)
    common = ["-q", "predict", "--model", model, "--out", str(out), "--vector", "none", "--no-adapt-prior", "--overwrite"]
    subprocess.run([*geoseg, *common, str(SCENE)], check=True, stdout=subprocess.DEVNULL)  # fills the export cache
    print(f"{model} ({card_members(card)} member(s)), 2048² scene, {card.in_channels} bands, {card.num_classes} classes")
    for tile in tiles:
        batch = default_batch_size("cpu", tile) if tile == card.tile_size else 1
        proc = subprocess.run([sys.executable, "-c", _PEAK, *geoseg, *common, str(scene), "--tile-size", str(tile),
                               "--overlap", str(min(card.overlap, tile // 4)), "--batch-size", str(batch)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"tile {tile} failed:\n{proc.stderr[-3000:]}")
        peak = float(proc.stdout.strip().splitlines()[-1])
        est = memory_estimate_mb(tile, batch, height=2048, width=2048, bands=card.in_channels, itemsize=1,
                                 num_classes=card.num_classes, members=card_members(card))
        print(f"  {tile:>5} px, batch {batch}: peak RSS {peak:7.0f} MB, estimate {est:7.0f} MB ({est / peak - 1:+.0%})",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--model", default="deeplabv3p", choices=sorted(COMPACT))
    ap.add_argument("--batch-size", type=int, default=None, help="windows per call (default: predict's on CPU)")
    ap.add_argument("--tile-size", type=int, default=None, help="window size (default: the card's, as predict)")
    ap.add_argument("--overlap", type=int, default=None, help="window overlap (default: the card's, as predict)")
    ap.add_argument("--adapt-prior", action="store_true", help="predict with class-prior adaptation (needs a card with class_prior)")
    ap.add_argument("--probabilities", default="none", choices=["none", "uint8", "float32"],
                    help="also write the class probabilities raster (its cost)")
    ap.add_argument("--sparse", type=int, default=None, metavar="N",
                    help="measure an N x N VRT that holds the NC sample at its centre (skipped windows' cost)")
    ap.add_argument("--memory", type=int, nargs="+", default=None, metavar="TILE",
                    help="peak RSS of geoseg predict in windows of these sizes against its memory estimate")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sparse-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        run_memory(args.memory, args.model)
        return
    if args.sparse_child:
        print(json.dumps(run_sparse(args.sparse_child, args.model)))
        return
    if args.sparse:
        proc = subprocess.run([sys.executable, __file__, "--sparse-child", str(args.sparse), "--model", args.model],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"sparse {args.sparse} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"sparse {row['size']}²: {row['windows']} windows run, {row['skipped']} all-nodata skipped, "
              f"{row['seconds']:.1f} s (model {row['model_seconds']:.1f} s): {row['ms_per_skipped']:.2f} ms per skipped window")
        return
    if args.child:
        print(json.dumps(run_one(args.child, args.model, args.batch_size, args.tile_size, args.overlap, args.adapt_prior,
                                 args.probabilities)))
        return
    rows = []
    for size in args.sizes:
        make_scene(size)
        given = {"--batch-size": args.batch_size, "--tile-size": args.tile_size, "--overlap": args.overlap}
        cmd = [sys.executable, __file__, "--child", str(size), "--model", args.model,
               *[s for k, v in given.items() if v is not None for s in (k, str(v))],
               "--probabilities", args.probabilities, *(["--adapt-prior"] if args.adapt_prior else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"size {size} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{size:>6}²  {row['windows']:>4} windows  {row['seconds']:7.1f} s  {row['megapixels_per_s']:6.2f} Mpx/s  "
            f"{row['windows_per_s']:5.2f} win/s  model alone {row['model_seconds_alone']:7.1f} s  "
            f"end-to-end/model {row['ratio_end_to_end_over_model']:.3f}  peak RSS {row['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    if len(rows) >= 2:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        verdict = "OK" if ratio <= 1.3 else "OVER TARGET"
        print(f"peak RSS {rows[-1]['size']}² / {rows[0]['size']}² = {ratio:.3f} (target <= 1.3: {verdict})")
    print(f"model {args.model}, windows {rows[0]['tile']}/{rows[0]['overlap']}, batch {rows[0]['batch_size']}, "
          f"prior adaptation {'on' if args.adapt_prior else 'off'}, probabilities {args.probabilities}, "
          f"device {rows[0]['device']}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
