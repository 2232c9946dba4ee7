"""Training: random-window dataset, augmentations, losses, schedules and the :class:`Trainer`.

``geoseg train`` fits a model on one GeoTIFF image and a label raster on the same grid. Pixels
of the label raster are class ids; ``ignore`` values (and the label raster's nodata) are not
scored. Two regions of the scene are used: random square windows are cut from the *train*
region, and the *validation* region is predicted window by window every ``val_every``
iterations. A region is a pixel window ``[col_off, row_off, width, height]`` or a vector AOI
(any file pyogrio reads, reprojected to the raster's CRS); windows are cut inside the
region's bounding box and labels outside the region are ignored.

Arrays are CHW (image windows, float32 after normalisation) and HW (labels, int64 class
*indexes* 0..K-1 with :data:`IGNORE_INDEX` for ignored pixels); batches are NCHW / NHW.

Outputs in ``out``: ``weights.pdparams`` + ``weights.yaml`` (the model card of the best
checkpoint by validation mIoU; both written when the run finishes, the card last),
``checkpoints/last.pdparams|.pdopt|.rng|.json`` and ``checkpoints/best.pdparams`` (for ``resume``; the
previous checkpoint is kept as ``prev.*`` until the next one is whole; ``last.rng`` holds Paddle's random
state, so dropout goes on with the masks of an uninterrupted run), ``train_log.csv`` and
``train_log.json``. A lock file (:data:`LOCK_FILE`) keeps a second run out of a folder in use.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.atomic import atomic_write_text, file_above, mode_as_created, refuse_link, write_error
from geoseg.blending import BlendMode, weight_map
from geoseg.card import DEFAULT_SCALE, PALETTE, ClassInfo, ModelCard, Normalization, gap_fill_for, model_kwargs
from geoseg.config import plain
from geoseg.errors import (
    GridMismatchError,
    ModelError,
    OutputError,
    ParameterError,
    PerformanceWarning,
    SceneReadError,
    TrainingWarning,
    require_paddle,
    warn,
)
from geoseg.io import (
    close_handles,
    has_mask_band,
    ids_by_text,
    is_vector_path,
    open_raster,
    open_scene,
    read_vector,
    read_window_gaps,
    scene_path,
    whole_class_ids,
)
from geoseg.metrics import ConfusionMatrix
from geoseg.tiling import core_bounds, make_grid, spread_tiles

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
#: Keys of one entry of a config's ``scenes``.
SCENE_KEYS = ("image", "labels", "train_region", "val_region", "use", "label_shift")
#: Keys of one entry of a config's ``classes``.
CLASS_KEYS = ("id", "name", "color")
#: What ``geoseg train`` writes in its output folder (``--overwrite`` removes these, nothing else).
RUN_FILES = ("weights.pdparams", "weights.yaml", "train_log.csv", "train_log.json")
#: A checkpoint's parts in ``OUT/checkpoints`` (``best.pdparams``: the best weights so far, published
#: as ``OUT/weights.pdparams`` when the run ends) and the name each is moved to while the next
#: checkpoint is written: ``last.json``, written last, lists the parts' digests, and resume finds each
#: part under either name, so a run stopped while saving resumes from the previous checkpoint.
_PREVIOUS = {"last.pdparams": "prev.pdparams", "last.ema.pdparams": "prev.ema.pdparams", "last.pdopt": "prev.pdopt",
             "last.rng": "prev.rng", "best.pdparams": "prev.best.pdparams"}
#: What a checkpoint holds in ``OUT/checkpoints``.
CHECKPOINT_FILES = (*_PREVIOUS, "last.json", *_PREVIOUS.values())
#: The lock a run holds on its output folder (``fcntl.flock``: the kernel drops it when the process dies).
LOCK_FILE = ".geoseg-train.lock"
#: Characters that make a scene's ``image`` a glob pattern (one scene per matching file).
_GLOB_CHARS = set("*?[")
#: The card's ``class_prior`` comes from every window of the training region up to this many
#: windows, else from this many spread evenly over it (as predict samples a scene): a large
#: training region costs the end of training a bounded time and memory, not a whole prediction.
PRIOR_WINDOWS = 64
#: Validation predicts a region of more pixels than this in bands of rows (bounded memory).
BAND_PIXELS = 4_000_000
LossName = Literal["ce", "dice", "ce+dice", "lovasz", "ce+lovasz"]
ScheduleName = Literal["poly", "cosine", "constant"]
ClassWeights = Literal["none", "auto", "balanced"]
DeviceName = Literal["auto", "cpu", "gpu"]
ReadFrom = Literal["auto", "memory", "disk"]


# ---- configuration ---------------------------------------------------------------------------
def _same_value(a: Any, b: Any) -> bool:
    """Whether two settings are the same, numbers by value: YAML 1.1 reads --set lr=1e-3 as the text
    '1e-3', which then 'disagreed' with --lr 0.001."""
    if a == b:
        return True
    try:
        return not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _check_relative_paths(data: Mapping[str, Any], config: Path) -> None:
    """A relative image or labels path of a config is taken from the working folder, as everywhere in
    geoseg. When it is missing there but lies beside the config, say so: "input sample_data/... does not
    exist" from another folder did not tell why."""
    entries = [data, *(sc for sc in data.get("scenes") or () if isinstance(sc, Mapping))]
    for entry in entries:
        for key in ("image", "labels"):
            value = entry.get(key)
            if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
                continue
            where = config.absolute().parent  # (a relative config path: "nc_unet.yaml" has no parents to look in)
            near = [where, *list(where.parents)[:3]]  # the config's folder or up to three above it
            if any((folder / value).exists() for folder in near):
                raise ParameterError(
                    f"{key} {value} of {config} does not exist in the working folder {Path.cwd()}: relative paths in "
                    "a config are taken from the working folder, not from the config's: run from the folder they "
                    "are relative to, or give absolute paths")



@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (YAML keys = field names).

    Regions are ``[col_off, row_off, width, height]`` pixel windows or a vector file path;
    ``None`` for ``train_region`` means the whole scene. ``val_region`` ``None`` means no
    validation (the last checkpoint is kept).
    """

    image: str | None = None
    labels: str | None = None
    out: str = "runs/train"
    model: str = "deeplabv3p"
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    description: str = ""
    bands: tuple[int, ...] | None = None
    band_names: tuple[str, ...] | None = None
    classes: tuple[Mapping[str, Any], ...] | None = None
    ignore: tuple[int, ...] = (0,)
    train_region: Any = None
    val_region: Any = None
    window: int = 512
    min_labelled: float = 0.1
    batch_size: int = 4
    iterations: int = 1000
    val_every: int = 100
    log_every: int = 10
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    schedule: ScheduleName = "poly"
    power: float = 0.9
    warmup: int = 50
    loss: LossName = "ce+dice"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    lovasz_weight: float = 1.0
    class_weights: Any = "none"
    grad_clip: float | None = 5.0
    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    global_brightness: float = 0.0
    global_contrast: float = 0.0
    noise: float = 0.0
    band_dropout: float = 0.0
    label_smoothing: float = 0.0
    mosaic: float = 0.0
    #: Random rescaling ``[low, high]`` (e.g. ``[0.75, 1.33]``): each window is read at size
    #: ``window / f`` for a factor ``f`` drawn log-uniformly from the range and resized to
    #: ``window`` (image bilinear, labels nearest): objects appear between ``low`` and ``high``
    #: times their size. ``None`` = off.
    scale: Any = None
    ema: float = 0.0
    #: The EMA's decay is ``min(ema, (1 + it) / (ema_warmup + it))`` at iteration ``it``: with the
    #: default 10 it reaches 0.99 only after 890 iterations (0.978 at 400: the average lags the
    #: last weights by about 40 iterations); a smaller value reaches ``ema`` sooner (2: at about
    #: 100 iterations, a lag of about 97 at 400).
    ema_warmup: float = 10.0
    train_on_gaps: bool = True
    label_shift: tuple[int, ...] = (0, 0)
    #: With vector labels (polygons): the attribute holding each polygon's class (an integer id,
    #: or a class name from ``classes``).
    label_field: str | None = None
    #: With vector labels: the class (id or name) of the pixels outside every polygon, e.g. the
    #: background of building footprints. None = those pixels are unlabelled. With it and two
    #: classes, ``label_field`` may be left out: every polygon is the other class.
    background: int | str | None = None
    #: Written into the card: predict adapts this model to each scene's class priors by default.
    adapt_prior: bool = False
    #: Knowledge distillation (a compression hook): a trained model (``geoseg train`` folder,
    #: ``.pdparams`` with its card, or a shipped name; an ensemble too) whose class probabilities
    #: the network also learns to match on the labelled pixels of each batch. None = off.
    teacher: str | None = None
    #: Weight ``w`` of the distillation term: ``(1 - w) * loss + w * T² * KL(teacher ‖ network)``.
    distill_weight: float = 0.5
    #: Softmax temperature ``T`` of the distillation term (1 = the teacher's own probabilities).
    distill_temperature: float = 1.0
    amp: bool = True
    device: DeviceName = "auto"
    read_from: ReadFrom = "auto"
    workers: int = 0
    seed: int = 0
    tile_overlap: int | None = None
    resume: str | None = None
    progress: bool = False
    #: Several image + label pairs instead of ``image``/``labels``/``train_region``/``val_region``:
    #: a list of ``{image, labels, train_region, val_region}`` (regions optional, per scene).
    scenes: tuple[Mapping[str, Any], ...] | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "training config") -> TrainConfig:
        """Build a config from plain data (YAML), naming unknown keys and bad values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = _unknown_keys(data, names)
        if unknown:
            raise ParameterError(f"{source}: {unknown}")
        d = {key: _check_type(source, key, value) for key, value in data.items()}
        if d.get("scenes") is not None:
            scenes = d["scenes"]
            clash = [k for k in ("image", "labels", "train_region", "val_region") if d.get(k) is not None]
            if clash:
                raise ParameterError(f"{source} has both scenes and {', '.join(clash)}: give each scene's image, labels "
                                     "and regions inside scenes, or one image + labels without scenes")
            if not isinstance(scenes, (list, tuple)) or not scenes:
                raise ParameterError(f"{source}: scenes must be a list of {{image, labels[, train_region, val_region]}}")
            checked = []
            for k, sc in enumerate(scenes, 1):
                if not isinstance(sc, Mapping):
                    raise ParameterError(f"{source}: scene {k} must be a mapping with image and labels")
                extra = _unknown_keys(sc, SCENE_KEYS)
                if extra:
                    raise ParameterError(f"{source}: scene {k} has {extra}")
                for key in ("image", "labels"):
                    if not sc.get(key):
                        raise ParameterError(f"{source}: scene {k} lacks {key!r}: give the path of its {key} raster")
                if sc.get("use") not in (None, "train", "val"):
                    raise ParameterError(f"{source}: scene {k} use {sc.get('use')!r}: choose train (training region, "
                                         "optional validation region) or val (validation only)")
                if sc.get("label_shift") is not None:
                    sc = {**sc, "label_shift": _check_shift(sc["label_shift"], f"scene {k} label_shift")}
                if sc.get("use") == "val" and sc.get("train_region") is not None:
                    raise ParameterError(f"{source}: scene {k} is for validation only (use: val) but has a train_region")
                if _GLOB_CHARS & set(str(sc["image"])) and "{stem}" not in str(sc["labels"]):
                    raise ParameterError(f"{source}: scene {k} image {sc['image']!r} is a pattern: its labels must name "
                                         "each image's label raster with {stem}, e.g. labels/{stem}_labels.tif")
                checked.append({key: sc.get(key) for key in SCENE_KEYS
                                if sc.get(key) is not None or key not in ("use", "label_shift")})
            d["scenes"] = tuple(checked)
        else:
            for key in ("image", "labels"):
                if not d.get(key):
                    raise ParameterError(f"{source} lacks {key!r}: give the path of the {key} raster "
                                         "(or a list of scenes)")
        if d.get("ignore") is None and any(isinstance(c, Mapping) and c.get("id") == 0 for c in d.get("classes") or ()):
            d["ignore"] = ()  # 0 is a class here (e.g. cloud): by default no label value means unlabelled
        for key in ("bands", "band_names", "ignore", "label_shift"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        if d.get("classes") is not None:
            d["classes"] = tuple(dict(c) for c in d["classes"])
        if d.get("scale") is not None:
            d["scale"] = _check_scale(d["scale"])
        if not isinstance(d.get("params") or {}, Mapping):  # (5 or [1] failed as a bare TypeError)
            raise ParameterError(f"{source}: params {d['params']!r}: give a mapping of the model's parameters "
                                 "(e.g. {width: 0.25})")
        d["params"] = dict(d.get("params") or {})
        cfg = cls(**d)
        cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None,
             explicit: Mapping[str, Any] | None = None) -> TrainConfig:
        """Read a YAML config; relative paths in it are taken relative to the working directory.

        ``overrides`` replace config keys where they are not ``None`` (unset CLI options);
        ``explicit`` replace them always, ``None`` included (``--set val_region=null``).
        """
        from geoseg.config import load_yaml_mapping

        data = load_yaml_mapping(path, "training config", ParameterError, empty_ok=True)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        both = [k for k in given if k in (explicit or {}) and not _same_value((explicit or {})[k], given[k])]
        if both:  # which one wins was said nowhere
            k = both[0]
            raise ParameterError(f"--{k.replace('_', '-')} {given[k]} and --set {k}={(explicit or {})[k]} disagree: give one")
        merged = {**data, **given, **dict(explicit or {})}
        # (only the paths the config still names: a recipe's own image, replaced by --image, was refused)
        _check_relative_paths({k: v for k, v in data.items() if k not in given and k not in (explicit or {})}, Path(path))
        return cls.from_mapping(merged, source=f"training config {path}")

    def checked(self) -> TrainConfig:
        """This config with every check a YAML config gets (types, ranges, names): one built in code
        (``TrainConfig(iterations=0, loss="bogus")``) was never checked, and trained an untrained
        network into a finished-looking card, or failed with a bare TypeError."""
        return TrainConfig.from_mapping(self.to_dict())

    def check(self) -> None:
        """Raise :class:`ParameterError` naming the first bad value."""
        if self.window < 16 or self.window % 16:
            raise ParameterError(f"window {self.window}: use a multiple of 16 (e.g. 128, 256, 512)")
        for label, v in (("batch_size", self.batch_size), ("iterations", self.iterations),
                         ("val_every", self.val_every), ("log_every", self.log_every)):
            if int(v) < 1:
                raise ParameterError(f"{label} {v}: use a number >= 1")
        if self.workers < 0:
            raise ParameterError(f"workers {self.workers}: use 0 or more")
        for label, v in (("brightness", self.brightness), ("contrast", self.contrast), ("warmup", self.warmup),
                         ("min_lr", self.min_lr), ("weight_decay", self.weight_decay), ("power", self.power),
                         ("ce_weight", self.ce_weight), ("dice_weight", self.dice_weight),
                         ("lovasz_weight", self.lovasz_weight), ("grad_clip", self.grad_clip),
                         ("tile_overlap", self.tile_overlap)):
            if v is not None and v < 0:
                raise ParameterError(f"{label} {v}: use 0 or more (a negative {label} means nothing)")
        if not math.isfinite(self.lr) or self.lr <= 0:  # (nan trained NaN weights into a half-written run; a
            # negative lr was blamed on min_lr first)
            raise ParameterError(f"lr {self.lr}: use a positive learning rate")
        if self.min_lr > self.lr and self.schedule != "constant":  # (the schedule climbed from lr to min_lr)
            raise ParameterError(f"min_lr {self.min_lr}: the learning rate the schedule ends at must not exceed lr "
                                 f"{self.lr} (e.g. {self.lr / 100:g}, or 0)")
        if self.tile_overlap is not None and self.tile_overlap >= self.window:
            # (the run trained, then predict refused its card: "overlap 40 must be smaller than the tile size 32")
            raise ParameterError(f"tile_overlap {self.tile_overlap}: must be smaller than window {self.window} "
                                 f"(e.g. {self.window // 4}, a quarter window, or leave it out)")
        start = self.params.get("pretrained")
        if start is not None and not isinstance(start, (str, os.PathLike)):  # (true: a bare TypeError)
            raise ParameterError(f"params.pretrained {start!r}: give the .pdparams file of the weights to start from")
        if "members" in self.params:
            raise ParameterError("params.members is for seed ensembles: train each member with its own --seed, "
                                 "then combine the runs with 'geoseg ensemble'")
        if self.loss not in get_args(LossName):
            raise ParameterError(f"loss {self.loss!r}: choose {', '.join(get_args(LossName))}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ParameterError(f"schedule {self.schedule!r}: choose poly, cosine or constant")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ParameterError(f"device {self.device!r}: choose auto, cpu or gpu")
        if self.seed is not None and not 0 <= self.seed < 2**32:  # (Paddle's manual_seed failed in 5 lines)
            raise ParameterError(f"seed {self.seed}: use a whole number 0 .. 4294967295")
        for label, v in (("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip),
                         ("ce_weight", self.ce_weight), ("dice_weight", self.dice_weight)):
            if v is not None and not math.isfinite(v):
                raise ParameterError(f"{label} {v}: give a finite number")
        for label, v in (("global_brightness", self.global_brightness), ("global_contrast", self.global_contrast),
                         ("noise", self.noise)):
            if v < 0:
                raise ParameterError(f"{label} {v}: use 0 (off) or a positive amount")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ParameterError(f"label_smoothing {self.label_smoothing}: use a fraction 0..1 (0 = off)")
        if isinstance(self.class_weights, str) and self.class_weights not in ("none", "auto", "balanced"):
            raise ParameterError(f"class_weights {self.class_weights!r}: choose none, auto, balanced or a list of weights")
        if self.class_weights is not None and not isinstance(self.class_weights, str):
            _check_class_weights(self.class_weights)
        if not 0.0 <= self.band_dropout <= 1.0:
            raise ParameterError(f"band_dropout {self.band_dropout}: use a probability 0..1 (0 = off)")
        if self.read_from not in ("auto", "memory", "disk"):
            raise ParameterError(f"read_from {self.read_from!r}: choose auto (in memory when the regions fit in half the "
                                 "available memory, else from disk), memory or disk")
        if not 0.0 <= self.mosaic <= 1.0:
            raise ParameterError(f"mosaic {self.mosaic}: use a probability 0..1 (0 = off)")
        if self.scale is not None:
            _check_scale(self.scale)
        if not 0.0 <= self.ema < 1.0:
            raise ParameterError(f"ema {self.ema}: use a decay in [0, 1), e.g. 0.99 (0 = off)")
        if not self.ema_warmup >= 1.0:
            raise ParameterError(f"ema_warmup {self.ema_warmup}: use 1 or more (10 = the default warm-up)")
        _check_shift(self.label_shift, "label_shift")
        if not 0.0 <= self.min_labelled <= 1.0:
            raise ParameterError(f"min_labelled {self.min_labelled}: use a fraction 0..1")
        if not isinstance(self.adapt_prior, bool):
            raise ParameterError(f"adapt_prior {self.adapt_prior!r}: use true or false")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ParameterError(f"distill_weight {self.distill_weight}: use a fraction in (0, 1] (the teacher's share "
                                 "of the loss)")
        if not self.distill_temperature > 0:
            raise ParameterError(f"distill_temperature {self.distill_temperature}: use a positive temperature, e.g. 1 or 2")
        if self.classes:
            config_classes(self.classes)
        both = sorted({int(c["id"]) for c in self.classes or () if "id" in c} & {int(v) for v in self.ignore})
        if both:
            raise ParameterError(f"label value(s) {', '.join(map(str, both))} are both classes and ignore values, so those "
                                 "classes would never be learned: drop them from ignore (ignore: [] when every label "
                                 "value is a class)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["params"] = dict(self.params)
        if self.scenes is not None:
            d["scenes"] = [dict(sc) for sc in self.scenes]
        else:
            del d["scenes"]
        return d

    def scene_list(self) -> list[dict[str, Any]]:
        """The training scenes: ``scenes``, or the one of ``image``/``labels``/regions.

        A scene whose ``image`` is a glob pattern (``chips/*.tif``) becomes one scene per
        matching file, in name order, its ``labels`` with ``{stem}`` replaced by that file's
        name without extension; regions and ``use`` apply to each.
        """
        if self.scenes is None:
            return [{"image": self.image, "labels": self.labels, "train_region": self.train_region,
                     "val_region": self.val_region, "label_shift": self.label_shift}]
        out: list[dict[str, Any]] = []
        for k, sc in enumerate(self.scenes, 1):
            image = str(sc["image"])
            sc = {"label_shift": self.label_shift, **sc}  # the config's label_shift unless the scene has its own
            if not _GLOB_CHARS & set(image):
                out.append(sc)
                continue
            matches = sorted(p for p in glob.glob(image) if Path(p).is_file())
            if not matches:
                raise ParameterError(f"scene {k} image pattern {image!r} matches no file: check the path "
                                     "(relative paths are read from the working directory)")
            out.extend({**sc, "image": m, "labels": str(sc["labels"]).replace("{stem}", Path(m).stem)} for m in matches)
        return out


def _unknown_keys(given: Any, known: Sequence[str] | set[str]) -> str | None:
    """``"unknown key(s) a, b (did you mean c?); known keys: ..."`` for the keys of ``given`` not in
    ``known`` (misspelt keys are refused, named, with the nearest known key), else None."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    close = [m for k in unknown for m in difflib.get_close_matches(str(k), list(known), n=1)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown key(s) {', '.join(map(str, unknown))}{hint}; known keys: {', '.join(sorted(known))}"


def _check_shift(value: Any, what: str) -> tuple[int, int]:
    """A ``label_shift`` as ``(rows, cols)`` of whole pixels, or a ParameterError naming ``what``."""
    try:
        ok = len(value) == 2 and all(int(v) == v and abs(int(v)) <= 64 for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"{what} {value!r}: give [rows, cols], whole pixels (e.g. [1, 1])")
    return int(value[0]), int(value[1])


_KINDS: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
    str: ((str,), "a string"),
}


@functools.cache
def _config_types() -> dict[str, Any]:
    """TrainConfig's field types (its annotations are strings: resolved once)."""
    return typing.get_type_hints(TrainConfig)


def _check_type(source: str, key: str, value: Any) -> Any:
    """``value`` of config ``key``, or a one-line error when it has the wrong kind (``iterations: abc``).

    A list of whole numbers may also be given as one number (``ignore: 0``) or as text with commas
    (``--set bands=4,3,2``, as predict's --bands).
    """
    hint = _config_types().get(key)
    options = get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    if value is None and type(None) in options:
        return value
    want = ""
    for t in options:
        if t is type(None):
            continue
        if typing.get_origin(t) is Literal:
            return value  # check() names the choices, with what each means
        if t in _KINDS:
            kinds, want = _KINDS[t]
            if t is str and isinstance(value, os.PathLike):  # (TrainConfig(image=Path(...)) was refused)
                value = os.fspath(value)
            if t is float and isinstance(value, str):
                try:  # YAML 1.1 reads 1e-3 (no dot) as text
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, kinds) and not (isinstance(value, bool) and t is not bool):
                return value
        elif typing.get_origin(t) is tuple and get_args(t)[1:] == (Ellipsis,) and get_args(t)[0] in _KINDS:
            item = get_args(t)[0]
            if isinstance(value, str) and item is int and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", value):
                value = [int(v) for v in value.split(",")]
            elif isinstance(value, str) and item is str:
                value = [v.strip() for v in value.split(",")]
            elif isinstance(value, int) and not isinstance(value, bool) and item is int:
                value = [value]
            kinds, want = _KINDS[item]
            want = f"a list of {want.removeprefix('a ')}s"
            if isinstance(value, (list, tuple)) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
                return value
        elif key == "classes":
            want = "a list of mappings (e.g. {id: 1, name: forest, color: [20, 110, 40]})"
            if isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value):
                return value
        else:
            return value  # checked where it is used
    raise ParameterError(f"{source}: {key} {value!r}: give {want}")


def _check_class_weights(value: Any) -> None:
    """A list of class weights: numbers, none negative, not all 0 (else a ParameterError naming
    class_weights). A weight of 0 leaves a class out of the loss; all 0 would leave nothing to learn
    (and made the losses 0/0 = NaN)."""
    try:
        weights = [float(v) for v in value if not isinstance(v, bool)]
        ok = (isinstance(value, (list, tuple, np.ndarray)) and len(weights) == len(value)
              and all(math.isfinite(v) for v in weights))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"class_weights {value!r}: give none, auto, balanced or a list of numbers, one per class")
    if any(v < 0 for v in weights):
        raise ParameterError(f"class_weights {list(value)}: a weight is negative: use 0 or more per class (0 leaves a "
                             "class out of the loss)")
    if not any(v > 0 for v in weights):
        raise ParameterError(f"class_weights {list(value)}: every weight is 0, so nothing would be learned: give the "
                             "classes to learn a positive weight (or class_weights: none)")


