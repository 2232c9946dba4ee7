"""Combine trained runs of one model into a seed ensemble (``geoseg ensemble``).

Models trained with the same config and different seeds disagree most where they are unsure;
averaging their class probabilities takes out much of that seed-to-seed variance. The members
are written into one weights file (``members.<i>.<name>``) with one model card whose
``params.members`` is their number, so predict, export and batch run the ensemble like any
model (:class:`geoseg.models.ensemble.Ensemble`). Members trained with other settings (window,
loss, iterations, ``adapt_prior`` ...) are combined too, with a warning: the card's ``training``
keeps the settings they share and ``training.member_settings`` the others, one value per member.

Example:
    >>> from geoseg.ensemble import combine_models, member_source
    >>> combine_models([member_source(d) for d in ("runs/s0", "runs/s1", "runs/s2")], "runs/ens")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.atomic import check_output, write_error
from geoseg.engine import ModelSource, resolve_model, shipped_models, weights_digest
from geoseg.card import ModelCard
from geoseg.config import checked_arguments, plain
from geoseg.errors import GeosegError, GeosegWarning, ModelError, OutputError, ParameterError, warn

__all__ = ["combine_models", "member_settings", "member_source"]

log = logging.getLogger(__name__)

#: Card fields the members must share: the same network, input and classes.
_SHARED = ("architecture", "params", "bands", "classes", "normalization", "nodata_id")
#: Card fields outside ``training`` that follow from a member's config: compared like its settings.
_SETTINGS = ("tile_size", "overlap", "adapt_prior", "pixel_size")
#: ``training`` keys that differ from run to run of one config: recorded, never warned about
#: (``seed`` goes to ``training.seeds``).
_PER_RUN = ("seed", "best_iteration", "device")


def member_source(member: str | Path, what: str = "member") -> ModelSource:
    """Resolve one member: a ``geoseg train`` output folder (``weights.pdparams`` +
    ``weights.yaml``), a ``.pdparams`` file with its card beside it, or a shipped model name.

    A shipped model's name beside a folder or file of that name is refused, as ``--model`` refuses it:
    ``./unet`` is the folder (it took the folder without a word: a run trained with ``--out unet``, or
    whatever lay there)."""
    path = Path(member)
    if isinstance(member, str) and member in shipped_models() and os.path.lexists(member):
        raise ModelError(f"{what} {member} names geoseg's shipped {member}, and {member} lies here too: pass "
                         f"./{member} for that one, or run from another folder for geoseg's {member}")
    if path.is_dir():
        weights = path / "weights.pdparams"
        if not weights.is_file():
            hint = ("it is an exported folder: give the run's weights instead" if (path / "deploy.yaml").exists()
                    else "give a 'geoseg train' output folder or a .pdparams file")
            raise ModelError(f"{what} {path} has no weights.pdparams: {hint}")
        return resolve_model(None, weights=weights)
    if path.suffix == ".pdparams" or path.exists():
        return resolve_model(None, weights=path)
    if str(member) in shipped_models():
        return resolve_model(str(member))
    # (an ensemble member is a single run: the shipped models, ensembles themselves, are refused as members)
    shipped = [n for n in shipped_models() if what != "member" or _single(n)]
    raise ModelError(f"{what} {member} does not exist: give a 'geoseg train' output folder"
                     + (f", a .pdparams file or a shipped model name ({', '.join(shipped)})" if shipped
                        else " or a .pdparams file"))


def _single(name: str) -> bool:
    """Whether the shipped model ``name`` is one run (not an ensemble, which ensemble refuses as a member)."""
    try:
        return int(resolve_model(name).card.params.get("members", 1)) <= 1
    except GeosegError:
        return False


@checked_arguments
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

    Members are meant to be one config trained with different seeds. Those whose ``training``
    settings (or ``tile_size``, ``overlap``, ``adapt_prior``, ``pixel_size``) differ are combined
    with a :class:`~geoseg.errors.GeosegWarning` naming each differing setting and its value per
    member (differences in ``seed``, ``best_iteration`` and ``device`` are expected and not warned
    about); ``training`` then keeps only the shared settings and ``training.member_settings`` the
    differing ones as ``{key: [member 1's, member 2's, ...]}`` (nested keys dotted,
    ``augment.brightness``; ``null`` where a member's card lacks the key). The card keeps member
    1's ``tile_size``/``overlap``/``pixel_size`` (predict's ``--tile-size``/``--overlap`` override
    them), and adapts priors by default only when every member's card does.

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
    for i, m in enumerate(members, 1):  # (--overwrite replaced the member's weights and card with the ensemble)
        if out.exists() and m.weights is not None and Path(m.weights).parent.resolve() == out.resolve():
            raise ParameterError(f"output {out} is member {i}'s run folder: write the ensemble into another folder")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # (a read-only folder was "unexpected error: OSError: [Errno 30]")
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}: choose another --out") from None
    try:
        return _write_ensemble(members, first, out, weights_path, card_path, name, description, half, overwrite)
    except BaseException:
        if made:  # (a failed run left the empty folder it made)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _write_ensemble(members: list[ModelSource], first: ModelCard, out: Path, weights_path: Path, card_path: Path,
                    name: str | None, description: str | None, half: bool, overwrite: bool) -> Path:
    """:func:`combine_models`'s writing, into the folder ``out`` that exists."""
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
    shared, differ = member_settings([m.card for m in members])
    warned = [k for k in differ if k not in _PER_RUN]
    adapt = all(m.card.adapt_prior for m in members) and prior is not None
    if warned:
        warn(_differ_message(differ, warned, adapt), GeosegWarning)
    training: dict[str, Any] = {**shared, "seeds": seeds, "members": [str(m.weights) for m in members],
                                **({"member_settings": differ} if differ else {})}
    kind = (f"Seed ensemble of {len(members)} runs" if not warned else
            f"Ensemble of {len(members)} runs with different {', '.join(warned)}")
    card = first.replace(
        name=name or f"{first.name}-ensemble",
        description=description if description is not None else
        f"{first.description.rstrip()} {kind} (seeds {', '.join(map(str, seeds))}): "
        "their class probabilities are averaged.".lstrip(),
        params={**dict(first.params), "members": len(members)},
        weights=weights_path.name,
        training=training,
        metrics={},
        class_prior=prior,
        adapt_prior=adapt,
    )
    # The old card goes first and the new one comes last: a run stopped in between leaves the new
    # weights without a card (which predict refuses, naming the missing card), never beside the old
    # card of other members (which, with the same member count, would load them silently).
    card_path.unlink(missing_ok=True)
    writing = weights_path
    try:
        save_weights(ensemble, weights_path, dtype="float16" if half else None)
        writing = card_path
        card.save(card_path)
    except GeosegError:
        raise
    except OSError as exc:  # (a full disk said "no space left on the device" and named no file)
        raise write_error(writing, exc) from None
    log.info("wrote the %d-member ensemble %s (%s)", len(members), card_path, card.name)
    return card_path


