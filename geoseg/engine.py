"""Scene segmentation: tiles → lazy Dask reads → batched model → blending → COG mask.

The pipeline is split so each part can be tested alone:

* :func:`resolve_model` turns ``--model/--weights/--card`` into a :class:`ModelSource`
  (card + weights, or an exported inference folder);
* :func:`build_predictor` makes a ``Predictor``: NCHW float32 (normalised) → NCHW class
  probabilities, through Paddle Inference with oneDNN on CPU (exported on the fly and
  cached) or the dygraph model with FP16 autocast on GPU;
* :func:`segment_scene` runs any predictor over a scene block by block (one row of windows
  at a time) while a background thread keeps the next batches read by Dask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.aoi import load_aoi
from geoseg.atomic import check_output, file_above, remove_leftovers, temp_name
from geoseg.blending import BlendMode, StripMerger
from geoseg.card import ModelCard
from geoseg.config import checked_arguments, is_whole_number, options_of, plain
from geoseg.errors import (
    InputRangeWarning,
    ModelError,
    NoCRSWarning,
    OutputError,
    ParameterError,
    PerformanceWarning,
    ResolutionWarning,
    RunStoppedError,
    SceneError,
    WindowSizeWarning,
    require_paddle,
    warn,
)
from geoseg.io import (
    MASK_NODATA,
    COGWriter,
    GridSpec,
    SceneMeta,
    check_georeferenced,
    class_colormap,
    classes_tag,
    close_handles,
    GeoAreas,
    add_area_counts,
    area_units,
    ProjectedAreas,
    georeferencing,
    is_virtual,
    open_scene,
    pixel_areas,
    polygons_skipped_reason,
    read_scene_window,
    scene_path,
    tiff_named,
    windows_with_data,
    write_aux_xml,
    write_qml,
    write_ramp_qml,
)
from geoseg.priors import PriorEstimate, em_priors, reweight_probs
from geoseg.profiles import get_profile
from geoseg.tiling import Tile, TileGrid, batched, core_bounds, fit_tile, make_grid, spread_tiles

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
Device = Literal["auto", "cpu", "gpu"]
Precision = Literal["fp32", "fp16"]
Confidence = Literal["none", "uint8", "float32"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


# ---- model resolution --------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a card plus dygraph weights, or an exported folder."""

    card: ModelCard
    weights: Path | None = None
    export_dir: Path | None = None
    layer: Any = None  # an in-memory paddle.nn.Layer (tests, training)
    #: What the network's first output holds: class logits (NCHW, softmax applied here),
    #: probabilities (NCHW, used as they are) or labels (argmax already applied: NHW or
    #: N1HW class indexes, turned into one-hot probabilities).
    output: Literal["logits", "probs", "labels"] = "logits"

    @property
    def label(self) -> str:
        """Short description for log lines."""
        if self.export_dir is not None:
            return f"{self.card.name} (exported {self.export_dir})"
        return f"{self.card.name} ({self.weights.name if self.weights else 'in-memory'})"


def shipped_models() -> dict[str, Path]:
    """Model names with weights shipped inside the package → their card path."""
    out = {}
    if WEIGHTS_DIR.is_dir():
        for card in sorted(WEIGHTS_DIR.glob("*.yaml")):
            if card.with_suffix(".pdparams").exists():
                out[card.stem] = card
    return out


def resolve_model(model: str | Path | None, weights: str | Path | None = None, card: str | Path | None = None,
                  classes: Any = None, exported: bool = True) -> ModelSource:
    """Turn the CLI's ``--model``, ``--weights``, ``--card`` and ``--classes`` into a :class:`ModelSource`.

    ``model`` is a registry name (``deeplabv3p``, ``unet``) or an exported model folder
    (geoseg's or PaddleSeg's, see :func:`geoseg.exported.load_exported`; ``classes`` names
    its classes when its ``deploy.yaml`` has none). Without ``weights`` the weights shipped
    with geoseg for that name are used.
    """
    # (os.path.isdir: False where the name cannot be looked up, as `--model unet` in a folder this user may not
    # read: Path.is_dir raised PermissionError, "unexpected error")
    from geoseg.models import MODEL_NAMES

    # a model's name (a str without a folder part) is the model, also where a folder of that name lies in the working
    # folder: `--model deeplabv3p` ran whatever export was there (a folder a colleague sent, or planted), without a word
    # (refused, not chosen: whichever it ran, one of the two meanings would be a surprise; where the folder could not
    # be meant, not: with --weights, or for a caller that takes no export folder, ``exported=False``: export)
    named = isinstance(model, str) and model in MODEL_NAMES
    if named and exported and weights is None and os.path.isdir(model):  # type: ignore[arg-type]
        raise ParameterError(f"--model {model} names geoseg's {model}, and a folder {model}/ lies here too: pass "
                             f"./{model} to run that folder, or run from another folder for geoseg's {model}")
    if model is not None and not named and exported and os.path.isdir(model):
        from geoseg.exported import load_exported

        folder = Path(model)
        if (folder / "weights.pdparams").is_file() and not (folder / "deploy.yaml").is_file():
            raise ModelError(f"--model {folder} is a training run's folder, not an exported model: pass --weights "
                             f"{folder / 'weights.pdparams'} (or geoseg export it)")
        if weights is not None:
            raise ParameterError(f"--weights {weights}: --model {folder} is an exported model, which holds its own "
                                 "weights: drop --weights, or drop --model to run these weights")
        return load_exported(folder, card=card, classes=classes)
    if classes is not None:
        raise ParameterError("--classes names the classes of an exported model folder (--model DIR) whose deploy.yaml "
                             "has none; this model's card names them: drop --classes")
    name = str(model) if model is not None else None
    if name is not None and name not in MODEL_NAMES:
        if not exported and os.path.isfile(os.path.join(name, "weights.pdparams")):  # (export --model RUN: it said to
            # give an exported folder, which export refuses)
            raise ModelError(f"--model {name} is a training run's folder: pass --weights {name} (--model names an "
                             f"architecture: {', '.join(MODEL_NAMES)})")
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}"
                         + (" or give an exported model folder" if exported else ""))
    if weights is None:
        name = name or "deeplabv3p"
        shipped = shipped_models()
        if name not in shipped:
            raise ModelError(
                f"no trained weights ship with geoseg for {name!r} yet: pass --weights FILE.pdparams "
                "(with its model card FILE.yaml beside it), or train one with 'geoseg train'"
            )
        card_path = Path(card) if card else shipped[name]
        weights_path = shipped[name].with_suffix(".pdparams")
    else:
        weights_path = Path(weights)
        if weights_path.is_dir() and (weights_path / "weights.pdparams").is_file():
            weights_path = weights_path / "weights.pdparams"  # a training run's folder (as ensemble takes them)
        elif weights_path.is_dir():
            raise ModelError(f"--weights {weights_path} is a folder without weights.pdparams: give the .pdparams file "
                             "(a finished geoseg train run's folder holds weights.pdparams)")
        if not weights_path.is_file():
            raise ModelError(f"weights file {weights_path} does not exist: check --weights")
    if card:
        card_path = Path(card)
        if not card_path.is_file():
            what = ("does not exist: check the path" if not card_path.exists() else
                    "is a folder: give the card's YAML file" if card_path.is_dir() else
                    "is not a file: give the card's YAML file")  # (/dev/null "did not exist")
            raise ModelError(f"--card {card_path} {what}")
    if weights is not None:
        card_path = Path(card) if card else weights_path.with_suffix(".yaml")
        if not card_path.is_file():
            raise ModelError(f"no model card for {weights_path.name}: put {card_path.name} beside it or pass --card")
    mc = ModelCard.load(card_path)
    if name is not None and mc.architecture != name:
        raise ModelError(f"--model {name} does not match the card's architecture {mc.architecture!r}: drop --model or fix it")
    return ModelSource(card=mc, weights=weights_path)


# ---- predictors ----------------------------------------------------------------------------
def resolve_device(device: Device) -> Literal["cpu", "gpu"]:
    """Pick ``cpu`` or ``gpu``; ``auto`` means GPU when paddle has CUDA and sees a device."""
    has_gpu = gpu_count() > 0
    if device == "auto":
        return "gpu" if has_gpu else "cpu"
    if device == "gpu" and not has_gpu:
        raise ParameterError(
            "--device gpu: this PaddlePaddle build has no CUDA or sees no GPU: use --device cpu or install a GPU build"
        )
    return device  # type: ignore[return-value]


def gpu_count() -> int:
    """GPUs Paddle's CUDA sees here (0 with a CPU build)."""
    paddle: Any = require_paddle()
    return int(paddle.device.cuda.device_count()) if paddle.is_compiled_with_cuda() else 0


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Numerically stable softmax over ``axis`` (float32)."""
    z = logits.astype(np.float32, copy=False)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def _labels_to_probs(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot NCHW probabilities from NHW / N1HW class indexes (argmax-exported models)."""
    if labels.ndim == 4 and labels.shape[1] != 1 or (
            labels.size and (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))
                             or labels.min() < 0)):
        # an older PaddleSeg deploy.yaml has no output_op: a graph exported with --without_argmax or
        # --with_softmax returns C channels of scores, read as labels (the whole map the first class)
        raise ModelError(f"the model returned {labels.shape[1] if labels.ndim == 4 else 1}-channel scores, not class "
                         "labels: set Deploy.output_op in its deploy.yaml to none (logits) or softmax")
    if labels.ndim == 4:
        labels = labels[:, 0]
    if labels.size and int(labels.max()) >= num_classes:
        raise ModelError(f"the model returned class index {int(labels.max())} but its class list (the card's, or "
                         f"--classes') has {num_classes} classes: give one class per output class")
    return (np.arange(num_classes)[None, :, None, None] == labels[:, None].astype(np.int64)).astype(np.float32)


_OUTPUT_TO_PROBS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "logits": lambda y, n: softmax(y, axis=1),
    "probs": lambda y, n: y.astype(np.float32, copy=False),
    "labels": _labels_to_probs,
}