def _check_scale(value: Any) -> tuple[float, float] | None:
    """A ``scale`` range as ``(low, high)`` with ``0.25 <= low <= high <= 4``, or a ParameterError."""
    try:
        low, high = (float(v) for v in value)
        ok = 0.25 <= low <= high <= 4.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"scale {value!r}: give [low, high] zoom factors between 0.25 and 4, e.g. [0.75, 1.33] "
                             "(null = off)")
    return None if low == high == 1.0 else (low, high)


# ---- regions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A region of the scene: its bounding box (pixels) and a mask inside that box (HW bool)."""

    row: int
    col: int
    height: int
    width: int
    mask: np.ndarray

    @property
    def window(self) -> Window:
        """The bounding box as a rasterio window."""
        return Window(self.col, self.row, self.width, self.height)


def parse_region(spec: Any, meta: Any, what: str) -> Region:
    """Turn a region spec into a :class:`Region` of the scene described by ``meta``.

    ``spec``: ``None`` (whole scene), ``[col_off, row_off, width, height]`` (list or
    ``"c,r,w,h"`` string) or a vector file path (polygons, rasterised onto the grid).

    A pixel window must lie inside the scene: one reaching past its edges is refused (the
    message gives the part inside), not clipped, so the card records the region trained on.
    """
    H, W = meta.height, meta.width
    if spec is None:
        return Region(0, 0, H, W, np.ones((H, W), bool))
    if isinstance(spec, str) and not Path(spec).exists() and spec.count(",") == 3:
        spec = [s.strip() for s in spec.split(",")]
    if isinstance(spec, (list, tuple)):
        try:
            c, r, w, h = (_whole_number(v) for v in spec)
        except (TypeError, ValueError):
            raise ParameterError(f"{what} {spec!r}: give [col_off, row_off, width, height] in whole pixels") from None
        given = f"[{c}, {r}, {w}, {h}]"
        if w <= 0 or h <= 0:
            raise ParameterError(f"{what} {given}: give a positive width and height ([col_off, row_off, width, height] "
                                 "in pixels)")
        c0, r0, c2, r2 = max(c, 0), max(r, 0), min(c + w, W), min(r + h, H)
        if c2 <= c0 or r2 <= r0:
            raise ParameterError(f"{what} {given} lies outside the {W}x{H} scene (width x height): give [col_off, "
                                 "row_off, width, height] inside it")
        if (c0, r0, c2, r2) != (c, r, c + w, r + h):
            raise ParameterError(f"{what} {given} reaches outside the {W}x{H} scene (width x height): give "
                                 f"[{c0}, {r0}, {c2 - c0}, {r2 - r0}], its part inside the scene")
        return Region(r, c, h, w, np.ones((h, w), bool))
    if not isinstance(spec, (str, os.PathLike)):  # (5, true or a mapping failed as a bare TypeError)
        raise ParameterError(f"{what} {spec!r}: give [col_off, row_off, width, height] in pixels or the path of "
                             "a vector file of polygons")
    return _vector_region(Path(spec), meta, what)


def _whole_number(v: Any) -> int:
    """``v`` as an int, or :class:`ValueError` when it is not a whole number (0.5 was cut to 0, silently)."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, (float, np.floating)):
        if not float(v).is_integer():
            raise ValueError(v)
        return int(v)
    return int(v)  # (a string: "12", not "0.5")


def _vector_region(path: Path, meta: Any, what: str) -> Region:
    from rasterio.features import rasterize

    _, _, keep, shapes = _read_polygons(
        path, meta, f"{what} {path} does not exist: give a vector file or [col_off, row_off, width, height]",
        f"{what} {path} cannot be read as vector data")
    if not keep:
        raise ParameterError(f"{what} {path} has no geometries")
    from geoseg.aoi import _polygon_parts

    # the polygons only, as predict's --aoi takes them (a line's pixels were a training region of 61 pixels)
    shapes = list(_polygon_parts(np.array(shapes, dtype=object)))
    if not shapes:
        raise ParameterError(f"{what} {path} has no polygons (lines and points cover no area): give the region as "
                             "polygons, or as [col_off, row_off, width, height]")
    full = rasterize(((s, 1) for s in shapes), out_shape=(meta.height, meta.width), transform=meta.transform,
                     fill=0, dtype="uint8").astype(bool)
    rows, cols = np.nonzero(full)
    if rows.size == 0:
        raise ParameterError(f"{what} {path} does not overlap the scene")
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return Region(int(r0), int(c0), int(r1 - r0), int(c1 - c0), full[r0:r1, c0:c1])


def _read_polygons(path: Path, meta: Any, missing: str, unreadable: str
                   ) -> tuple[list[str], list[np.ndarray], list[int], list[Any]]:
    """Read a vector file for the grid of ``meta``: its field names, its attribute arrays, the
    indexes of its non-empty geometries, and those geometries in ``meta``'s CRS.
    ``missing`` is the error for a file that does not exist, ``unreadable`` the start of the
    error for one that cannot be read."""
    vec = read_vector(path, meta.crs, missing=missing, unreadable=unreadable)
    keep = [i for i, g in enumerate(vec.geoms) if g is not None and not g.is_empty]
    return vec.fields, vec.values, keep, [vec.geoms[i] for i in keep]


def _ids_by_name(classes: Sequence[Mapping[str, Any]] | None) -> dict[str, int]:
    """The config's class names (lower case) → ids."""
    return {str(c.get("name", "")).lower(): int(c["id"]) for c in classes or () if "id" in c}


def _class_id(value: int | str, classes: Sequence[Mapping[str, Any]] | None, what: str) -> int:
    """A class given by id or by name (case-insensitive) → its id, checked against ``classes``."""
    by_name = _ids_by_name(classes)
    ids = {int(c["id"]) for c in classes or () if "id" in c}  # all of them, named or not
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if value.lower() not in by_name:
            raise ParameterError(f"{what} {value!r} is not a class name: the config's classes are "
                                 f"{', '.join(sorted(by_name)) or 'not listed (list them, id and name)'}")
        return by_name[value.lower()]
    cid = int(value)
    if ids and cid not in ids:
        raise ParameterError(f"{what} {cid} is not one of the config's class ids {sorted(ids)}")
    if not 0 <= cid <= 65535:
        raise ParameterError(f"{what} {cid}: use a class id 0..65535")
    return cid


def rasterize_labels(path: Path, meta: Any, field: str | None, classes: Sequence[Mapping[str, Any]] | None,
                     out: Path, background: int | str | None = None, ignore: Sequence[int] = (0,)) -> Path:
    """Burn polygon labels onto the image grid of ``meta``: a uint8/uint16 GeoTIFF at ``out``
    whose pixels outside every polygon are unlabelled (its nodata: never trained on), or the class
    ``background`` (id or name) when given.

    ``field`` names the attribute with each polygon's class: integer ids, or names of the
    config's ``classes`` (case-insensitive). With ``background`` and two ``classes`` it may be
    None: every polygon is the class that is not the background (building footprints).
    Polygons in another CRS are reprojected; where polygons overlap, the later one wins.

    Unlabelled pixels are 0, as in a label raster, unless 0 is a class (one of ``classes``, or,
    with none listed, not in ``ignore``: e.g. cloud, and the ``class_id`` polygons of ``geoseg
    vectorize``): then ids 0.. are burnt as they are and the unlabelled pixels get a value that
    is no class and no polygon's id (:func:`_unlabelled_value`).
    """
    fields, values, keep, shapes = _read_polygons(
        path, meta, f"labels {path} does not exist: give a label raster or a polygon file",
        f"labels {path} cannot be read as polygons")
    fill = None if background is None else _class_id(background, classes, "background")
    class_ids = [int(c["id"]) for c in classes or () if "id" in c]
    zero_class = 0 in class_ids if class_ids else 0 not in ignore
    others = [i for i in class_ids if i != fill]
    if field is None and fill is not None and len(others) == 1:
        if not keep:
            raise ParameterError(f"polygon labels {path.name} have no geometries")
        _say_point_labels(path, shapes)
        return _burn(path, meta, shapes, [others[0]] * len(keep), fill, out)
    if field is None or field not in fields:
        what = "needs label_field" if field is None else f"has no field {field!r}"
        shown = ", ".join(fields[:12]) + (f" ... ({len(fields)} in all)" if len(fields) > 12 else "")
        footprints = ("; polygons of one class (e.g. building footprints) need no field: set background to the class "
                      "outside them (its id or name) and list two classes" if fill is None else
                      f"; or leave label_field out: every polygon is then class {others[0]} over background {fill}"
                      if len(others) == 1 else
                      "; without a field, background needs two classes listed (the polygons are the other one), "
                      f"the config lists {len(class_ids) or 'none'}")
        raise ParameterError(f"polygon labels {path.name} {what}: set label_field to the attribute holding each "
                             f"polygon's class (its fields: {shown or 'none'}){footprints}")
    col = values[fields.index(field)]
    if col.dtype.kind in "iuf":
        ids = np.asarray(col, np.float64)
        low = 0 if zero_class else 1
        drawn = np.zeros(ids.shape, bool)
        drawn[keep] = True
        empty = int(np.count_nonzero(np.isnan(ids) & drawn))
        if empty:
            raise ParameterError(f"polygon labels {path.name}: {empty} feature(s) have no value in {field}: give each "
                                 "polygon its class id, or remove those features")
        ids = np.where(np.isnan(ids) & ~drawn, low, ids)  # (no value and no geometry: not burnt)
        if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)) or np.any(ids < low) or np.any(ids > 65535):
            raise ParameterError(f"polygon labels {path.name}: {field} must hold whole class ids 0..65535"
                                 if zero_class else
                                 f"polygon labels {path.name}: {field} must hold whole class ids 1..65535 (0 is left "
                                 "for unlabelled pixels; if 0 is a class, list it in classes)")
        ids = ids.astype(np.int64)
    else:
        low = 0 if zero_class else 1
        by_name = ids_by_text(_ids_by_name(classes), (str(v) for v in col), low, 65535)  # (names and ids mixed)
        unknown = sorted({str(v) for v in col if str(v).lower() not in by_name})
        if unknown:
            hint = (f"the config's classes are {', '.join(sorted(by_name))}" if by_name
                    else "list the classes (id, name) in the config")
            raise ParameterError(f"polygon labels {path.name}: {field} values {', '.join(unknown[:5])} are not class "
                                 f"names or ids: {hint}")
        ids = np.array([by_name[str(v).lower()] for v in col], np.int64)
        if np.any(ids[keep] < low) or np.any(ids[keep] > 65535):
            raise ParameterError(f"polygon labels {path.name}: {field} must hold class names or whole class ids "
                                 f"{low}..65535")
    if not keep:
        raise ParameterError(f"polygon labels {path.name} have no geometries")
    burnt = [int(ids[i]) for i in keep]
    _say_point_labels(path, shapes)
    unlabelled = _unlabelled_value({*class_ids, *burnt}) if zero_class and fill is None else 0
    return _burn(path, meta, shapes, burnt, fill, out, unlabelled)


def _say_point_labels(path: Path, shapes: Sequence[Any]) -> None:
    """Log how many of the label file's geometries are points or lines: they are burnt as the pixels
    they fall on or cross (a point sample labels one pixel), which a user who meant areas should know."""
    import shapely

    kinds = shapely.get_type_id(np.asarray(shapes, dtype=object))
    points = int(np.count_nonzero((kinds == 0) | (kinds == 4)))
    lines = int(np.count_nonzero((kinds == 1) | (kinds == 2) | (kinds == 5)))
    if points or lines:
        said = " and ".join(f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((points, "point"), (lines, "line")) if n)
        log.info("polygon labels %s: %s burnt as the pixels they fall on or cross (a point labels one pixel)",
                 path.name, said)


def _unlabelled_value(used: set[int]) -> int:
    """The label value of burnt pixels outside every polygon when 0 is a class: 255 (a uint8
    raster) unless a class or polygon uses it, else the largest uint16 value none uses."""
    return next(v for v in (255, *range(65535, -1, -1)) if v not in used)


def _burn(path: Path, meta: Any, shapes: Sequence[Any], ids: Sequence[int], fill: int | None, out: Path,
          unlabelled: int = 0) -> Path:
    """Rasterise ``shapes`` with their class ``ids`` onto the grid of ``meta`` into ``out``;
    elsewhere ``fill`` (a class), or ``unlabelled`` (the file's nodata, no class) when it is None."""
    from rasterio.features import rasterize

    nodata = unlabelled if fill is None else None
    dtype = "uint8" if max([*ids, fill or 0, nodata or 0]) <= 255 else "uint16"
    burned = rasterize(zip(shapes, ids), out_shape=(meta.height, meta.width), transform=meta.transform,
                       fill=unlabelled if fill is None else fill, dtype=dtype)
    touched = rasterize(((g, 1) for g in shapes), out_shape=(meta.height, meta.width), transform=meta.transform,
                        fill=0, dtype="uint8").any() if fill is not None else (burned != unlabelled).any()
    if not touched:
        raise ParameterError(f"polygon labels {path.name} do not overlap the image")
    with rasterio.open(out, "w", driver="GTiff", width=meta.width, height=meta.height, count=1, dtype=dtype,
                       crs=meta.crs, transform=meta.transform, nodata=nodata, compress="deflate") as dst:
        dst.write(burned, 1)
    return out


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class RegionData:
    """A region's pixels in memory: normalised image CHW float32, label indexes HW uint8
    (``IGNORE_INDEX`` where not trained on; int64 only for more than 255 classes)."""

    image: np.ndarray
    labels: np.ndarray
    region: Region


