"""Benchmark geoseg's models on CPU: dygraph vs Paddle Inference (oneDNN), one window.

For each variant, prints the parameter count, the fp32 ``.pdparams`` size and the median
seconds per ``[1, C, S, S]`` window for :class:`~geoseg.models.inference.DygraphPredictor`
and :class:`~geoseg.models.inference.InferencePredictor`, plus the largest logit difference
between the two.  Weights are random (no download); timing does not depend on them.

Usage::

    .venv/bin/python bench/bench_models.py               # 512x512, 4 bands, 3 repeats
    .venv/bin/python bench/bench_models.py --slow        # also UNet width 1.0
    .venv/bin/python bench/bench_models.py --threads 2 --size 256 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoseg.models import build_model  # noqa: E402
from geoseg.models.checkpoints import save_weights  # noqa: E402
from geoseg.models.inference import DygraphPredictor, InferencePredictor, export_model  # noqa: E402

#: (label, model name, parameters, slow)
VARIANTS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("deeplabv3p R18 w1.0 aspp256", "deeplabv3p", {}, False),
    (
        "deeplabv3p R18 w0.5 aspp128",
        "deeplabv3p",
        {"backbone_width": 0.5, "aspp_channels": 128, "decoder_channels": 128},
        False,
    ),
    (
        "deeplabv3p R18 w0.5 aspp128 sep",
        "deeplabv3p",
        {"backbone_width": 0.5, "aspp_channels": 128, "decoder_channels": 128, "separable": True},
        False,
    ),
    (
        "deeplabv3p R18 w0.5 aspp64",
        "deeplabv3p",
        {"backbone_width": 0.5, "aspp_channels": 64, "decoder_channels": 64},
        False,
    ),
    ("unet w0.25", "unet", {"width": 0.25}, False),
    ("unet w0.5", "unet", {"width": 0.5}, False),
    ("unet w1.0", "unet", {"width": 1.0}, True),
]

WEIGHTS_LIMIT_MB = 15.0


def time_call(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Median wall seconds of ``fn(x)`` over ``repeats`` runs after one warm-up; last output."""
    out = fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table row per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="window height and width (px)")
    parser.add_argument("--bands", type=int, default=4, help="input bands")
    parser.add_argument("--classes", type=int, default=8, help="output classes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per predictor")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--slow", action="store_true", help="also run UNet width 1.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    import paddle

    threads = args.threads or os.cpu_count() or 1
    x = np.random.default_rng(0).standard_normal((1, args.bands, args.size, args.size)).astype(np.float32)
    print(
        f"paddle {paddle.__version__}, CPU, {threads} thread(s), window 1x{args.bands}x{args.size}x{args.size}, "
        f"median of {args.repeats}"
    )
    header = f"{'variant':32s} {'params':>9s} {'fp32 MB':>8s} {'fits':>5s} {'dygraph s':>10s} {'infer s':>8s} {'speedup':>8s} {'max|diff|':>10s}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, params, slow in VARIANTS:
            if slow and not args.slow:
                continue
            paddle.seed(0)
            model = build_model(name, in_channels=args.bands, num_classes=args.classes, **params)
            model.eval()
            n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
            weights = save_weights(model, Path(tmp) / f"{name}.pdparams")
            size_mb = weights.stat().st_size / 1e6
            folder = export_model(model, Path(tmp) / label.replace(" ", "_") / "model", args.bands)
            fast = InferencePredictor.from_dir(folder, threads=threads)
            t_dy, y_dy = time_call(DygraphPredictor(model), x, args.repeats)
            t_in, y_in = time_call(fast, x, args.repeats)
            diff = float(np.abs(y_dy - y_in).max())
            fits = "yes" if size_mb <= WEIGHTS_LIMIT_MB else "no"
            print(
                f"{label:32s} {n_params / 1e6:8.2f}M {size_mb:8.1f} {fits:>5s} {t_dy:10.3f} {t_in:8.3f} "
                f"{t_dy / t_in:7.1f}x {diff:10.2e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
