"""Write a shipped model's class_prior (and its config's adapt_prior) into its card, without retraining.

`geoseg train` writes both at the end of a run (session 6 on). The shipped weights were trained
before that; this gives their cards the same values from the same code (Trainer.class_prior: the
mean class probabilities of the weights over the config's training region, train columns only).

    python sample_data/recipes/class_prior.py deeplabv3p
    python sample_data/recipes/class_prior.py unet
    python sample_data/recipes/class_prior.py unet runs/nc_unet_s0    # a run folder's card instead
"""

from __future__ import annotations

import sys
import tempfile

from geoseg.card import ModelCard
from geoseg.engine import build_layer, resolve_model
from geoseg.train import TrainConfig, Trainer


def main(name: str, run: str | None = None) -> None:
    """``name``: deeplabv3p or unet (its config); ``run``: a run folder instead of the shipped weights."""
    src = resolve_model(None, weights=f"{run}/weights.pdparams") if run else resolve_model(name)
    layer = build_layer(src)  # a single model or a seed ensemble (its prior is then the ensemble's own)
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(TrainConfig.load(f"sample_data/recipes/nc_{name}.yaml", explicit={"out": out}))
        prior = t.class_prior(layer)
    card = src.weights.with_suffix(".yaml")
    ModelCard.load(card).replace(class_prior=prior, adapt_prior=t.cfg.adapt_prior).save(card)
    print(f"{card}: class_prior {prior}, adapt_prior {t.cfg.adapt_prior}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