def check_same_grid(image_meta: Any, label_meta: Any) -> None:
    """Raise :class:`GridMismatchError` unless both rasters share size, transform and CRS, saying how to
    put the labels on the image's grid (a gdalwarp command with the image's CRS, extent and resolution)."""
    a, b = image_meta, label_meta
    same_size = (a.width, a.height) == (b.width, b.height)
    same_transform = a.transform.almost_equals(b.transform, precision=1e-6 * max(abs(a.transform.a), 1e-9))
    same_crs = (a.crs is None) == (b.crs is None) and (a.crs is None or a.crs == b.crs)
    srs = None if a.crs is None else a.crs.to_string() if a.crs.to_epsg() else "IMAGE_CRS.wkt"

    def warp(name: str) -> str:
        if a.crs is None or a.transform.b or a.transform.d:  # (no CRS or a rotated grid: no -te/-tr to give)
            return "resample the labels onto the image grid first"
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(a.height, a.width, a.transform)
        te = " ".join(f"{v:.15g}" for v in (west, south, east, north))  # (exact: ':g' kept 6 digits of a UTM northing)
        return (f"warp the labels onto the image grid first: gdalwarp -r near -t_srs {srs} -te {te} -tr "
                f"{abs(a.transform.a):.15g} {abs(a.transform.e):.15g} {name} aligned_labels.tif")

    if a.crs is not None and b.crs is None:  # (the labels lost their CRS: assign it, no reprojection can help)
        fix = (f"assign the image's CRS (gdal_edit.py -a_srs {srs} {b.path.name})" if same_size and same_transform
               else warp(b.path.name))
        raise GridMismatchError(f"labels {b.path.name} have no CRS and the image {a.path.name} has one: {fix}")
    if not same_crs:
        raise GridMismatchError(f"labels {b.path.name} (CRS {b.crs}) and the image {a.path.name} (CRS {a.crs}) differ "
                                f"in CRS: {warp(b.path.name)}")
    if not same_size:
        raise GridMismatchError(f"labels {b.path.name} are {b.width}x{b.height} but the image {a.path.name} is "
                                f"{a.width}x{a.height}: {warp(b.path.name)}")
    if not same_transform:
        raise GridMismatchError(f"labels {b.path.name} and the image {a.path.name} have different geotransforms "
                                f"({tuple(b.transform)[:6]} vs {tuple(a.transform)[:6]}): {warp(b.path.name)}")


