"""``geoseg ensemble``: combine trained runs of one model into a seed ensemble."""

from __future__ import annotations

from pathlib import Path

import click
from geoseg_cli import options as o


@click.command(short_help="Average several trained runs of one model (a seed ensemble).")
@click.argument("members", nargs=-1, required=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: weights.pdparams + weights.yaml are written there.")
@click.option("--name", default=None, help="Model name in the card (default: the first member's + '-ensemble').")
@click.option("--half/--float32", default=True, show_default=True,
              help="Store the weights as float16 (half the file; computed in float32).")
@o.overwrite_opt
def ensemble(members: tuple[str, ...], out: Path, name: str | None, half: bool, overwrite: bool) -> None:
    """Combine MEMBERS (geoseg train output folders, or .pdparams files with their cards; not the
    shipped models, which are ensembles already) into one model that averages their class probabilities.

    The members must be the same network, bands, classes and normalisation, and are meant to be
    one config trained with different seeds: members trained with other settings (window, loss,
    iterations, adapt_prior ...) are combined with a warning naming them, the card records each
    member's value under training.member_settings, keeps member 1's tile_size/overlap and adapts
    priors by default only when every member does. The result predicts, exports and batches like
    any model, at N times a member's model time. Prints the card's path on stdout.

    \b
    Example:
      geoseg ensemble runs/unet_s0 runs/unet_s1 runs/unet_s2 --out runs/unet_ens
      geoseg predict scene.tif --weights runs/unet_ens/weights.pdparams
    """
    from geoseg.ensemble import combine_models, member_source

    card = combine_models([member_source(m) for m in members], out, name=name, half=half, overwrite=overwrite)
    click.echo(str(card))