def _flatten(m: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{("augment", "flips"): True, ...}``: nested mappings become key paths (empty ones stay values)."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in m.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def member_settings(cards: Sequence[ModelCard]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split the members' training settings into the shared and the differing.

    Compares the cards' ``training`` sections (nested mappings key by key) and the card fields
    :data:`_SETTINGS`.

    Returns:
        ``(shared, differ)``: ``shared`` is the first card's ``training`` without the differing
        keys (and without ``seed``, which the ensemble lists under ``seeds``); ``differ`` maps each
        differing setting (``window``, ``augment.brightness``, ``adapt_prior`` ...) to its value
        per member, ``None`` where a card lacks it, in member order.
    """
    flat = [{**_flatten(c.training), **{(f,): getattr(c, f) for f in _SETTINGS}} for c in cards]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ: dict[str, list[Any]] = {}
    for k in keys:
        values = [f.get(k) for f in flat]
        if k != ("seed",) and any(v != values[0] for v in values[1:]):
            differ[".".join(k)] = [plain(v) for v in values]
    shared: dict[str, Any] = plain(cards[0].training)  # (a deep copy)
    shared.pop("seed", None)
    for name in differ:
        *path, last = name.split(".")
        node: Any = shared
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return shared, differ


def _differ_message(differ: Mapping[str, Sequence[Any]], keys: Sequence[str], adapt: bool) -> str:
    """One line: the settings the members differ in, with each member's value, and what the card does."""
    def show(v: Any) -> str:
        return "-" if v is None else v if isinstance(v, str) else json.dumps(v)

    what = "; ".join(f"{k}: {' | '.join(show(v) for v in differ[k])}" for k in keys)
    then = ["the card lists each member's under training.member_settings"]
    kept = [k for k in ("tile_size", "overlap", "pixel_size") if k in differ]
    if kept:
        then.append(f"keeps member 1's {'/'.join(kept)}")
    if "adapt_prior" in differ:
        then.append("adapts priors " + ("by default (every member does)" if adapt else
                                        "only with predict --adapt-prior (not every member does)"))
    return (f"ensemble members differ in more than their seeds ({what}): a seed ensemble averages runs of one "
            f"config; {', '.join(then[:-1]) + ' and ' + then[-1] if len(then) > 1 else then[0]}")