def cache_dir() -> Path:
    """Folder for exported-model caches: ``GEOSEG_CACHE_DIR`` (``~`` expanded), else ``$XDG_CACHE_HOME/geoseg``
    (an absolute one), else ``~/.cache/geoseg``.

    Raises:
        ParameterError: ``GEOSEG_CACHE_DIR`` is blank or relative (a folder made wherever the job runs).
        FileNotFoundError: there is no home folder (HOME unset and no passwd entry: a container's
            ``--user 54321``); the caller exports into a temporary folder for the run.
    """
    given = os.environ.get("GEOSEG_CACHE_DIR")
    if given is not None and given.strip():
        path = Path(os.path.expanduser(given.strip()))
        if not path.is_absolute():
            raise ParameterError(f"GEOSEG_CACHE_DIR={given!r} is not an absolute path (a cache would be made wherever "
                                 "the command runs): give an absolute folder, or unset it")
        return path
    if given:
        raise ParameterError(f"GEOSEG_CACHE_DIR={given!r} is blank: give an absolute folder, or unset it")
    xdg = (os.environ.get("XDG_CACHE_HOME") or "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "geoseg"
    try:
        return Path.home() / ".cache" / "geoseg"
    except (RuntimeError, KeyError):  # (Path.home without HOME and without a passwd entry)
        raise FileNotFoundError("no home folder (HOME is unset and this user has no passwd entry)") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_digest(source: ModelSource) -> str:
    """Short hash of the model's weights: the weights file, an export's params, or in-memory values.

    With the card's digest it identifies a model (export cache, batch manifest).
    """
    if source.weights is not None:
        return _file_digest(source.weights)
    if source.export_dir is not None:
        from geoseg.models.inference import find_model_files

        return _file_digest(find_model_files(source.export_dir)[1])
    h = hashlib.sha256()
    for k, v in sorted(build_layer(source).state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()[:16]


def build_layer(source: ModelSource) -> Any:
    """Build the dygraph model of ``source`` (eval mode, weights loaded)."""
    if source.layer is not None:
        source.layer.eval()
        return source.layer
    from geoseg.models import build_model
    from geoseg.models.checkpoints import load_weights

    layer = build_model(source.card.architecture, **source.card.model_kwargs())
    if source.weights is not None:
        load_weights(layer, source.weights)
    layer.eval()
    return layer


def exported_for_inference(source: ModelSource) -> Path:
    """Export ``source`` for Paddle Inference once and cache it; return the folder."""
    if source.export_dir is not None:
        return source.export_dir
    paddle: Any = require_paddle()
    digest = weights_digest(source)
    # the cached graph ends in a softmax (oneDNN computes it faster than numpy): it returns probabilities
    key = hashlib.sha256(f"{digest}|{source.card.digest()}|{paddle.__version__}|softmax".encode()).hexdigest()[:20]
    try:
        target: Path | None = cache_dir() / "exports" / key
    except FileNotFoundError as exc:  # no home folder: this run's temporary cache (see _export_cached)
        target, homeless = None, exc
    if target is None:
        from geoseg.models.inference import EXPORT_LOCK

        with EXPORT_LOCK:
            return _export_cached(source, None, key, homeless)
    if (target / "DONE").exists():  # (before building the model: a cached call built and dropped one, ~1 s)
        with contextlib.suppress(OSError):  # (its last use: see _tidy_exports)
            os.utime(target / "DONE")
        return target
    from geoseg.models.inference import EXPORT_LOCK

    with EXPORT_LOCK:  # another thread may be exporting this very model: it waits, then takes that export
        if (target / "DONE").exists():
            return target
        return _export_cached(source, target, key)


def _export_cached(source: ModelSource, target: Path | None, key: str, homeless: OSError | None = None) -> Path:
    """Export into the cache's ``target`` or, where it cannot be written (or there is none: ``homeless``
    says why), into this run's temporary cache, removed when the process ends."""
    if target is None:
        fallback = _fallback_folder() / key  # (made only where needed: a full temp folder fails nothing else)
        if (fallback / "DONE").exists():
            return fallback
        warn(f"no export cache: {homeless}: exporting into {fallback.parent} for this run; set GEOSEG_CACHE_DIR to "
             "a writable folder to keep it", PerformanceWarning)
        return _export_fallback(fallback, build_layer(source), source)
    layer = build_layer(source)
    try:
        return _export_into(target, layer, source)
    except OSError as exc:  # a read-only home (a container, a cron user): this run's own temporary cache
        if getattr(exc, "file_size_limit", None) is not None:  # (ulimit -f: as small anywhere else)
            raise
        fallback = _fallback_folder() / key
        warn(f"cannot write the export cache {target.parent} ({exc.strerror or exc}): exporting into {fallback.parent} "
             "for this run; set GEOSEG_CACHE_DIR to a writable folder to keep it", PerformanceWarning)
        if (fallback / "DONE").exists():
            return fallback
        return _export_fallback(fallback, layer, source)


#: This process's temporary export cache, per temp folder (see :func:`_fallback_folder`).
_FALLBACKS: dict[str, Path] = {}


def _fallback_folder() -> Path:
    """This process's temporary export cache: ``geoseg-exports-<pid>-<random>`` in the temp folder, made private
    (0700) by ``mkdtemp`` the first time and removed when the process ends. (A fixed ``geoseg-exports-<pid>``
    was taken as it was found: another local user could plant a model there for a run to load.)"""
    import atexit
    import shutil

    tmp = tempfile.gettempdir()
    folder = _FALLBACKS.get(tmp)
    if folder is None or not folder.is_dir():
        _remove_dead_fallbacks(Path(tmp))
        folder = Path(tempfile.mkdtemp(prefix=f"geoseg-exports-{os.getpid()}-", dir=tmp))
        _FALLBACKS[tmp] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _export_fallback(fallback: Path, layer: Any, source: ModelSource) -> Path:
    """Export into this run's temporary cache ``fallback`` (its folder removed when the process ends)."""
    return _export_into(fallback, layer, source)


def _discard_export(folder: Path) -> None:
    """Take a damaged cached export out of the cache: renamed aside first (a process loading it at this moment
    keeps its files), then removed."""
    import shutil

    aside = temp_name(folder)
    try:
        os.replace(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_dead_fallbacks(tmp: Path) -> None:
    """Remove the temporary export caches (``geoseg-exports-<pid>``) of processes that are gone: a
    killed run's was never removed (24 MB a night for a cron job with a read-only home)."""
    import shutil

    from geoseg.atomic import is_alive

    with contextlib.suppress(OSError):
        for d in tmp.glob("geoseg-exports-*"):
            pid = d.name.split("-")[2]  # (geoseg-exports-<pid>-<random>; before session 29 no random part)
            if pid.isdigit() and int(pid) != os.getpid() and not is_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


#: Days after its last use that a cached export is removed (when another is made): each model trained and
#: predicted with left 12-24 MB in the cache for good.
EXPORT_CACHE_DAYS = 30


def _tidy_exports(folder: Path) -> None:
    """Remove from the export cache ``folder``, in one pass: unfinished exports (hidden
    ``.geoseg-<key>.<host>-<pid>-<hex>.tmp`` folders) of processes that are gone
    (:func:`geoseg.atomic.is_leftover`: a killed first run left one for good), and finished ones not
    used for :data:`EXPORT_CACHE_DAYS` (their ``DONE`` file's time, which each use renews)."""
    import shutil

    from geoseg.atomic import TMP_PREFIX, is_leftover

    cutoff = time.time() - EXPORT_CACHE_DAYS * 86400
    with contextlib.suppress(OSError):
        for d in folder.iterdir():
            with contextlib.suppress(OSError):
                if d.name.startswith(TMP_PREFIX):
                    if d.name.endswith(".tmp") and d.is_dir() and is_leftover(d):
                        shutil.rmtree(d, ignore_errors=True)
                elif not d.name.startswith(".") and (d / "DONE").stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
                    log.debug("removed the export %s, unused for %d days", d, EXPORT_CACHE_DAYS)


def _export_into(target: Path, layer: Any, source: ModelSource) -> Path:
    """Export ``layer`` (ending in a softmax) into ``target`` atomically (see :func:`exported_for_inference`)."""
    from geoseg.exported import with_output_op
    from geoseg.models.inference import export_model

    target.parent.mkdir(parents=True, exist_ok=True)
    _tidy_exports(target.parent)
    tmp = temp_name(target)  # names this process: a killed run's is removed by the next export here
    log.debug("exporting %s for Paddle Inference into %s", source.label, target)
    try:
        export_model(with_output_op(layer, "softmax"), tmp / "model", source.card.in_channels)
        # the files' sizes: a file cut short later (or by an older geoseg) is told by them (a .pdmodel cannot be
        # parsed here), and the export made again (see build_predictor)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "DONE").write_text(json.dumps({"sizes": sizes}) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: use its export
            if not (target / "DONE").exists():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_predictor(
    source: ModelSource,
    device: Device = "auto",
    precision: Precision = "fp32",
    runtime: Literal["auto", "inference", "dygraph"] = "auto",
    threads: int | None = None,
) -> tuple[Predictor, str]:
    """Make the batched predictor for ``source``: NCHW normalised → NCHW probabilities.

    ``threads`` caps the CPU math threads of Paddle Inference (default: all cores; a Dask
    worker sharing a machine with others should use fewer). Returns the predictor and a
    description (device, runtime, precision) for logs.
    """
    check_address_space()  # (before paddle's predictor: under a small ulimit -v it hung for good)
    kind, _, index = str(device).partition(":")  # "gpu:1": batch's workers spread over the GPUs
    dev = resolve_device(kind)  # type: ignore[arg-type]
    if precision == "fp16" and dev == "cpu":
        warn("--precision fp16 needs a GPU: running in fp32 on CPU", PerformanceWarning)
        precision = "fp32"
    on = f"gpu:{index}" if dev == "gpu" and index else dev
    if runtime == "auto":
        runtime = "inference" if (dev == "cpu" or source.export_dir is not None) else "dygraph"
    if runtime == "dygraph" and source.export_dir is not None and source.layer is None:
        # (it built the card's network untrained: a map of random weights, without a word)
        raise ParameterError(f"{source.label}: an exported model runs through Paddle Inference only: "
                             "use runtime 'inference' (or 'auto'), or give the weights for the dygraph runtime")
    output = source.output
    if runtime == "inference":
        from geoseg.models.inference import InferencePredictor, find_model_files

        if source.export_dir is None:
            output = "probs"  # our own cached export ends in a softmax
        folder = exported_for_inference(source)
        model_file, params_file = find_model_files(folder)
        try:
            net = InferencePredictor(model_file, params_file, device=on, precision=precision, threads=threads)
        except ModelError:
            from geoseg.models.inference import damaged_export

            if source.export_dir is not None or not damaged_export(folder):
                raise  # (a whole export that fails otherwise, e.g. on its device, is not made again)
            # a cached export that cannot be loaded (cut short by a file-size limit before geoseg checked, or
            # damaged on disk since) broke every later run: it is made again, once
            log.warning("warning: the cached export %s of %s cannot be loaded: exporting the model again", folder,
                        source.label)
            _discard_export(folder)
            model_file, params_file = find_model_files(exported_for_inference(source))
            net = InferencePredictor(model_file, params_file, device=on, precision=precision, threads=threads)
    else:
        from geoseg.models.inference import DygraphPredictor

        net = DygraphPredictor(build_layer(source), device=on, precision=precision)

    to_probs = _OUTPUT_TO_PROBS[output]
    num_classes = source.card.num_classes
    # One call at a time: a Paddle predictor holds one input and one output buffer, and a ready predictor
    # is shared (a Dask worker's threads, an application's): two threads' calls ran on each other's
    # inputs (wrong masks without an error, or a batch of the other's size). The reading, blending and
    # writing around the calls still overlap.
    lock = threading.Lock()

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with lock:
            y = net(x)
        return to_probs(y, num_classes)

    desc = f"{on}/{runtime}/{getattr(net, 'precision', precision)}"  # (fp32 where fp16 cannot run)
    predict.description = desc  # type: ignore[attr-defined]  # (segment_scene reports it for a ready predictor)
    return predict, desc


def dihedral_average(predict: Predictor) -> Predictor:
    """Test-time augmentation: the mean of ``predict`` over the 8 flips and 90° rotations of each
    window, each output turned back before averaging (flips only for non-square windows).

    Eight model calls per batch, so 8x the model time; on the NC validation folds it added
    0.007-0.008 mIoU and 0.006-0.019 OA to the session-2 models' settings.
    """

    def predict_tta(x: np.ndarray) -> np.ndarray:
        turns = (0, 1, 2, 3) if x.shape[-1] == x.shape[-2] else (0, 2)
        total: np.ndarray | None = None
        for k in turns:
            for flip in (False, True):
                view = np.rot90(x, k, axes=(-2, -1))
                view = view[..., ::-1] if flip else view
                p = predict(np.ascontiguousarray(view))
                p = p[..., ::-1] if flip else p
                p = np.rot90(p, -k, axes=(-2, -1)).astype(np.float32)
                total = p if total is None else total + p
        assert total is not None
        return total / (2 * len(turns))

    return predict_tta


# ---- scene segmentation ----------------------------------------------------------------------
@dataclass(frozen=True)
class PredictOptions:
    """Options of :func:`segment_scene` (None = take the model card's value)."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int | None = None
    device: Device = "auto"
    precision: Precision = "fp32"
    bands: tuple[int, ...] | None = None
    blend: BlendMode = BlendMode.GAUSSIAN
    confidence: Confidence = "none"
    #: Also write every class's probability (``<stem>_probabilities.tif``, one band per class).
    probabilities: Confidence = "none"
    creation_options: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    #: True: a tqdm bar on stderr (a terminal); ``"log"``: a log line every :data:`PROGRESS_LOG_S`
    #: seconds instead (a cron job's or a batch queue's log file, where a bar writes nothing useful).
    progress: bool | Literal["log"] = False
    prefetch: int = 2
    read_workers: int = 2
    runtime: Literal["auto", "inference", "dygraph"] = "auto"
    threads: int | None = None
    #: Also vectorise the mask: "gpkg", "geojson", "fgb" or "none".
    vector: Literal["gpkg", "geojson", "fgb", "none"] = "none"
    #: Minimum mapping unit of the polygons in map units² (m² on a geographic CRS or one far from ground areas,
    #: see :func:`geoseg.io.distorts_areas`; None: no sieve).
    min_area: float | None = None
    #: Polygon simplification tolerance in map units (m where min_area is m²; None: one pixel; 0: pixel edges).
    simplify: float | None = None
    #: Write the polygons of these classes only (ids or names of the card's classes; None: all).
    vector_classes: tuple[int | str, ...] | None = None
    #: Test-time augmentation: average the model over the 8 flips/rotations of each window.
    tta: bool = False
    #: Adapt the posteriors to the scene's class priors (EM; see geoseg.priors). None: the card's
    #: ``adapt_prior``. Costs a first pass over (a sample of) the scene's windows.
    adapt_prior: bool | None = None
    #: Prior adaptation: hold each class's ratio scene / training prior within [1/r, r] (None: unbounded;
    #: 2 was chosen on the NC validation folds, where unbounded EM ran away on a rare class).
    prior_max_ratio: float | None = 2.0
    #: Prior adaptation: most windows the sample pass runs (spread evenly over the scene).
    prior_windows: int = 64
    #: Area of interest: a vector file of polygons (any CRS) or ``minx,miny,maxx,maxy`` in the
    #: scene's CRS. The outputs cover its bounding box on the scene's grid; outside it is nodata.
    aoi: str | None = None

    def __post_init__(self) -> None:
        from geoseg.config import check_fields, materialise_iterators

        materialise_iterators(self)
        self._check_values()  # (first: it names the choices and the band numbers)
        check_fields(self, "PredictOptions")  # (options_of checked a mapping's values, an instance's none)
        for value, option in ((self.vector_classes, "--vector-classes chooses which"), (self.min_area, "--min-area "
                              "sieves the"), (self.simplify, "--simplify simplifies the")):
            if value is not None and self.vector == "none":  # (they were ignored without a word)
                raise ParameterError(f"{option} polygons to write, and --vector none writes none: drop one of the two")


    def _check_values(self) -> None:
        """One-line :class:`ParameterError` for a value no run can take (API users: the CLI refuses its
        options itself). ``runtime="onnx"`` ran dygraph and reported "cpu/onnx"; ``tile_size=0`` meant
        the default; ``blend="linear"`` was a bare ValueError, ``bands="1,2"`` a TypeError."""
        choices = {"device": get_args(Device), "precision": get_args(Precision), "confidence": get_args(Confidence),
                   "probabilities": get_args(Confidence), "runtime": ("auto", "inference", "dygraph"),
                   "vector": ("gpkg", "geojson", "fgb", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ParameterError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(map(repr, allowed))}")
        try:
            object.__setattr__(self, "blend", BlendMode(self.blend))
        except ValueError:
            raise ParameterError(f"blend {self.blend!r}: choose one of "
                                 f"{', '.join(repr(m.value) for m in BlendMode)}") from None
        for name, low in (("tile_size", 1), ("batch_size", 1), ("threads", 1)):  # (sizes and overlap: scene_grid)
            value = getattr(self, name)
            if value is not None and (not is_whole_number(value) or value < low):
                raise ParameterError(f"{name} {value!r}: give a whole number >= {low}, or None for the default")
        for name, low in (("prefetch", 1), ("read_workers", 1), ("prior_windows", 1)):
            value = getattr(self, name)
            if not is_whole_number(value) or value < low:
                raise ParameterError(f"{name} {value!r}: give a whole number >= {low}")
        if self.prior_max_ratio is not None and not (isinstance(self.prior_max_ratio, (int, float))
                                                     and not isinstance(self.prior_max_ratio, bool)
                                                     and self.prior_max_ratio >= 1):
            raise ParameterError(f"prior_max_ratio {self.prior_max_ratio!r}: give a number >= 1, or None (unbounded)")
        if self.bands is not None:
            if isinstance(self.bands, (str, bytes)) or not all(
                    is_whole_number(b) and b >= 1 for b in self.bands):
                raise ParameterError(f"bands {self.bands!r}: give band numbers from 1, e.g. (4, 3, 2)")
            object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))  # (numpy's too)
        if self.progress not in (True, False, "log"):
            raise ParameterError(f"progress {self.progress!r}: choose True, False or 'log'")


@dataclass(frozen=True)
class PredictResult:
    """What :func:`segment_scene` wrote and how fast."""

    mask: Path
    confidence: Path | None
    style: Path
    aux: Path
    windows: int
    windows_skipped: int
    seconds: float
    model_seconds: float
    megapixels: float
    device: str
    extra_outputs: tuple[Path, ...] = ()
    #: The scene's class priors estimated by prior adaptation (class name → prior), when it ran.
    scene_prior: dict[str, float] | None = None
    #: The class probabilities raster, when asked for.
    probabilities: Path | None = None
    #: Pixels of each class in the mask (class name → count, every class of the card).
    class_pixels: dict[str, int] = field(default_factory=dict)
    #: Ground area of each class (class name → area) in :attr:`area_units`: the CRS's units² for a projected
    #: CRS (m² for most), geodesic m² for a geographic one (a degree pixel's area depends on its latitude:
    #: see :class:`geoseg.io.GeoAreas`) or a projection far from ground areas (Web Mercator: see
    #: :func:`geoseg.io.distorts_areas`); None when the scene has no CRS.
    class_area: dict[str, float] | None = None
    #: Units of :attr:`class_area` (``m2``, ``ftUS2``, ...); None when the scene has no CRS.
    area_units: str | None = None
    #: QGIS styles of the confidence and probabilities rasters (``<stem>_confidence.qml``, ...), when written.
    confidence_style: Path | None = None
    probabilities_style: Path | None = None

    @property
    def outputs(self) -> list[Path]:
        """Every file this run wrote: mask, its .aux.xml and .qml, confidence and probabilities (each
        with its .qml), polygons."""
        out = [self.mask, self.aux, self.style]
        for raster, style in ((self.confidence, self.confidence_style), (self.probabilities, self.probabilities_style)):
            if raster is not None:
                out.append(raster)
                if Path(f"{raster}.aux.xml").exists():  # the CRS, where GeoTIFF keys cannot hold it
                    out.append(Path(f"{raster}.aux.xml"))
            if style is not None:
                out.append(style)
        return out + list(self.extra_outputs)

    @property
    def windows_per_s(self) -> float:
        """Windows per second, end to end."""
        return self.windows / self.seconds if self.seconds > 0 else 0.0

    @property
    def megapixels_per_s(self) -> float:
        """Scene megapixels per second, end to end."""
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, one key per field: paths as strings, numbers as Python's."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _names_folder(out: str | Path) -> bool:
    """Whether ``--out`` was given as a folder by its form: a name ending in '/' (a Path has lost it)."""
    return isinstance(out, str) and out.endswith(("/", os.sep))


def _out_is_folder(out: str | Path) -> bool:
    """Whether ``--out`` is a folder for the outputs: one that exists, a name ending in '/', or any name but a
    .tif's (the mask's own name)."""
    return _names_folder(out) or Path(out).is_dir() or Path(out).suffix.lower() not in (".tif", ".tiff")


def output_paths(input_path: Path, out: str | Path | None) -> tuple[Path, Path]:
    """``(mask, confidence)`` paths: ``<out>/<stem>_landcover.tif`` or the given .tif name."""
    stem = input_path.stem
    if input_path.suffix.lower() == ".gz" and tiff_named(input_path):
        stem = Path(stem).stem  # (/vsigzip/a.tif.gz: a_landcover.tif, not a.tif_landcover.tif)
    if out is None:
        # beside the input; an input inside an archive or object storage: the current folder
        folder = Path.cwd() if is_virtual(input_path) else input_path.parent
        mask = folder / f"{stem}_landcover.tif"
    else:
        # a folder that exists, or a name ending in '/', is a folder whatever its name ends in (an archive's
        # subfolder 'dir.tif' failed each of its scenes: "output .../dir.tif is a folder: give a file name")
        folder_named = _names_folder(out)
        is_folder, out = _out_is_folder(out), Path(out)
        if not is_folder:
            mask = out
        else:
            if out.exists():
                if not out.is_dir():
                    raise ParameterError(f"--out {out} is a file, not a folder: give a folder or the mask's .tif name")
            elif out.suffix.lower() in VECTOR_EXTENSIONS.values() and not folder_named:
                raise ParameterError(f"--out {out}: give a folder or the mask's .tif name; the polygons are written "
                                     f"beside the mask (their format: --vector {out.suffix.lower()[1:]})")
            elif out.suffix.lower() in RASTER_SUFFIXES and not folder_named:
                raise ParameterError(f"--out {out}: the mask is a GeoTIFF: give its .tif name or a folder")
            else:
                above = file_above(out)
                if above is not None:
                    raise ParameterError(f"--out {out}: {above} is a file, not a folder: choose another --out")
                if not out.parent.exists() and str(out.parent) not in ("", "."):
                    raise ParameterError(f"output folder {out.parent} does not exist: create it first")
                try:
                    out.mkdir()
                except OSError as exc:
                    raise ParameterError(f"cannot create output folder {out}: {exc.strerror}: choose another "
                                         "--out") from None
            mask = out / f"{stem}_landcover.tif"
    return mask, companion_path(mask, "confidence")


def companion_path(mask: Path, kind: str) -> Path:
    """``<scene>_<kind>.tif`` beside ``mask`` (``<scene>_landcover.tif``; any other name gets ``_<kind>``)."""
    stem = mask.stem[: -len("_landcover")] if mask.stem.endswith("_landcover") else mask.stem
    return mask.with_name(f"{stem}_{kind}.tif")


VECTOR_EXTENSIONS = {"gpkg": ".gpkg", "geojson": ".geojson", "fgb": ".fgb"}
#: Names of other raster/image files, refused as --out (they became folders of that name).
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".jp2", ".img", ".vrt", ".nc", ".bmp", ".gif", ".webp", ".cog", ".gtiff")


def vector_output_path(mask_path: Path, vector: str) -> Path | None:
    """``<mask stem>.gpkg`` (or .geojson/.fgb) beside the mask; None for ``vector="none"``."""
    if vector == "none":
        return None
    if vector not in VECTOR_EXTENSIONS:
        raise ParameterError(f"--vector {vector}: choose one of gpkg, geojson, fgb, none")
    return mask_path.with_suffix(VECTOR_EXTENSIONS[vector])


def select_bands(meta: SceneMeta, card: ModelCard, bands: Sequence[int] | None) -> tuple[int, ...]:
    """1-based band indexes to feed the model, checked against the card."""
    if bands:
        bad = [b for b in bands if not 1 <= b <= meta.count]
        if bad:
            raise SceneError(f"--bands {','.join(map(str, bands))}: {meta.path.name} has bands 1..{meta.count} only")
        chosen = tuple(bands)
    else:
        chosen = meta.data_bands
        # By name whenever the scene's band descriptions hold the card's band names, also when
        # the count matches: a scene of the same bands in another order must not be read as is.
        by_name = _bands_by_name(meta, card)
        # (only as many bands as the card's: a wider scene may be another sensor's, as before it is
        # refused, the error giving these numbers as --bands)
        by_index = _bands_by_index(meta, card) if by_name is None and len(chosen) == card.in_channels else None
        if by_name is not None and by_name != chosen:
            log.info("%s: bands %s picked by their names %s", meta.path.name, ",".join(map(str, by_name)),
                     ", ".join(card.bands))
            chosen = by_name
        elif by_index is not None and by_index != chosen:
            log.info("%s: bands %s picked by the model's band names %s (band numbers of its training scene)",
                     meta.path.name, ",".join(map(str, by_index)), ", ".join(card.bands))
            chosen = by_index
        elif by_name is None and len(chosen) == card.in_channels:
            _warn_misnamed_bands(meta, card, chosen)
    if len(chosen) != card.in_channels:
        if bands:  # (the list is short or long, not the scene: it said only "--bands picked them")
            raise SceneError(f"--bands {','.join(map(str, chosen))} gives {len(chosen)} band"
                             f"{'s' if len(chosen) != 1 else ''} but model {card.name!r} expects {card.in_channels}: "
                             f"give {card.in_channels} band numbers of {meta.path.name} (1..{meta.count}), in the "
                             f"order {', '.join(card.bands)}")
        if len(chosen) < card.in_channels:
            hint = (f" ({', '.join(card.bands)}): predict it with a model trained on the bands it has "
                    f"(geoseg train), or use a scene that has all {card.in_channels}")
        elif (numbered := _bands_by_index(meta, card)) is not None:
            hint = (f": pass --bands {','.join(map(str, numbered))} to read the bands {', '.join(card.bands)} "
                    "the model was trained on, if this scene's band numbers are its training scene's")
        else:
            hint = f": pass --bands to pick {card.in_channels} of them in the order {', '.join(card.bands)}"
        raise SceneError(
            f"{meta.path.name} gives {len(chosen)} band{'s' if len(chosen) != 1 else ''} but model {card.name!r} "
            f"expects {card.in_channels}{hint}"
        )
    meta.for_bands(chosen, hint=" (or pick bands of one type with --bands)" if meta.count > len(chosen) else "")
    if bands:  # the user's order: still say where a band's description names another of the card's bands
        _warn_misnamed_bands(meta, card, chosen, given=True)
    if meta.alpha_band is not None and meta.alpha_band in chosen:  # (GDAL tags the 4th band of an RGB file alpha)
        kept = f"; its nodata value {meta.nodata:g} still does" if meta.nodata is not None else ""
        warn(f"{meta.path.name}: band {meta.alpha_band} is tagged alpha (transparency) but is read as data "
             f"({card.bands[chosen.index(meta.alpha_band)]}): it marks no pixel as nodata{kept}", InputRangeWarning)
    if len(set(chosen)) < len(chosen):  # a band read twice: allowed (a stand-in for a band the scene lacks), but rarely meant
        warn(f"--bands {','.join(map(str, chosen))} feeds the model {repeated_bands(chosen, card.bands)}: check --bands",
             InputRangeWarning)
    return chosen


def repeated_bands(chosen: Sequence[int], names: Sequence[str] | None = None) -> str:
    """``band 3 twice (as B1_blue, B2_green), band 1 three times (...)``: the bands ``chosen`` reads more than once,
    with the model's band names they stand for where ``names`` are given."""
    times = {2: "twice", 3: "three times"}
    return ", ".join(
        f"band {b} {times.get(chosen.count(b), f'{chosen.count(b)} times')}"
        + (f" (as {', '.join(names[k] for k, c in enumerate(chosen) if c == b)})" if names else "")
        for b in sorted({b for b in chosen if chosen.count(b) > 1}))


def _band_key(name: str | None, exact: bool = False) -> str | None:
    """A band name as descriptions are matched to a card's band names: without case or surrounding
    spaces (``b5_swir1`` is ``B5_swir1``: a scene of lower-case names in another order was read as is),
    or only without surrounding spaces when ``exact`` (see :func:`_positional`)."""
    if not name or not name.strip():
        return None
    return name.strip() if exact else name.strip().casefold()


def _positional(card: ModelCard) -> bool:
    """Whether the card's band names are all ``b<k>``, geoseg train's names for the undescribed bands of
    its training scene, after their positions: matched with their case (a scene's Landsat names ``B3, B2,
    B1, B4`` matched a card of ``b1..b4`` and were read 3,2,1,4, blue as red)."""
    return all(re.fullmatch(r"b[1-9][0-9]*", n) for n in card.bands)


def _warn_misnamed_bands(meta: SceneMeta, card: ModelCard, chosen: tuple[int, ...], given: bool = False) -> None:
    """Warn when a band read in the card's position k is described as another of the card's bands
    (``given``: ``chosen`` is the user's --bands)."""
    exact = _positional(card)
    keys = [_band_key(n, exact) for n in card.bands]
    wrong = [(b, meta.descriptions[b - 1], card.bands[k]) for k, b in enumerate(chosen)
             if _band_key(meta.descriptions[b - 1], exact) in keys and _band_key(meta.descriptions[b - 1], exact) != keys[k]]
    if wrong:
        said = "; ".join(f"band {b} is described {d!r} but feeds the model as {n!r}" for b, d, n in wrong[:3])
        by_name = _bands_by_name(meta, card) if given else None
        if by_name is not None:
            todo = f"--bands {','.join(map(str, by_name))} reads them by their names"
        elif given:
            todo = f"check --bands (the model's bands, in order: {', '.join(card.bands)})"
        else:
            todo = f"check the band order, or pass --bands in the order {', '.join(card.bands)}"
        warn(f"{meta.path.name}: {said}: {todo}", InputRangeWarning)


def _bands_by_name(meta: SceneMeta, card: ModelCard) -> tuple[int, ...] | None:
    """The scene's bands whose descriptions are the card's band names, in the card's order, or
    ``None`` unless every name appears exactly once among the data bands."""
    names: dict[str, list[int]] = {}
    exact = _positional(card)
    for b in meta.data_bands:
        d = _band_key(meta.descriptions[b - 1], exact)
        if d:
            names.setdefault(d, []).append(b)
    keys = [_band_key(n, exact) or "" for n in card.bands]
    if not all(len(names.get(n, ())) == 1 for n in keys):
        return None
    return tuple(names[n][0] for n in keys)


def _bands_by_index(meta: SceneMeta, card: ModelCard) -> tuple[int, ...] | None:
    """The bands ``k`` of a card whose band names are all ``b<k>`` (geoseg train's names for the
    undescribed bands of its training scene: ``bands: [3, 2, 1]`` trains a card of b3, b2, b1), or
    ``None`` when a name is another, a number repeats or is not a data band of the scene, or the scene
    describes one of those bands as another of the card's bands (its descriptions then decide)."""
    ks = [int(m.group(1)) for n in card.bands if (m := re.fullmatch(r"b([1-9][0-9]*)", n))]
    if len(ks) != len(card.bands) or len(set(ks)) != len(ks) or not set(ks) <= set(meta.data_bands):
        return None
    keys = [_band_key(n, True) for n in card.bands]
    if any(_band_key(meta.descriptions[k - 1], True) in keys and _band_key(meta.descriptions[k - 1], True) != f"b{k}"
           for k in ks):
        return None
    return tuple(ks)


def _pad_to(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reflect-pad a CHW window to ``shape`` (height, width; only rasters smaller than a tile need it)."""
    _, h, w = x.shape
    th, tw = shape
    if h == th and w == tw:
        return x
    mode_h = "reflect" if h > 1 else "edge"
    x = np.pad(x, ((0, 0), (0, th - h), (0, 0)), mode=mode_h)
    mode_w = "reflect" if w > 1 else "edge"
    return np.pad(x, ((0, 0), (0, 0), (0, tw - w)), mode=mode_w)


Prepared = tuple[np.ndarray | None, np.ndarray]


def _prepare_window(meta: SceneMeta, tile: Tile, bands: tuple[int, ...], card: ModelCard, size: tuple[int, int]) -> Prepared:
    """Read one window and make it model-ready: ``(normalised CHW padded to size (h, w) | None, valid HW)``.

    Runs in Dask's reader threads, so normalisation and padding overlap with the model.
    ``None`` marks a window without any valid pixel (it is never sent to the model), or one
    outside the area of interest (not even read).
    """
    read = read_scene_window(meta, tile.window, bands)
    if read is None:
        return None, np.zeros((tile.height, tile.width), bool)
    data, valid, missing = read
    if not valid.any():
        return None, valid
    return _pad_to(card.model_input(data, meta.dtype, missing), size), valid


#: Model input read per ``dask.compute`` of the reader (float32 bytes): 48 windows of 5 × 128².
GROUP_BYTES = 16 * 2**20


#: _prefetch reads at most this many windows in the caller's thread.
_INLINE_WINDOWS = 16


def _prefetch(
    batches: list[list[Tile]], meta: SceneMeta, bands: tuple[int, ...], card: ModelCard, size: tuple[int, int],
    depth: int, workers: int,
) -> Iterator[tuple[list[Tile], list[Prepared]]]:
    """Yield ``(tiles, prepared windows)`` per batch while a thread keeps ``depth`` batches ready.

    Windows are read (and normalised) by ``dask.delayed`` tasks on Dask's threaded scheduler, a
    group of batches (:data:`GROUP_BYTES` of model input) split into one task per reader thread;
    each task opens the file itself (per-thread handles). The tasks take only indexes: Dask walks a
    task's arguments looking for collections, and walking the scene and card for every window cost
    more than reading the window (2.6 against 0.5 ms per 128² window). The graph is not optimised
    (nothing to fuse in one task per thread).
    """
    if sum(len(b) for b in batches) <= _INLINE_WINDOWS:
        # a small scene: its few windows are read here, without a reader thread, a pool and a Dask
        # graph per scene (about 20 ms a scene, more than reading them)
        try:
            for b in batches:
                yield b, [_prepare_window(meta, t, bands, card, size) for t in b]
        finally:
            close_handles(meta.path)
        return
    from concurrent.futures import ThreadPoolExecutor

    import dask
    import dask.threaded

    # (dask >= 2025: contextvars, and with them warnings on free-threaded Python, reach the readers)
    executor = getattr(dask.threaded, "ContextAwareThreadPoolExecutor", ThreadPoolExecutor)

    def prepare_part(where: list[tuple[int, int]]) -> list[Prepared]:
        return [_prepare_window(meta, batches[k][m], bands, card, size) for k, m in where]

    prepare = dask.delayed(prepare_part, pure=False)
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    # each compute costs about 3 ms of Python that holds the GIL, more than reading a small window
    group_windows = max(1, GROUP_BYTES // (4 * len(bands) * size[0] * size[1]))

    def produce() -> None:
        # A pool of this scene's own, shut down with it: without one, Dask's threaded scheduler makes a pool
        # per calling thread (this reader is a new thread per scene) and keeps each for ever through
        # atexit, so a service segmenting scene after scene grew by two pools a call.
        pool = executor(max(1, workers), thread_name_prefix="geoseg-read")
        try:
            i = 0
            while i < len(batches):
                if stop.is_set():
                    return
                j, n = i, 0
                while j < len(batches) and (j == i or n + len(batches[j]) <= group_windows):
                    n += len(batches[j])
                    j += 1
                where = [(k, m) for k in range(i, j) for m in range(len(batches[k]))]
                step = -(-len(where) // max(1, workers))  # one part per reader thread
                parts = dask.compute(*[prepare(where[a:a + step]) for a in range(0, len(where), step)],
                                     scheduler="threads", pool=pool, optimize_graph=False)
                ready = iter([w for part in parts for w in part])
                for k in range(i, j):
                    q.put((batches[k], [next(ready) for _ in batches[k]]))
                i = j
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)
        finally:
            pool.shutdown(wait=True)

    t = threading.Thread(target=produce, name="geoseg-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)
        t.join()
        close_handles(meta.path)


def argmax_classes(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index (HW uint8, first maximum wins) and max probability (HW) of CHW ``probs``.

    One pass per class over contiguous planes: several times faster than ``argmax(axis=0)``,
    which walks the class axis with a large stride.
    """
    best = probs[0].copy()
    idx = np.zeros(best.shape, np.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        idx[better] = c
        np.maximum(best, probs[c], out=best)
    return idx, best


def run_grid(
    meta: SceneMeta,
    bands: tuple[int, ...],
    grid: TileGrid,
    card: ModelCard,
    predictor: Predictor,
    sink: Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None],
    *,
    batch_size: int = 1,
    blend: BlendMode = BlendMode.GAUSSIAN,
    prefetch: int = 2,
    read_workers: int = 2,
    progress: Any = None,
    reweight: np.ndarray | None = None,
    cached: dict[tuple[int, int], np.ndarray] | None = None,
    cached_valid: dict[tuple[int, int], np.ndarray | None] | None = None,
) -> tuple[int, int, float]:
    """Predict every window of ``grid`` and hand finished strips to ``sink``.

    ``sink(row, class_index HW uint8, max_prob HW float32, valid HW bool, probs CHW float32)``
    receives full-width strips top to bottom (``probs``: the probabilities the argmax was taken
    of). ``reweight`` (per-class factors, see :mod:`geoseg.priors`) multiplies the blended
    probabilities before the argmax. ``cached``: the model's probabilities of some windows by
    ``Tile.index`` (the prior pass's, :func:`sample_posteriors`' ``keep_probs``), used instead of running
    those windows again (and removed from it as they are used); windows are still blended in grid
    order, so the result is the same. Returns ``(windows run, windows skipped, model seconds)``.
    """
    merger = StripMerger(card.num_classes, meta.height, meta.width, grid.tile, blend)
    # Batches never straddle two window rows, so each row's strip is released in time.
    batches = [b for i in range(grid.shape[0]) for b in batched(grid.row_band(i), batch_size, skip=cached)]
    ran = skipped = 0
    model_s = 0.0
    current_row = -1

    def emit(strips: Iterator[Any]) -> None:
        for strip in strips:
            if not strip.covered.any():  # rows no window ran over: all nodata, nothing to take the argmax of
                empty = np.zeros(strip.valid.shape, np.uint8)
                sink(strip.row, empty, empty.astype(np.float32), strip.valid, strip.probs)
                continue
            probs = strip.probs if reweight is None else reweight_probs(strip.probs, reweight)
            idx, conf = argmax_classes(probs)
            sink(strip.row, idx, conf, strip.valid & strip.covered, probs)

    windows: Iterator[tuple[list[Tile], list[Prepared]]]
    if cached and cached_valid and all(t.index in cached_valid and (cached_valid[t.index] is None or t.index in cached)
                                       for b in batches for t in b):
        # every window was read (and run) by the prior pass: nothing to read again (a small scene)
        windows = ((b, [(None, np.zeros((t.height, t.width), bool)) if cached_valid[t.index] is None
                        else (cached[t.index], cached_valid[t.index]) for t in b]) for b in batches)
    else:
        windows = _prefetch(batches, meta, bands, card, grid.model_shape, prefetch, read_workers)
    for tiles, prepared in windows:
        if tiles[0].row != current_row:
            emit(merger.release(tiles[0].row))
            current_row = tiles[0].row
        todo = []
        for t, (x_t, valid) in zip(tiles, prepared):
            if x_t is not None:
                todo.append((t, x_t, valid))
            else:
                skipped += 1
        if todo:
            run = [x_t for t, x_t, _ in todo if not cached or t.index not in cached]
            ready: Iterator[np.ndarray] = iter(())
            if run:
                x = run[0][None] if len(run) == 1 else np.stack(run)
                t0 = time.perf_counter()
                probs = predictor(x)
                model_s += time.perf_counter() - t0
                if probs.shape[:2] != (len(run), card.num_classes):
                    raise ModelError(
                        f"the model returned shape {tuple(probs.shape)} for a batch of {len(run)}: expected "
                        f"{card.num_classes} classes (the card's, or --classes'): give one class per output channel"
                        + (f" ({probs.shape[1]})" if probs.ndim == 4 else "")
                    )
                ready = iter(probs)
            for t, _, valid in todo:  # grid order, as without a cache: the sums are the same
                p = cached.pop(t.index) if cached and t.index in cached else next(ready)
                merger.aggregate(p[:, : t.height, : t.width], t, valid)
            ran += len(todo)
        if progress is not None:
            progress.update(len(tiles))
    emit(merger.finish())
    return ran, skipped, model_s


def sample_posteriors(
    meta: SceneMeta,
    bands: tuple[int, ...],
    grid: TileGrid,
    card: ModelCard,
    predictor: Predictor,
    *,
    max_windows: int = 256,
    max_pixels: int = 400_000,
    batch_size: int = 1,
    prefetch: int = 2,
    read_workers: int = 2,
    keep_probs: dict[tuple[int, int], np.ndarray] | None = None,
    keep_bytes: int = 0,
    keep_valid: dict[tuple[int, int], np.ndarray | None] | None = None,
) -> np.ndarray:
    """Model posteriors ``(N, C)`` of a sample of the scene's valid pixels, memory bounded.

    Runs the windows of ``grid`` (all of them up to ``max_windows``, else that many spread
    evenly over those that hold data: a scene's nodata frame, a mosaic's gaps or the outside of an
    AOI would otherwise take the sample, and a mostly empty mosaic adapted to nothing) without
    blending, keeps each window's core (the cores partition the raster: neighbouring windows meet
    in the middle of their overlap, so no pixel counts twice)
    and takes every k-th raster row and column of it so that at most about ``max_pixels``
    pixels are kept. ``keep_probs``: a dict that receives the whole probabilities of the windows run, by
    ``Tile.index``, up to ``keep_bytes`` in all, for :func:`run_grid`'s ``cached`` (the model's output
    for a window does not depend on the batch it ran in).
    """
    tiles = list(grid.tiles())
    if len(tiles) > max_windows and (meta.has_nodata or meta.aoi is not None):
        holds = windows_with_data(meta, [t.window for t in tiles])
        tiles = [t for t, h in zip(tiles, holds) if h] or tiles
    tiles = spread_tiles(tiles, max_windows)
    rb, cb = core_bounds(grid.row_offsets, grid.tile, meta.height), core_bounds(grid.col_offsets, grid.tile, meta.width)
    core_px = sum((rb[t.index[0] + 1] - rb[t.index[0]]) * (cb[t.index[1] + 1] - cb[t.index[1]]) for t in tiles)
    step = max(1, int(np.ceil(np.sqrt(core_px / max(max_pixels, 1)))))
    out: list[np.ndarray] = []
    batches = list(batched(tiles, batch_size))
    for group, prepared in _prefetch(batches, meta, bands, card, grid.model_shape, prefetch, read_workers):
        todo = [(t, x_t, valid) for t, (x_t, valid) in zip(group, prepared) if x_t is not None]
        if keep_valid is not None:  # windows without data: run_grid need not read them again
            keep_valid.update((t.index, None) for t, (x_t, _) in zip(group, prepared) if x_t is None)
        if not todo:
            continue
        x = np.stack([x_t for _, x_t, _ in todo])
        probs = predictor(x)
        for (t, _, valid), p in zip(todo, probs):
            if keep_probs is not None and keep_bytes >= p.nbytes:
                keep_probs[t.index] = p.copy()  # (a view would hold the whole batch)
                keep_bytes -= p.nbytes
                if keep_valid is not None:
                    keep_valid[t.index] = valid
            i, j = t.index
            # Every step-th raster row and column of the core (a lattice over the whole raster).
            r_first, c_first = -(-rb[i] // step) * step, -(-cb[j] // step) * step
            rows = np.arange(r_first, rb[i + 1], step) - t.row
            cols = np.arange(c_first, cb[j + 1], step) - t.col
            if rows.size == 0 or cols.size == 0:
                continue
            keep = valid[np.ix_(rows, cols)]
            sample = p[:, rows[:, None], cols[None, :]]
            out.append(sample[:, keep].T.astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, card.num_classes), np.float32)


def scene_prior(
    meta: SceneMeta, bands: tuple[int, ...], grid: TileGrid, card: ModelCard, predictor: Predictor, *,
    max_ratio: float | None = None, **kwargs: Any
) -> PriorEstimate:
    """EM estimate of the scene's class priors under ``card.class_prior`` (see :mod:`geoseg.priors`)."""
    prior = _require_class_prior(card)
    return em_priors(sample_posteriors(meta, bands, grid, card, predictor, **kwargs), prior, max_ratio=max_ratio)


#: Most memory (MB) the prior pass keeps of its windows' probabilities for the main pass to reuse
#: instead of running them again (64 windows of 128 px, 7 classes: 29 MB; 25 of 512 px: 183 MB).
PRIOR_KEEP_MB = 256

#: GDAL block cache (MB) while predict reads and writes: windows are read once, so a large cache
#: only grows the memory with the scene; but it must hold the input tiles under a row of windows
#: (a 128-px window of a 512-px tiled GeoTIFF lies in 1-4 tiles its neighbours share).
_GDAL_CACHE_MB = 64
#: The same in bytes, as ``rasterio.Env(GDAL_CACHEMAX=...)`` takes an int (GDALSetCacheMax64):
#: ``GDAL_CACHEMAX=64`` was a cache of 64 bytes, and every window decoded its tiles again.
_GDAL_CACHE = _GDAL_CACHE_MB * 2**20


def _require_class_prior(card: ModelCard) -> np.ndarray:
    """The card's ``class_prior`` as an array, or a one-line error when it has none."""
    if card.class_prior is None:
        raise ParameterError(f"--adapt-prior: {card.name}'s card has no class_prior (the training region's mean class "
                             "probabilities): retrain with geoseg train (it writes one), or predict without --adapt-prior")
    return np.asarray(card.class_prior, np.float64)


def scene_tile(meta: SceneMeta, card: ModelCard | None, tile: int | None = None,
               overlap: int | None = None) -> tuple[int, int]:
    """The window size and overlap predict runs the scene of ``meta`` in: ``tile`` and ``overlap``
    (None: the card's; without a card 512 and 128), except that a window larger than the whole
    scene shrinks to what the scene needs (:func:`geoseg.tiling.fit_tile`, never below the card's
    window): the padding would only cost memory and time (a 489 x 443 scene in 8,000-px windows
    ran out of 23 GB)."""
    default = card.tile_size if card is not None else 512
    asked = tile or default
    overlap = (card.overlap if card is not None else 128) if overlap is None else overlap
    fitted, overlap = fit_tile(meta.height, meta.width, asked, overlap, floor=default)
    if fitted != asked:
        log.info("%s: one window of %d px instead of %d: the %dx%d scene fits in it", meta.path.name, fitted, asked,
                 meta.width, meta.height)
    return fitted, overlap


def scene_grid(meta: SceneMeta, card: ModelCard | None, tile: int | None = None,
               overlap: int | None = None) -> TileGrid:
    """The window grid predict runs the scene of ``meta`` in (:func:`scene_tile`'s windows); along an
    axis of the scene shorter than a window, the windows reach the model padded only to the scene's
    length (:func:`geoseg.tiling.make_grid`, never below the card's window)."""
    size, overlap = scene_tile(meta, card, tile, overlap)
    floor = card.tile_size if card is not None else 512
    grid = make_grid(meta.height, meta.width, size, overlap, pad_floor=floor)
    usual = len(make_grid(meta.height, meta.width, size, size // 4, pad_floor=floor))
    if overlap > size // 4 and len(grid) > max(4 * usual, 16):
        # (a 128-px window with an overlap of 127 ran 114,000 windows on a 489x443 scene, without a word)
        log.warning("%s: an overlap of %d px in %d-px windows makes %s windows, %.0f times the %s of an overlap "
                    "of %d: each pixel is predicted about %.0f times; an overlap of a quarter of the window is "
                    "usually enough", meta.path.name, overlap, size, f"{len(grid):,}", len(grid) / usual,
                    f"{usual:,}", size // 4, (size / (size - overlap)) ** 2)
    if grid.input_shape is not None:
        log.info("%s: model input %dx%d px per window (the scene is shorter than a %d-px window)", meta.path.name,
                 grid.model_shape[1], grid.model_shape[0], size)
    return grid


def _ready_device(device: Device) -> Literal["cpu", "gpu"]:
    """Where a ready-made predictor (tests, batch workers) computes, for the memory check: ``device``
    when it names one; for ``auto``, as :func:`resolve_device` when paddle is loaded (it built the
    predictor), else the CPU (no paddle model runs, and importing paddle only to ask costs seconds)."""
    if device != "auto":
        return device
    return resolve_device("auto") if sys.modules.get("paddle") is not None else "cpu"


def check_window_size(card: ModelCard, tile: int) -> None:
    """Warn when a DeepLabv3+ whose output depends on the window size runs far from its training size.

    Two parts of DeepLabv3+ can make it so: the ASPP's image-pooling branch (a global average
    of the window) and atrous rates that reach beyond the training window (the paper's rates at
    output stride 8 reach 288 input pixels, so in 128-pixel training windows they mostly sampled
    zero padding, and in much larger windows they see features the network never learned to
    read: the NC model of session 2 lost half its validation mIoU at 448 px). A DeepLabv3+ with
    small ``aspp_rates`` and no image pooling, or a UNet, has neither.
    """
    if card.architecture != "deeplabv3p" or card.tile_size / 2 <= tile <= card.tile_size * 2:
        return
    from geoseg.models import DEEPLAB_ASPP_RATES

    p = card.params
    stride = int(p.get("output_stride", 16))
    rates = p.get("aspp_rates") or DEEPLAB_ASPP_RATES.get(stride, DEEPLAB_ASPP_RATES[16])
    if p.get("image_pooling", True) or max(rates) * stride >= card.tile_size:
        warn(
            f"{card.name} was trained on {card.tile_size}-pixel windows; in {tile}-pixel windows its atrous "
            f"convolutions see different context and its predictions can get much worse: "
            f"keep --tile-size near {card.tile_size} (the card's default)", WindowSizeWarning)


#: A band whose sampled scene mean lies more than this many training standard deviations from
#: the training mean gets an :class:`InputRangeWarning`. The NC sample scene with its own model:
#: under 0.3; a Landsat-8 scene of 16-bit digital numbers given to it: 8 to 45; a Sentinel-2
#: scene: up to 4.9; the NC scene stored ×10 as uint16 with scale 0.1: 4.6 (a map of water only).
#: Session 20 lowered it from 5: the last two got no warning.
INPUT_RANGE_Z = 3.0


#: check_input_range reads a scene of at most this many pixels whole, once.
_WHOLE_READ_PX = 512 * 512


def check_input_range(meta: SceneMeta, bands: tuple[int, ...], card: ModelCard, *, grid: int = 8,
                      size: int = 32) -> dict[str, float] | None:
    """Warn when the scene's bands, scaled and normalised as the model will see them, average far
    from the data the model was trained on.

    A model given values on another scale (16-bit digital numbers where it learned reflectance,
    another sensor's band order) still writes a map, and a plausible-looking but meaningless one.
    Reads ``grid`` × ``grid`` small windows (``size`` pixels) spread evenly over the scene, so it
    costs a few blocks however large the scene is. Returns each card band's mean normalised value
    (its distance from the training mean in training standard deviations), or None when the
    windows hold no valid pixel.
    """
    h, w = min(size, meta.height), min(size, meta.width)
    rows = np.unique(np.linspace(0, meta.height - h, grid).round().astype(int))
    cols = np.unique(np.linspace(0, meta.width - w, grid).round().astype(int))
    total = np.zeros(len(bands))
    count = np.zeros(len(bands))
    whole = None
    try:
        if meta.aoi is None and meta.height * meta.width <= _WHOLE_READ_PX:
            # a small scene: one read, sliced (64 reads of overlapping 32-px windows cost more)
            whole = read_scene_window(meta, Window(0, 0, meta.width, meta.height), bands)
        for r in rows:
            for c in cols:
                if whole is not None:
                    d, v, m = whole
                    sl = (slice(None), slice(int(r), int(r) + h), slice(int(c), int(c) + w))
                    read = d[sl], v[sl[1:]], (None if m is None or not m[sl].any() else m[sl])
                else:
                    read = read_scene_window(meta, Window(int(c), int(r), w, h), bands)
                if read is None or not read[1].any():
                    continue
                data, valid, missing = read
                z = card.model_input(data, meta.dtype, missing)
                have = valid[None] if missing is None else ~missing
                total += np.where(have, z, 0).sum(axis=(1, 2))
                count += have.sum(axis=(1, 2))
    finally:
        close_handles(meta.path)  # no reader runs yet; a scene that fails later keeps no open file
    if not count.any():
        return None
    seen = [i for i in range(len(bands)) if count[i]]
    z = {i: total[i] / count[i] for i in seen}
    off = [i for i in seen if abs(z[i]) > INPUT_RANGE_Z]
    if len(off) == 1:
        i = off[0]
        warn(
            f"{meta.path.name}: band {bands[i]} averages {z[i]:+.0f} standard deviations from what {card.name} "
            f"was trained on as {card.bands[i]}: the scene's values are not on the scale the model learned (units, "
            "scaling or band order?), and its map may be meaningless; check --bands and the data" + _scaling_hint(meta, bands, card),
            InputRangeWarning)
    elif off:
        # several bands: name them all (one band named read as a band-order problem when all were off)
        lo, hi = min(z[i] for i in off), max(z[i] for i in off)
        spread = f"{lo:+.0f}" if round(lo) == round(hi) else f"{lo:+.0f} to {hi:+.0f}"
        cause = "units or scaling" if len(off) == len(seen) else "units, scaling or band order"
        fed: dict[int, list[str]] = {}  # (one scene band fed as several was counted as several bands)
        for i in off:
            fed.setdefault(bands[i], []).append(card.bands[i])
        if len(fed) == 1:
            (b, names), = fed.items()
            which = f"band {b} (as {', '.join(names)}) averages"
        else:
            listed = ", ".join(f"{b} as {' and '.join(n)}" for b, n in fed.items())
            which = f"{'all ' if len(off) == len(seen) else ''}{len(fed)} bands ({listed}) average"
        warn(
            f"{meta.path.name}: {which} {spread} standard deviations from "
            f"what {card.name} was trained on: the scene's values are not on the scale the model learned ({cause}?), "
            "and its map may be meaningless; check --bands and the data" + _scaling_hint(meta, bands, card),
            InputRangeWarning)
    return {card.bands[i]: float(z[i]) for i in seen}


def _scaling_hint(meta: SceneMeta, bands: tuple[int, ...], card: ModelCard) -> str:
    """What to say of the scale/offset tags of the scene's ``bands`` (1-based), if they have any:
    geoseg feeds the model the stored values times the card's factor for their data type (as
    training read them), never ``stored × scale + offset``."""
    tagged = [(b, *meta.scaling[b - 1]) for b in bands if b - 1 < len(meta.scaling) and meta.scaling[b - 1] != (1.0, 0.0)]
    if not tagged:
        return ""
    b, scale, offset = tagged[0]
    return (f" (band {b} carries scale {scale:g} and offset {offset:g} tags, which geoseg does not apply: the model "
            f"gets the stored {meta.dtype} values x {card.normalization.scale_for(meta.dtype):g}, as its card says)")


#: A scene whose ground pixels are more than this factor larger or smaller than the model's
#: training pixels (its card's ``pixel_size``) gets a :class:`ResolutionWarning`.
RESOLUTION_FACTOR = 1.5


def check_resolution(meta: SceneMeta, card: ModelCard, size: float | None = None) -> float | None:
    """Warn when the scene's pixels are much larger or smaller on the ground than the pixels the
    model learned from: a network learns textures and object sizes in pixels, so a 28.5 m model
    given 10 m pixels sees every field and building three times its size, and writes a plausible
    looking but poor map. ``size``: the scene's ground pixel size in metres when the caller has
    it (else computed). Returns that size (None when unknown)."""
    if size is None:
        size = meta.ground_pixel_m()
    ratio = resolution_mismatch(size, card)
    if ratio is not None:
        span = f"{ratio:.1f} times as many pixels as" if ratio > 1 else f"{1 / ratio:.1f} times fewer pixels than"
        warn(
            f"{meta.path.name}: its pixels are {size:.3g} m on the ground, {card.name} learned from {card.pixel_size:.3g} m "
            f"ones: objects span {span} in its training data, and its map may be poor; resample the scene to "
            f"about {card.pixel_size:.3g} m (e.g. gdalwarp -tr with -r average) or train a model at this resolution",
            ResolutionWarning)
    return size


def resolution_mismatch(size: float | None, card: ModelCard) -> float | None:
    """``card.pixel_size / size`` (how many scene pixels of ground ``size`` m a training pixel spans)
    when it lies beyond :data:`RESOLUTION_FACTOR` either way; None when within it or unknown."""
    if size is None or card.pixel_size is None:
        return None
    ratio = card.pixel_size / size
    return ratio if max(ratio, 1 / ratio) > RESOLUTION_FACTOR else None


def _stoppable(predictor: Predictor, stopped: Callable[[], bool]) -> Predictor:
    """``predictor`` that first asks ``stopped`` and raises :class:`RunStoppedError` when it says so."""

    def run(x: np.ndarray) -> np.ndarray:
        if stopped():
            raise RunStoppedError("the run was stopped")
        return predictor(x)

    return run


def _device_errors_are_model_errors(predictor: Predictor) -> Predictor:
    """``predictor`` whose ``OSError`` becomes :class:`ModelError`. Paddle raises the GPU's own failures
    ("(External) CUDA error(700), an illegal memory access was encountered") as ``OSError``, which a
    batch took for one scene's I/O error and went on, failing every later scene on the broken device
    one by one; a model call reads and writes no file, so its ``OSError`` is the model's or the device's."""

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return predictor(x)
        except OSError as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the model failed on its device: {text}: a GPU in this state fails every later call; "
                             "run again (a new process), and check the GPU (nvidia-smi) if it repeats") from exc

    return run


@checked_arguments
def segment_scene(
    input_path: str | Path,
    out: str | Path | None = None,
    *,
    source: ModelSource | None = None,
    model: str | Path | None = None,
    weights: str | Path | None = None,
    card: str | Path | None = None,
    classes: Any = None,
    predictor: Predictor | None = None,
    options: PredictOptions | None = None,
    stopped: Callable[[], bool] | None = None,
) -> PredictResult:
    """Segment one scene into ``<stem>_landcover.tif`` (COG, palette, class names, .qml style).

    Give either ``source`` (or ``model``/``weights``/``card`` to resolve one) or a ready
    ``predictor`` together with ``source`` for its card. All checks (input, bands, tile
    parameters, output paths) run before any window is read. Outputs appear atomically; an
    output folder this call created is removed again when the run fails before writing into it.
    ``stopped`` is asked before each batch of windows and just before the mask is published; when it
    says True the run ends with :class:`RunStoppedError` and publishes nothing (a batch's scene
    cancelled on a Dask worker, whose thread cannot be interrupted).
    """
    if predictor is not None and source is None:  # it ran under the default model's card (classes, normalisation)
        raise ParameterError("segment_scene: a ready predictor needs source=, the ModelSource it was built from (its "
                             "card gives the classes, normalisation and windows)")
    if source is not None and (model, weights, card) != (None, None, None):
        raise ParameterError("segment_scene: give source= or model=/weights=/card=, not both")
    new_folder = None
    if out is not None and not Path(out).exists() and _out_is_folder(out):
        new_folder = Path(out)
    try:
        return _segment_scene(input_path, out, source=source, model=model, weights=weights, card=card, classes=classes,
                              predictor=predictor, options=options, stopped=stopped)
    except BaseException:
        if new_folder is not None:
            with contextlib.suppress(OSError):
                new_folder.rmdir()  # only when empty: a failed run leaves no empty --out behind
        raise


def _segment_scene(
    input_path: str | Path,
    out: str | Path | None,
    *,
    source: ModelSource | None,
    model: str | Path | None,
    weights: str | Path | None,
    card: str | Path | None,
    classes: Any,
    predictor: Predictor | None,
    options: PredictOptions | None,
    stopped: Callable[[], bool] | None = None,
) -> PredictResult:
    opts = options_of(options, PredictOptions, "options")
    t_start = time.perf_counter()
    input_path = scene_path(input_path)
    meta = open_scene(input_path)
    aoi = load_aoi(opts.aoi, meta) if opts.aoi is not None else None
    if source is None:
        source = resolve_model(model, weights, card, classes)
    mc = source.card
    bands = select_bands(meta, mc, opts.bands)
    meta = meta.for_bands(bands)  # (normalised as their type: band 1, not read, may be of another)
    grid = scene_grid(meta, mc, opts.tile_size, opts.overlap)
    tile = grid.tile
    check_window_size(mc, tile)
    out_meta = meta
    if aoi is not None:
        # the whole scene's windows that meet the AOI, so its pixels are blended as in a whole-scene run;
        # the outputs cover the AOI's bounding box
        grid, region = grid.covering(aoi.window)
        out_meta = meta.subset(aoi.window)
        meta = meta.subset(region, aoi)
    check_window_count(meta, grid)
    # before any output or model exists. On a GPU the model and its activations live there, but the
    # blending strip and the prefetched batches (8 windows per call) still take this machine's memory
    run_on = resolve_device(opts.device) if predictor is None else _ready_device(opts.device)
    # a ready-made predictor (batch's workers build theirs on the GPU too) is sized for where it runs
    # ("custom" gave a GPU worker the CPU's 1 window per call instead of 8)
    batch_size = opts.batch_size or default_batch_size(run_on, tile)
    adapting = (mc.adapt_prior if opts.adapt_prior is None else opts.adapt_prior) and source.output != "labels"
    check_memory(memory_estimate_mb(tile, batch_size, height=meta.height, width=meta.width, bands=len(bands),
                                    itemsize=np.dtype(meta.dtype).itemsize, num_classes=mc.num_classes,
                                    members=card_members(mc), window=grid.model_shape, gpu=run_on != "cpu",
                                    kept_windows=min(opts.prior_windows, len(grid)) if adapting else 0),
                 grid.model_shape, batch_size)
    mask_path, conf_path = output_paths(input_path, out)
    if mask_path.resolve() == input_path.resolve():
        raise ParameterError(f"output {mask_path} is the input: choose another --out")
    # the styles and .aux.xml beside a raster are outputs too (a hand-made style was replaced silently)
    check_output(mask_path, opts.overwrite)
    check_output(mask_path.with_suffix(".qml"), opts.overwrite)
    check_output(f"{mask_path}.aux.xml", opts.overwrite)
    remove_leftovers(mask_path.parent)  # a killed run's temp files (never a live one's)
    if opts.confidence != "none":
        check_output(conf_path, opts.overwrite)
        check_output(conf_path.with_suffix(".qml"), opts.overwrite)
    prob_path = companion_path(mask_path, "probabilities")
    if opts.probabilities != "none":
        check_output(prob_path, opts.overwrite)
        check_output(prob_path.with_suffix(".qml"), opts.overwrite)
    vector_path = vector_output_path(mask_path, opts.vector)
    skipped = polygons_skipped_reason(meta) if vector_path is not None else None
    if skipped:
        warn(skipped, NoCRSWarning)
        vector_path = None
    if vector_path is not None:
        check_output(vector_path, opts.overwrite)
        from geoseg.vectorize import (  # refused now, not after the mask
            check_geojson_crs,
            mask_pixel_area,
            resolve_classes,
            vector_settings,
        )

        if opts.vector == "geojson" and out_meta.crs is not None:
            check_geojson_crs(out_meta.crs, input_path.name, out_meta.transform @ (out_meta.width / 2, out_meta.height / 2))

        vector_settings(opts.min_area, None, opts.simplify,
                        mask_pixel_area(out_meta.crs, out_meta.transform, out_meta.height, out_meta.width),
                        (out_meta.height, out_meta.width))
        if opts.vector_classes is not None:
            resolve_classes(opts.vector_classes, {c.id: c for c in mc.classes}, mc.name)
    check_georeferenced(meta)
    adapt = mc.adapt_prior if opts.adapt_prior is None else opts.adapt_prior
    if source.output == "labels":  # an argmax export: one class per pixel, no probabilities to weigh or write
        asked = [o for o, on in (("--adapt-prior", opts.adapt_prior), ("--probabilities", opts.probabilities != "none"),
                                 ("--confidence", opts.confidence != "none")) if on]
        if asked:
            raise ParameterError(f"{', '.join(asked)}: {source.label} returns class labels (exported with "
                                 "--output-op argmax), not probabilities: drop it, or export with --output-op softmax")
        adapt = False  # (the card's default)
    if adapt:
        _require_class_prior(mc)
    check_input_range(meta, bands, mc)
    check_resolution(meta, mc)
    mask_profile = get_profile("mask", opts.creation_options)  # refuses --co GDAL would not take, before any work

    device_desc = getattr(predictor, "description", "custom")  # a ready one of build_predictor's says where it runs
    if predictor is None:
        predictor, device_desc = build_predictor(source, opts.device, opts.precision, opts.runtime, opts.threads)
    predictor = _device_errors_are_model_errors(predictor)
    if stopped is not None:
        predictor = _stoppable(predictor, stopped)
    if opts.tta:
        predictor = dihedral_average(predictor)
        device_desc += "+tta"
    log.debug("%s: %dx%d, %d bands %s, %d windows of %d px (overlap %d), model %s on %s, batch %d",
              input_path.name, meta.width, meta.height, len(bands), meta.dtype, len(grid), tile, grid.overlap,
              source.label, device_desc, batch_size)

    reweight = None
    cached: dict[tuple[int, int], np.ndarray] = {}
    cached_valid: dict[tuple[int, int], np.ndarray | None] = {}
    prior_tags: dict[str, str] = {}
    scene_priors: dict[str, float] | None = None
    if adapt:
        with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE):  # as the main pass: a bounded block cache
            est = scene_prior(meta, bands, grid, mc, predictor, max_ratio=opts.prior_max_ratio,
                              max_windows=opts.prior_windows, batch_size=batch_size, prefetch=opts.prefetch,
                              read_workers=opts.read_workers, keep_probs=cached, keep_bytes=PRIOR_KEEP_MB * 2**20,
                              keep_valid=cached_valid)
        reweight = est.weights
        scene_priors = {c.name: round(float(v), 4) for c, v in zip(mc.classes, est.scene)}
        prior_tags = {"GEOSEG_SCENE_PRIOR": ", ".join(f"{k}={v}" for k, v in scene_priors.items())}
        log.info("%s: scene class priors %s (EM over %d pixels, %d iterations%s); weights %s", input_path.name,
                 prior_tags["GEOSEG_SCENE_PRIOR"], est.pixels, est.iterations, "" if est.converged else ", not converged",
                 ", ".join(f"{c.name}={w:.2f}" for c, w in zip(mc.classes, est.weights)))

    gridspec = GridSpec.of(out_meta)
    lut = np.full(256, MASK_NODATA, np.uint8)
    lut[: mc.num_classes] = mc.class_lut()
    writers: list[COGWriter] = []
    sides: list[tuple[Path, Path]] = []  # (raster, a sidecar of it this run wrote: removed if the raster does not land)
    landed: set[Path] = set()
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE):
        try:
            mask_w = COGWriter(
                mask_path, gridspec, mask_profile, overwrite=opts.overwrite,
                colormap=class_colormap(mc.classes),
                tags={**classes_tag(mc.classes), "GEOSEG_MODEL": mc.name, **prior_tags},
                description="land cover class", registry=writers,
            )
            conf_w = None
            if opts.confidence != "none":
                conf_w = COGWriter(conf_path, gridspec, get_profile(f"confidence_{opts.confidence}"),
                                   overwrite=opts.overwrite, description="max class probability", registry=writers)
            prob_w = None
            if opts.probabilities != "none":
                prob_w = COGWriter(prob_path, gridspec, get_profile(f"probabilities_{opts.probabilities}"),
                                   overwrite=opts.overwrite, count=mc.num_classes,
                                   description=[f"probability of {c.name} (class {c.id})" for c in mc.classes],
                                   tags={**classes_tag(mc.classes), "GEOSEG_MODEL": mc.name, **prior_tags},
                                   registry=writers)

            counts = np.zeros(256, np.int64)
            # by row or pixel on a degree grid, by pixel on a projection that distorts areas (Web Mercator)
            areas = pixel_areas(out_meta.crs, out_meta.transform, out_meta.height, out_meta.width)
            row_area = np.zeros(256)

            def sink(row: int, idx: np.ndarray, conf: np.ndarray, valid: np.ndarray, probs: np.ndarray) -> None:
                if valid.any():
                    m = lut[idx]
                    m[~valid] = MASK_NODATA
                    counts[:] += np.bincount(m.ravel(), minlength=256)
                else:  # rows of nodata (outside the scene's footprint or the AOI)
                    m = np.full(idx.shape, MASK_NODATA, np.uint8)
                    counts[MASK_NODATA] += m.size
                mask_w.write_rows(row, m)
                if isinstance(areas, GeoAreas):
                    add_area_counts(row_area, m, areas.block(row, len(m), 0, m.shape[1]))
                if conf_w is not None:
                    conf_w.write_rows(row, encode_probabilities(conf, valid, opts.confidence))
                if prob_w is not None:
                    prob_w.write_rows(row, encode_probabilities(probs, valid, opts.probabilities))

            if aoi is not None:
                (r0, c0), (out_r0, out_c0) = meta.origin, out_meta.origin
                sink = cropped(sink, out_r0 - r0, out_c0 - c0, out_meta.height, out_meta.width)
            bar = (_ProgressLog(len(grid), input_path.name) if opts.progress == "log"
                   else _progress_bar(len(grid), input_path.name) if opts.progress else None)
            try:
                ran, skipped, model_s = run_grid(
                    meta, bands, grid, mc, predictor, sink, batch_size=batch_size, blend=opts.blend,
                    prefetch=opts.prefetch, read_workers=opts.read_workers, progress=bar, reweight=reweight,
                    cached=cached, cached_valid=cached_valid,
                )
            finally:
                if bar is not None:
                    bar.close()
            class_pixels = {c.name: int(counts[c.id]) for c in mc.classes}
            mask_w.update_tags(GEOSEG_CLASS_PIXELS=json.dumps(class_pixels))  # the mask's own class statistics

            def before_first_lands() -> None:
                if stopped is not None and stopped():
                    raise RunStoppedError(f"{input_path.name}: the run was stopped; {mask_path.name} was not written")
                if opts.overwrite:
                    drop_old_set()

            def sidecars(w: COGWriter) -> None:
                # A raster's .qml and .aux.xml land just before the raster: a run stopped between them
                # left a mask without its style, class names or (where GeoTIFF keys cannot hold it) CRS.
                # (A stop before the raster lands removes them again: see below.)
                # (each recorded before it is written: a stop inside the write may still have landed it)
                if w is mask_w:
                    sides.append((w.path, Path(f"{mask_path}.aux.xml")))
                    write_aux_xml(mask_path, mc.classes, srs_xml=mask_w.srs_xml)
                    sides.append((w.path, mask_path.with_suffix(".qml")))
                    write_qml(mask_path, mc.classes)
                else:  # the percent (uint8, 0-100) and float (0-1) rasters on a fixed 0-max colour ramp
                    kind = opts.confidence if w is conf_w else opts.probabilities
                    sides.append((w.path, w.path.with_suffix(".qml")))
                    if w.srs_xml is not None:  # (written by the writer itself, next)
                        sides.append((w.path, Path(f"{w.path}.aux.xml")))
                    write_ramp_qml(w.path, 100 if kind == "uint8" else 1, "confidence" if w is conf_w else "probability")

            def drop_old_set() -> None:
                # --overwrite: the outputs are published one by one, so a run stopped among them left
                # the new mask beside the old run's confidence, polygons, .aux.xml: a set that did not
                # belong together, and nothing said so. The old run's files go just before this run's
                # first output lands: a stop then leaves part of the new set, never a mix. Those this
                # run does not write go too (an old model's confidence and polygons stayed beside a
                # new mask made without them): they belong to the mask being replaced. The old mask
                # itself stays until the new one replaces it (a batch's mosaic lists it).
                old = [mask_path.with_suffix(".qml"), Path(f"{mask_path}.aux.xml")]
                for raster in (conf_path, prob_path):
                    old += [raster, raster.with_suffix(".qml"), Path(f"{raster}.aux.xml")]
                old += [mask_path.with_suffix(ext) for ext in VECTOR_EXTENSIONS.values() if ext]
                for p in old:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

            for i, w in enumerate([mask_w] + [w for w in writers if w is not mask_w]):  # (the mask first)
                def before_publish(w: COGWriter = w, first: bool = not i) -> None:
                    if first:
                        before_first_lands()
                    sidecars(w)
                w.close(before_publish=before_publish, own_pam=w is mask_w)
                landed.add(w.path)
        except BaseException:
            for w in writers:
                w.abort()
            for raster, side in sides:  # (sidecars of a raster that did not land: a rerun refused them)
                if raster not in landed:
                    with contextlib.suppress(FileNotFoundError):
                        side.unlink()
            raise
    aux, style = Path(f"{mask_path}.aux.xml"), mask_path.with_suffix(".qml")  # (what write_aux_xml, write_qml wrote)
    conf_style = conf_path.with_suffix(".qml") if opts.confidence != "none" else None
    prob_style = prob_path.with_suffix(".qml") if opts.probabilities != "none" else None
    extra: tuple[Path, ...] = ()
    if vector_path is not None and stopped is not None and stopped():  # (a cancelled task wrote its polygons on)
        raise RunStoppedError(f"{input_path.name}: the run was stopped; {mask_path.name} was written, its polygons "
                              "were not")
    if vector_path is not None:
        from geoseg.vectorize import vectorize_mask

        try:
            vec = vectorize_mask(
                mask_path, vector_path, fmt=opts.vector, min_area=opts.min_area, simplify=opts.simplify,  # type: ignore[arg-type]
                classes=mc.classes, keep_classes=opts.vector_classes, scene_name=input_path.name, overwrite=opts.overwrite,
            )
        except OutputError as exc:  # (a full disk) the mask is whole and stays: say how to go on from it
            raise type(exc)(f"{exc}; the mask {mask_path.name} is complete: write its polygons with geoseg "  # (NoRoomError stays one)
                              f"vectorize {mask_path}, or run predict again with --overwrite") from None
        extra = (vec.path,)
    seconds = time.perf_counter() - t_start
    result = PredictResult(
        mask=mask_path, confidence=conf_path if opts.confidence != "none" else None, style=style, aux=aux,
        windows=ran, windows_skipped=skipped, seconds=seconds, model_seconds=model_s,
        megapixels=out_meta.width * out_meta.height / 1e6, device=device_desc, extra_outputs=extra,
        scene_prior=scene_priors, probabilities=prob_path if opts.probabilities != "none" else None,
        class_pixels=class_pixels, confidence_style=conf_style, probabilities_style=prob_style,
        class_area=None if areas is None else {
            c.name: float(row_area[c.id] if isinstance(areas, GeoAreas) else counts[c.id] * areas) for c in mc.classes},
        area_units=None if areas is None else area_units(out_meta.crs, ground=isinstance(areas, ProjectedAreas)),
    )
    total = sum(class_pixels.values())
    if not total:  # (an exit 0 with an all-nodata mask and an empty layer said nothing)
        where = "inside the AOI" if aoi is not None else "in the scene"
        warn(f"{input_path.name}: no pixel {where} has data (every band is nodata or masked there): the mask "
             f"is all nodata and has no polygons; check the scene and its nodata value", InputRangeWarning)
    if total:
        log.info("%s: %s of %d classified pixels", mask_path.name, ", ".join(
            f"{k} {v / total:.1%}" for k, v in sorted(class_pixels.items(), key=lambda kv: -kv[1]) if v), total)
    log.info("wrote %s: %d window%s (%d %s skipped) in %.1f s, %.2f windows/s, %.2f megapixels/s",
             mask_path, ran, "" if ran == 1 else "s", skipped,
             "all-nodata" if aoi is None else "all-nodata or outside the AOI's shape", seconds, result.windows_per_s,
             result.megapixels_per_s)
    return result


def encode_probabilities(p: np.ndarray, valid: np.ndarray, kind: str) -> np.ndarray:
    """Probabilities (HW or CHW) as the confidence/probability rasters store them: ``uint8``
    percent with 255 where not ``valid``, or ``float32`` 0-1 with NaN there (always a copy)."""
    if kind == "uint8":
        out = np.rint(p * 100).astype(np.uint8)
        out[..., ~valid] = 255
    else:
        out = p.astype(np.float32)  # a copy: the strip is not changed
        out[..., ~valid] = np.nan
    return out


def cropped(sink: Callable[..., None], row0: int, col0: int, height: int, width: int) -> Callable[..., None]:
    """``sink`` (see :func:`run_grid`) fed only rows ``[row0, row0 + height)`` and columns
    ``[col0, col0 + width)`` of each strip, renumbered from 0."""

    def inner(row: int, idx: np.ndarray, conf: np.ndarray, valid: np.ndarray, probs: np.ndarray) -> None:
        lo, hi = max(row, row0), min(row + idx.shape[0], row0 + height)
        if hi > lo:
            r, c = slice(lo - row, hi - row), slice(col0, col0 + width)
            sink(lo - row0, idx[r, c], conf[r, c], valid[r, c], probs[:, r, c])

    return inner


def _progress_bar(total: int, name: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="win", file=sys.stderr, leave=False, dynamic_ncols=True)


#: Seconds between two progress lines of a run whose stderr is not a terminal (``progress="log"``).
PROGRESS_LOG_S = 60.0


class _ProgressLog:
    """Progress as log lines, at most one per ``every`` seconds (the first after ``every``): for a
    log file, where a tqdm bar printed nothing until the run ended (a long run looked hung)."""

    def __init__(self, total: int, name: str, every: float | None = None) -> None:
        self.total, self.name, self.done = total, name, 0
        self.every = PROGRESS_LOG_S if every is None else every
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every or self.done >= self.total:
            return
        self.last = now
        spent = now - self.t0
        left = spent * (self.total - self.done) / max(self.done, 1)
        log.info("%s: %d of %d windows (%d%%) in %.0f s, about %.0f s left", self.name, self.done, self.total,
                 100 * self.done // max(self.total, 1), spent, left)

    def close(self) -> None:
        pass


# ---- scene description (geoseg info) and memory --------------------------------------------
# predict's peak resident memory on CPU (Paddle Inference, oneDNN) is, besides the blending strip
# and the prefetched reads, a base plus a working set that grows with the pixels of a batch, for
# the shared part of the graph and for each member of a seed ensemble. Fitted to peak RSS
# (/usr/bin/time -v, 2 cores) of `geoseg -q predict --vector none` over a 2,048² mirror-tiling of
# the NC sample (5 uint8 bands, 7 classes), the cards' overlap 32, the export cache warm:
#
#   model (members)        128 px batch 4   128 px batch 1   512 px   1,024 px   2,048 px (batch 1)
#   deeplabv3p (2)             753 MB           634 MB      1,069 MB   2,172 MB   5,217 MB
#   unet (3)                   780 MB           639 MB      1,222 MB   2,565 MB   7,523 MB
#   deeplabv3p, 1 member       712 MB                         928 MB              3,735 MB
#   deeplabv3p, 3 members      830 MB                       1,208 MB              6,680 MB
#   unet, 1 member             661 MB                         956 MB              4,044 MB
#
# (the 1- and 3-member rows: the shipped weights' members split or repeated). The estimate lies
# within 11 % of the shipped models' peaks above (13 % of all). Each member adds about 140 MB per
# 512² window and 1,470 MB (DeepLabv3+) to 1,740 MB (UNet) per 2,048² window: a 2,048-px window
# holds 5-8 GB, a 4,096-px one about 20 GB (the shipped DeepLabv3+ on the NC sample: 18.8 GB).
#: Resident memory of the runtime and the process before any window.
RUNTIME_BASE_MB = 630.0
#: Each further member of a seed ensemble, whatever the window (its weights and graph).
RUNTIME_PER_MEMBER_MB = 20.0
#: The working set per 512² window of a batch, shared by the members ...
RUNTIME_PER_WINDOW_MB = 70.0
#: ... and for each member.
RUNTIME_PER_MEMBER_WINDOW_MB = 110.0


def card_members(card: ModelCard) -> int:
    """Networks in the model of ``card``: its seed ensemble's ``members``, else 1."""
    return int(card.params.get("members", 1))


def memory_estimate_mb(tile: int, batch_size: int, *, height: int, width: int, bands: int, itemsize: int,
                       num_classes: int, members: int = 1, window: tuple[int, int] | None = None,
                       gpu: bool = False, kept_windows: int = 0) -> float:
    """predict's peak resident memory on CPU (MB) over a ``height`` × ``width`` region in windows of
    ``tile`` px, ``batch_size`` per model call: the runtime (measured, see the table above), the
    blending strip of one window row (``classes × tile × width`` float32 plus weights and masks)
    and the prefetched batches (raw ``itemsize`` and float32 ``bands`` per pixel). ``window``: the
    model input (height, width) when it is not ``tile × tile`` (see :func:`scene_grid`). ``gpu``: the
    host memory of a GPU run (the model and its activations live on the GPU: the runtime counts its
    base only). ``kept_windows``: windows of class probabilities that prior adaptation keeps for the
    main pass (at most :data:`PRIOR_KEEP_MB`)."""
    wh, ww = window or (tile, tile)
    windows = batch_size * wh * ww / 512**2  # the pixels of a batch in 512² windows
    runtime = RUNTIME_BASE_MB if gpu else (
        RUNTIME_BASE_MB + RUNTIME_PER_MEMBER_MB * (members - 1)
        + (RUNTIME_PER_WINDOW_MB + RUNTIME_PER_MEMBER_WINDOW_MB * members) * windows)
    strip_mb = (num_classes * 4 + 4 + 1 + 1) * min(tile, height) * width / 2**20
    reads_mb = 3 * batch_size * bands * wh * ww * (itemsize + 4) / 2**20
    kept_mb = min(PRIOR_KEEP_MB, kept_windows * num_classes * wh * ww * 4 / 2**20)
    return runtime + strip_mb + reads_mb + kept_mb


def _cgroup_memory(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """``(limit, usage)`` in bytes of the tightest memory limit of this process's control groups (v2's
    ``memory.max``, v1's ``memory.limit_in_bytes``, from its own group up to the root), or None without one:
    a container's ``--memory`` or a Kubernetes pod's limit, which psutil's machine-wide figures do not see
    (a run past it is killed without a word)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, int] | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in parts[1].split(","):
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        d = base / parts[2].lstrip("/")
        while True:
            try:
                text = (d / limit_file).read_text().strip()
                if text != "max" and int(text) < 1 << 60:
                    limit, usage = int(text), int((d / usage_file).read_text().strip())
                    usage -= _inactive_file(d / "memory.stat")  # (page cache the kernel reclaims: as docker stats)
                    if best is None or limit - usage < best[0] - best[1]:
                        best = (limit, usage)
            except (OSError, ValueError):
                pass
            if d == base or d.parent == d or base not in d.parents:
                break
            d = d.parent
    return best


def _inactive_file(stat_file: Path) -> int:
    """Bytes of reclaimable page cache in a control group's ``memory.stat`` (v2 ``inactive_file``, v1
    ``total_inactive_file``), 0 where it cannot be read: its usage counts the cache of every file a long
    batch read, which left no memory "available" and warned on every scene."""
    try:
        fields = dict(line.split() for line in stat_file.read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return 0
    for key in ("total_inactive_file", "inactive_file"):
        if fields.get(key, "").isdigit():
            return int(fields[key])
    return 0


def physical_memory_mb() -> float:
    """The memory this process may use (MB): the machine's physical memory (psutil, as train's memory
    checks), or its control group's limit where smaller (a container's)."""
    import psutil

    total = psutil.virtual_memory().total
    group = _cgroup_memory()
    return min(total, group[0]) / 2**20 if group else total / 2**20


def available_memory_mb() -> float:
    """Memory available to a new process now (MB; psutil), or left under its control group's limit where less."""
    import psutil

    free = psutil.virtual_memory().available
    group = _cgroup_memory()
    return min(free, max(0, group[0] - group[1])) / 2**20 if group else free / 2**20


#: Address space (MB) Paddle Inference maps before any data (its libraries, threads and arenas: 1.73 GB at the
#: peak of the sample's predict with one thread, Paddle 3.3.1): under a smaller ``ulimit -v`` it hung for good
#: in its thread pool (SIGTERM could not stop it) or died of a segmentation fault.
ADDRESS_SPACE_MIN_MB = 1800


def address_space_limit_mb() -> float | None:
    """This process's address-space limit (``ulimit -v``, MB), or None when unlimited."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft / 2**20


def check_address_space() -> None:
    """Refuse to load Paddle Inference under an address-space limit it cannot start in (see
    :data:`ADDRESS_SPACE_MIN_MB`): one line instead of a hang or a crash.

    Raises:
        ParameterError: the limit is below :data:`ADDRESS_SPACE_MIN_MB`.
    """
    limit = address_space_limit_mb()
    if limit is not None and limit < ADDRESS_SPACE_MIN_MB:
        raise ParameterError(f"this process may map only {limit:,.0f} MB of address space (ulimit -v), and PaddlePaddle "
                             f"maps about {ADDRESS_SPACE_MIN_MB:,} MB before any data (below it, it hangs or crashes): "
                             "raise the limit by a few GB, or remove it (ulimit -v unlimited)")


#: The most windows one predict runs: 4,000,000 (a 192,000-px square scene in the shipped models' 128-px windows, days
#: of model time on a CPU). A 45 MB sparse GeoTIFF declaring 1,000,000 x 1,000,000 pixels (an upload to a nightly
#: batch) grew to 7.8 GB listing its 108 million windows, and would have run for months.
MAX_WINDOWS = 4_000_000


def max_windows() -> int:
    """The most windows one predict runs: ``GEOSEG_MAX_WINDOWS`` where set (a larger scene on purpose), else
    :data:`MAX_WINDOWS`.

    Raises:
        ParameterError: ``GEOSEG_MAX_WINDOWS`` is not a positive whole number.
    """
    text = os.environ.get("GEOSEG_MAX_WINDOWS", "").strip()
    if not text:
        return MAX_WINDOWS
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ParameterError(f"GEOSEG_MAX_WINDOWS={text!r}: give a whole number of windows, e.g. 10000000")
    return int(text)


def check_window_count(meta: Any, grid: Any) -> None:
    """Refuse a scene of more than :func:`max_windows` windows in one line, before any work.

    Raises:
        SceneError: naming the scene's size and the windows it would need.
    """
    most = max_windows()
    if len(grid) > most:
        raise SceneError(
            f"{meta.path.name} is {meta.width:,} x {meta.height:,} pixels: {len(grid):,} windows of {grid.tile} px, more "
            f"than one predict runs ({most:,}): cut it into parts (gdal_translate -srcwin), give a larger --tile-size, "
            "or raise the limit (GEOSEG_MAX_WINDOWS)")


def check_memory(estimate_mb: float, window: tuple[int, int], batch_size: int) -> None:
    """Refuse a predict run whose memory estimate exceeds the machine's physical memory (it would
    be killed, after minutes and without a word); warn when it exceeds the memory available now.
    ``window``: the model input (height, width)."""
    what = (f"{window[0]}-px windows" if window[0] == window[1] else f"{window[1]}x{window[0]}-px windows") + \
        f" at batch {batch_size}"
    total = physical_memory_mb()
    if estimate_mb > total:
        group = _cgroup_memory()
        whose = ("the memory limit of this process's container (control group):"
                 if group is not None and group[0] / 2**20 <= total + 1 else "this machine's")
        raise ParameterError(
            f"predict would need about {estimate_mb:,.0f} MB of memory with {what}, more than {whose} "
            f"{total:,.0f} MB: lower --tile-size or --batch-size (geoseg info --tile-size N shows the estimate)")
    limit = address_space_limit_mb()
    if limit is not None and ADDRESS_SPACE_MIN_MB <= limit < ADDRESS_SPACE_MIN_MB + estimate_mb:  # (below: refused)
        warn(f"this process may map only {limit:,.0f} MB of address space (ulimit -v): PaddlePaddle maps about "
             f"{ADDRESS_SPACE_MIN_MB:,} MB and this run about {estimate_mb:,.0f} MB more; it may fail or hang: raise "
             "the limit", PerformanceWarning)
    free = available_memory_mb()
    if estimate_mb > free:
        warn(
            f"predict may need about {estimate_mb:,.0f} MB of memory with {what}, more than the {free:,.0f} MB "
            "available now: it may be slow or killed; lower --tile-size or --batch-size, or free memory",
            PerformanceWarning)


def default_batch_size(device: str, tile: int) -> int:
    """Windows per model call when none is asked for: on a GPU 8 windows of 512 px or less, fewer larger
    ones (the pixels of 8 × 512², at least 1: 2 at 1,024 px; 8 windows of 2,048 px would hold 16 times
    the activations in GPU memory); on CPU about 256² pixels per call (1 for windows of 256 px and
    more, 4 for the shipped models' 128 px windows): each call to Paddle Inference costs a fixed time
    that small windows feel (2,048² scene, shipped UNet, 128/32 windows, 2 cores: 24.4 s at batch 1,
    20.3 s at batch 4, 21.3 s at batch 8; the same mask), while larger windows gain nothing past
    batch 1 and only hold more memory."""
    if device.startswith("gpu"):
        return max(1, min(8, round(8 * (512 / tile) ** 2)))
    return max(1, min(8, round((256 / tile) ** 2)))


#: Windows :func:`time_model` runs (after one warm-up call), and how many it reads at most to find them.
TIME_WINDOWS = 8
TIME_READ_LIMIT = 200


def time_model(meta: SceneMeta, source: ModelSource, grid: TileGrid, bands: Sequence[int], windows: int = TIME_WINDOWS,
               device: Device = "auto", batch_size: int | None = None,
               within: Window | None = None) -> dict[str, Any] | None:
    """Time the model predict would run on up to ``windows`` of the scene's windows that hold data (those
    nearest the centre of the scene, or of ``within``, an AOI's window, among the windows meeting it; at
    most :data:`TIME_READ_LIMIT` are read to find them), in batches of ``batch_size`` (default: predict's),
    after one warm-up call: ``{"device", "windows_timed", "batch_size", "seconds_per_window"}``, or None
    when no window read holds data. The model alone: a run adds its start and 10-40 % for reading,
    blending and writing."""
    import heapq

    from rasterio.windows import intersect

    predictor, desc = build_predictor(source, device)
    batch = batch_size or default_batch_size(desc, grid.tile)
    box = within if within is not None else Window(0, 0, meta.width, meta.height)
    cy, cx = box.row_off + box.height / 2, box.col_off + box.width / 2
    tiles = (t for t in grid.tiles() if within is None or intersect(t.window, within))
    near = heapq.nsmallest(TIME_READ_LIMIT, tiles,
                           key=lambda t: (t.row + t.height / 2 - cy) ** 2 + (t.col + t.width / 2 - cx) ** 2)
    ready = []
    for t in near:
        x, _ = _prepare_window(meta, t, tuple(bands), source.card, grid.model_shape)
        if x is not None:
            ready.append(x)
            if len(ready) == windows:
                break
    if not ready:
        return None
    predictor(np.stack(ready[:batch]))  # (the first call builds the kernels: not a run's pace)
    t0 = time.perf_counter()
    for i in range(0, len(ready), batch):
        predictor(np.stack(ready[i:i + batch]))
    seconds = time.perf_counter() - t0
    return {"device": desc, "windows_timed": len(ready), "batch_size": batch,
            "seconds_per_window": round(seconds / len(ready), 5)}


@checked_arguments
def describe_scene(
    input_path: str | Path, tile: int | None = None, overlap: int | None = None, num_classes: int | None = None,
    batch_size: int | None = None, *, source: ModelSource | None = None, bands: Sequence[int] | None = None,
    aoi: str | Path | None = None, timed: bool = False,
) -> dict[str, Any]:
    """What predict will see: size, bands, dtype, CRS, nodata, window grid, memory estimate.

    With ``source`` (the model predict would run) the window size, overlap and class count
    default to its card's, as in predict, and the result says which scene bands the model
    reads (``bands`` as predict's ``--bands``) or why it cannot read them, and how far the
    scene's values lie from the model's training data (see :func:`check_input_range`, which
    also warns). Without one: 512-pixel windows, overlap 128, 7 classes.

    A window larger than the scene shrinks as in predict (:func:`scene_tile`; ``tile_size_asked``
    then says the size asked for). The memory estimate is :func:`memory_estimate_mb`, the one
    predict checks against the machine's memory before it starts.
    With ``aoi`` (as predict's ``--aoi``), ``aoi`` says which part of the scene predict writes
    and how many windows it runs. With ``timed`` (and a model that can read the scene), ``time`` is
    :func:`time_model`'s timing on this machine plus ``model_seconds``, the model's time for the
    windows predict would run (an upper bound where many hold no data: those are skipped in well under
    a millisecond each), or None when no window near the centre holds data.
    """
    meta = open_scene(input_path)
    area = load_aoi(aoi, meta) if aoi is not None else None
    model: dict[str, Any] | None = None
    ground = meta.ground_pixel_m()
    if source is not None:
        mc = source.card
        num_classes = num_classes or mc.num_classes
        model = {"name": mc.name, "architecture": mc.architecture, "bands": list(mc.bands),
                 "scene_bands": None, "problem": None, "input_z": None, "pixel_size": mc.pixel_size,
                 "resolution_mismatch": resolution_mismatch(ground, mc)}
        check_resolution(meta, mc, ground)
        try:
            chosen = select_bands(meta, mc, bands)
        except SceneError as e:
            model["problem"] = str(e)
        else:
            model["scene_bands"] = list(chosen)
            meta = meta.for_bands(chosen)  # (as predict reads them: a band tagged alpha read as data masks nothing)
            z = check_input_range(meta, chosen, mc)
            if z is not None:
                model["input_z"] = {k: round(v, 2) for k, v in z.items()}
    card = source.card if source is not None else None
    asked = tile or (card.tile_size if card is not None else 512)
    grid = scene_grid(meta, card, tile, overlap)
    tile, overlap = grid.tile, grid.overlap
    num_classes = num_classes or 7
    asked_batch = batch_size
    batch_size = batch_size or default_batch_size("cpu", tile)
    aoi_info = None
    run_height, run_width = meta.height, meta.width
    if area is not None:
        sub, region = grid.covering(area.window)
        w = area.window
        aoi_info = {"source": area.source, "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)],
                    "megapixels": round(w.width * w.height / 1e6, 3),
                    # predict's rule (io.read_scene_window): a window runs when it holds an AOI pixel centre
                    "windows": sum(area.pixels(Window(t.col + region.col_off, t.row + region.row_off, t.width,
                                                      t.height)) is not False for t in sub.tiles())}
        run_height, run_width = int(region.height), int(region.width)
    read_bands = model["scene_bands"] if model is not None and model["scene_bands"] else meta.data_bands
    est = memory_estimate_mb(tile, batch_size, height=run_height, width=run_width, bands=len(read_bands),
                             itemsize=np.dtype(meta.dtype).itemsize, num_classes=num_classes,
                             members=card_members(card) if card is not None else 1, window=grid.model_shape,
                             kept_windows=min(PredictOptions.prior_windows, len(grid))
                             if card is not None and card.adapt_prior else 0)
    masked = any("per_dataset" in f for f in meta.mask_flags)
    mask_band = ("mask file " + Path(f"{meta.path}.msk").name if not is_virtual(meta.path)
                 and os.path.exists(f"{meta.path}.msk") else "internal mask")
    nodata = (
        "values " + ", ".join(f"{v}" for v in meta.nodatavals)
        if len(set(map(str, meta.nodatavals))) > 1
        else f"value {meta.nodata}" + (f", alpha band {meta.alpha_band}" if meta.alpha_band is not None else
                                       f", {mask_band}" if masked else "")
        if meta.nodata is not None
        else f"alpha band {meta.alpha_band}" if meta.alpha_band is not None
        else f"none (band {meta.alpha_as_data}, tagged alpha, is read as data)" if meta.alpha_as_data is not None
        else mask_band if masked
        else "NaN" if meta.dtype.startswith("float") else "none"
    )
    out = {
        "path": str(meta.path),
        "width": meta.width,
        "height": meta.height,
        "bands": meta.count,
        "data_bands": list(meta.data_bands),
        "band_descriptions": [d or "" for d in meta.descriptions],
        "dtype": meta.dtype,
        "crs": meta.crs.to_string() if meta.crs else None,
        # unrectified scenes: how they are placed instead ('4 ground control points', 'RPCs')
        "georeferenced_by": "geotransform" if meta.crs else (georeferencing(meta) or None),
        # in the CRS's units; a scene placed by GCPs: of the transform fitted to them; None: not georeferenced
        "pixel_size": list(meta.res) if meta.crs is not None or not meta.transform.is_identity else (
            None if meta.gcp_transform() is None else list(dataclasses.replace(meta, transform=meta.gcp_transform()).res)),
        # a pixel's ground size in metres (geodesic in the middle row on a geographic CRS, at the centre on Web Mercator)
        "ground_pixel_m": None if ground is None else round(ground, 3),
        "transform": list(meta.transform)[:6],
        "nodata": nodata,
        "tile_size": tile,
        # the window size asked for (or the card's), when the scene needs a smaller one (see scene_tile)
        "tile_size_asked": asked if asked != tile else None,
        "overlap": overlap,
        # what each window reaches the model as (height, width): tile x tile unless the scene is shorter
        "model_input": list(grid.model_shape),
        "window_grid": list(grid.shape),
        "windows": len(grid),
        "megapixels": round(meta.width * meta.height / 1e6, 3),
        "memory_estimate_mb": round(est),
        "batch_size": batch_size,
        "model": model,
        "aoi": aoi_info,
        "time": None,
    }
    if timed and source is not None and model is not None and model["scene_bands"]:
        timing = time_model(meta, source, grid, model["scene_bands"], batch_size=asked_batch,
                            within=area.window if area is not None else None)
        if timing is not None:
            runs = aoi_info["windows"] if aoi_info is not None else len(grid)
            timing["windows"] = runs
            timing["model_seconds"] = round(timing["seconds_per_window"] * runs, 1)
        out["time"] = timing
    return out
