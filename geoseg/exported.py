"""Export models for Paddle Inference, and load exported folders (geoseg's or PaddleSeg's).

An export folder holds the static program (``model.json`` with Paddle 3.x, ``model.pdmodel``
with 2.x), its parameters ``model.pdiparams`` and a ``deploy.yaml`` laid out like PaddleSeg's::

    Deploy:
      model: model.json
      params: model.pdiparams
      transforms:
      - type: Normalize
        mean: [...]        # per band, applied as (x / 255 - mean) / std by PaddleSeg
        std: [...]
      input_shape: [-1, C, -1, -1]
      output_op: none      # none (logits), softmax (probabilities) or argmax (labels)
    geoseg:                # the full geoseg model card (absent in PaddleSeg's own exports)
      name: ...
      classes: [...]

geoseg's card normalisation for uint8 input is ``(x / 255 - mean) / std`` too, so the same
``Normalize`` entry is exact for PaddleSeg's deploy tools on 8-bit imagery; geoseg itself uses
the card (its per-dtype ``scale`` table) when the ``geoseg`` section is present.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from geoseg.atomic import atomic_write_text
from geoseg.card import PALETTE, ClassInfo, ModelCard, Normalization
from geoseg.config import load_yaml_mapping
from geoseg.errors import ModelError, ParameterError

log = logging.getLogger(__name__)

OutputOp = Literal["none", "softmax", "argmax"]
DEPLOY_FILE = "deploy.yaml"

__all__ = ["DEPLOY_FILE", "export_model_dir", "load_exported", "parse_classes"]

_OUTPUT_FOR_OP: dict[str, Literal["logits", "probs", "labels"]] = {"none": "logits", "softmax": "probs", "argmax": "labels"}


def export_model_dir(
    card: ModelCard,
    weights: str | Path | None,
    out: str | Path,
    *,
    output_op: OutputOp = "none",
    layer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Export a model (card + weights, or an in-memory ``layer``) into folder ``out``.

    Writes ``model.json``/``model.pdmodel`` + ``model.pdiparams`` (``paddle.jit.save``, input
    ``x``: float32 ``[N, C, H, W]`` normalised as the card says) and ``deploy.yaml``.

    Args:
        card: The model card.
        weights: ``.pdparams`` file (ignored when ``layer`` is given).
        out: Output folder (created; must be empty or absent unless ``overwrite``).
        output_op: What the exported graph returns: ``none`` = logits NCHW, ``softmax`` =
            probabilities NCHW, ``argmax`` = class indexes N1HW int64... as PaddleSeg's export.
        layer: A ready ``paddle.nn.Layer`` to export instead of building one from the card.
        overwrite: Replace an existing export in ``out``.

    Returns:
        The folder.
    """
    from geoseg.engine import ModelSource, build_layer
    from geoseg.models.inference import export_model, find_model_files

    if output_op not in _OUTPUT_FOR_OP:
        raise ParameterError(f"output_op {output_op!r}: choose none, softmax or argmax")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"export target {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ParameterError(f"export folder {out} is not empty: choose another or pass --overwrite")
    net = build_layer(ModelSource(card=card, weights=Path(weights) if weights else None, layer=layer))
    if output_op != "none":
        net = with_output_op(net, output_op)
    try:
        out.mkdir(parents=True, exist_ok=True)  # as train and ensemble make their --out
    except OSError as exc:
        raise ParameterError(f"cannot create export folder {out}: {exc.strerror or exc}") from None
    for old in ("model.json", "model.pdmodel", "model.pdiparams"):
        (out / old).unlink(missing_ok=True)
    export_model(net, out / "model", card.in_channels)
    program, params = find_model_files(out)
    deploy = {
        "Deploy": {
            "model": program.name,
            "params": params.name,
            "transforms": [{
                "type": "Normalize",
                "mean": [float(v) for v in card.normalization.mean],
                "std": [float(v) for v in card.normalization.std],
            }],
            "input_shape": [-1, card.in_channels, -1, -1],
            "output_op": output_op,
        },
        "geoseg": {**card.to_dict(), "weights": None, "output_op": output_op},
    }
    atomic_write_text(out / DEPLOY_FILE, yaml.safe_dump(deploy, sort_keys=False, default_flow_style=None))
    log.info("exported %s to %s (%s + %s + %s)", card.name, out, program.name, params.name, DEPLOY_FILE)
    return out


