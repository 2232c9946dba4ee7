"""Benchmark ``geoseg.vectorize.vectorize_mask`` on 4096² and 16384² masks.

The masks are the sample land-cover label raster (489x443, classes 1-7, nodata 0) mirror-tiled
to size and written to tiled GeoTIFFs in ``bench/_work`` (gitignored; reused when present, or
--work).  Each size runs in its own subprocess so that its peak RSS is measured alone.  Prints
one line per size: seconds, megapixels/s, polygon count, peak RSS (PASS/FAIL against the
2.5 GB budget at 16384²), then a check that block-wise and whole-array results on a 1024²
mosaic have the same polygon count and total area within 0.5 %.

``--noise`` uses salt-and-pepper masks instead (uniform random classes 1-6: about 0.7 polygons
per pixel, the worst case for memory; strips are cut by value changes, ``STRIP_EDGES``).

Usage: python bench/bench_vectorize.py [--sizes 4096 16384] [--noise] [--min-pixels N] [--work DIR] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "nc_landsat7" / "landcover96_labels.tif"
WORK = Path(__file__).resolve().parent / "_work"
RSS_BUDGET_MB = 2500.0
RSS_BUDGET_SIZE = 16384


def make_mask(path: Path, size: int, strip: int = 2048) -> None:
    """Mirror-tile the sample labels to ``size`` x ``size`` (written strip by strip)."""
    import numpy as np
    import rasterio

    with rasterio.open(SAMPLE) as src:
        base = src.read(1)
        profile = src.profile
        cmap = src.colormap(1)
        tags = src.tags(1)
    tile = np.block([[base, base[:, ::-1]], [base[::-1], base[::-1, ::-1]]])  # seamless mirror period
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
    tmp = path.with_name(path.name + ".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        reps = (size + tile.shape[1] - 1) // tile.shape[1]
        for r0 in range(0, size, strip):
            r1 = min(size, r0 + strip)
            rows = np.arange(r0, r1) % tile.shape[0]
            block = np.tile(tile[rows], (1, reps))[:, :size]
            dst.write(block, 1, window=((r0, r1), (0, size)))
        dst.write_colormap(1, cmap)
        dst.update_tags(1, **tags)
    tmp.replace(path)


def make_noise(path: Path, size: int, strip: int = 1024) -> None:
    """Uniform random classes 1-6 (seeded), nodata 255, the sample's CRS and pixel size."""
    import numpy as np
    import rasterio

    with rasterio.open(SAMPLE) as src:
        profile = src.profile
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate", nodata=255)
    rng = np.random.default_rng(0)
    tmp = path.with_name(path.name + ".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, strip):
            r1 = min(size, r0 + strip)
            dst.write(rng.integers(1, 7, (r1 - r0, size)).astype(profile["dtype"]), 1, window=((r0, r1), (0, size)))
    tmp.replace(path)


def mask_for(work: Path, size: int, noise: bool = False) -> Path:
    mask = work / f"{'noise' if noise else 'mask'}_{size}.tif"
    if not mask.exists():
        (make_noise if noise else make_mask)(mask, size)
    return mask


def child(mask: str, out: str, min_pixels: int) -> None:
    from geoseg.vectorize import vectorize_mask

    res = vectorize_mask(mask, out, min_pixels=min_pixels or None, overwrite=True)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": res.seconds, "mpx_s": res.megapixels_per_second, "polygons": res.polygons, "rss_mb": rss_mb}))


def blockwise_check(work: Path, size: int = 1024, block: int = 128) -> str:
    """Block-wise (``block`` rows) vs whole-array run on a ``size``² mosaic, simplified (1 px)."""
    import pyogrio.raw

    from geoseg.vectorize import vectorize_mask

    mask = mask_for(work, size)
    stats = {}
    for name, bs in (("blocks", block), ("whole", size)):
        out = work / f"check_{size}_{name}.gpkg"
        res = vectorize_mask(mask, out, overwrite=True, block_size=bs)
        area = float(pyogrio.raw.read(out, layer=res.layer, columns=["area"], read_geometry=False)[3][0].sum())
        stats[name] = (res.polygons, area)
    (nb, ab), (nw, aw) = stats["blocks"], stats["whole"]
    rel = abs(ab - aw) / aw
    ok = nb == nw and rel < 0.005
    return (
        f"check {size}x{size} simplified, {block}-row strips vs whole array: {nb} vs {nw} polygons, "
        f"total area differs by {100 * rel:.2g} % -> {'PASS' if ok else 'FAIL'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--min-pixels", type=int, default=0)
    ap.add_argument("--noise", action="store_true", help="salt-and-pepper masks (the most polygons per pixel)")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--no-check", action="store_true", help="skip the block-wise vs whole-array check")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.no_check:
        print(blockwise_check(args.work), flush=True)
    for size in args.sizes:
        mask = mask_for(args.work, size, args.noise)
        out = args.work / f"landcover_{size}.gpkg"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(mask), str(out), str(args.min_pixels)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode:
            print(f"{size}x{size}: failed (exit {proc.returncode})\n{proc.stderr}", file=sys.stderr, flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        verdict = ""
        if size >= RSS_BUDGET_SIZE:
            verdict = f" -> {'PASS' if r['rss_mb'] < RSS_BUDGET_MB else 'FAIL'} (< {RSS_BUDGET_MB / 1000:.1f} GB)"
        print(
            f"{size}x{size}{' noise' if args.noise else ''} min_pixels={args.min_pixels}: {r['seconds']:.1f} s, {r['mpx_s']:.2f} Mpx/s, "
            f"{r['polygons']} polygons, peak RSS {r['rss_mb']:.0f} MB{verdict}, gpkg {out.stat().st_size / 1e6:.0f} MB",
            flush=True,
        )
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
