"""``geoseg train``: fit a segmentation model from image + label pairs (rasters or polygons; one or several scenes)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click
from geoseg_cli import options as o


def _set_values(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for v in value:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: use KEY=VALUE (VALUE is read as YAML, e.g. lr=0.0005)")
        k, val = v.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(val)
        except yaml.YAMLError:
            raise click.BadParameter(f"{v!r}: VALUE is not valid YAML") from None
    return out


@click.command(short_help="Train a model from GeoTIFF images + label rasters or polygons.")
@click.option("-c", "--config", "config", type=click.Path(path_type=Path), required=True,
              help="Training config (YAML): image, labels, regions (or a list of scenes), model, schedule ... (see sample_data/recipes/).")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Override the config's image raster.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Override the config's labels: a label raster on the image's grid or a polygon (vector) file.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (weights.pdparams, weights.yaml, checkpoints/, train_log.csv/json).")
@click.option("-m", "--model", type=click.Choice(["deeplabv3p", "unet"]), default=None, help="Architecture.")
@click.option("--iterations", type=int, default=None, callback=o._positive, help="Training iterations.")
@click.option("--batch-size", type=int, default=None, callback=o._positive, help="Windows per step.")
@click.option("--window", type=int, default=None, callback=o._positive, help="Training window size (pixels, multiple of 16).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (AdamW).")
@click.option("--val-every", type=int, default=None, callback=o._positive, help="Validate every N iterations.")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes (0 = in the main process).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Random seed (0 .. 2^32-1).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default=None, help="auto = GPU when available.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue from a checkpoint (OUT/checkpoints/last.pdparams or its folder); finishes a stopped run.")
@click.option("--set", "sets", multiple=True, callback=_set_values, metavar="KEY=VALUE",
              help="Override any config key (repeatable), e.g. --set class_weights=auto --set schedule=cosine.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out: its weights, logs and checkpoint are removed first "
                   "(else such a folder is refused).")
@click.pass_context
def train(ctx: click.Context, config: Path, image: Path | None, labels: Path | None, out: Path | None,
          model: str | None, iterations: int | None, batch_size: int | None, window: int | None,
          lr: float | None, val_every: int | None, workers: int | None, seed: int | None, device: str | None,
          resume: Path | None, sets: dict[str, Any], overwrite: bool) -> None:
    """Train a model as the YAML CONFIG says; options and --set override its keys.

    Writes OUT/weights.pdparams and its model card OUT/weights.yaml (the best checkpoint by
    validation mIoU; without a validation region, the last weights, their EMA when ema is set)
    when the run finishes, OUT/checkpoints/ (last.*, best.pdparams) for
    --resume, which also finishes a stopped run, and OUT/train_log.csv/.json. A folder another
    run is training into is refused. Prints the weights path on stdout.

    \b
    Example:
      geoseg train --config sample_data/recipes/nc_deeplabv3p.yaml --out runs/dlv3p
      geoseg predict scene.tif --weights runs/dlv3p/weights.pdparams
    """
    from geoseg.train import TrainConfig
    from geoseg.train import train as run_training

    overrides: dict[str, Any] = {
        "image": str(image) if image else None, "labels": str(labels) if labels else None,
        "out": str(out) if out else None, "model": model, "iterations": iterations, "batch_size": batch_size,
        "window": window, "lr": lr, "val_every": val_every, "workers": workers, "seed": seed, "device": device,
        "resume": str(resume) if resume else None,
        "progress": sys.stderr.isatty() and not ctx.obj.get("quiet", False),
    }
    cfg = TrainConfig.load(config, overrides, explicit=sets)
    if resume and not out and "out" not in sets:
        # a resumed run finishes in its own folder, not in the config's out: (a run stopped in
        # runs/stop finished in the recipe's runs/nc_unet, leaving runs/stop without a card)
        cfg = dataclasses.replace(cfg, out=TrainConfig.out)
    result = run_training(cfg, overwrite=overwrite)
    click.echo(str(result.weights))