def with_output_op(net: Any, op: str) -> Any:
    """Wrap ``net`` so its graph returns probabilities (``softmax``) or class indexes (``argmax``)."""
    import paddle

    class _Head(paddle.nn.Layer):  # type: ignore[misc]
        def __init__(self, inner: Any, softmax: bool) -> None:
            super().__init__()
            self.inner = inner
            self.softmax = softmax  # an attribute: Paddle 2.6's dy2static cannot see a closure's variables

        def forward(self, x: Any) -> Any:
            y = self.inner(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            if self.softmax:
                return paddle.nn.functional.softmax(y, axis=1)
            return paddle.argmax(y, axis=1, keepdim=True, dtype="int32")

    head = _Head(net, op == "softmax")
    head.eval()
    return head


def parse_classes(spec: str | Path | Sequence[Any] | None) -> tuple[ClassInfo, ...] | None:
    """Class table from ``--classes``: comma-separated names, a YAML/JSON file, or a list.

    Names get ids 0, 1, 2 ... (output channel order). A file holds a list of names or of
    ``{id, name, color}`` mappings (or a mapping with a ``classes`` key).
    """
    if spec is None:
        return None
    items: Any
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if p.suffix.lower() in (".yaml", ".yml", ".json") or p.is_file():
            if not p.is_file():
                raise ParameterError(f"classes file {p} does not exist")
            try:
                items = json.loads(p.read_text()) if p.suffix.lower() == ".json" else yaml.safe_load(p.read_text())
            except (ValueError, yaml.YAMLError) as exc:
                raise ParameterError(f"classes file {p} cannot be parsed: {str(exc).splitlines()[0]}") from None
            if isinstance(items, Mapping):
                items = items.get("classes")
        else:
            items = [s.strip() for s in str(spec).split(",") if s.strip()]
    else:
        items = list(spec)
    if not items or not isinstance(items, (list, tuple)):
        raise ParameterError(f"--classes {spec!r}: give names separated by commas or a YAML/JSON list of classes")
    out = []
    for k, c in enumerate(items):
        if isinstance(c, ClassInfo):
            out.append(c)
        elif isinstance(c, Mapping):
            try:
                out.append(ClassInfo(int(c.get("id", k)), str(c.get("name", f"class_{k}")),
                                     tuple(int(v) for v in c.get("color", PALETTE[k % len(PALETTE)]))))  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                raise ParameterError(f"--classes entry {k} ({c!r}) is malformed: {exc}") from None
        else:
            out.append(ClassInfo(k, str(c), PALETTE[k % len(PALETTE)]))
    for what, keys in (("names", [c.name.lower() for c in out]), ("ids", [c.id for c in out])):
        twice = sorted({str(v) for v in keys if keys.count(v) > 1})
        if twice:
            raise ParameterError(f"--classes gives the {what} {', '.join(twice)} twice: each class needs its own")
    return tuple(out)


def load_exported(
    directory: str | Path,
    card: str | Path | ModelCard | None = None,
    classes: str | Path | Sequence[Any] | None = None,
) -> Any:
    """A :class:`geoseg.engine.ModelSource` for an export folder (geoseg's or PaddleSeg's).

    The card comes from ``card`` if given, else from the ``geoseg`` section of
    ``deploy.yaml``, else it is built from PaddleSeg's ``Deploy`` section: ``Normalize``
    mean/std (PaddleSeg divides by 255 first, whatever the dtype), the input channels from
    ``input_shape`` (or the number of means), and the classes from ``classes`` (required then:
    PaddleSeg's yaml has none). ``output_op`` maps to what the graph returns: ``argmax`` (also
    PaddleSeg's default when the key is absent) → labels, ``softmax`` → probabilities,
    ``none`` → logits.
    """
    from geoseg.engine import ModelSource
    from geoseg.models.inference import find_model_files

    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"exported model folder {d} does not exist")
    find_model_files(d)  # fail early with the standard message
    deploy_path = d / DEPLOY_FILE
    deploy: Mapping[str, Any] = {}
    if deploy_path.is_file():
        deploy = load_yaml_mapping(deploy_path, "deploy file", ModelError, empty_ok=True)
    dep = deploy.get("Deploy") or {}
    if not isinstance(dep, Mapping):
        raise ModelError(f"{deploy_path}: 'Deploy' is not a mapping")
    op = str(dep.get("output_op", "argmax" if dep else "none")).lower()
    if op not in _OUTPUT_FOR_OP:
        raise ModelError(f"{deploy_path}: output_op {op!r} is not none, softmax or argmax")
    class_table = parse_classes(classes)

    if isinstance(card, ModelCard):
        mc = card
    elif card is not None:
        mc = ModelCard.load(card)
    elif isinstance(deploy.get("geoseg"), Mapping):
        g = dict(deploy["geoseg"])
        g.pop("output_op", None)
        mc = ModelCard.from_dict(g, source=f"{deploy_path} (geoseg section)")
    else:
        mc = _card_from_paddleseg(d, dep, class_table)
    if class_table is not None:
        mc = mc.replace(classes=class_table)
    return ModelSource(card=mc, export_dir=d, output=_OUTPUT_FOR_OP[op])


def _card_from_paddleseg(d: Path, dep: Mapping[str, Any], classes: tuple[ClassInfo, ...] | None) -> ModelCard:
    if classes is None:
        raise ModelError(
            f"{d} is a PaddleSeg export without class names: pass --classes (e.g. --classes background,building "
            "or a YAML/JSON list of {id, name, color}) or --card CARD.yaml"
        )
    mean: list[float] | None = None
    std: list[float] | None = None
    for t in dep.get("transforms") or []:
        if isinstance(t, Mapping) and t.get("type") == "Normalize":
            mean = [float(v) for v in t.get("mean", [0.5, 0.5, 0.5])]
            std = [float(v) for v in t.get("std", [0.5, 0.5, 0.5])]
    shape = dep.get("input_shape") or []
    channels = int(shape[1]) if len(shape) > 1 and int(shape[1]) > 0 else (len(mean) if mean else 3)
    if mean is None or std is None:
        # Without Normalize, PaddleSeg feeds raw pixel values as float32.
        norm = Normalization(mean=(0.0,) * channels, std=(1.0,) * channels, scale={"default": 1.0})
    else:
        if len(mean) != channels:
            raise ModelError(f"{d}/deploy.yaml: Normalize has {len(mean)} means for {channels} input channels")
        norm = Normalization(mean=tuple(mean), std=tuple(std), scale={"default": 1.0 / 255.0})
    tile = 512
    if len(shape) == 4 and int(shape[2]) > 0 and int(shape[3]) > 0 and int(shape[2]) == int(shape[3]):
        tile = int(shape[2])
    return ModelCard(
        name=f"paddleseg:{d.name}", architecture="paddleseg-export", bands=tuple(f"b{i + 1}" for i in range(channels)),
        classes=classes, normalization=norm, tile_size=tile, overlap=tile // 4,
        description=f"PaddleSeg export {d}",
    )
