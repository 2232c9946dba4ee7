"""Seed ensembles: several copies of one network whose class probabilities are averaged.

A model card asks for one with ``params: {..., members: N}`` (see
:func:`geoseg.models.build_model`); ``geoseg ensemble`` combines trained runs into such a card
and weights file (:mod:`geoseg.ensemble`). The ensemble is one ``paddle.nn.Layer``, so predict,
export, Paddle Inference and the batch path run it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import paddle
import paddle.nn.functional as F  # noqa: N812

__all__ = ["Ensemble"]


class Ensemble(paddle.nn.Layer):
    """Average the softmax probabilities of ``members``.

    ``forward`` returns ``[log(mean probability)]``: log-probabilities, which act as logits
    (their softmax is the mean probability), so everything that takes a model's logits takes
    an ensemble's. Member ``i``'s parameters are named ``members.<i>.<name>``.

    Args:
        members: Networks with the same input and classes (each returns a list of logits, the
            main output first).
    """

    def __init__(self, members: Sequence[paddle.nn.Layer]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        self.members = paddle.nn.LayerList(list(members))

    def forward(self, x: paddle.Tensor) -> list[Any]:
        probs = [F.softmax(m(x)[0].astype("float32"), axis=1) for m in self.members]
        return [paddle.log(paddle.add_n(probs) / float(len(probs)))]
