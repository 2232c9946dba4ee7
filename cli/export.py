"""``geoseg export``: write a Paddle Inference model folder with a PaddleSeg-style deploy.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import click
from geoseg_cli import options as o


@click.command(short_help="Export a model for Paddle Inference (model + params + deploy.yaml).")
@click.option("-m", "--model", default=None,
              help="Model name (deeplabv3p, unet; default: the card's architecture, else the shipped deeplabv3p).")
@o.weights_opt
@o.card_opt
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--output-op", type=click.Choice(["none", "softmax", "argmax"]), default="none", show_default=True,
              help="What the exported graph returns: logits (none), probabilities or class indexes (as PaddleSeg; "
                   "predict then runs it without the card's prior adaptation, confidence or probabilities).")
@click.option("--input-dtype", type=click.Choice(["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"]),
              default=None,
              help="Raster type that deploy.yaml's PaddleSeg Normalize is exact for (default: the type the model "
                   "was trained on, read from its card's training image; uint8 when unknown).")
@o.overwrite_opt
def export(model: str | None, weights: Path | None, card: Path | None, out: Path, output_op: str,
           input_dtype: str | None, overwrite: bool) -> None:
    """Export --model/--weights (or the shipped model) into the folder --out.

    The folder holds model.json (Paddle 3.x; model.pdmodel with 2.x), model.pdiparams and a
    deploy.yaml laid out like PaddleSeg's, with geoseg's model card alongside; run it with
    'geoseg predict SCENE --model OUT'. PaddleSeg's Normalize divides every input by 255, so its
    mean/std are the card's rescaled to be exact for one raster type: the one the model was
    trained on (or --input-dtype); geoseg reads any type through the card. The folder is built
    hidden beside OUT and renamed into place when whole (a stopped export leaves no half-written
    OUT). Prints the folder on stdout.

    \b
    Example:
      geoseg export --model deeplabv3p --out exported/deeplabv3p
    """
    from geoseg.engine import resolve_model
    from geoseg.exported import export_model_dir
    from geoseg.models import MODEL_NAMES

    # (before reading it: a PaddleSeg export asked for --classes)
    if model is not None and model not in MODEL_NAMES and os.path.isfile(os.path.join(model, "deploy.yaml")):
        raise click.BadParameter(f"{model} is already an exported folder", param_hint="--model")
    source = resolve_model(model, weights, card, exported=False)  # (a name beside a folder of that name: the model)
    if source.export_dir is not None:  # (an export without deploy.yaml, read with --card)
        raise click.BadParameter(f"{model} is already an exported folder", param_hint="--model")
    folder = export_model_dir(source.card, source.weights, out, output_op=output_op,  # type: ignore[arg-type]
                              overwrite=overwrite, input_dtype=input_dtype)
    click.echo(str(folder))
