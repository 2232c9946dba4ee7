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
    normalize_for:         # the input dtype that Normalize is exact for, and how it was chosen
      dtype: uint16
      scale: 0.0001
      source: training image ...
    geoseg:                # the full geoseg model card (absent in PaddleSeg's own exports)
      name: ...
      classes: [...]

PaddleSeg's ``Normalize`` computes ``(x / 255 - mean) / std`` whatever the dtype, while the card
computes ``(x * scale[dtype] - mean) / std`` (``scale`` 1/255 for uint8 but 1/10000 for uint16 by
default). The export writes the card's mean and std divided by ``255 * scale``, with ``scale`` the
card's for the dtype the model was trained on (:func:`training_dtype`), so PaddleSeg's deploy tools
normalise that dtype exactly as geoseg does (any dtype with a scale > 0, float32 with scale 1
included; for uint8, scale 1/255, the card's own mean and std). Input of another dtype needs
another ``Normalize``: geoseg itself uses the card (its per-dtype ``scale`` table) when the
``geoseg`` section is present.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from geoseg.atomic import TMP_PREFIX, TMP_SUFFIX, atomic_write_text, file_above, is_leftover, temp_name
from geoseg.card import PALETTE, ClassInfo, ModelCard, Normalization
from geoseg.config import checked_arguments, load_yaml_mapping
from geoseg.errors import GeosegError, GeosegWarning, ModelError, ParameterError, warn

log = logging.getLogger(__name__)

OutputOp = Literal["none", "softmax", "argmax"]
DEPLOY_FILE = "deploy.yaml"
#: What an export folder holds (``--overwrite`` replaces a folder of these only).
EXPORT_FILES = ("model.json", "model.pdmodel", "model.pdiparams", "model.pdiparams.info", DEPLOY_FILE)

__all__ = ["DEPLOY_FILE", "export_model_dir", "load_exported", "paddleseg_normalize", "parse_classes", "training_dtype"]

#: Input dtypes a deploy.yaml's Normalize can be written for (what geoseg reads, :data:`geoseg.io.SUPPORTED_DTYPES`).
INPUT_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
#: PaddleSeg's ``Normalize`` divides every input by this before ``(x - mean) / std``.
PADDLESEG_DIVISOR = 255.0

_OUTPUT_FOR_OP: dict[str, Literal["logits", "probs", "labels"]] = {"none": "logits", "softmax": "probs", "argmax": "labels"}


@checked_arguments
def export_model_dir(
    card: ModelCard,
    weights: str | Path | None,
    out: str | Path,
    *,
    output_op: OutputOp = "none",
    layer: Any = None,
    overwrite: bool = False,
    input_dtype: str | None = None,
) -> Path:
    """Export a model (card + weights, or an in-memory ``layer``) into folder ``out``.

    Writes ``model.json``/``model.pdmodel`` + ``model.pdiparams`` (``paddle.jit.save``, input
    ``x``: float32 ``[N, C, H, W]`` normalised as the card says) and ``deploy.yaml``, whose
    PaddleSeg ``Normalize`` is the card's normalisation rescaled for PaddleSeg's ``x / 255``:
    exact for input of the dtype the model was trained on (:func:`paddleseg_normalize`).

    Args:
        card: The model card.
        weights: ``.pdparams`` file (ignored when ``layer`` is given).
        out: Output folder (created; must be empty or absent unless ``overwrite``).
        output_op: What the exported graph returns: ``none`` = logits NCHW, ``softmax`` =
            probabilities NCHW, ``argmax`` = class indexes N1HW int64... as PaddleSeg's export.
        layer: A ready ``paddle.nn.Layer`` to export instead of building one from the card.
        overwrite: Replace an existing export in ``out``.
        input_dtype: The raster dtype (``uint8``, ``uint16`` ...) PaddleSeg's ``Normalize`` is
            written for; default: the model's training dtype (:func:`training_dtype`; uint8, with
            a warning, when the card cannot tell).

    Returns:
        The folder.
    """
    from geoseg.engine import ModelSource, build_layer
    from geoseg.models.inference import export_model, find_model_files

    if output_op not in _OUTPUT_FOR_OP:
        raise ParameterError(f"output_op {output_op!r}: choose none, softmax or argmax")
    given = out = Path(out)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()  # the link's folder is the export's place: replacing the link would leave it stale
    out = Path(os.path.abspath(out))  # "." and "a/.." have a name and a parent to build beside
    if out.parent.is_dir():
        _clean_leftovers(out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"export target {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ParameterError(f"export folder {out} is not empty: choose another or pass --overwrite")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if foreign:  # --overwrite replaces the whole folder: never what the user keeps there
            raise ParameterError(f"export folder {out} holds more than an export ({', '.join(foreign[:3])}"
                                 f"{' ...' if len(foreign) > 3 else ''}): --overwrite would remove it; move those "
                                 "files or choose another --out")
    if weights is None and layer is None:  # an untrained network was exported without a word
        raise ParameterError(f"export of {card.name}: give its weights (or a ready layer); without them the network "
                             "would be exported untrained")
    if input_dtype is None:
        dtype, source = training_dtype(card, weights)
        if dtype is None:
            # uint8: what PaddleSeg's /255 is made for, and the card's own mean/std (as before the rescaling).
            dtype = "uint8"
            msg = (f"{card.name}: {source}: deploy.yaml's PaddleSeg Normalize is written for uint8 input; pass "
                   "--input-dtype if the model was trained on another type")
            if card.training:  # a trained model whose dtype is lost; an untrained card has no dtype to lose
                warn(msg, GeosegWarning)
            else:
                log.info("%s", msg)
            source = f"assumed uint8 ({source})"
    else:
        dtype, source = str(input_dtype), "given (--input-dtype)"
    mean, std, scale = paddleseg_normalize(card, dtype)
    net = build_layer(ModelSource(card=card, weights=Path(weights) if weights else None, layer=layer))
    if output_op != "none":
        net = with_output_op(net, output_op)
    # Built in a hidden folder beside ``out`` and renamed into place when whole: a killed export
    # leaves only that folder (removed by the next export to ``out``), never a half-written one
    # under the real name that predict would misread and a new export would refuse as not empty.
    tmp = _temp_folder(out)
    above = file_above(out)
    if above is not None:  # mkdir said only "File exists"
        raise ParameterError(f"cannot create export folder {out}: {above} is a file, not a folder: choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as train and ensemble make their --out
        tmp.mkdir()
    except OSError as exc:
        raise ParameterError(f"cannot create export folder {out}: {exc.strerror or exc}") from None
    try:
        export_model(net, tmp / "model", card.in_channels)
        program, params = find_model_files(tmp)
        deploy = {
            "Deploy": {
                "model": program.name,
                "params": params.name,
                "transforms": [{"type": "Normalize", "mean": mean, "std": std}],
                "input_shape": [-1, card.in_channels, -1, -1],
                "output_op": output_op,
            },
            # Beside Deploy, not in it or in Normalize: PaddleSeg passes a transform's keys to its class.
            "normalize_for": {"dtype": dtype, "scale": scale, "source": source},
            "geoseg": {**card.to_dict(), "weights": None, "output_op": output_op},
        }
        how = ("the card's mean and std as they are\n# (its scale for uint8 is 1/255)" if mean == list(card.normalization.mean)
               else f"the card's mean and std divided by\n# 255 * {scale:.10g} (the card's scale for {dtype})")
        note = (f"# Normalize below is PaddleSeg's (x / 255 - mean) / std with {how}: exact for {dtype} input only\n"
                "# (normalize_for). geoseg normalises every dtype with its own scale from the card (geoseg: section).\n")
        ids = [c.id for c in card.classes]
        if ids != list(range(len(ids))):  # a PaddleSeg consumer gets the argmax: index k, not the class id
            pairs = ", ".join(f"{k} -> {c.id} ({c.name})" for k, c in enumerate(card.classes))
            note += f"# PaddleSeg's prediction is the class index k, not the class id: {pairs}.\n"
        atomic_write_text(tmp / DEPLOY_FILE, note + yaml.safe_dump(deploy, sort_keys=False, default_flow_style=None,
                                                                 allow_unicode=True))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s + %s + %s)", card.name, out, program.name, params.name, DEPLOY_FILE)
    return given


#: The dtypes of geoseg's sample scenes that models are trained on (``training.image`` of the shipped cards), for
#: an install without the checkout's ``sample_data`` (a wheel): export found no dtype and warned.
SAMPLE_SCENE_DTYPES = {"sample_data/nc_landsat7/image_6band_uint8.tif": "uint8"}


def training_dtype(card: ModelCard, weights: str | Path | None = None) -> tuple[str | None, str]:
    """The raster dtype ``card``'s model was trained on, and where that was read.

    The card's normalisation statistics were computed on raw values of that dtype times the
    card's ``scale`` for it. Sources, in turn: a ``training.dtype`` key; the dtype of the
    training image (``training.image``, or the first readable of ``training.scenes`` or of an
    ensemble's ``training.member_settings.image``; a relative path is looked up from the working
    folder, then from the folders above ``weights``, so the shipped models find their sample
    scene in a source checkout).

    Returns:
        ``(dtype, source)``; ``(None, why)`` when the card cannot tell.
    """
    from geoseg.io import open_scene

    training = card.training or {}
    given = training.get("dtype")
    if given:
        return str(given), "the card's training.dtype"
    per_member = training.get("member_settings") or {}  # an ensemble of members trained on other images
    images = [training.get("image")] + [sc.get("image") for sc in training.get("scenes") or []
                                        if isinstance(sc, Mapping)] + list(per_member.get("image") or [])
    images = [str(p) for p in images if p]
    if not images:
        return None, "the card does not record its training image or dtype"
    bases = [Path(".")] + (list(Path(weights).resolve().parents)[:4] if weights else [])
    for image in images:
        for base in bases if not Path(image).is_absolute() and not image.startswith("/vsi") else [Path(".")]:
            path = base / image
            try:
                return open_scene(path).dtype, f"training image {path}"
            except (GeosegError, OSError):
                continue
    for image in images:  # (the shipped models' cards name the checkout's sample scene, which no wheel holds)
        if image in SAMPLE_SCENE_DTYPES:
            return SAMPLE_SCENE_DTYPES[image], f"training image {image} (geoseg's sample scene)"
    return None, f"its training image {images[0]} cannot be read"


def paddleseg_normalize(card: ModelCard, dtype: str) -> tuple[list[float], list[float], float]:
    """PaddleSeg ``Normalize`` mean and std that reproduce the card's normalisation on ``dtype``.

    PaddleSeg computes ``(x / 255 - mean') / std'``; with ``mean' = mean / (255 * scale)`` and
    ``std' = std / (255 * scale)`` that is the card's ``(x * scale - mean) / std`` exactly, for
    the card's ``scale`` of ``dtype`` (uint8 with scale 1/255 keeps the card's mean and std).

    Returns:
        ``(mean', std', scale)``.

    Raises:
        ParameterError: ``dtype`` is not a raster dtype geoseg reads, or its scale is not > 0.
    """
    if dtype not in INPUT_DTYPES:
        raise ParameterError(f"input dtype {dtype!r}: choose one of {', '.join(INPUT_DTYPES)}")
    scale = card.normalization.scale_for(dtype)
    if not math.isfinite(scale) or scale <= 0:
        raise ParameterError(f"{card.name}: the card's normalization scale for {dtype} is {scale}: PaddleSeg's "
                             "Normalize can only express a scale > 0; pass another --input-dtype")
    k = PADDLESEG_DIVISOR * scale
    return ([float(v) / k for v in card.normalization.mean], [float(v) / k for v in card.normalization.std],
            float(scale))


def _temp_folder(out: Path, kind: str = "") -> Path:
    """A hidden folder name beside ``out`` (same file system, so renames are atomic) that says
    which process made it, as every geoseg temp name does (:func:`geoseg.atomic.temp_name`):
    ``.geoseg-<name>.<host>-<pid>-<hex>[.old].tmp``."""
    t = temp_name(out)
    return t.with_name(t.name[: -len(TMP_SUFFIX)] + kind + TMP_SUFFIX)


def _clean_leftovers(out: Path) -> None:
    """Remove the hidden folders that killed exports to ``out`` left beside it (those of live
    processes are another export's work in progress and are kept: :func:`geoseg.atomic.is_leftover`).
    A previous export that a killed ``--overwrite`` had moved aside but not yet replaced is put back."""
    pattern = re.compile(rf"{re.escape(TMP_PREFIX + out.name)}\.[0-9a-f]{{8}}-\d+-[0-9a-f]{{8}}(\.old)?"
                         rf"{re.escape(TMP_SUFFIX)}")
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink() or not is_leftover(p):
            continue
        if m.group(1) and not out.exists() and (p / DEPLOY_FILE).is_file():
            with contextlib.suppress(OSError):
                os.rename(p, out)
                log.info("put back the export %s that a stopped export had moved aside", out)
            continue
        shutil.rmtree(p, ignore_errors=True)
        log.debug("removed %s, left by a stopped export", p)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished export folder ``tmp`` to ``out``: an absent or empty ``out`` is
    replaced in one rename; an old export is moved aside first, put back if the rename fails,
    and removed after it."""
    here = out.is_dir() and os.path.samefile(out, os.getcwd())
    if not here:
        try:
            os.replace(tmp, out)
            return
        except OSError:
            if not out.is_dir():
                raise
    if here or not any(out.iterdir()):
        # The working folder (renaming it away would strand this process and the user's shell in a
        # deleted folder), or an empty folder that cannot be renamed over: the files move in one by
        # one, the old deploy.yaml out first and the new one in last, so a stop in between leaves a
        # folder without deploy.yaml, never a deploy.yaml beside other model files.
        (out / DEPLOY_FILE).unlink(missing_ok=True)
        new = {p.name for p in tmp.iterdir()}
        for name in EXPORT_FILES:
            if name not in new:
                (out / name).unlink(missing_ok=True)
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == DEPLOY_FILE):
            os.replace(p, out / p.name)
        tmp.rmdir()
        return
    aside = _temp_folder(out, ".old")
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


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
                items = json.loads(p.read_text(encoding="utf-8")) if p.suffix.lower() == ".json" else yaml.safe_load(p.read_text(encoding="utf-8"))
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
    mean/std (PaddleSeg divides by 255 first, whatever the dtype; geoseg's exports write them
    rescaled so that this is exact for the training dtype, see ``normalize_for``), the input channels from
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
    elif card is None:  # (it was taken for a PaddleSeg export of 3 bands: --classes, then a Paddle crash)
        raise ModelError(f"exported model folder {d} has no {DEPLOY_FILE} (geoseg's and PaddleSeg's exports carry "
                         "one): export it again (geoseg export), or give the model's card with --card CARD.yaml")
    if card is None and deploy_path.is_file() and not ({"Deploy", "geoseg"} & set(map(str, deploy))):
        raise ModelError(f"{deploy_path} has neither a Deploy nor a geoseg section: it is not an export's deploy "
                         "file; export the model again (geoseg export)")
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
    transforms = dep.get("transforms") or []
    if not isinstance(transforms, list):  # (a mapping was ignored: the model then took raw values)
        raise ModelError(f"{d}/deploy.yaml: Deploy.transforms must be a list of transforms "
                         f"(- type: Normalize ...), not a {type(transforms).__name__}")
    try:
        return _paddleseg_card(d, dep, classes, transforms)
    except GeosegError:  # (a ModelError is a ValueError: "no class names" read "input_shape cannot be read")
        raise
    except (TypeError, ValueError, IndexError) as exc:  # (an "unexpected error" with a traceback's words)
        raise ModelError(f"{d}/deploy.yaml: its input_shape or Normalize cannot be read ({exc}): give input_shape as "
                         "[-1, C, H, W] and Normalize's mean and std as lists of numbers") from None


def _paddleseg_card(d: Path, dep: Mapping[str, Any], classes: tuple[ClassInfo, ...] | None,
                    transforms: list[Any]) -> ModelCard:
    if classes is None:
        raise ModelError(
            f"{d} is a PaddleSeg export without class names: pass --classes (e.g. --classes background,building "
            "or a YAML/JSON list of {id, name, color}) or --card CARD.yaml"
        )
    mean: list[float] | None = None
    std: list[float] | None = None
    for t in transforms:
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
