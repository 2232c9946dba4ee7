"""Combine trained runs of one model into a seed ensemble (``geoseg ensemble``).

Models trained with the same config and different seeds disagree most where they are unsure;
averaging their class probabilities takes out much of that seed-to-seed variance. The members
are written into one weights file (``members.<i>.<name>``) with one model card whose
``params.members`` is their number, so predict, export and batch run the ensemble like any
model (:class:`geoseg.models.ensemble.Ensemble`).

Example:
    >>> from geoseg.ensemble import combine_models, member_source
    >>> combine_models([member_source(d) for d in ("runs/s0", "runs/s1", "runs/s2")], "runs/ens")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.atomic import check_output
from geoseg.engine import ModelSource, resolve_model, shipped_models, weights_digest
from geoseg.errors import ModelError, OutputError

__all__ = ["combine_models", "member_source"]

log = logging.getLogger(__name__)

#: Card fields the members must share: the same network, input and classes.
_SHARED = ("architecture", "params", "bands", "classes", "normalization", "nodata_id")


def member_source(member: str | Path) -> ModelSource:
    """Resolve one member: a ``geoseg train`` output folder (``weights.pdparams`` +
    ``weights.yaml``), a ``.pdparams`` file with its card beside it, or a shipped model name."""
    path = Path(member)
    if path.is_dir():
        weights = path / "weights.pdparams"
        if not weights.is_file():
            hint = ("it is an exported folder: give the run's weights instead" if (path / "deploy.yaml").exists()
                    else "give a 'geoseg train' output folder or a .pdparams file")
            raise ModelError(f"member {path} has no weights.pdparams: {hint}")
        return resolve_model(None, weights=weights)
    if path.suffix == ".pdparams" or path.exists():
        return resolve_model(None, weights=path)
    if str(member) in shipped_models():
        return resolve_model(str(member))
    raise ModelError(f"member {member} does not exist: give a 'geoseg train' output folder, a .pdparams file "
                     f"or a shipped model name ({', '.join(shipped_models())})")


def combine_models(
    members: Sequence[ModelSource | str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    description: str | None = None,
    half: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the ensemble of ``members`` into ``out/weights.pdparams`` + ``out/weights.yaml``.

    A member is a :class:`~geoseg.engine.ModelSource` or what ``geoseg ensemble`` takes (a run
    folder, a ``.pdparams`` file, a shipped model name; see :func:`member_source`).

    The card is the first member's with ``params.members`` set, ``class_prior`` the mean of the
    members' (the ensemble's mean probability over the training region, when all have one),
    ``training.seeds`` the members' seeds and no validation metrics (they belonged to single
    members). ``half`` stores the weights as float16 (half the file; loaded back as float32).

    Returns:
        The card's path.

    Raises:
        ModelError: Fewer than two members, a member without weights or already an ensemble,
            the same weights twice, or members that differ in network, bands, classes or
            normalisation (the message names the field).
        OutputExistsError: The outputs exist and ``overwrite`` is false.
    """
    if len(members) < 2:
        raise ModelError("an ensemble needs at least 2 members: give two or more trained runs")
    members = [m if isinstance(m, ModelSource) else member_source(m) for m in members]
    first = members[0].card
    digests: dict[str, int] = {}
    for i, m in enumerate(members, 1):
        if m.weights is None:
            raise ModelError(f"member {i} ({m.label}) has no weights file: give the run it was exported from")
        if int(m.card.params.get("members", 1)) > 1:
            raise ModelError(f"member {i} ({m.weights}) is already an ensemble: give its members' runs instead")
        for field in _SHARED:
            if getattr(m.card, field) != getattr(first, field):
                raise ModelError(f"member {i} ({m.weights}) differs from member 1 ({members[0].weights}) in its "
                                 f"{field}: the members must be one model trained with different seeds")
        digest = weights_digest(m)
        if digest in digests:
            raise ModelError(f"members {digests[digest]} and {i} have the same weights ({m.weights}): "
                             "give runs trained with different seeds")
        digests[digest] = i

    out = Path(out)
    weights_path, card_path = out / "weights.pdparams", out / "weights.yaml"
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} is a file: give a folder for the ensemble")
    out.mkdir(parents=True, exist_ok=True)
    for p in (weights_path, card_path):
        check_output(p, overwrite)

    from geoseg.models import build_model
    from geoseg.models.checkpoints import load_weights, save_weights

    ensemble = build_model(first.architecture, **first.model_kwargs(), members=len(members))
    for net, m in zip(ensemble.members, members):
        load_weights(net, m.weights)

    priors = [m.card.class_prior for m in members]
    prior = None
    if all(p is not None for p in priors):
        mean = np.mean(np.asarray(priors, dtype=np.float64), axis=0)
        prior = tuple(round(float(v), 6) for v in mean / mean.sum())
    seeds = [m.card.training.get("seed") for m in members]
    training: dict[str, Any] = {**dict(first.training), "seeds": seeds, "members": [str(m.weights) for m in members]}
    card = first.replace(
        name=name or f"{first.name}-ensemble",
        description=description if description is not None else
        f"{first.description.rstrip()} Seed ensemble of {len(members)} runs (seeds {', '.join(map(str, seeds))}): "
        "their class probabilities are averaged.".lstrip(),
        params={**dict(first.params), "members": len(members)},
        weights=weights_path.name,
        training=training,
        metrics={},
        class_prior=prior,
        adapt_prior=first.adapt_prior and prior is not None,
    )
    # The old card goes first and the new one comes last: a run stopped in between leaves the new
    # weights without a card (which predict refuses, naming the missing card), never beside the old
    # card of other members (which, with the same member count, would load them silently).
    card_path.unlink(missing_ok=True)
    save_weights(ensemble, weights_path, dtype="float16" if half else None)
    card.save(card_path)
    log.info("wrote the %d-member ensemble %s (%s)", len(members), card_path, card.name)
    return card_path