def read_labels(path: Path, window: Window, shift: Sequence[int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Read band 1 of the label raster in ``window``: its values (HW int32, or int64 for 32-bit
    unsigned and wider labels) and where it holds a label (HW bool). A pixel holds none where it
    is the raster's nodata (compared exactly: a nodata of 2.5 matches no whole id), NaN, or hidden
    by the raster's mask band (GDAL's per-dataset mask, e.g. a GeoTIFF's internal mask, as
    ``evaluate`` reads a reference).

    ``shift`` ``(rows, cols)`` moves the labels by whole pixels before use (co-registration):
    the label at pixel ``(r, c)`` becomes the one at ``(r - rows, c - cols)``; pixels whose
    label would come from outside the raster hold none.
    """
    dy, dx = (int(v) for v in shift)
    shape = (int(window.height), int(window.width))
    try:
        with open_raster(path) as ds:
            # int32 holds every label of an 8/16/32-bit signed or 8/16-bit unsigned raster (half
            # the memory of int64 over a large region).
            kind = np.int32 if ds.dtypes[0] in ("uint8", "int8", "uint16", "int16", "int32") else np.int64
            if not (dy or dx):
                return _label_block(ds, window, path, kind)
            src = Window(window.col_off - dx, window.row_off - dy, window.width, window.height)
            inter = src.intersection(Window(0, 0, ds.width, ds.height))
            out, has = np.zeros(shape, kind), np.zeros(shape, bool)
            r0, c0 = int(inter.row_off - src.row_off), int(inter.col_off - src.col_off)
            labels, labelled = _label_block(ds, inter, path, kind)
            out[r0:r0 + int(inter.height), c0:c0 + int(inter.width)] = labels
            has[r0:r0 + int(inter.height), c0:c0 + int(inter.width)] = labelled
            return out, has
    except rasterio.errors.WindowError:
        return np.zeros(shape, np.int64), np.zeros(shape, bool)
    except rasterio.errors.RasterioError as exc:
        raise SceneReadError(f"labels {path} cannot be read: {exc}") from None


def _label_block(ds: Any, window: Window, path: Path, kind: type) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_labels` of one window inside the raster ``ds``."""
    block = ds.read(1, window=window)
    labelled = np.ones(block.shape, bool)
    nodata = ds.nodata
    if np.issubdtype(block.dtype, np.floating):
        labelled &= np.isfinite(block)
    if nodata is not None and not np.isnan(nodata):
        labelled &= block != nodata  # exactly (an integer block against a float nodata: as floats)
    if has_mask_band(ds):
        labelled &= ds.read_masks(1, window=window) != 0
    if np.issubdtype(block.dtype, np.floating):
        block = np.where(labelled, block, np.nan)  # no label: whatever value lies there is no class id
    return _whole_ids(block, path, kind, None), labelled


def _whole_ids(block: np.ndarray, path: Path, kind: type, nodata: float | None) -> np.ndarray:
    """Labels as integer class ids (a floating-point raster's must be whole; nodata and NaN: no label)."""
    return whole_class_ids(block, nodata, f"labels {Path(path).name} hold",
                           "give the class ids (labels resampled onto the image grid need nearest-neighbour "
                           "resampling)").astype(kind)


def one_class_message(classes: Sequence[ClassInfo], ignore: Sequence[int], nodata: Sequence[float], listed: bool,
                      negative: Sequence[int] = ()) -> str:
    """Why a class table of fewer than two classes cannot be trained, and what to change (``ignore``: the
    ignore values the training labels hold; ``negative``: their negative values, no class ids)."""
    have = f"one class only ({classes[0].id})" if classes else "no class"
    if listed:
        return f"the config's classes list {have}: a segmentation model needs at least two; list every class the labels hold"
    dropped = [f"value {v} (ignore)" for v in ignore] + [f"value {v:g} (the label raster's nodata)" for v in nodata]
    why = f"; label {', '.join(dropped)} is not a class" if dropped else ""
    fix = (": if it is one (e.g. 0 = background in a building mask), set ignore: [] (--set ignore=[]) or list the "
           "classes with their ids" if ignore and not nodata else
           "" if not dropped else ": if it is one, list the classes with their ids (and unset the labels' nodata)")
    neg = (f"; label values {_few(negative)} are negative, and class ids are 0..254: recode the labels to ids 0..254"
           if negative else "")
    return f"the training labels hold {have} in the training region{why}{fix}{neg}; a segmentation model needs at least two"


def _few(values: Sequence[Any], n: int = 8) -> str:
    """The first ``n`` of ``values`` for a message (``[1, 2, ...]``)."""
    return f"[{', '.join(map(str, values[:n]))}{', ...' if len(values) > n else ''}]"


def config_classes(classes: Sequence[Mapping[str, Any]]) -> tuple[ClassInfo, ...]:
    """The config's ``classes`` as the card's :class:`ClassInfo` (palette colours where none is
    given), checked as the model card checks them, so that a bad class table is refused when the
    config is read, not when the card is written after training: a :class:`ParameterError`
    naming ``classes``. Names must differ too (case-insensitive: ``label_field`` and
    ``background`` may give a class by name)."""
    infos = []
    for k, c in enumerate(classes, 1):
        unknown = _unknown_keys(c, CLASS_KEYS)
        if unknown:
            raise ParameterError(f"classes: class {k} has {unknown}")
        if "id" not in c:
            raise ParameterError(f"classes: class {k} {dict(c)} has no id: give each class the label value it stands "
                                 "for, e.g. {id: 1, name: forest, color: [20, 110, 40]}")
        try:
            infos.append(ClassInfo(_whole_number(c["id"]), str(c.get("name", f"class_{c['id']}")),
                                   tuple(int(v) for v in c.get("color", PALETTE[(k - 1) % len(PALETTE)]))))  # type: ignore[arg-type]
        except ModelError as exc:
            raise ParameterError(f"classes: {exc}") from None
        except (TypeError, ValueError):
            raise ParameterError(f"classes: class {k} {dict(c)}: give id (a whole number), name and color "
                                 "([r, g, b], 0..255)") from None
    for what, keys in (("id", [c.id for c in infos]), ("name", [c.name.lower() for c in infos])):
        twice = next((v for v in keys if keys.count(v) > 1), None)
        if twice is not None:
            same = [c for c, v in zip(infos, keys) if v == twice]
            which = (f"{twice} ({', '.join(c.name for c in same)})" if what == "id"
                     else f"{twice!r} (ids {', '.join(str(c.id) for c in same)})")
            raise ParameterError(f"classes: duplicate class {what} {which}: give each class its own {what}")
    try:  # whatever else the card checks of its classes
        ModelCard(name="classes", architecture="check", bands=("b1",), classes=tuple(infos),
                  normalization=Normalization((0.0,), (1.0,)))
    except ModelError as exc:
        raise ParameterError(f"classes: {exc}") from None
    return tuple(infos)


def class_table(cfg: TrainConfig, labels_path: Path, present: Sequence[int],
                given: Path | None = None) -> tuple[ClassInfo, ...]:
    """Classes from the config, else the label ids present (colours from the label palette).
    ``given``: the labels as the config names them (polygons, burnt into ``labels_path``)."""
    if cfg.classes:
        return config_classes(cfg.classes)
    too_big = [i for i in present if i > 254]
    if too_big and given is not None and is_vector_path(given):
        raise ParameterError(
            f"polygon labels {given.name}: {cfg.label_field} value(s) {', '.join(map(str, too_big[:5]))}"
            f"{' ...' if len(too_big) > 5 else ''} cannot be class ids (masks hold 0..254, 255 is their nodata): give "
            "the polygons class ids 0..254, or add those values to ignore")
    if too_big:
        raise ParameterError(
            f"label value(s) {', '.join(map(str, too_big[:5]))}{' ...' if len(too_big) > 5 else ''} in "
            f"{Path(labels_path).name} cannot be class ids (masks hold "
            "0..254, 255 is their nodata): recode the labels to small ids, e.g. a 0/255 mask to 0/1 with gdal_calc.py "
            f"-A {Path(labels_path).name} --calc=\"A/255\" --outfile labels01.tif, or add them to ignore")
    from geoseg.io import band_class_names, read_classes

    cmap: dict[int, tuple[int, ...]] = {}
    names: dict[int, str] = {}
    with contextlib.suppress(rasterio.errors.RasterioError):
        with open_raster(labels_path) as ds:
            with contextlib.suppress(ValueError):
                cmap = ds.colormap(1)
            # the names a class raster carries (geoseg's own table, or another tool's CLASSES=1=developed,...):
            # they were dropped for class_1, class_3 ... on the card, the masks and the polygons
            table = read_classes(ds)
            names = {c.id: c.name for c in table} if table else band_class_names(ds)
            if table:
                cmap = {**cmap, **{c.id: tuple(c.color) for c in table}}
    picked = [names.get(int(i), "").strip() for i in present]
    if len({n.lower() for n in picked if n}) != len([n for n in picked if n]):  # (a name twice: ids only)
        picked = [""] * len(picked)
    return tuple(
        ClassInfo(int(i), name or f"class_{i}", tuple(cmap.get(int(i), PALETTE[k % len(PALETTE)])[:3]))  # type: ignore[arg-type]
        for k, (i, name) in enumerate(zip(present, picked))
    )


def band_statistics(image: np.ndarray, valid: np.ndarray, scale: float,
                    missing: np.ndarray | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of ``image * scale`` (CHW raw) over valid pixels (HW bool).

    A band's values where it has no data (``missing``, CHW bool) are left out of its figures.
    """
    if not valid.any():
        raise ParameterError("the training region has no valid (non-nodata) pixels")
    mean, std = [], []
    for b in range(image.shape[0]):
        use = valid if missing is None else valid & ~missing[b]
        px = image[b][use].astype(np.float64) * scale
        if px.size == 0:
            raise ParameterError(f"band {b + 1} has no data in the training region: pick other bands")
        mean.append(px.mean())
        std.append(max(px.std(), 1e-6))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _file_identity(path: str | Path) -> str | None:
    """A file's size and a hash of its first and last 64 KiB (:func:`geoseg.batch.quick_hash`): enough to see it
    replaced or rewritten; None where it cannot be read (a glob, a virtual path). A shapefile's with its
    attribute table and index (.dbf, .shx, .prj, .cpg): classes relabelled in QGIS change the .dbf only."""
    from geoseg.batch import quick_hash

    try:
        ident = f"{os.stat(path).st_size}:{quick_hash(path)}"
    except OSError:
        return None
    if str(path).lower().endswith(".shp"):
        for ext in (".dbf", ".shx", ".prj", ".cpg"):
            for side in (Path(path).with_suffix(ext), Path(path).with_suffix(ext.upper())):
                with contextlib.suppress(OSError):
                    ident += f"|{ext}:{os.stat(side).st_size}:{quick_hash(side)}"
                    break
    return ident


def _same_file_identity(then: str, now: str | None) -> bool:
    """Whether a file's :func:`_file_identity` at a checkpoint and now agree; one saved before a shapefile's
    identity held its sidecars (no '|') is compared with the .shp's part only."""
    if now is None:
        return False
    return then == now or ("|" not in then and then == now.split("|", 1)[0])


def _warn_constant_bands(bands: Sequence[int], std: Sequence[float]) -> None:
    """Warn about bands with one value over the training region (their std floored at 1e-6): they teach
    nothing, and at predict time any other value of theirs lies about 1e5 standard deviations off."""
    flat = [b for b, s in zip(bands, std) if s <= 1e-6]
    if flat:
        warn(f"band{'s' if len(flat) > 1 else ''} {', '.join(map(str, flat))} hold{'' if len(flat) > 1 else 's'} "
             "one value over the training region: the model learns nothing from "
             f"{'them' if len(flat) > 1 else 'it'}, and predict reads any other value as some 1e5 standard "
             "deviations off; leave it out with bands:", TrainingWarning)


def pooled_band_statistics(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                           scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`band_statistics` over several regions together: ``parts`` are ``(image CHW raw,
    valid HW, missing CHW or None)``; each region's mean and sum of squared deviations are
    combined exactly (Chan et al.), as if the pixels of all regions were one sample."""
    moments = BandMoments(parts[0][0].shape[0], scale)
    for image, valid, missing in parts:
        moments.add(image, valid, missing)
    return moments.result()


class BandMoments:
    """Per-band mean and std of ``image * scale`` accumulated over parts (regions, or blocks of
    rows of a region read one at a time): each part's mean and sum of squared deviations are
    combined exactly (Chan et al.), as if all pixels were one sample."""

    def __init__(self, bands: int, scale: float) -> None:
        self.scale = scale
        self.n = [0] * bands
        self.m = [0.0] * bands
        self.m2 = [0.0] * bands

    def add(self, image: np.ndarray, valid: np.ndarray, missing: np.ndarray | None) -> None:
        """Add the valid pixels (HW bool) of ``image`` (CHW raw), each band without its ``missing`` ones."""
        for b in range(len(self.n)):
            use = valid if missing is None else valid & ~missing[b]
            px = image[b][use].astype(np.float64) * self.scale
            if px.size == 0:
                continue
            nb, mb = px.size, float(px.mean())
            m2b = float(((px - mb) ** 2).sum())
            n = self.n[b]
            delta = mb - self.m[b]
            tot = n + nb
            self.m[b] += delta * nb / tot
            self.m2[b] += m2b + delta * delta * n * nb / tot
            self.n[b] = tot

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per band, rounded as :func:`band_statistics` rounds them."""
        if not any(self.n):
            raise ParameterError("the training regions have no valid (non-nodata) pixels")
        for b, n in enumerate(self.n):
            if n == 0:
                raise ParameterError(f"band {b + 1} has no data in the training regions: pick other bands")
        std = [max(float(np.sqrt(m2 / n)), 1e-6) for m2, n in zip(self.m2, self.n)]
        return tuple(round(float(v), 6) for v in self.m), tuple(round(float(v), 6) for v in std)


def region_memory(region: Region, bands: int, dtype: str) -> int:
    """Bytes :func:`load_region` and the normalisation hold at their peak for ``region``: the raw
    pixels, the band-gap flags and the float32 copy of each band, plus the labels and masks."""
    itemsize = np.dtype(dtype).itemsize
    return region.height * region.width * (bands * (itemsize + 1 + 4) + 12)


def label_memory(region: Region) -> int:
    """Bytes a region read from disk keeps (``read_from: disk``): its labels and valid pixels."""
    return region.height * region.width * 2


def check_region_memory(region: Region, bands: int, dtype: str, what: str, key: str) -> None:
    """Refuse, before reading it, a region whose pixels would not fit in the available memory
    (``geoseg train`` holds its training and validation regions in memory)."""
    check_memory(region_memory(region, bands, dtype), f"{what} ({region.width}x{region.height} pixels, {bands} bands)",
                 key)


def check_memory(need: int, what: str, key: str) -> None:
    """Raise :class:`ParameterError` when ``need`` bytes exceed the available memory."""
    import psutil

    available = psutil.virtual_memory().available
    if need > available:
        raise ParameterError(
            f"{what}: about {need / 2**30:.1f} GB of memory needed, {available / 2**30:.1f} GB available: "
            f"train on a smaller {key} (a pixel window or a vector AOI)"
        )


#: Training's working set on CPU per window of a batch (forward and backward activations), in MB per
#: 128² window: measured 25 (UNet width 0.25) and 17.5 (DeepLabv3+ R18 x0.5, output stride 16) as
#: peak RSS over batches of 8-256 (2 cores); the lower bound, so that only a batch that cannot fit
#: is refused. Plus the process with its regions and the network (about 0.5 GB).
TRAIN_MB_PER_WINDOW = 15.0
TRAIN_BASE_MB = 500.0


def check_batch_memory(batch_size: int, window: int) -> None:
    """Refuse a batch whose training working set alone exceeds the machine's memory (a batch of
    100,000 was killed at 24 GB with no message); warn when it exceeds the memory available now."""
    import psutil

    need = TRAIN_BASE_MB + TRAIN_MB_PER_WINDOW * batch_size * (window / 128) ** 2
    mem = psutil.virtual_memory()
    what = f"batch_size {batch_size} of {window}-px windows needs at least {need / 1024:,.1f} GB of memory to train"
    if need * 2**20 > mem.total:
        raise ParameterError(f"{what}, more than this machine's {mem.total / 2**30:,.1f} GB: lower batch_size or window")
    if need * 2**20 > mem.available:
        warn(f"{what}, more than the {mem.available / 2**30:.1f} GB available now: it may be slow or killed",
             PerformanceWarning)


def load_region(image_path: Path, bands: tuple[int, ...], meta: Any, labels_path: Path, region: Region,
                lut: np.ndarray, ignore: Sequence[int], label_shift: Sequence[int] = (0, 0)
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a region: raw image CHW, label indexes HW (ignored = IGNORE_INDEX), valid HW, and
    where single bands have no data (CHW bool or None; see :func:`geoseg.io.read_window_gaps`)."""
    data, valid, missing = read_window_gaps(image_path, region.window, bands, meta.alpha_band)
    raw, labelled = read_labels(labels_path, region.window, label_shift)
    idx = np.full(raw.shape, IGNORE_INDEX, np.uint8 if int(lut.max(initial=0)) <= IGNORE_INDEX else np.int64)
    inside = (raw >= 0) & (raw < lut.size)
    idx[inside] = lut[raw[inside]]
    bad = ~region.mask | ~valid | ~labelled | np.isin(raw, list(ignore))
    idx[bad] = IGNORE_INDEX
    return data, idx, valid, missing


class DiskImage:
    """A region's normalised image (CHW float32) that stays on disk: slicing it like an array
    (``image[:, r0:r1, c0:c1]``) reads only that window of the file, with its band gaps, and
    normalises it exactly as the in-memory path normalises the whole region (``read_from: disk``).

    Picklable for DataLoader workers; each process (and thread) reads through its own dataset
    handle (:func:`geoseg.io.read_window_gaps`).
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, path: Path, bands: tuple[int, ...], alpha_band: int | None, region: Region,
                 normalization: Normalization, raster_dtype: str, gap_fill: float) -> None:
        self.path, self.bands, self.alpha_band = scene_path(path), tuple(bands), alpha_band
        self.row, self.col = region.row, region.col
        self.shape = (len(bands), region.height, region.width)
        self.normalization, self.raster_dtype, self.gap_fill = normalization, raster_dtype, gap_fill

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or any(k is Ellipsis for k in key):
            raise IndexError("DiskImage takes [bands, rows, cols] with slices")
        key = key + (slice(None),) * (3 - len(key))
        spans = []
        for k, n in zip(key[1:], self.shape[1:]):
            if not isinstance(k, slice):
                raise IndexError("DiskImage takes slices of rows and columns")
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError("DiskImage takes slices of rows and columns with step 1")
            spans.append((start, max(start, stop)))
        (r0, r1), (c0, c1) = spans
        window = Window(self.col + c0, self.row + r0, c1 - c0, r1 - r0)
        data, _, missing = read_window_gaps(self.path, window, self.bands, self.alpha_band)
        return self.normalization.apply(data, self.raster_dtype, missing, self.gap_fill)[key[0]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self[:, :, :]
        return x if dtype is None else x.astype(dtype)


def row_blocks(region: Region, max_pixels: int) -> Iterator[tuple[int, Region]]:
    """``(first row, sub-region)`` of consecutive blocks of rows of ``region``, each of at most
    ``max_pixels`` pixels (at least one row): a large region read one block at a time."""
    rows = max(1, max_pixels // max(region.width, 1))
    for r0 in range(0, region.height, rows):
        r1 = min(region.height, r0 + rows)
        yield r0, Region(region.row + r0, region.col, r1 - r0, region.width, region.mask[r0:r1])


class WindowDataset:
    """Random square windows from a region, augmented; item ``i`` is the same for a given seed.

    Each item draws from its own generator seeded by ``(seed, i)``, so results do not depend
    on the number of DataLoader workers, and a resumed run continues with the same samples
    (item indexes continue from ``start``).
    """

    def __init__(self, data: RegionData | Sequence[RegionData], window: int, length: int, *, seed: int = 0, start: int = 0,
                 flips: bool = True, rot90: bool = True, brightness: float = 0.0, contrast: float = 0.0,
                 min_labelled: float = 0.0, global_brightness: float = 0.0, global_contrast: float = 0.0,
                 noise: float = 0.0, mosaic: float = 0.0, band_dropout: float = 0.0, gap_fill: float = 0.0,
                 scale: tuple[float, float] | None = None) -> None:
        """See the class docstring; ``length`` items starting at index ``start``.

        ``data`` may be several regions (scenes): each window then comes from one of them,
        drawn with probability proportional to its labelled pixels (one region draws nothing).

        ``gap_fill`` is the input value of a band without data (0, or NaN for ``gap_channels``
        models); ``band_dropout`` writes it over a whole band.

        ``mosaic`` is the probability that an item is a 2x2 mosaic of four half-size windows
        from independent random places (0 = off, and then no random number is drawn for it).

        ``scale`` ``(low, high)`` rescales each window by a factor drawn log-uniformly from the
        range (see :attr:`TrainConfig.scale`; ``None`` = off, drawing nothing).
        """
        self.sets = [data] if isinstance(data, RegionData) else list(data)
        if not self.sets:
            raise ValueError("WindowDataset needs at least one region")
        self.data = self.sets[0]
        labelled = np.array([float((d.labels != IGNORE_INDEX).sum()) for d in self.sets]) if len(self.sets) > 1 else None
        self.set_weights = None if labelled is None else labelled / max(labelled.sum(), 1.0)
        self.window = window
        self.length = max(0, int(length))  # a DataLoader's sampler refuses (and hangs on) a negative length
        self.seed = seed
        self.start = start
        self.flips, self.rot90 = flips, rot90
        self.brightness, self.contrast = brightness, contrast
        self.global_brightness, self.global_contrast, self.noise = global_brightness, global_contrast, noise
        self.band_dropout = band_dropout
        self.gap_fill = np.float32(gap_fill)
        self.min_labelled = min_labelled
        self.mosaic = mosaic
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image CHW float32, labels HW int64)``."""
        rng = np.random.default_rng([self.seed, self.start + int(i)])
        s = self.window
        if self.mosaic > 0 and rng.random() < self.mosaic:
            # Four half-size windows from independent places, tiled 2x2: the network sees
            # classes next to neighbours they never touch in the scene (less reliance on context).
            h = s // 2
            x = np.empty((self.data.image.shape[0], s, s), np.float32)
            y = np.empty((s, s), np.int64)
            for r0 in (0, h):
                for c0 in (0, h):
                    x[:, r0 : r0 + h, c0 : c0 + h], y[r0 : r0 + h, c0 : c0 + h] = self._crop(rng, h)
        else:
            x, y = self._crop(rng, s)
        x, y = augment(x, y, rng, self.flips, self.rot90, self.brightness, self.contrast,
                       self.global_brightness, self.global_contrast, self.noise)
        if self.band_dropout > 0 and rng.random() < self.band_dropout:
            # One band reads as missing (as predict fills a band gap) over the window:
            # the model learns to classify without any single band.
            x[int(rng.integers(0, x.shape[0]))] = self.gap_fill
        return x, y.astype(np.int64)

    def _crop(self, rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
        """A random ``s``-pixel window (copies), preferring ones with enough labelled pixels."""
        data = self.data if self.set_weights is None else self.sets[int(rng.choice(len(self.sets), p=self.set_weights))]
        img, lab = data.image, data.labels
        _, H, W = img.shape
        m = s
        if self.scale is not None:
            # Read an m-pixel window and resize it to s: objects appear s/m times their size.
            low, high = self.scale
            m = min(H, W, max(2, int(round(s / math.exp(rng.uniform(math.log(low), math.log(high)))))))
        best = None
        for _ in range(10):  # prefer windows with enough labelled pixels
            r = int(rng.integers(0, H - m + 1))
            c = int(rng.integers(0, W - m + 1))
            y = lab[r : r + m, c : c + m]
            frac = float((y != IGNORE_INDEX).mean())
            if best is None or frac > best[0]:
                best = (frac, r, c)
            if frac >= self.min_labelled:
                break
        assert best is not None
        _, r, c = best
        x, y = np.array(img[:, r : r + m, c : c + m], np.float32), lab[r : r + m, c : c + m].copy()
        if m != s:
            x, y = resize_bilinear(x, s), resize_nearest(y, s)
        return x, y


def _source_coords(n_out: int, n_in: int) -> np.ndarray:
    """Input coordinates of ``n_out`` output pixel centres spread over ``n_in`` input pixels
    (pixel-centre alignment, as GDAL, OpenCV and Paddle's ``align_corners=False`` resample)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Resize a CHW float window to ``size`` x ``size`` by bilinear interpolation (pixel-centre
    alignment; a NaN input spreads to the output pixels it touches)."""
    out = x
    for axis in (1, 2):
        n = out.shape[axis]
        t = np.clip(_source_coords(size, n), 0, n - 1)
        i0 = np.floor(t).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (t - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = size
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_nearest(y: np.ndarray, size: int) -> np.ndarray:
    """Resize an HW label window to ``size`` x ``size`` by nearest neighbour (pixel-centre
    alignment: no label value is invented)."""
    def nearest(n: int) -> np.ndarray:  # always within 0 .. n-1: centres lie in [-0.5, n - 0.5)
        return np.floor(_source_coords(size, n) + 0.5).astype(np.intp)

    return np.ascontiguousarray(y[np.ix_(nearest(y.shape[0]), nearest(y.shape[1]))])


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, flips: bool, rot90: bool,
            brightness: float, contrast: float, global_brightness: float = 0.0, global_contrast: float = 0.0,
            noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, 90° rotations and photometric jitter of a normalised window.

    Jitter acts in normalised units: ``x * (1 + U(-contrast, contrast)) + U(-brightness, brightness)``
    (one draw per window and band). ``global_contrast`` / ``global_brightness`` add one draw per
    window shared by all bands (``x * (1 + U(-gc, gc)) + U(-gb, gb)``), and ``noise`` adds
    per-pixel Gaussian noise of that standard deviation. All are off at 0; draws that are off
    consume no random numbers, so older configs reproduce.
    """
    if flips:
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[:, ::-1, :], y[::-1, :]
    if rot90:
        k = int(rng.integers(0, 4))
        if k:
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if contrast > 0 or brightness > 0:
        c = x.shape[0]
        gain = 1.0 + rng.uniform(-contrast, contrast, size=(c, 1, 1)) if contrast > 0 else 1.0
        shift = rng.uniform(-brightness, brightness, size=(c, 1, 1)) if brightness > 0 else 0.0
        x = (x * gain + shift).astype(np.float32)
    if global_contrast > 0 or global_brightness > 0:
        g = 1.0 + rng.uniform(-global_contrast, global_contrast) if global_contrast > 0 else 1.0
        b = rng.uniform(-global_brightness, global_brightness) if global_brightness > 0 else 0.0
        x = (x * g + b).astype(np.float32)
    if noise > 0:
        x = (x + rng.normal(0.0, noise, size=x.shape)).astype(np.float32)
    return x, np.ascontiguousarray(y, dtype=np.int64)


# ---- schedules ----------------------------------------------------------------------------------
def learning_rate(it: int, cfg: TrainConfig) -> float:
    """Learning rate at iteration ``it`` (0-based): linear warm-up, then poly/cosine/constant decay."""
    if cfg.warmup > 0 and it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    span = max(1, cfg.iterations - cfg.warmup)
    t = min(1.0, (it - cfg.warmup) / span)
    match cfg.schedule:
        case "poly":
            return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - t) ** cfg.power
        case "cosine":
            return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        case _:
            return cfg.lr


def _warn_long_warmup(cfg: TrainConfig) -> None:
    """Warn when the warm-up is not shorter than the run (the default 50 with a short test run): the
    learning rate never reaches ``lr`` (or reaches it only at the last iteration) and its decay never
    starts. Nothing is changed: the configured schedule is trained as given. (A warm-up of 1 is
    none: the first iteration is at ``lr``.)"""
    if cfg.warmup <= 1 or cfg.warmup < cfg.iterations:
        return
    climb = (f"reaches lr {cfg.lr:g} only at the last iteration" if cfg.warmup == cfg.iterations else
             f"climbs only to {learning_rate(cfg.iterations - 1, cfg):g}, never to lr {cfg.lr:g}")
    decay = "" if cfg.schedule == "constant" else f" and the {cfg.schedule} decay never starts"
    tenth = cfg.iterations // 10
    example = f"warmup: {tenth}, a tenth of the run" if tenth > 1 else "warmup: 0 in so short a run"
    warn(f"warmup {cfg.warmup} is not shorter than iterations {cfg.iterations}: the learning rate {climb}{decay}: set "
         f"warmup below iterations (e.g. {example}) or train for more iterations", TrainingWarning)


def auto_class_weights(labels: np.ndarray, num_classes: int, kind: str = "auto") -> np.ndarray:
    """Class weights from the label indexes of the training region.

    ``auto``: ``∝ 1/sqrt(frequency)``, scaled so that the frequency-weighted mean weight is 1,
    clipped to [0.1, 10]: common classes keep their ``1/sqrt`` ratios to each other whatever
    rare classes are present, and a class of a few pixels is capped at 10. (Before 2026-11-23
    the plain mean was 1 with a 0.2 floor, so one very rare class pushed every common class
    onto the floor: on the NC fold B all but sediment got 0.2.)
    ``balanced``: ``1 / (n_present * frequency)`` as in scikit-learn, so that every present
    class carries the same total weight and the frequency-weighted mean weight is 1 (the loss
    keeps its scale), clipped to [0.1, 10] so a class of a few pixels cannot dominate.
    Classes absent from the labels get weight 1. The losses divide by the summed weights, so
    only the ratios between weights matter.
    """
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    w = np.ones(num_classes)
    present = counts > 0
    if not present.any():
        return w.astype(np.float32)
    freq = counts[present] / counts[present].sum()
    if kind == "balanced":
        w[present] = 1.0 / (present.sum() * freq)
        return np.clip(w, 0.1, 10.0).astype(np.float32)
    wp = 1.0 / np.sqrt(freq)
    w[present] = wp / (freq * wp).sum()
    return np.clip(w, 0.1, 10.0).astype(np.float32)


# ---- losses --------------------------------------------------------------------------------------
def make_loss(kind: LossName, num_classes: int, class_weights: np.ndarray | None = None,
              ce_weight: float = 1.0, dice_weight: float = 1.0,
              label_smoothing: float = 0.0, lovasz_weight: float = 1.0) -> Callable[[Any, Any], tuple[Any, dict[str, float]]]:
    """Loss ``f(logits NCHW, labels NHW int64 (other integer types are cast)) -> (loss, parts)``; labels == 255 are ignored.

    ``label_smoothing`` (0 = off) smooths the cross-entropy targets. ``lovasz`` is the
    Lovász-softmax loss (Berman et al., CVPR 2018; PaddleSeg's ``LovaszSoftmaxLoss`` with
    ``classes='present'``): the Lovász extension of each class's Jaccard loss over the batch's
    pixels, averaged over the classes present in the labels (class weights make it a weighted
    mean; a class of weight 0 is left out, and a batch of such classes only has a loss of 0);
    on hard (one-hot) predictions it equals ``1 - mIoU`` of those classes.
    """
    paddle: Any = require_paddle()
    import paddle.nn.functional as F

    weight = paddle.to_tensor(class_weights, dtype="float32") if class_weights is not None else None

    def ce(logits: Any, labels: Any) -> Any:
        # NHWC + trailing label axis: the layout paddle's cross_entropy handles for every version.
        if label_smoothing > 0:
            return _smoothed_ce(F, logits, labels, weight, label_smoothing, num_classes)
        return F.cross_entropy(logits.transpose([0, 2, 3, 1]), labels.unsqueeze(-1), weight=weight,
                               ignore_index=IGNORE_INDEX, axis=-1, reduction="mean")

    def dice(logits: Any, labels: Any) -> Any:
        probs = F.softmax(logits, axis=1)
        valid = (labels != IGNORE_INDEX).astype("float32").unsqueeze(1)
        onehot = F.one_hot(paddle.where(labels == IGNORE_INDEX, paddle.zeros_like(labels), labels),
                           num_classes).transpose([0, 3, 1, 2]) * valid
        probs = probs * valid
        inter = (probs * onehot).sum(axis=[0, 2, 3])
        denom = probs.sum(axis=[0, 2, 3]) + onehot.sum(axis=[0, 2, 3])
        d = (2.0 * inter + 1.0) / (denom + 1.0)
        if weight is not None:
            return 1.0 - (d * weight).sum() / weight.sum()
        return 1.0 - d.mean()

    def lovasz(logits: Any, labels: Any) -> Any:
        probs = F.softmax(logits, axis=1).transpose([0, 2, 3, 1]).reshape([-1, num_classes])
        y = labels.reshape([-1])
        keep = paddle.nonzero(y != IGNORE_INDEX).flatten()
        if keep.shape[0] == 0:
            return probs.sum() * 0.0
        probs, y = paddle.gather(probs, keep), paddle.gather(y, keep)
        terms, weights = [], []
        for c in range(num_classes):
            w_c = 1.0 if class_weights is None else float(class_weights[c])
            if w_c <= 0:  # a class left out of the loss (all of a batch's classes weighing 0 made 0/0 = NaN)
                continue
            fg = (y == c).astype("float32")
            if float(fg.sum()) == 0:  # classes='present'
                continue
            err = (fg - probs[:, c]).abs()
            order = paddle.argsort(err, descending=True)
            fg_sorted = paddle.gather(fg, order)
            terms.append((paddle.gather(err, order) * _lovasz_grad(paddle, fg_sorted)).sum())
            weights.append(w_c)
        if not terms:
            return probs.sum() * 0.0
        w = paddle.to_tensor(weights, dtype="float32")
        return (paddle.stack(terms) * w).sum() / w.sum()

    def loss(logits: Any, labels: Any) -> tuple[Any, dict[str, float]]:
        logits = logits.astype("float32")
        if labels.dtype != paddle.int64:  # e.g. a region's compact uint8 label indexes
            labels = labels.astype("int64")
        match kind:
            case "ce":
                lc = ce(logits, labels)
                return lc, {"ce": float(lc)}
            case "dice":
                ld = dice(logits, labels)
                return ld, {"dice": float(ld)}
            case "lovasz":
                lz = lovasz(logits, labels)
                return lz, {"lovasz": float(lz)}
            case "ce+lovasz":
                lc, lz = ce(logits, labels), lovasz(logits, labels)
                return ce_weight * lc + lovasz_weight * lz, {"ce": float(lc), "lovasz": float(lz)}
            case _:
                lc, ld = ce(logits, labels), dice(logits, labels)
                return ce_weight * lc + dice_weight * ld, {"ce": float(lc), "dice": float(ld)}

    return loss


def _lovasz_grad(paddle: Any, fg_sorted: Any) -> Any:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order
    (``fg_sorted``: the matching foreground indicators; Berman et al. 2018, algorithm 1)."""
    total = fg_sorted.sum()
    intersection = total - paddle.cumsum(fg_sorted)
    union = total + paddle.cumsum(1.0 - fg_sorted)
    jaccard = 1.0 - intersection / union
    return paddle.concat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _smoothed_ce(F: Any, logits: Any, labels: Any, weight: Any, eps: float, num_classes: int) -> Any:
    """Label-smoothed cross-entropy (targets ``(1 - eps) * onehot + eps / K``), ignoring 255.

    With class weights, each pixel is weighted by its true class's weight (as in weighted CE).
    """
    import paddle

    valid = labels != IGNORE_INDEX
    safe = paddle.where(valid, labels, paddle.zeros_like(labels))
    logp = F.log_softmax(logits, axis=1)
    onehot = F.one_hot(safe, num_classes).transpose([0, 3, 1, 2])
    target = onehot * (1.0 - eps) + eps / num_classes
    per_pixel = -(target * logp).sum(axis=1)
    w = valid.astype("float32")
    if weight is not None:
        w = w * paddle.gather(weight, safe.flatten()).reshape(safe.shape)
    return (per_pixel * w).sum() / paddle.clip(w.sum(), min=1e-6)


def distillation_loss(F: Any, logits: Any, teacher_logits: Any, labels: Any, temperature: float = 1.0) -> Any:
    """``T² * KL(softmax(teacher / T) ‖ softmax(logits / T))``, averaged over the pixels whose label is
    not ignored (Hinton et al. 2015, "Distilling the knowledge in a neural network"); 0 without any."""
    import paddle

    valid = (labels != IGNORE_INDEX).astype("float32")
    t = F.softmax(teacher_logits.astype("float32") / temperature, axis=1)
    log_s = F.log_softmax(logits.astype("float32") / temperature, axis=1)
    per_pixel = (t * (paddle.log(paddle.clip(t, min=1e-12)) - log_s)).sum(axis=1)
    return (per_pixel * valid).sum() / paddle.clip(valid.sum(), min=1.0) * float(temperature) ** 2


@dataclass(frozen=True)
class _Teacher:
    """A distillation teacher (normalised NCHW batch → class probabilities, as predict runs it) and
    the per-band ``(a, b)`` (NCHW-shaped) that map this model's normalised input onto the teacher's
    (``None``: the same normalisation)."""

    predict: Callable[[np.ndarray], np.ndarray]
    affine: tuple[np.ndarray, np.ndarray] | None


def _omp_threads() -> int | None:
    """The run's ``OMP_NUM_THREADS`` when set to a positive number, else None (all cores)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


# ---- prediction over a region (validation) -------------------------------------------------------
def window_probs(layer: Any, image: np.ndarray, tiles: Sequence[Any], batch: int = 4) -> Iterator[tuple[Any, np.ndarray]]:
    """``(tile, class probabilities CHW float32)`` of each of ``tiles`` of a normalised CHW array,
    ``batch`` windows per forward pass, the network in eval mode (its mode is restored after)."""
    paddle: Any = require_paddle()
    import paddle.nn.functional as F

    was_training = layer.training
    layer.eval()
    try:
        with paddle.no_grad():
            for k in range(0, len(tiles), batch):
                group = tiles[k : k + batch]
                x = np.stack([image[:, t.row : t.row_stop, t.col : t.col_stop] for t in group])
                out = layer(paddle.to_tensor(x))
                out = out[0] if isinstance(out, (list, tuple)) else out
                yield from zip(group, F.softmax(out.astype("float32"), axis=1).numpy())
    finally:
        if was_training:
            layer.train()


def predict_array(layer: Any, image: np.ndarray, num_classes: int, tile: int, overlap: int, batch: int = 4,
                  max_pixels: int = BAND_PIXELS) -> np.ndarray:
    """Class indexes (HW int64) of a normalised CHW array, predicted in blended windows.

    An array of more than ``max_pixels`` pixels is predicted in bands of rows, each with a
    window's height of context above and below, so the class probabilities held at once stay
    bounded (a large validation region must not exhaust memory mid-training).
    """
    _, H, W = image.shape
    band = max(tile, (max_pixels // max(W, 1)) // tile * tile)
    if H * W <= max_pixels or H <= band + 2 * tile:
        return predict_probs(layer, image, num_classes, tile, overlap, batch).argmax(axis=0).astype(np.int64)
    out = np.empty((H, W), np.int64)
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        a0, a1 = max(0, r0 - tile), min(H, r1 + tile)
        probs = predict_probs(layer, image[:, a0:a1], num_classes, tile, overlap, batch)
        out[r0:r1] = probs[:, r0 - a0 : r1 - a0].argmax(axis=0)
    return out


def predict_probs(layer: Any, image: np.ndarray, num_classes: int, tile: int, overlap: int, batch: int = 4) -> np.ndarray:
    """Class probabilities (CHW float32) of a normalised CHW array, blended over windows as predict does."""
    _, H, W = image.shape
    size = tile
    ph, pw = max(0, size - H), max(0, size - W)
    if ph or pw:  # smaller than a window: reflect-pad, crop after
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(H, W) > 1 else "edge")
    _, Hp, Wp = image.shape
    grid = make_grid(Hp, Wp, size, min(overlap, size - 16))
    acc = np.zeros((num_classes, Hp, Wp), np.float32)
    wsum = np.zeros((Hp, Wp), np.float32)
    for t, p in window_probs(layer, image, list(grid.tiles()), batch):
        wm = weight_map(t.height, t.width, BlendMode.GAUSSIAN)
        acc[:, t.row : t.row_stop, t.col : t.col_stop] += p * wm
        wsum[t.row : t.row_stop, t.col : t.col_stop] += wm
    acc /= np.maximum(wsum, 1e-12)
    return acc[:, :H, :W]


def sampled_mean_probs(layer: Any, image: np.ndarray, valid: np.ndarray, grid: Any, num_classes: int,
                       count: int, batch: int = 4) -> np.ndarray:
    """Mean class probabilities (C float64) over the ``valid`` pixels (HW bool) of the cores of
    ``count`` windows of ``grid`` spread evenly over ``image`` (normalised CHW), each window
    predicted alone: memory and time bounded by ``count`` whatever the image's size (the cores
    partition the image, so no pixel counts twice)."""
    rb = core_bounds(grid.row_offsets, grid.tile, grid.height)
    cb = core_bounds(grid.col_offsets, grid.tile, grid.width)
    total = np.zeros(num_classes, np.float64)
    for t, p in window_probs(layer, image, spread_tiles(grid, count), batch):
        i, j = t.index
        rows, cols = slice(rb[i] - t.row, rb[i + 1] - t.row), slice(cb[j] - t.col, cb[j + 1] - t.col)
        keep = valid[rb[i] : rb[i + 1], cb[j] : cb[j + 1]]
        total += p[:, rows, cols][:, keep].sum(axis=1, dtype=np.float64)
    if not total.any():
        raise ParameterError("the sampled windows of the training region have no valid pixels")
    return total / total.sum()


# ---- trainer --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced."""

    weights: Path
    card: Path
    best_iteration: int
    best_miou: float | None
    iterations: int
    seconds: float
    log_csv: Path
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, one key per field: paths as strings, NaN as None."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


class Trainer:
    """Train a segmentation model from a :class:`TrainConfig`.

    The steps are hooks (:meth:`configure_model`, :meth:`configure_loss`,
    :meth:`configure_optimizer`, :meth:`validate`) so tests or variants can replace one part.
    """

    def __init__(self, cfg: TrainConfig, progress: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """Check inputs, read the regions into memory and compute normalisation statistics.

        With several scenes (``cfg.scenes``) every scene is checked before any pixel is read;
        they must share the selected bands' count and dtype; the normalisation statistics, the
        class weights and the class prior pool all training regions, and validation pools all
        validation regions. ``meta``, ``train_region``, ``train_data`` etc. are the first
        scene's; ``train_sets``/``val_sets`` hold every scene's.
        """
        # polygon labels are burnt into rasters here, for this init: removed also when it refuses the config (the
        # folder stayed in the temp folder as long as the error was held, in a notebook for good)
        with tempfile.TemporaryDirectory(prefix="geoseg-labels-", ignore_cleanup_errors=True) as burn_dir:
            self._init(cfg, progress, Path(burn_dir))

    def _init(self, cfg: TrainConfig, progress: Callable[[int, dict[str, float]], None] | None, burn_dir: Path) -> None:
        cfg = cfg.checked()
        self.cfg = cfg
        _warn_long_warmup(cfg)
        self.ema: _Ema | None = None
        self.teacher: _Teacher | None = None  # set by fit (configure_teacher)
        self.teacher_name: str | None = None
        self.paddle: Any = require_paddle()
        self.out = Path(cfg.out)
        specs = cfg.scene_list()
        many = len(specs) > 1

        def where(k: int, what: str) -> str:
            return f"scene {k + 1} ({Path(specs[k]['image']).name}) {what}" if many else what

        # Every scene checked first: grids, bands, dtype, regions.
        scenes: list[dict[str, Any]] = []
        for k, spec in enumerate(specs):
            image_path, labels_path = scene_path(spec["image"]), scene_path(spec["labels"])
            meta = open_scene(image_path)
            if is_vector_path(labels_path):
                labels_path = rasterize_labels(labels_path, meta, cfg.label_field, cfg.classes,
                                               burn_dir / f"{k}_{labels_path.stem}.tif", cfg.background,
                                               cfg.ignore)
            label_meta = open_scene(labels_path)
            check_same_grid(meta, label_meta)
            if label_meta.count > 1 and not is_vector_path(Path(spec["labels"])):
                warn(f"labels {labels_path.name} have {label_meta.count} bands: band 1 is read as the class ids, the "
                     "others are not used (give a one-band label raster to say so)", TrainingWarning)
            bands = tuple(cfg.bands) if cfg.bands else meta.data_bands
            bad = [b for b in bands if not 1 <= b <= meta.count]
            if bad:
                raise ParameterError(f"bands {list(bands)}: {image_path.name} has bands 1..{meta.count}")
            meta = meta.for_bands(bands)  # (normalised as their type: band 1, not read, may be of another)
            if len(set(bands)) < len(bands) and k == 0:  # (as predict warns of a --bands that feeds a band twice)
                from geoseg.engine import repeated_bands

                warn(f"bands {list(bands)} feed the model {repeated_bands(bands)}: check bands (a repeated band adds "
                     "nothing to learn from)", TrainingWarning)
            if cfg.band_names and len(cfg.band_names) != len(bands):
                raise ParameterError(f"band_names lists {len(cfg.band_names)} name(s) but the model reads {len(bands)} "
                                     f"band(s) of {image_path.name}: give one name per band read (with --set bands=..., "
                                     "also --set band_names=null, or the new bands' names)")
            if scenes:
                first = scenes[0]
                if len(bands) != len(first["bands"]):
                    raise ParameterError(f"scene {k + 1} ({image_path.name}) gives {len(bands)} bands but scene 1 gives "
                                         f"{len(first['bands'])}: set bands in the config, or train on scenes of one sensor")
                if meta.dtype != first["meta"].dtype:
                    raise ParameterError(f"scene {k + 1} ({image_path.name}) is {meta.dtype} but scene 1 is "
                                         f"{first['meta'].dtype}: one model normalises one data type; convert the scenes first")
            val_only = spec.get("use") == "val"
            train_region = None if val_only else parse_region(spec.get("train_region"), meta, where(k, "train_region"))
            val_region = (parse_region(spec.get("val_region"), meta, where(k, "val_region"))
                          if spec.get("val_region") is not None or val_only else None)
            if val_region is not None and train_region is not None:
                overlap = _overlap(train_region, val_region)
                if overlap > 0:
                    raise ParameterError(f"{where(k, 'train_region')} and val_region share {overlap} pixels: "
                                         "make them disjoint")
            scenes.append({"k": k, "image": image_path, "labels": labels_path, "labels_given": Path(spec["labels"]), "meta": meta,
                           "label_nodata": label_meta.nodata, "bands": bands, "train_region": train_region,
                           "val_region": val_region, "label_shift": tuple(spec["label_shift"])})
        if cfg.background is not None and not any(is_vector_path(sc["labels_given"]) for sc in scenes):
            # (it names the class outside every polygon: with label rasters it was ignored without a word)
            _class_id(cfg.background, cfg.classes, "background")
            warn(f"background {cfg.background!r} is for polygon labels (the class outside every polygon): the labels "
                 "are rasters, so it is not used (leave it out)", TrainingWarning)
        for a in scenes:  # one image file trained in one scene and validated in another: a validation leak
            for b in scenes:
                if a is b or a["train_region"] is None or b["val_region"] is None or not _same_file(a["image"], b["image"]):
                    continue
                overlap = _overlap(a["train_region"], b["val_region"])
                if overlap > 0:
                    raise ParameterError(f"{where(a['k'], 'train_region')} and {where(b['k'], 'val_region')} share "
                                         f"{overlap} pixels: make them disjoint (both are regions of "
                                         f"{Path(a['image']).name})")
        self.scenes = [{**{k: v for k, v in sc.items() if k not in ("meta", "k", "labels_given")},
                        "labels": sc["labels_given"]} for sc in scenes]
        # what the files held when this run read them (a resume compares: see _resume)
        self._data = [{"image": _file_identity(sc["image"]), "labels": _file_identity(sc["labels"])}
                      for sc in self.scenes]
        all_scenes, scenes = scenes, [sc for sc in scenes if sc["train_region"] is not None]
        if not scenes:
            raise ParameterError("every scene is for validation only (use: val): give at least one training scene")
        self.meta = scenes[0]["meta"]
        self.bands = scenes[0]["bands"]
        self.train_region = scenes[0]["train_region"]
        self.val_region = scenes[0]["val_region"]
        # the training pixels' ground size in metres (the card's pixel_size; a geometric mean over scenes)
        sizes = [s for sc in scenes if (s := sc["meta"].ground_pixel_m()) is not None]
        self.pixel_size = round(float(np.exp(np.mean(np.log(sizes)))), 4) if sizes else None

        # Classes: from the config or the ids present in the training labels (of every scene).
        counts: dict[int, int] = {}  # labelled pixels by label value, over the training regions
        region_pixels = 0
        for sc in scenes:
            region_pixels += self._count_labels(sc, sc["train_region"], counts)
        ignored = sorted(v for v in counts if v in cfg.ignore)
        negative = sorted(v for v in counts if v < 0 and v not in cfg.ignore)
        present_set = {v for v in counts if v >= 0 and v not in cfg.ignore}
        zeros = counts.get(0, 0)  # label value 0 where it is not the raster's nodata (see below)
        present = sorted(present_set)
        self.classes = class_table(cfg, scenes[0]["labels"], present,
                                   next((sc["labels_given"] for sc in scenes if is_vector_path(sc["labels_given"])), None))
        if len(self.classes) < 2:
            nodata = sorted({float(sc["label_nodata"]) for sc in scenes if sc["label_nodata"] is not None})
            raise ParameterError(one_class_message(self.classes, ignored, nodata, bool(cfg.classes), negative))
        if zeros and 0 in cfg.ignore and not cfg.classes:
            # 0 as "unlabelled" is the default: a cloud mask (0 cloud, 1 shadow, 4 clear) lost its cloud
            # class without a word
            warn(f"label value 0 ({100 * zeros / max(1, region_pixels):.1f} % of the training region) is taken as "
                 "unlabelled (ignore: [0], the default) and the model gets no class 0: if 0 is a class (e.g. cloud), "
                 "set ignore: [] (--set ignore=[]) or list the classes with their ids", TrainingWarning)
        self._check_classes_have_pixels(present_set, scenes)
        ids = [c.id for c in self.classes]
        # class ids are 0..254 (the card's): a table over those, whatever other values the labels hold
        self.lut = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, np.int64)
        self.lut[ids] = np.arange(len(ids))
        unknown = sorted(set(present) - set(ids))
        if unknown:
            warn(f"label values {unknown} are not among the classes {ids}: they are ignored", TrainingWarning)
        if negative:
            warn(f"label values {_few(negative)} are negative, and class ids are 0..254: those pixels are taken as "
                 "unlabelled (add the values to ignore to say so, or recode the labels)", TrainingWarning)

        # Training regions: in memory (raw pixels, then statistics over all of them, then
        # normalised), or, when they would not fit (read_from), labels in memory and the image
        # read window by window from disk.
        dtype = self.meta.dtype
        self.read_from = self._read_mode(sum(region_memory(sc["train_region"], len(self.bands), dtype)
                                             for sc in scenes))
        self.train_sets: list[RegionData] = []
        self.train_valids: list[np.ndarray] = []
        if self.read_from == "disk":
            self._train_from_disk(scenes, dtype)
        else:
            self._train_in_memory(scenes, dtype, where)
        self.train_data = self.train_sets[0]
        self.train_valid = self.train_valids[0]
        if not any((d.labels != IGNORE_INDEX).any() for d in self.train_sets):
            raise ParameterError("the training region has no labelled pixels: check train_region and ignore")
        side = min(min(sc["train_region"].height, sc["train_region"].width) for sc in scenes)
        if side < 16:  # the smallest window: random windows could not be cut (a bare ValueError, a hung loader)
            small = next(sc for sc in scenes if min(sc["train_region"].height, sc["train_region"].width) == side)
            raise ParameterError(f"{where(small['k'], 'train_region')} is {small['train_region'].width}x"
                                 f"{small['train_region'].height} pixels: training windows are at least 16 pixels: "
                                 "give a region at least 16 pixels wide and high")
        self.window = cfg.window if cfg.window <= side else max(16, side // 16 * 16)

        # Validation regions. Validation windows see image context around the region (as predict
        # does on a whole scene), but only from inside the train + validation bounding box;
        # labels outside the validation region are ignored.
        self.val_sets: list[RegionData] = []
        val_keys: list[int] = []  # the scene of each validation set
        for sc in all_scenes:
            if sc["val_region"] is None:
                continue
            val_keys.append(sc["k"])
            meta = sc["meta"]
            around = sc["train_region"] if sc["train_region"] is not None else Region(
                0, 0, meta.height, meta.width, np.broadcast_to(True, (meta.height, meta.width)))  # a validation scene
            ctx = _context_region(sc["val_region"], around, self.window // 2)
            if self.read_from == "disk":
                check_memory(label_memory(ctx), f"{where(sc['k'], 'val_region')}'s labels", "val_region")
                vidx, _ = self._scan_region(sc, ctx)
                self.val_sets.append(RegionData(DiskImage(sc["image"], sc["bands"], meta.alpha_band, ctx, self.normalization,
                                                          dtype, self.gap_fill), vidx, sc["val_region"]))
                continue
            check_region_memory(ctx, len(self.bands), dtype, where(sc["k"], "val_region"), "val_region")
            vimg, vidx, _, vgaps = load_region(sc["image"], sc["bands"], sc["meta"], sc["labels"], ctx, self.lut,
                                              cfg.ignore, sc["label_shift"])
            self.val_sets.append(RegionData(self.normalization.apply(vimg, dtype, vgaps, self.gap_fill), vidx,
                                            sc["val_region"]))
        self._check_val_labels([sc for sc in all_scenes if sc["val_region"] is not None], ids, where)
        unlabelled = [k for k, d in zip(val_keys, self.val_sets) if not (d.labels != IGNORE_INDEX).any()]
        if self.val_sets and len(unlabelled) < len(self.val_sets):
            for k in unlabelled:  # (validated nothing, without a word, beside the other scenes' regions)
                warn(f"{where(k, 'val_region')} has no labelled pixels: it validates nothing (the other scenes' "
                     "validation regions do); check its val_region and labels", TrainingWarning)
        elif self.val_sets:
            # every validation gave mIoU NaN, so no weights were ever the best: the last ones were shipped
            raise ParameterError(f"{'the validation regions have' if len(self.val_sets) > 1 else 'val_region has'} no "
                                 "labelled pixels (every label there is unlabelled or ignored), so nothing can be "
                                 "validated: choose a val_region with labels, or train without validation "
                                 "(--set val_region=null)")
        self.val_data: RegionData | None = self.val_sets[0] if self.val_sets else None
        if self.window != cfg.window:
            log.info("window %d is larger than the training region (%dx%d): using %d",
                     cfg.window, self.train_region.width, self.train_region.height, self.window)
        self.num_classes = len(self.classes)
        self.progress = progress
        self.device = self._device()
        if self.device == "cpu":
            check_batch_memory(cfg.batch_size, self.window)
        for sc in all_scenes:  # the regions are read (training from disk reopens its own handles)
            close_handles(sc["image"])

    def _count_labels(self, sc: Mapping[str, Any], region: Region, counts: dict[int, int]) -> int:
        """Add the labelled pixels of ``region`` of scene ``sc`` to ``counts`` (by label value, ignore
        values too), read in blocks of rows; return the region's pixel count."""
        pixels = 0
        for _, block in row_blocks(region, BAND_PIXELS):
            raw, labelled = read_labels(sc["labels"], block.window, sc["label_shift"])
            values, n = np.unique(raw[block.mask & labelled], return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                counts[v] = counts.get(v, 0) + c
            pixels += int(np.count_nonzero(block.mask))
            del raw, labelled
        return pixels

    def _check_val_labels(self, scenes: Sequence[Mapping[str, Any]], ids: Sequence[int],
                          where: Callable[[int, str], str]) -> None:
        """Warn about validation labels that are no class (as about training ones): a class found only in
        a validation region (or a ``use: val`` scene) was left out of validation mIoU without a word."""
        for sc in scenes:
            counts: dict[int, int] = {}
            self._count_labels(sc, sc["val_region"], counts)
            scored = {v: n for v, n in counts.items() if v not in self.cfg.ignore}
            other = sorted(v for v in scored if v not in ids)
            if other:
                share = 100 * sum(scored[v] for v in other) / max(1, sum(scored.values()))
                warn(f"{where(sc['k'], 'val_region')} label values {_few(other)} ({share:.1f} % of its labelled pixels) "
                     f"are not among the classes {list(ids)}: they are not validated (list them in classes, or add "
                     "them to ignore)", TrainingWarning)

    def _drop_gap_targets(self, labels: np.ndarray, gaps: np.ndarray | None) -> None:
        """With ``train_on_gaps: false``, pixels with a band missing stay as context (that band at
        its mean) but are not training targets. Off by default: predict classifies such pixels, and
        a model that never trained on them predicted them erratically on the NC folds (see the
        recipes)."""
        if gaps is not None and not self.cfg.train_on_gaps:
            labels[gaps.any(axis=0)] = IGNORE_INDEX

    def _read_mode(self, need: int) -> str:
        """``memory`` or ``disk`` for the training regions, whose in-memory peak is ``need`` bytes
        (``read_from: auto`` = memory when that fits in half the available memory)."""
        import psutil

        mode = self.cfg.read_from
        if mode == "auto":
            available = psutil.virtual_memory().available
            mode = "memory" if need <= available // 2 else "disk"
            if mode == "disk":
                log.info("the training regions need about %.1f GB in memory (%.1f GB available): reading their "
                         "windows from disk", need / 2**30, available / 2**30)
        return mode

    def _scan_region(self, sc: Mapping[str, Any], region: Region,
                     moments: BandMoments | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label indexes and valid pixels (HW) of ``region``, read in blocks of rows; with
        ``moments``, the blocks' pixels are added to the band statistics (a training region)."""
        cfg = self.cfg
        labels = valid_all = None
        for r0, block in row_blocks(region, BAND_PIXELS):
            data, idx, valid, gaps = load_region(sc["image"], sc["bands"], sc["meta"], sc["labels"], block, self.lut,
                                                 cfg.ignore, sc["label_shift"])
            if moments is not None:
                moments.add(data, valid & block.mask, gaps)
                self._drop_gap_targets(idx, gaps)
            if labels is None or valid_all is None:
                labels = np.empty((region.height, region.width), idx.dtype)
                valid_all = np.empty((region.height, region.width), bool)
            labels[r0 : r0 + block.height] = idx
            valid_all[r0 : r0 + block.height] = valid & block.mask
            del data, gaps
        assert labels is not None and valid_all is not None
        return labels, valid_all

    def _train_from_disk(self, scenes: Sequence[Mapping[str, Any]], dtype: str) -> None:
        """Training regions read once in blocks (labels, valid pixels, exact band statistics),
        their images left on disk (:class:`DiskImage`)."""
        check_memory(sum(label_memory(sc["train_region"]) for sc in scenes), "the training regions' labels",
                     "train_region")
        moments = BandMoments(len(self.bands), DEFAULT_SCALE.get(dtype, DEFAULT_SCALE["default"]))
        scanned = [self._scan_region(sc, sc["train_region"], moments) for sc in scenes]
        mean, std = moments.result()
        self.normalization = Normalization(mean=mean, std=std, scale=dict(DEFAULT_SCALE))
        _warn_constant_bands(self.bands, std)
        striped = [sc["image"].name for sc in scenes
                   if sc["meta"].block_shape[1] >= sc["meta"].width > 2 * self.cfg.window]
        if striped:
            names = ", ".join(striped[:3]) + (f" and {len(striped) - 3} more" if len(striped) > 3 else "")
            warn(f"{names} {'is' if len(striped) == 1 else 'are'} stored in strips, not tiles: each training window "
                 "read from disk decodes whole rows of the image; a tiled copy trains faster (gdal_translate -co "
                 "TILED=YES, or a COG)", PerformanceWarning)
        for sc, (labels, valid) in zip(scenes, scanned):
            image = DiskImage(sc["image"], sc["bands"], sc["meta"].alpha_band, sc["train_region"], self.normalization,
                              dtype, self.gap_fill)
            self.train_sets.append(RegionData(image, labels, sc["train_region"]))  # type: ignore[arg-type]
            self.train_valids.append(valid)

    def _train_in_memory(self, scenes: Sequence[Mapping[str, Any]], dtype: str, where: Callable[[int, str], str]) -> None:
        """Training regions read whole: raw pixels, statistics over all of them, normalised."""
        cfg = self.cfg
        if len(scenes) > 1:  # all training regions together, before any is read
            need = sum(region_memory(sc["train_region"], len(self.bands), dtype) for sc in scenes)
            check_memory(need, f"the {len(scenes)} training regions", "train_region")
        loaded = []
        for sc in scenes:
            check_region_memory(sc["train_region"], len(self.bands), dtype, where(sc["k"], "train_region"),
                                "train_region")
            loaded.append(load_region(sc["image"], sc["bands"], sc["meta"], sc["labels"], sc["train_region"], self.lut,
                                      cfg.ignore, sc["label_shift"]))
        scale = DEFAULT_SCALE.get(dtype, DEFAULT_SCALE["default"])
        if len(scenes) > 1:
            mean, std = pooled_band_statistics(
                [(raw, valid & sc["train_region"].mask, gaps) for (raw, _, valid, gaps), sc in zip(loaded, scenes)], scale)
        else:
            raw, _, valid, gaps = loaded[0]
            mean, std = band_statistics(raw, valid & self.train_region.mask, scale, gaps)
            del raw  # the raw pixels go once normalised (loaded[0] holds them until then)
        self.normalization = Normalization(mean=mean, std=std, scale=dict(DEFAULT_SCALE))
        _warn_constant_bands(self.bands, std)
        for k, sc in enumerate(scenes):
            raw_img, train_idx, train_valid, gaps = loaded[k]
            loaded[k] = None  # type: ignore[call-overload]  # the raw pixels go once normalised
            self._drop_gap_targets(train_idx, gaps)
            self.train_sets.append(RegionData(self.normalization.apply(raw_img, dtype, gaps, self.gap_fill),
                                              train_idx, sc["train_region"]))
            self.train_valids.append(train_valid & sc["train_region"].mask)
            del raw_img, gaps

    @property
    def gap_fill(self) -> float:
        """Input value for band values without data (see :func:`geoseg.card.gap_fill_for`)."""
        return gap_fill_for(self.cfg.params)

    @property
    def overlap(self) -> int:
        """Window overlap for validation, the class prior and the card (default a quarter window)."""
        given = self.cfg.tile_overlap
        if given is None:
            return self.window // 4
        # the window shrinks to a small training region: an overlap the config's window allowed may
        # not fit it (the card would hold one predict refuses)
        return given if given < self.window else self.window // 4

    # -- hooks -------------------------------------------------------------------------------
    def configure_model(self) -> Any:
        """Build the network named in the config."""
        from geoseg.models import build_model

        return build_model(self.cfg.model, **model_kwargs(self.cfg.params, len(self.bands), self.num_classes,
                                                          self.normalization))

    def configure_loss(self) -> Callable[[Any, Any], tuple[Any, dict[str, float]]]:
        """Build the loss (with class weights when configured)."""
        cw = self.cfg.class_weights
        weights: np.ndarray | None
        if cw is None or cw == "none":
            weights = None
        elif cw in ("auto", "balanced"):
            labels = (self.train_data.labels if len(self.train_sets) == 1
                      else np.concatenate([d.labels.ravel() for d in self.train_sets]))
            weights = auto_class_weights(labels, self.num_classes, cw)
        else:
            weights = np.asarray(cw, np.float32)
            if weights.shape != (self.num_classes,):
                raise ParameterError(f"class_weights has {weights.size} values for {self.num_classes} classes")
        self.class_weights = weights
        if weights is not None:
            log.info("class weights: %s", ", ".join(f"{c.id}:{w:.2f}" for c, w in zip(self.classes, weights)))
        return make_loss(self.cfg.loss, self.num_classes, weights, self.cfg.ce_weight, self.cfg.dice_weight,
                         self.cfg.label_smoothing, self.cfg.lovasz_weight)

    def configure_teacher(self) -> _Teacher | None:
        """The distillation teacher (run as predict runs it), or None without ``teacher``.

        Its classes must be this model's; its input is this model's normalised batch mapped
        band by band onto the teacher's own normalisation (an exact identity when both were
        computed on the same pixels, as for models trained on the same regions).
        """
        cfg = self.cfg
        if not cfg.teacher:
            return None
        from geoseg.engine import build_predictor, resolve_model, shipped_models
        from geoseg.ensemble import member_source

        # (`teacher: unet` with `out: unet`: the folder of that name is this run's own, made before: the shipped unet)
        own = (cfg.teacher in shipped_models() and os.path.isdir(cfg.teacher)
               and Path(cfg.teacher).resolve() == self.out.resolve())
        try:
            source = resolve_model(cfg.teacher, exported=False) if own else member_source(cfg.teacher, what="teacher")
        except ModelError as e:
            raise ParameterError(str(e) if str(e).startswith("teacher ") else f"teacher: {e}") from None
        card = source.card
        if source.export_dir is not None:
            raise ParameterError(f"teacher {cfg.teacher} is an exported folder: give the run's weights (.pdparams + card)")
        ids, own = [c.id for c in card.classes], [c.id for c in self.classes]
        if ids != own:
            raise ParameterError(f"teacher {cfg.teacher} predicts classes {ids}, this model {own}: distil from a model "
                                 "with the same classes in the same order")
        if len(card.normalization.mean) != len(self.bands):
            raise ParameterError(f"teacher {cfg.teacher} reads {len(card.normalization.mean)} bands, this model "
                                 f"{len(self.bands)}: distil from a model trained on the same bands")
        if math.isnan(gap_fill_for(card.params)) != math.isnan(self.gap_fill):
            raise ParameterError(f"teacher {cfg.teacher} and this model differ in gap_channels: give both the same setting")
        dtype = self.meta.dtype
        s, t = self.normalization, card.normalization
        ratio = t.scale_for(dtype) / s.scale_for(dtype)
        a = np.asarray(s.std, np.float64) * ratio / np.asarray(t.std, np.float64)
        b = (np.asarray(s.mean, np.float64) * ratio - np.asarray(t.mean, np.float64)) / np.asarray(t.std, np.float64)
        identity = bool(np.allclose(a, 1.0, rtol=0, atol=1e-6) and np.allclose(b, 0.0, rtol=0, atol=1e-6))
        # predict's own runner: Paddle Inference on CPU (oneDNN, several times faster than the dygraph
        # forward pass for a UNet), dygraph on GPU; as many CPU threads as the run's OMP_NUM_THREADS.
        predict, how = build_predictor(source, device=self.device, threads=_omp_threads())
        self.teacher_name = card.name
        log.info("distilling from %s (%s on %s, weight %.2f, temperature %.2f%s)", cfg.teacher, card.name, how,
                 cfg.distill_weight, cfg.distill_temperature, "" if identity else ", input re-normalised for it")
        shape = (1, len(a), 1, 1)
        return _Teacher(predict, None if identity else (a.astype(np.float32).reshape(shape),
                                                        b.astype(np.float32).reshape(shape)))

    def configure_optimizer(self, model: Any) -> Any:
        """AdamW with global-norm gradient clipping; the LR is set every step."""
        paddle = self.paddle
        clip = paddle.nn.ClipGradByGlobalNorm(self.cfg.grad_clip) if self.cfg.grad_clip else None
        return paddle.optimizer.AdamW(learning_rate=self.cfg.lr, parameters=model.parameters(),
                                      weight_decay=self.cfg.weight_decay, grad_clip=clip)

    def validate(self, model: Any) -> dict[str, Any]:
        """mIoU / OA over the validation region(s) (classes present in their labels)."""
        assert self.val_sets
        cm = ConfusionMatrix(range(self.num_classes), ignore_reference=(IGNORE_INDEX,))
        for data in self.val_sets:
            cm.update(data.labels, predict_array(model, data.image, self.num_classes, self.window, self.overlap))
        m = cm.metrics()
        names = {i: c.id for i, c in enumerate(self.classes)}
        return {
            "miou": float(m.miou), "overall_accuracy": float(m.overall_accuracy), "kappa": float(m.kappa),
            "per_class_iou": {int(names[i]): (None if not np.isfinite(v) else round(float(v), 4)) for i, v in enumerate(m.iou)},
            "miou_classes": [names[i] for i in m.averaged_classes],
        }

    # -- run ---------------------------------------------------------------------------------
    def _device(self) -> str:
        paddle = self.paddle
        has_gpu = bool(paddle.is_compiled_with_cuda()) and paddle.device.cuda.device_count() > 0
        if self.cfg.device == "gpu" and not has_gpu:
            raise ParameterError("device gpu: this PaddlePaddle build has no CUDA or sees no GPU: use --device cpu")
        dev = "gpu" if (self.cfg.device == "gpu" or (self.cfg.device == "auto" and has_gpu)) else "cpu"
        paddle.set_device(dev)
        return dev

    def card(self, metrics: Mapping[str, Any], best_iteration: int) -> ModelCard:
        """The model card for the current weights."""
        cfg = self.cfg
        names = cfg.band_names or tuple((self.meta.descriptions[b - 1] or f"b{b}") for b in self.bands)
        return ModelCard(
            name=cfg.name or f"{cfg.model}-{Path(self.scenes[0]['labels']).stem}",
            architecture=cfg.model,
            bands=tuple(names),
            classes=self.classes,
            normalization=self.normalization,
            params={k: v for k, v in cfg.params.items() if k != "pretrained"},  # (a start, not the model)
            tile_size=self.window,
            overlap=self.overlap,
            weights="weights.pdparams",
            description=cfg.description or f"{cfg.model} trained with geoseg train on "
                        + (", ".join(Path(sc["image"]).name for sc in self.scenes) if len(self.scenes) <= 5
                           else f"{len(self.scenes)} scenes"),
            training={
                **({"image": str(cfg.image), "labels": str(cfg.labels),
                    "train_region": _plain_region(cfg.train_region), "val_region": _plain_region(cfg.val_region)}
                   if cfg.scenes is None else
                   {"scenes": [{"image": str(sc["image"]), "labels": str(sc["labels"]),
                                "train_region": _plain_region(sc.get("train_region")),
                                "val_region": _plain_region(sc.get("val_region")),
                                **({"use": sc["use"]} if sc.get("use") else {}),
                                **({"label_shift": list(sc["label_shift"])} if sc.get("label_shift") else {})}
                               for sc in cfg.scenes],
                    "scene_files": len(self.scenes)}),
                "bands": list(self.bands),
                # the raster type its normalisation statistics were computed on (x * scale[dtype]): an
                # export's PaddleSeg Normalize is written for it (geoseg.exported.training_dtype)
                "dtype": str(self.meta.dtype),
                "ignore": list(cfg.ignore), "window": self.window, "batch_size": cfg.batch_size,
                "iterations": cfg.iterations, "best_iteration": best_iteration, "lr": cfg.lr,
                "weight_decay": cfg.weight_decay, "schedule": cfg.schedule, "warmup": cfg.warmup,
                # (these were in no card: an ensemble of members that differ in them said nothing)
                "min_lr": cfg.min_lr, **({"power": cfg.power} if cfg.schedule == "poly" else {}),
                "grad_clip": cfg.grad_clip, "min_labelled": cfg.min_labelled,
                "loss_weights": {"ce": cfg.ce_weight, "dice": cfg.dice_weight, "lovasz": cfg.lovasz_weight},
                "loss": cfg.loss, "class_weights": (None if getattr(self, "class_weights", None) is None
                                                    else [round(float(v), 4) for v in self.class_weights]),
                "augment": {"flips": cfg.flips, "rot90": cfg.rot90, "brightness": cfg.brightness, "contrast": cfg.contrast,
                            **({"global_brightness": cfg.global_brightness, "global_contrast": cfg.global_contrast,
                                "noise": cfg.noise} if (cfg.global_brightness or cfg.global_contrast or cfg.noise)
                               else {}),
                            **({"mosaic": cfg.mosaic} if cfg.mosaic else {}),
                            **({"scale": list(cfg.scale)} if cfg.scale else {}),
                            **({"band_dropout": cfg.band_dropout} if cfg.band_dropout else {})},
                **({"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}),
                **({"ema": cfg.ema} if cfg.ema else {}),
                **({"ema_warmup": cfg.ema_warmup} if cfg.ema and cfg.ema_warmup != 10.0 else {}),
                **({"train_on_gaps": False} if not cfg.train_on_gaps else {}),
                **({"label_shift": list(cfg.label_shift)} if any(cfg.label_shift) else {}),
                **({"teacher": {"model": str(cfg.teacher), "name": self.teacher_name, "weight": cfg.distill_weight,
                                "temperature": cfg.distill_temperature}} if cfg.teacher else {}),
                "seed": cfg.seed, "device": self.device,
            },
            metrics={"validation": dict(metrics)} if metrics else {},
            pixel_size=self.pixel_size,
        )

    def fit(self, replace: bool = False) -> TrainResult:
        """Run (or resume) training; return where the best weights and card went.

        ``replace``: first remove the files of a run already in ``out`` (:data:`RUN_FILES` and the
        checkpoint), after every check and before anything is written (``--overwrite``).
        """
        paddle = self.paddle
        cfg = self.cfg
        from geoseg.models.checkpoints import save_weights

        paddle.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = self.configure_model()
        loss_fn = self.configure_loss()
        self.teacher = self.configure_teacher()
        opt = self.configure_optimizer(model)
        amp = cfg.amp and self.device == "gpu"
        if amp:
            from geoseg.models.inference import amp_fp16_supported

            if not amp_fp16_supported(paddle):  # Paddle would turn autocast off with a bare UserWarning
                warn("amp: this GPU (compute capability below 7.0) has no FP16 autocast in Paddle: training in fp32",
                     PerformanceWarning)
                amp = False
        scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**14) if amp else None
        self.scaler = scaler  # its loss scale and counters are saved with each checkpoint

        self.card({}, 0)  # the card's own checks, before anything is written or trained

        ckpt_dir = self.out / "checkpoints"
        self._ckpt_files: dict[str, str] = {}  # last.json's part digests (the checkpoint to keep whole)
        self._ckpt_it: int | None = None  # that checkpoint's iteration
        self._best: tuple[Path, str] | None = None  # the best weights so far and their digest
        start, best_miou, best_it, history = 0, -1.0, -1, []
        best_metrics: dict[str, Any] = {}
        self.ema = _Ema(paddle, model, cfg.ema, cfg.ema_warmup) if cfg.ema > 0 else None
        if cfg.resume:
            start, best_miou, best_it, history, best_metrics = self._resume(Path(cfg.resume), model, opt)
            if start > cfg.iterations:
                raise ParameterError(f"resume: the checkpoint is at iteration {start}, past iterations {cfg.iterations}: "
                                     f"give --iterations {start} or more to continue it")
            log.info("resuming at iteration %d%s", start, f" (best validation mIoU {best_miou:.4f} at {best_it})"
                     if best_it >= 0 and best_miou >= 0 else " (no validation so far)")
        if start >= cfg.iterations:
            log.info("nothing to do: the checkpoint is at iteration %d of %d", start, cfg.iterations)
        if replace:
            _remove_run(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.out}: {exc.strerror or exc}: choose another --out") from None
        if self._best is not None and not _same_file(self._best[0].parent, ckpt_dir):  # another run's checkpoint
            from geoseg.atomic import atomic_output

            ckpt_dir.mkdir(exist_ok=True)
            with atomic_output(ckpt_dir / "best.pdparams") as tmp:
                shutil.copyfile(self._best[0], tmp)
            self._best = (ckpt_dir / "best.pdparams", self._best[1])
        weights_path, card_path = self.out / "weights.pdparams", self.out / "weights.yaml"
        if start >= cfg.iterations and self._published(weights_path, card_path, best_it):
            # a finished run resumed with nothing to do: its model stays as it is (republishing it
            # replaced the card, and on a full disk left the weights without one)
            log.info("the run is finished: its weights and card in %s are left as they are", self.out)
            if not (self.out / "train_log.json").is_file():  # (stopped just before writing it)
                self._write_log(best_it, best_metrics, history, 0.0)
            return TrainResult(weights_path, card_path, best_it, best_miou if best_miou >= 0 else None, start, 0.0,
                               self.out / "train_log.csv", history)

        ds = WindowDataset(self.train_sets, self.window, (cfg.iterations - start) * cfg.batch_size, seed=cfg.seed,
                           start=start * cfg.batch_size, flips=cfg.flips, rot90=cfg.rot90,
                           brightness=cfg.brightness, contrast=cfg.contrast, min_labelled=cfg.min_labelled,
                           global_brightness=cfg.global_brightness, global_contrast=cfg.global_contrast,
                           noise=cfg.noise, mosaic=cfg.mosaic, band_dropout=cfg.band_dropout,
                           gap_fill=self.gap_fill, scale=cfg.scale)
        # none when the checkpoint is at the end (a DataLoader of no items can hang in its reader thread)
        loader = paddle.io.DataLoader(_PaddleDataset(ds), batch_size=cfg.batch_size, shuffle=False, drop_last=False,
                                      num_workers=cfg.workers, use_shared_memory=cfg.workers > 0,
                                      worker_init_fn=functools.partial(_worker_init, os.getpid()) if cfg.workers else None
                                      ) if len(ds) else []
        csv_path = self.out / "train_log.csv"
        fields = ["iteration", "lr", "loss", "ce", "dice", *(["lovasz"] if "lovasz" in cfg.loss else []),
                  *(["distill"] if self.teacher is not None else []), "grad_norm",
                  "val_miou", "val_oa", "val_kappa", "seconds"]
        # the log up to the checkpoint, from its history: rows logged after it (a run stopped between two) are
        # logged again, and a log deleted or torn by a kill (a row cut short, the next glued onto it) is whole
        buf = io.StringIO()
        csv.writer(buf).writerows([fields, *([_fmt(r.get(k)) for k in fields] for r in history)])
        atomic_write_text(csv_path, buf.getvalue())
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=start, desc="train", unit="it", file=sys.stderr, dynamic_ncols=True)
        model.train()
        t0 = time.perf_counter()
        it = start
        running: list[float] = []
        params = [p for p in model.parameters() if not p.stop_gradient]
        for x, y in loader:
            lr = learning_rate(it, cfg)
            lval, parts, gnorm = self.step(model, opt, loss_fn, x, y, lr, scaler, params)
            it += 1
            if not math.isfinite(lval):  # the weights are spoilt from here on: stop before any is saved
                tries = ["a lower lr", *(["other class_weights"] if cfg.class_weights not in (None, "none") else []),
                         *(["amp: false"] if scaler is not None else [])]
                raise ParameterError(f"iteration {it}: the loss is {lval}, not a finite number, so training stopped "
                                     "(its weights would turn to NaN): try "
                                     f"{', '.join(tries[:-1]) + ' or ' if len(tries) > 1 else ''}{tries[-1]}, "
                                     "training anew with --overwrite")
            if self.ema is not None:
                self.ema.update(model, it)
            running.append(lval)
            row: dict[str, Any] = {"iteration": it, "lr": lr, "loss": lval, **parts, "grad_norm": gnorm}
            validate_now = bool(self.val_sets) and (it % cfg.val_every == 0 or it == cfg.iterations)
            if validate_now:
                with self._averaged(model):
                    m = self.validate(model)
                    row.update(val_miou=m["miou"], val_oa=m["overall_accuracy"], val_kappa=m["kappa"])
                    log.info("iteration %d: loss %.4f, validation mIoU %.4f, OA %.4f", it, float(np.mean(running)),
                             m["miou"], m["overall_accuracy"])
                    if m["miou"] > best_miou:
                        best_miou, best_it, best_metrics = m["miou"], it, m
                        self._save_best(model, save_weights, best_metrics, best_it)
            if not self.val_sets and (it % cfg.val_every == 0 or it == cfg.iterations):
                best_it = it
                with self._averaged(model):
                    self._save_best(model, save_weights, {}, it)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            if it % cfg.log_every == 0 or validate_now or it == cfg.iterations:
                history.append(row)
                with open(csv_path, "a", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerow([_fmt(row.get(k)) for k in fields])
                if not validate_now:  # (a line in a log file or cron mail; beside a progress bar, debug only)
                    (log.debug if bar is not None else log.info)(
                        "iteration %d: loss %.4f, lr %.2e, grad norm %.3f", it, float(np.mean(running)), lr, gnorm)
                running = []
            if it % cfg.val_every == 0 or it == cfg.iterations:
                self._save_checkpoint(ckpt_dir, model, opt, it, best_miou, best_it, history, best_metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lval:.3f}", best_miou=f"{max(best_miou, 0):.3f}")
            if self.progress is not None:
                self.progress(it, row)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        best = self._best[0] if self._best is not None else None
        if best is None and cfg.resume and best_it >= 0 and weights_path.is_file():
            best = weights_path  # a checkpoint of geoseg before 2026-11-30: the best weights were published as they came
        if best is None:  # resumed at the end of such a checkpoint without validation
            with self._averaged(model):
                self._save_best(model, save_weights, best_metrics, it)
            best = self._best[0]  # type: ignore[index]
            best_it = it  # the card names the iteration of the weights it ships
        self._publish(best, best_metrics, best_it)
        self._write_log(best_it, best_metrics, history, seconds)
        return TrainResult(weights_path, card_path, best_it, best_miou if best_miou >= 0 else None, it, seconds,
                           csv_path, history)

    def class_prior(self, model: Any) -> tuple[float, ...]:
        """``model``'s mean class probabilities over the valid pixels of the training region(s),
        predicted in blended windows of the training size (the card's ``class_prior``: the
        priors its posteriors reflect, for prediction-time prior adaptation, see
        :mod:`geoseg.priors`). Only training pixels are read.

        At most about :data:`PRIOR_WINDOWS` windows are predicted, whatever the size: a region
        of more windows is sampled (windows spread evenly over it, each window's core, see
        :func:`sampled_mean_probs`); with several scenes the budget is shared by their window
        counts, and of more scenes than that, that many spread over the list are used. Scenes
        weigh by their valid pixels.
        """
        sets = [(d, v, int(v.sum())) for d, v in zip(self.train_sets, self.train_valids)]
        sets = [s for s in sets if s[2] > 0]
        if len(sets) > PRIOR_WINDOWS:
            sets = [sets[i] for i in np.unique(np.linspace(0, len(sets) - 1, PRIOR_WINDOWS).round().astype(int))]
        grids = []
        for data, _, _ in sets:
            _, H, W = data.image.shape
            grids.append(make_grid(H, W, self.window, min(self.overlap, self.window - 16))
                         if min(H, W) >= self.window else None)
        sizes = [len(g) if g is not None else 1 for g in grids]
        total, count = np.zeros(self.num_classes, np.float64), 0
        for (data, valid, n), grid, size in zip(sets, grids, sizes):
            budget = max(1, PRIOR_WINDOWS * size // sum(sizes))
            if grid is None or len(grid) <= budget:
                probs = predict_probs(model, data.image, self.num_classes, self.window, self.overlap)
                mean = probs[:, valid].astype(np.float64).mean(axis=1)
                del probs
            else:
                mean = sampled_mean_probs(model, data.image, valid, grid, self.num_classes, budget)
            if len(self.train_sets) == 1:
                return tuple(round(float(v), 6) for v in mean / mean.sum())
            total += mean / mean.sum() * n  # regions weigh by their valid pixels
            count += n
        mean = total / max(count, 1)
        return tuple(round(float(v), 6) for v in mean / mean.sum())

    def write_class_prior(self, weights_path: Path) -> tuple[float, ...]:
        """The :meth:`class_prior` of the weights saved in ``weights_path`` (for the final card)."""
        from geoseg.models.checkpoints import load_weights

        layer = self.configure_model()
        load_weights(layer, weights_path)
        prior = self.class_prior(layer)
        log.info("class prior over the training region: %s",
                 ", ".join(f"{c.name} {v:.3f}" for c, v in zip(self.classes, prior)))
        return prior

    def _check_classes_have_pixels(self, present: set[int], scenes: Sequence[Mapping[str, Any]]) -> None:
        """Refuse a class whose id is the label raster's nodata (its pixels all count as unlabelled); warn
        about a listed class without any labelled pixel in the training regions (the model cannot learn
        it, yet its card would list it)."""
        nodata = {int(v) for sc in scenes if (v := sc["label_nodata"]) is not None and float(v).is_integer()}
        for c in self.classes:
            if c.id not in present and c.id in nodata:
                raise ParameterError(
                    f"class {c.id} ({c.name}) is also the label raster's nodata value, so its pixels count as unlabelled "
                    f"and it would never be learned: unset the labels' nodata (gdal_edit.py -unsetnodata LABELS) or "
                    "give the classes other ids")
        have = [c.id for c in self.classes if c.id in present]
        if len(have) < 2:  # (listed classes: it trained, warning of each missing one, and validated mIoU = OA)
            held = f"one of them only ({have[0]})" if have else "none of them"
            raise ParameterError(f"the config lists {len(self.classes)} classes and the training labels hold {held} in "
                                 "the training region: a segmentation model needs at least two; check the labels, "
                                 "train_region and ignore")
        for c in self.classes:
            if c.id in present:
                continue
            warn(f"class {c.id} ({c.name}) has no labelled pixel in the training region: the model cannot learn it "
                 "(check the class ids and train_region)", TrainingWarning)

    def step(self, model: Any, opt: Any, loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]], x: Any, y: Any,
             lr: float, scaler: Any = None, params: Sequence[Any] | None = None) -> tuple[float, dict[str, float], float]:
        """One optimisation step on batch ``x`` (NCHW float32), ``y`` (NHW int64).

        With a ``GradScaler`` (GPU) the forward pass runs under ``paddle.amp.auto_cast``.
        Returns ``(loss, loss parts, gradient norm before clipping)``.
        """
        paddle = self.paddle
        opt.set_lr(lr)
        params = params if params is not None else [p for p in model.parameters() if not p.stop_gradient]
        loss_fn = self._with_teacher(loss_fn, x) if self.teacher is not None else loss_fn
        if scaler is not None:
            with paddle.amp.auto_cast(level="O1"), _quiet_batchnorm():
                out = model(x)
                logits = out[0] if isinstance(out, (list, tuple)) else out
            loss, parts = loss_fn(logits, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = _grad_norm(paddle, params)
            scaler.step(opt)
            # Paddle prints "Found inf or nan, current scale is ..." to stdout on each overflow step (common
            # early in AMP training): stdout carries only the weights path (W=$(geoseg train ...))
            with contextlib.redirect_stdout(io.StringIO()) as said:
                scaler.update()
            for line in said.getvalue().splitlines():
                log.debug("AMP: %s", line)
        else:
            with _quiet_batchnorm():
                out = model(x)
            logits = out[0] if isinstance(out, (list, tuple)) else out
            loss, parts = loss_fn(logits, y)
            loss.backward()
            gnorm = _grad_norm(paddle, params)
            opt.step()
        opt.clear_grad()
        return float(loss), parts, gnorm

    def _with_teacher(self, loss_fn: Callable[[Any, Any], tuple[Any, dict[str, float]]],
                      x: Any) -> Callable[[Any, Any], tuple[Any, dict[str, float]]]:
        """``loss_fn`` with the distillation term of batch ``x`` mixed in (see ``teacher``)."""
        paddle = self.paddle
        import paddle.nn.functional as F

        cfg, teacher = self.cfg, self.teacher
        assert teacher is not None
        xt = np.asarray(x.numpy(), np.float32)
        if teacher.affine is not None:
            xt = xt * teacher.affine[0] + teacher.affine[1]
        target = paddle.to_tensor(np.log(np.clip(teacher.predict(xt), 1e-12, None)).astype(np.float32))

        def loss(logits: Any, y: Any) -> tuple[Any, dict[str, float]]:
            base, parts = loss_fn(logits, y)
            kd = distillation_loss(F, logits, target, y, cfg.distill_temperature)
            w = cfg.distill_weight
            return base * (1.0 - w) + kd * w, {**parts, "distill": float(kd)}

        return loss

    def _averaged(self, model: Any) -> Any:
        """Context in which ``model`` holds the weights to validate and ship (EMA when on)."""
        return self.ema.applied(model) if self.ema is not None else nullcontext()

    def _write_log(self, best_it: int, best_metrics: Mapping[str, Any], history: list[dict[str, Any]],
                   seconds: float) -> None:
        """Write ``OUT/train_log.json`` (the run's last file)."""
        atomic_write_text(self.out / "train_log.json", json.dumps({
            "config": self.cfg.to_dict(), "best_iteration": best_it,
            "best_validation": best_metrics, "history": history, "seconds": round(seconds, 1),
        }, indent=1, default=_json_default))

    def _published(self, weights_path: Path, card_path: Path, best_it: int) -> bool:
        """Whether ``OUT`` holds this run's finished model: its card beside the checkpoint's best weights."""
        if not (weights_path.is_file() and card_path.is_file()):
            return False
        if self._best is None:  # a checkpoint of an older version (its best weights were published as they came,
            # with a card; the class prior came last: a run stopped before it is finished by republishing)
            try:
                return best_it >= 0 and ModelCard.load(card_path).class_prior is not None
            except (ModelError, ParameterError, OSError):  # (a damaged card: republished)
                return False
        return _digest(weights_path) == self._best[1]

    def _publish(self, best: Path, metrics: Mapping[str, Any], best_it: int) -> None:
        """Publish the finished model: ``best`` as ``OUT/weights.pdparams``, then its card with the
        class prior as ``OUT/weights.yaml``.

        Only a finished run has a card in ``OUT``: one stopped earlier must not leave a model that
        reads as finished (without its class prior); it is finished with ``--resume``. The old card
        goes once the new weights are copied whole, just before they replace the old ones, and the new
        card comes last, so a card never describes other weights than those beside it (a stop in
        between leaves weights without a card, which predict refuses; a failed copy leaves the old
        weights and card as they were).
        """
        from geoseg.atomic import atomic_output

        card = self.card(metrics, best_it)  # made (and so checked) before anything is replaced
        prior = self.write_class_prior(best)
        card = card.replace(class_prior=prior, adapt_prior=self.cfg.adapt_prior)
        weights_path, card_path = self.out / "weights.pdparams", self.out / "weights.yaml"
        if not _same_file(best, weights_path):
            try:
                with atomic_output(weights_path) as tmp:
                    shutil.copyfile(best, tmp)
                    card_path.unlink(missing_ok=True)  # once the new weights are whole, before they replace the old
            except OSError as exc:  # (copyfile names its source) the old weights and card are left as they were
                raise write_error(weights_path, exc) from None
        card_path.unlink(missing_ok=True)
        card.save(card_path)

    @contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Turn an :class:`OSError` of writing ``path`` (a checkpoint's part) into one line naming it
        (a full disk, ``ulimit -f``: :func:`geoseg.atomic.write_error`) and saying what is left to
        resume from: the previous checkpoint stays whole while the next is written."""
        try:
            yield
        except OSError as exc:
            err = write_error(path, exc)
            d = self.out / "checkpoints"
            kept = (f"the checkpoint of iteration {self._ckpt_it} is intact: --resume {d} goes on from it"
                    if self._ckpt_it is not None else "no checkpoint was saved before it: train anew")
            raise type(err)(f"{err}; {kept}") from None

    def _save_best(self, model: Any, save_weights: Any, metrics: Mapping[str, Any], it: int) -> None:
        """Save the best weights so far as ``checkpoints/best.pdparams`` (published when the run ends);
        the previous checkpoint's best stays (as ``prev.best.pdparams``) until the next checkpoint."""
        d = self.out / "checkpoints"
        with self._writing(d / "best.pdparams"):
            d.mkdir(parents=True, exist_ok=True)
            _set_aside(d, "best.pdparams", self._ckpt_files)
            save_weights(model, d / "best.pdparams")
        self._best = (d / "best.pdparams", _digest(d / "best.pdparams"))

    def _save_checkpoint(self, d: Path, model: Any, opt: Any, it: int, best: float, best_it: int,
                         history: list[dict[str, Any]], best_metrics: Mapping[str, Any]) -> None:
        from geoseg.atomic import atomic_output
        from geoseg.models.checkpoints import save_weights

        with self._writing(d):
            d.mkdir(parents=True, exist_ok=True)
        # Each part of the previous checkpoint is moved to its prev.* name before its new version is
        # written, and last.json, written last, names the digest of each part of this checkpoint:
        # a run stopped while saving resumes from the previous checkpoint (found under either name).
        with self._writing(d / "last.pdparams"):
            _set_aside(d, "last.pdparams", self._ckpt_files)
            save_weights(model, d / "last.pdparams")
        written = ["last.pdparams"]
        if self.ema is not None:
            with self._writing(d / "last.ema.pdparams"):
                _set_aside(d, "last.ema.pdparams", self._ckpt_files)
                with atomic_output(d / "last.ema.pdparams") as tmp:
                    self.paddle.save(self.ema.state_dict(), str(tmp))
            written.append("last.ema.pdparams")
        with self._writing(d / "last.pdopt"):
            _set_aside(d, "last.pdopt", self._ckpt_files)
            with atomic_output(d / "last.pdopt") as tmp:
                self.paddle.save(_portable_opt_state(model, opt.state_dict(), to_structured=True), str(tmp))
        written.append("last.pdopt")
        with self._writing(d / "last.rng"):
            _set_aside(d, "last.rng", self._ckpt_files)
            with atomic_output(d / "last.rng") as tmp:  # dropout's masks go on from here on resume
                self.paddle.save(self._rng_state(), str(tmp))
        written.append("last.rng")
        files = {name: _digest(d / name) for name in written}
        if self._best is not None:
            files["best.pdparams"] = self._best[1]
        with self._writing(d / "last.json"):
            atomic_write_text(d / "last.json", json.dumps({
                "iteration": it, "best_miou": best, "best_iteration": best_it, "config": self.cfg.to_dict(),
                "history": history, "best_validation": dict(best_metrics), "files": files, "data": self._data,
                **({"amp_scaler": scaler} if (scaler := _scaler_state(getattr(self, "scaler", None))) else {}),
            }, default=_json_default))
        self._ckpt_files = files
        self._ckpt_it = it
        for prev in _PREVIOUS.values():  # the previous checkpoint's parts: no last.json names them now
            with contextlib.suppress(OSError):
                (d / prev).unlink(missing_ok=True)

    def _resume(self, path: Path, model: Any, opt: Any) -> tuple[int, float, int, list[dict[str, Any]], dict[str, Any]]:
        from geoseg.models.checkpoints import load_weights

        d = _checkpoint_folder(path)
        path, meta_path = d / "last.pdparams", d / "last.json"
        if not meta_path.is_file():
            if path.is_file():  # (it said "no checkpoint at .../last.pdparams", a file that was there)
                raise ParameterError(f"resume: the checkpoint in {d} is incomplete (no {meta_path.name}: the run was "
                                     "stopped while saving its first checkpoint): train anew with --overwrite")
            raise ParameterError(f"resume: no checkpoint at {path} (expected last.pdparams and last.json from a run)")
        try:
            state = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            it = int(state["iteration"])
            best_miou, best_it = float(state.get("best_miou", -1.0)), int(state.get("best_iteration", -1))
            history, best_validation = list(state.get("history", [])), dict(state.get("best_validation") or {})
            files = dict(state.get("files") or {})  # checkpoints of older versions list none
            data = list(state.get("data") or [])  # (older versions: none)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            why = f"no {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            raise ParameterError(f"resume: the checkpoint in {d} is damaged ({meta_path.name} cannot be read: {why}): "
                                 "train anew with --overwrite") from None
        except OSError as exc:
            raise ParameterError(f"resume: cannot read {meta_path}: {exc.strerror or exc}") from None
        if data and len(data) != len(self._data):  # (a scene added or removed: zip compared the first ones only)
            raise ParameterError(f"resume: the run was trained on {len(data)} scene(s) and its config now gives "
                                 f"{len(self._data)} (files added or removed since the checkpoint was saved): resume "
                                 "with the data the run was trained on, or train anew with --overwrite")
        for then, now, sc in zip(data, self._data, self.scenes):
            changed = [k for k in ("image", "labels") if isinstance(then, dict) and then.get(k) is not None
                       and not _same_file_identity(then[k], now[k])]
            if changed:  # (the statistics and labels of this run are the new file's; the weights learnt the old)
                raise ParameterError(f"resume: {sc[changed[0]]} changed since the checkpoint was saved (its size or "
                                     "content): resume with the data the run was trained on, or train anew with "
                                     "--overwrite")
        parts: dict[str, Path] = {}
        for name, digest in files.items():
            found = [p for p in (d / name, d / _PREVIOUS.get(name, name)) if p.is_file() and _digest(p) == digest]
            if not found:
                raise ParameterError(f"resume: the checkpoint in {d} is inconsistent ({name} is not the one "
                                     f"{meta_path.name} was saved with, and no earlier copy is left): train "
                                     "anew with --overwrite")
            parts[name] = found[0]
        path = parts.get("last.pdparams", path)
        if not path.is_file():
            raise ParameterError(f"resume: no checkpoint at {path} (expected last.pdparams and last.json from a run)")
        if any(p.name != name for name, p in parts.items()):
            log.warning("resuming from the checkpoint of iteration %s: the run was stopped while saving the next one",
                        state.get("iteration"))
        load_weights(model, path)
        opt_path = parts.get("last.pdopt", d / "last.pdopt")
        if opt_path.is_file():
            opt.set_state_dict(_portable_opt_state(model, self._load_part(opt_path), to_structured=False))
        ema_path = parts.get("last.ema.pdparams", d / "last.ema.pdparams")
        scaler = getattr(self, "scaler", None)
        if scaler is not None and state.get("amp_scaler"):  # AMP's loss scale goes on where it was
            scaler.load_state_dict({**state["amp_scaler"], "scale": np.array([state["amp_scaler"]["scale"]], np.float32)})
        self._ckpt_files = files
        if "best.pdparams" in parts:
            self._best = (parts["best.pdparams"], files["best.pdparams"])
        if self.ema is not None:
            if not ema_path.is_file():
                raise ParameterError(f"resume: {path.parent} has no EMA weights (last.ema.pdparams); "
                                     "resume with the run's own config (ema as it was)")
            self.ema.set_state_dict(self._load_part(ema_path))
        if "last.rng" in parts:  # older checkpoints have none: the RNG starts again from the seed
            self._set_rng_state(self._load_part(parts["last.rng"]))
        self._ckpt_it = it
        return it, best_miou, best_it, history, best_validation

    def _load_part(self, path: Path) -> Any:
        """A checkpoint part read with ``paddle.load``, or a one-line :class:`ParameterError`."""
        try:
            return self.paddle.load(str(path))
        except Exception as exc:  # paddle raises ValueError, EOFError, pickle errors ...
            raise ParameterError(f"resume: the checkpoint in {path.parent} is damaged ({path.name} cannot be read: "
                                 f"{type(exc).__name__}): train anew with --overwrite") from None

    def _rng_state(self) -> dict[str, Any]:
        """Paddle's random state for a checkpoint (dropout's masks, e.g. DeepLabv3+'s ASPP): its CPU
        generator's, and on a GPU run its GPUs' (``fit`` seeds them anew at every start)."""
        paddle = self.paddle
        # (the CPU generator itself: Paddle 2.6's set_rng_state cannot take device="cpu")
        state: dict[str, Any] = {"cpu": [paddle.base.core.default_cpu_generator().get_state()]}
        if self.device == "gpu":
            state["gpu"] = paddle.get_cuda_rng_state()
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`_rng_state` (the GPUs' on a GPU run with as many GPUs; a checkpoint of another
        device or GPU count keeps the seeded state there)."""
        paddle = self.paddle
        if state.get("cpu"):
            paddle.base.core.default_cpu_generator().set_state(state["cpu"][0])
        gpu = state.get("gpu")
        if gpu and self.device == "gpu":
            if len(gpu) == paddle.device.cuda.device_count():
                paddle.set_cuda_rng_state(gpu)
            else:
                log.info("resume: the checkpoint's random state is of %d GPU(s), this machine has %d: dropout's "
                         "masks start again from the seed", len(gpu), paddle.device.cuda.device_count())


@contextmanager
def _quiet_batchnorm() -> Iterator[None]:
    """Paddle's BatchNorm warns "When training, we now always track global mean and variance" on
    training forward passes: not about the user's run (the CLI filters it for the process; a library
    caller got it on every train())."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")
        yield


def _scaler_state(scaler: Any) -> dict[str, Any] | None:
    """An AMP ``GradScaler``'s state as JSON values (its loss scale, counters and settings), or None
    without one (CPU, or AMP off; a disabled scaler's state is empty)."""
    state = scaler.state_dict() if scaler is not None else None
    if not state:
        return None
    return {k: float(np.asarray(v).ravel()[0]) if k == "scale" else (v.item() if hasattr(v, "item") else v)
            for k, v in state.items()}


class _Ema:
    """Exponential moving average of a model's weights and buffers (BatchNorm statistics too).

    ``decay`` is warmed up as ``min(decay, (1 + it) / (warmup + it))`` so early averages are not
    dominated by the random initialisation. :meth:`applied` swaps the averaged weights in for
    validation and saving, and puts the trained ones back afterwards.
    """

    def __init__(self, paddle: Any, model: Any, decay: float, warmup: float = 10.0) -> None:
        self.paddle = paddle
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: Any, it: int) -> None:
        """Fold the current weights in (``it``: iterations done)."""
        d = min(self.decay, (1.0 + it) / (self.warmup + it))
        with self.paddle.no_grad():
            for k, v in model.state_dict().items():
                s = self.shadow[k]
                if v.dtype in (self.paddle.float32, self.paddle.float64, self.paddle.float16, self.paddle.bfloat16):
                    self.paddle.assign(s * d + v.detach().astype(s.dtype) * (1.0 - d), output=s)
                else:
                    self.paddle.assign(v.detach(), output=s)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.shadow)

    def set_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, s in self.shadow.items():
            if k in state:
                v = state[k]
                v = v if isinstance(v, self.paddle.Tensor) else self.paddle.to_tensor(np.asarray(v))
                self.paddle.assign(v.astype(s.dtype), output=s)

    @contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Run the block with the averaged weights in ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.set_state_dict(self.shadow)
        try:
            yield
        finally:
            model.set_state_dict(backup)


class _PaddleDataset:
    """:class:`WindowDataset` as the map-style dataset ``paddle.io.DataLoader`` takes (``__len__`` and
    ``__getitem__``), at module level: DataLoader workers started by spawn or forkserver (macOS, Windows, and
    Linux from Python 3.14) unpickle it, and a class made inside a function could not be ("Can't pickle local
    object")."""

    def __init__(self, inner: WindowDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inner[i]


def _portable_opt_state(model: Any, state: Mapping[str, Any], to_structured: bool) -> dict[str, Any]:
    """Rename optimizer state keys between Paddle's per-process parameter names and stable ones.

    Accumulators are keyed ``<param.name>_<acc>`` where ``param.name`` (``conv2d_57.w_0``)
    depends on how many layers the process built before; checkpoints store
    ``@<structured name>@<acc>`` instead so another process can resume.
    """
    pairs = [(p.name, n) for n, p in model.named_parameters()]
    if to_structured:
        by_len = sorted(pairs, key=lambda t: -len(t[0]))
        out: dict[str, Any] = {}
        for k, v in state.items():
            for pname, sname in by_len:
                if k.startswith(pname + "_"):
                    k = f"@{sname}@{k[len(pname) + 1:]}"
                    break
            out[k] = v
        return out
    to_name = {sname: pname for pname, sname in pairs}
    out = {}
    for k, v in state.items():
        if k.startswith("@") and k.count("@") >= 2:
            sname, acc = k[1:].split("@", 1)
            if sname in to_name:
                k = f"{to_name[sname]}_{acc}"
        out[k] = v
    return out


def _grad_norm(paddle: Any, params: Sequence[Any]) -> float:
    """Global L2 norm of the gradients (before clipping)."""
    sq = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in params if p.grad is not None]
    if not sq:
        return 0.0
    return float(paddle.sqrt(paddle.add_n(sq)))


def _context_region(val: Region, train: Region, margin: int) -> Region:
    """``val``'s box grown by ``margin`` inside the union box of ``val`` and ``train``; mask = val."""
    r_lo, r_hi = min(val.row, train.row), max(val.row + val.height, train.row + train.height)
    c_lo, c_hi = min(val.col, train.col), max(val.col + val.width, train.col + train.width)
    r0, r1 = max(r_lo, val.row - margin), min(r_hi, val.row + val.height + margin)
    c0, c1 = max(c_lo, val.col - margin), min(c_hi, val.col + val.width + margin)
    mask = np.zeros((r1 - r0, c1 - c0), bool)
    mask[val.row - r0 : val.row - r0 + val.height, val.col - c0 : val.col - c0 + val.width] = val.mask
    return Region(r0, c0, r1 - r0, c1 - c0, mask)


def _overlap(a: Region, b: Region) -> int:
    r0, r1 = max(a.row, b.row), min(a.row + a.height, b.row + b.height)
    c0, c1 = max(a.col, b.col), min(a.col + a.width, b.col + b.width)
    if r1 <= r0 or c1 <= c0:
        return 0
    ma = a.mask[r0 - a.row : r1 - a.row, c0 - a.col : c1 - a.col]
    mb = b.mask[r0 - b.row : r1 - b.row, c0 - b.col : c1 - b.col]
    return int((ma & mb).sum())


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (however spelt); GDAL paths (``/vsizip/...``) by their text."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.normpath(str(a)) == os.path.normpath(str(b))


def _digest(path: Path) -> str:
    """SHA-256 of a file (a checkpoint part)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_run(out: Path) -> None:
    """Remove the files ``geoseg train`` writes in ``out`` (an older run's), nothing else."""
    from geoseg.atomic import TMP_PREFIX

    ckpt = out / "checkpoints"
    for folder, names in ((out, RUN_FILES), (ckpt, CHECKPOINT_FILES)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            ours = p.name in names or any(p.name.startswith(f"{TMP_PREFIX}{n}.") for n in names)  # or a killed write's
            if ours and (p.is_file() or p.is_symlink()):
                try:
                    p.unlink()
                except OSError as exc:
                    raise OutputError(f"cannot remove {p} of the run in {out}: {exc.strerror or exc}: "
                                      "remove it yourself or choose another --out") from None
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


def _checkpoint_folder(resume: str | Path) -> Path:
    """The folder of the checkpoint ``resume`` names (the folder, a run's folder or a file in it)."""
    p = Path(resume)
    if p.is_dir():
        return p if (p / "last.json").exists() or (p / "last.pdparams").exists() else p / "checkpoints"
    if not p.exists() and not p.suffix:  # a folder that is not there: named as given in the error
        return p
    return p.parent


def _set_aside(d: Path, name: str, files: Mapping[str, str]) -> None:
    """Before ``d/name`` is replaced: move it to its ``prev.*`` name when it is the part that the
    last whole checkpoint (``files``: its ``last.json``'s digests) lists, so that checkpoint stays
    whole until the new ``last.json`` is written (a part of a checkpoint that was never finished is
    simply replaced)."""
    p = d / name
    if files.get(name) and p.is_file() and _digest(p) == files[name]:
        os.replace(p, d / _PREVIOUS[name])


def _plain_region(spec: Any) -> Any:
    if spec is None or isinstance(spec, (str, int)):
        return spec
    return [int(v) for v in spec]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def train(cfg: TrainConfig, progress: Callable[[int, dict[str, float]], None] | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train a model as configured (see :class:`Trainer`).

    A folder ``cfg.out`` that already holds a run (its weights or checkpoint) is refused before
    anything is read, unless ``overwrite`` or the run resumes (``cfg.resume``): a finished model is
    not replaced by accident. The run holds a lock on ``cfg.out`` (:data:`LOCK_FILE`) from that
    check to its end: a second run into the same folder is refused at once. A resumed run goes on in
    its checkpoint's run folder with the settings it was started with (see :func:`resume_config`).
    """
    cfg = cfg.checked()
    if cfg.resume:
        cfg = resume_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder: choose another --out")
    above = file_above(out)
    if above is not None:
        raise OutputError(f"--out {out}: {above} is a file, not a folder: choose another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}: choose another --out") from None
    with _run_lock(out):
        try:
            return _train_locked(cfg, out, progress, overwrite)
        except BaseException:
            if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # failed before writing: leave no folder
                with contextlib.suppress(OSError):
                    (out / LOCK_FILE).unlink()
                    out.rmdir()
            raise


#: What a resumed run may change: how long it runs and where and how fast it computes, not what it learns.
RESUME_MAY_CHANGE = frozenset({"iterations", "resume", "out", "progress", "workers", "device", "log_every", "val_every",
                               "read_from", "amp"})


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked against the settings its checkpoint was saved with (``last.json``).

    Without an ``out`` of its own the run goes on in the checkpoint's run folder (the folder above
    ``checkpoints/``): it finished in ./runs/train, split from its first part. Settings that change what the run learns
    (window, lr, seed, classes, ...) are refused: the weights went on as before while the card
    recorded the new values (a 64-px model carded as 32 px, predict's default windows then 32).

    Raises:
        ParameterError: a setting that changes what the run learns differs.
    """
    d = _checkpoint_folder(cfg.resume)  # type: ignore[arg-type]
    try:
        saved = json.loads((d / "last.json").read_text(encoding="utf-8"))
        saved = (saved.get("config") if isinstance(saved, dict) else None) or {}
        if not isinstance(saved, dict):
            return cfg
    except (OSError, ValueError):
        return cfg  # no readable checkpoint: the run's own check says so
    run = d.parent if d.name == "checkpoints" else d
    if cfg.out == TrainConfig.out and Path(cfg.out).resolve() != run.resolve():  # no --out: the run's own folder
        log.info("resuming the run in %s", run)
        cfg = dataclasses.replace(cfg, out=str(run))
    now = json.loads(json.dumps(cfg.to_dict(), default=_json_default))
    changed = [k for k in sorted(set(saved) & set(now) - RESUME_MAY_CHANGE) if saved[k] != now[k]]
    if changed:
        what = ", ".join(f"{k} ({json.dumps(saved[k])} -> {json.dumps(now[k])})" for k in changed[:6])
        raise ParameterError(f"--resume: the run was started with other settings: {what}{' ...' if len(changed) > 6 else ''}: "
                             f"resume with its own config (only {', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'out', 'progress'}))} "
                             "may change), or train anew into another --out")
    return cfg


#: The lock files' descriptors this process holds (:func:`_run_lock`). A ``flock`` belongs to the open
#: file, which a forked child (a DataLoader worker) shares: one left behind by a run killed with
#: ``kill -9`` held the lock for good. Every forked child closes its copies at once (closing a copy
#: does not unlock the parent's).
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (:data:`_HELD_LOCKS`)."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _worker_init(parent: int, worker_id: int) -> None:
    """A DataLoader worker's start (Linux): it is killed when the run dies (``PR_SET_PDEATHSIG``), so a
    run ended by ``kill -9`` (the OOM killer, a preemption) leaves no workers behind, blocked on their
    queue and holding memory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    if os.getppid() != parent:
        # not forked by the run itself: started by a fork server (forkserver, Python 3.14's default), whose
        # death says nothing of the run's; the workers' own watchdog ends them (or the run is gone already)
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the workers' own watchdog ends them
        return
    if os.getppid() != parent:  # the run died between the fork and the signal's setting
        os.kill(os.getpid(), signal.SIGKILL)


def _dead_holder(holder: str) -> int | None:
    """The pid of the run that ``holder`` (a lock file's line) names when that run is dead (on this host)."""
    m = re.match(r"pid (\d+) on (\S+) ", holder + " ")
    if m is None or m.group(2) != socket.gethostname():
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return int(m.group(1))
    except OSError:  # alive, another user's
        return None
    return None


@contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/``:data:`LOCK_FILE` (kept, emptied at the end), or raise
    :class:`OutputError` naming the run that holds it. The kernel drops the lock when its process
    dies (even by ``kill -9``) and forked children close their copies of it (:data:`_HELD_LOCKS`),
    so a dead run's lock is never in the way; one held by other leftovers of a dead run (processes it
    forked before this version) is named as such."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    path = out / LOCK_FILE
    for _ in range(3):  # a lock file removed by a run that failed before writing is made anew
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)  # (less the umask)
        except OSError as exc:
            refuse_link(path, "the lock file")
            raise OutputError(f"cannot create the lock file {path}: {exc.strerror or exc}: choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "starting"
            os.close(fd)
            dead = _dead_holder(holder)
            if dead is not None:
                raise OutputError(f"{out} is locked by leftover processes of the geoseg train run {dead}, which is dead "
                                  f"({holder}): end them (fuser -v {path} lists them) and run again, or choose "
                                  "another --out") from None
            raise OutputError(f"{out} is in use by another geoseg train run ({holder}): wait for it to end or choose "
                              "another --out") from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    else:
        raise OutputError(f"cannot lock {path}: it keeps being removed: choose another --out")
    _HELD_LOCKS.add(fd)
    mode_as_created(path)  # (one made 0644 by geoseg before session 29)
    owner = os.getpid()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        try:
            yield
        finally:
            if os.getpid() == owner:
                os.ftruncate(fd, 0)
    finally:
        # (a forked child unwinding through here closed its copy at its fork: the number may be another
        # file's now, which it truncated and closed)
        if os.getpid() == owner:
            _HELD_LOCKS.discard(fd)
            os.close(fd)


def _train_locked(cfg: TrainConfig, out: Path, progress: Callable[[int, dict[str, float]], None] | None,
                  overwrite: bool) -> TrainResult:
    """:func:`train` once it holds ``out``'s lock."""
    from geoseg.atomic import remove_leftovers

    for folder in (out, out / "checkpoints"):  # a killed run's half-written files (a checkpoint's each time)
        if folder.is_dir():
            remove_leftovers(folder)
    weights, last = out / "weights.pdparams", out / "checkpoints" / "last.json"
    best = out / "checkpoints" / "best.pdparams"
    held = [p.relative_to(out).as_posix() for p in (weights, last, best) if p.exists()]
    # resuming this folder's own checkpoint (its own run) may write over that run; another run's may not
    own = bool(cfg.resume) and _same_file(_checkpoint_folder(cfg.resume), out / "checkpoints")
    if held and not overwrite and cfg.resume and not own:
        raise ParameterError(f"{out} already holds a run ({', '.join(held)}) and --resume {cfg.resume} is another run's "
                             "checkpoint: choose another --out, or pass --overwrite to replace that run")
    if held and not overwrite and not cfg.resume:
        # A run that failed or was stopped has no card next to its weights, or no train_log.json
        # (written last); --resume is offered only where there is a checkpoint to resume.
        card = weights.with_suffix(".yaml")
        if weights.exists() and not card.exists():
            held[0] = f"{weights.name} without {card.name}"
        done = weights.exists() and card.exists() and (out / "train_log.json").exists()
        resume = f", continue it with --resume {last.parent}" if last.exists() else ""
        raise ParameterError(f"{out} already holds {'a trained' if done else 'an unfinished'} run ({', '.join(held)}): "
                             f"choose another --out{resume}, or pass --overwrite to replace it")
    return Trainer(cfg, progress).fit(replace=overwrite and not own)
