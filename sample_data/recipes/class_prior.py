"""Write a shipped model's class_prior (and its config's adapt_prior) into its card, without retraining.

`geoseg train` writes both at the end of a run (session 6 on). The shipped weights were trained
before that; this gives their cards the same values from the same code (Trainer.class_prior: the
mean class probabilities of the weights over the config's training region, train columns only).

    python sample_data/recipes/class_prior.py deeplabv3p
    python sample_data/recipes/class_prior.py unet
"""

from __future__ import annotations

import sys
import tempfile

from geoseg.card import ModelCard
from geoseg.models.checkpoints import load_weights
from geoseg.train import TrainConfig, Trainer


def main(name: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(TrainConfig.load(f"sample_data/recipes/nc_{name}.yaml", explicit={"out": out}))
        layer = t.configure_model()
        load_weights(layer, f"geoseg/weights/{name}.pdparams")
        prior = t.class_prior(layer)
    card = f"geoseg/weights/{name}.yaml"
    ModelCard.load(card).replace(class_prior=prior, adapt_prior=t.cfg.adapt_prior).save(card)
    print(f"{card}: class_prior {prior}, adapt_prior {t.cfg.adapt_prior}")


if __name__ == "__main__":
    main(sys.argv[1])
