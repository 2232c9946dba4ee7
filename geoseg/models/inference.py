"""Fast inference: export a model to a static graph and run it with Paddle Inference.

Two predictors share one call signature — float32 NCHW batch in, float32 NCHW logits out —
so the engine can take either:

* :class:`InferencePredictor` runs an exported graph (:func:`export_model`) through
  ``paddle.inference`` with oneDNN on CPU (4–6× faster than dygraph) or CUDA on GPU, with
  optional FP16 mixed precision on GPU.
* :class:`DygraphPredictor` runs the ``paddle.nn.Layer`` directly (no export step; slower
  on CPU, handy for freshly trained models and as a reference).

Paddle 3.x exports a PIR program ``<prefix>.json``; Paddle 2.6 exports ``<prefix>.pdmodel``.
Both come with ``<prefix>.pdiparams`` and both are read by :func:`find_model_files`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from geoseg.errors import ModelError, PerformanceWarning, require_paddle, signals_deferred, warn

if TYPE_CHECKING:  # pragma: no cover
    import paddle

__all__ = [
    "DygraphPredictor",
    "InferencePredictor",
    "Precision",
    "export_model",
    "find_model_files",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]

#: Program file suffixes, preferred first (PIR JSON from Paddle 3.x, protobuf from 2.x).
PROGRAM_SUFFIXES: tuple[str, ...] = (".json", ".pdmodel")
PARAMS_SUFFIX = ".pdiparams"

# Paddle Inference 3.3 with oneDNN: this pass turns interpolate's float-array attribute into
# a runtime attribute it cannot convert ("ConvertPirAttribute2RuntimeAttribute not support
# ArrayAttribute<DoubleAttribute>"), failing every F.interpolate.  Without it outputs match
# dygraph to ~1e-6 and oneDNN still accelerates the convolutions.
_BROKEN_ONEDNN_PASSES: tuple[str, ...] = ("onednn_placement_pass",)


@contextlib.contextmanager
def _writable_home(scratch: Path) -> Iterator[None]:
    """Paddle's to_static writes its generated code under ``~/.cache/paddle`` (``$HOME``), whatever
    the export's own folder: with a home that cannot be written (a container, a cron or service
    user) every first predict failed. HOME points at a scratch folder beside the export for the
    call when ``~/.cache`` cannot be made or written; it is removed afterwards."""
    cache = Path(os.path.expanduser("~/.cache"))
    try:
        if not cache.is_absolute():  # no home (HOME unset, no passwd entry): "~/.cache" made in the working folder
            raise FileNotFoundError(f"no home folder for {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK | os.X_OK)
        if writable:  # (os.access says yes to root on a read-only or virtual file system)
            probe = cache / f".geoseg-probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
    except OSError:
        writable = False
    if writable:
        yield
        return
    home = Path(tempfile.mkdtemp(prefix=".geoseg-home-", dir=scratch))
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    logger.debug("%s cannot be written: paddle's to_static writes under %s for this export", cache, home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


#: One export at a time in a process: Paddle's to_static translation is not thread-safe (two threads'
#: first predicts failed with "Not found key in IRMapping" or "The block obtained before and after calling
#: the static API name is inconsistent"), and a HOME pointed at a scratch folder is the whole process's.
#: Reentrant: :func:`geoseg.engine.exported_for_inference` holds it around its check, build and export.
EXPORT_LOCK = threading.RLock()


def export_model(model: paddle.nn.Layer, path_prefix: str | Path, in_channels: int) -> Path:
    """Export ``model`` as a static inference graph with dynamic batch and image size.

    The model is switched to eval mode for the export (and put back in training mode
    afterwards if it was training).  The input spec is ``[None, in_channels, None, None]``
    float32 (NCHW); the graph's first output is the main logits ``[N, num_classes, H, W]``.

    Args:
        model: The network (returning a list of logits, main first).
        path_prefix: Output path without suffix, e.g. ``out/model``; its folder is created.
            Paddle writes ``<prefix>.json`` (3.x) or ``<prefix>.pdmodel`` (2.x) plus
            ``<prefix>.pdiparams``.
        in_channels: Number of input bands ``C``.

    Returns:
        The folder holding the exported files.

    Raises:
        ModelError: The export fails.
    """
    paddle = require_paddle()
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spec = paddle.static.InputSpec([None, in_channels, None, None], "float32", name="x")  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    try:
        with EXPORT_LOCK, _writable_home(prefix.parent), signals_deferred():
            paddle.jit.save(model, str(prefix), input_spec=[spec])  # type: ignore[attr-defined]
    except Exception as exc:
        if _interrupted(exc):  # Ctrl-C inside Paddle's program translation comes back as its error
            raise KeyboardInterrupt from None
        from geoseg.atomic import file_size_limit, too_large

        if too_large(exc) and (limit := file_size_limit()) is not None:  # (Paddle 2.6 says EFBIG; 3.x cuts short)
            raise _too_large(prefix, limit) from None
        lines = [t.strip() for t in str(exc).splitlines() if t.strip()] or [""]
        # (Paddle's dy2static errors quote the translated code's traceback, the error itself last)
        said = lines[-1] if lines[0].startswith("In transformed code") else lines[0]
        raise ModelError(f"cannot export the model to {prefix}: {type(exc).__name__}: {said}") from exc
    finally:
        if was_training:
            model.train()
    _check_written(prefix)
    logger.debug("exported inference model to %s.*", prefix)
    return prefix.parent


def _check_written(prefix: Path) -> None:
    """Refuse an export that Paddle cut short without an error: past the file-size limit (``ulimit -f``) its
    files end at the limit, and a cached export of them broke every later predict ("parse error at line 1,
    column 102401").

    Raises:
        NoRoomError: a file reached the limit (``file_size_limit`` set on the error).
        ModelError: the program file is not whole (its JSON does not parse).
    """
    from geoseg.atomic import file_size_limit

    files = [p for p in prefix.parent.glob(f"{prefix.name}.*") if p.is_file()]
    limit = file_size_limit()
    if limit is not None and any(p.stat().st_size >= limit for p in files):
        raise _too_large(prefix, limit)
    program = prefix.with_suffix(".json")
    if program.is_file() and not _whole_program(program):
        raise ModelError(f"cannot export the model to {prefix}: Paddle wrote {program.name} only in part "
                         "(a full disk?): free some space and run again")


def _too_large(prefix: Path, limit: int) -> Exception:
    """The one-line error of an export past the file-size limit (``file_size_limit`` set on it)."""
    from geoseg.errors import NoRoomError

    err = NoRoomError(f"cannot export the model to {prefix}: file too large: this process may not write files "
                      f"over {limit} bytes (ulimit -f), and the model's files are larger: raise the limit")
    err.file_size_limit = limit  # type: ignore[attr-defined]
    return err


def _whole_program(program: Path) -> bool:
    """Whether a ``.json`` program file parses (a ``.pdmodel`` cannot be told: True)."""
    import json

    if program.suffix != ".json":
        return True
    try:
        json.loads(program.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def damaged_export(folder: Path) -> bool:
    """Whether an export folder's files are damaged: missing, an empty parameters file, a program file
    that does not parse (what a write cut short leaves), or, for geoseg's cached exports, a file whose size
    differs from the one its ``DONE`` file recorded."""
    import json

    try:
        program, params = find_model_files(folder)
        if params.stat().st_size == 0 or not _whole_program(program):
            return True
        try:
            sizes = json.loads((folder / "DONE").read_text(encoding="utf-8")).get("sizes", {})
        except (OSError, ValueError, AttributeError):  # (none, or an older geoseg's "ok")
            sizes = {}
        return any((folder / name).stat().st_size != size for name, size in sizes.items())
    except (OSError, ModelError):
        return True


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` stands for a ``KeyboardInterrupt``: one in its cause or context chain (Paddle turns an
    interrupt pending inside a C call into a ``SystemError`` "returned a result with an exception set") or
    named in its message (its dy2static errors carry the original traceback as text)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def find_model_files(directory_or_prefix: str | Path) -> tuple[Path, Path]:
    """Locate an exported program file and its parameters file.

    Args:
        directory_or_prefix: A folder holding ``model.json``/``model.pdmodel`` (or a single
            ``*.json``/``*.pdmodel`` with a ``.pdiparams`` of the same stem), or an export
            prefix such as ``out/model``, or the program file itself.

    Returns:
        ``(program_file, params_file)``.

    Raises:
        ModelError: No (or more than one candidate) program/params pair is found.
    """
    path = Path(directory_or_prefix)
    if path.is_dir():
        for stem in ("model", "inference"):
            pair = _pair(path / stem)
            if pair is not None:
                return pair
        pairs = [
            p for f in sorted(path.iterdir()) if f.suffix in PROGRAM_SUFFIXES
            if (p := _pair(f.with_suffix(""))) is not None
        ]
        pairs = list(dict.fromkeys(pairs))
        if len(pairs) == 1:
            return pairs[0]
        if not pairs:
            raise ModelError(
                f"no exported model in {path}: expected model.json or model.pdmodel with "
                f"model{PARAMS_SUFFIX} (export one with geoseg export)"
            )
        raise ModelError(
            f"{len(pairs)} exported models in {path} ({', '.join(p[0].name for p in pairs)}): "
            "give the file prefix instead of the folder"
        )
    prefix = path.with_suffix("") if path.suffix in (*PROGRAM_SUFFIXES, PARAMS_SUFFIX) else path
    pair = _pair(prefix)
    if pair is None:
        raise ModelError(
            f"no exported model at {path}: expected {prefix}.json or {prefix}.pdmodel "
            f"with {prefix}{PARAMS_SUFFIX} (export one with geoseg export)"
        )
    return pair


def _pair(prefix: Path) -> tuple[Path, Path] | None:
    params = prefix.with_name(prefix.name + PARAMS_SUFFIX)
    if not params.is_file():
        return None
    for suffix in PROGRAM_SUFFIXES:
        program = prefix.with_name(prefix.name + suffix)
        if program.is_file():
            return program, params
    return None


def _parse_device(device: str) -> tuple[str, int]:
    """Split ``"cpu"``, ``"gpu"`` or ``"gpu:N"`` into (kind, device id)."""
    kind, _, index = device.strip().lower().partition(":")
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ModelError(f"device must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")
    return kind, int(index or 0)


def _check_precision(precision: str, kind: str) -> bool:
    """Validate ``precision``; return whether FP16 is to be used (GPU only)."""
    if precision not in ("fp32", "fp16"):
        raise ModelError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if precision == "fp16" and kind == "cpu":
        warn("FP16 was requested on CPU: running FP32 instead", PerformanceWarning)
        return False
    return precision == "fp16"


def _check_gpu(paddle: Any, device: str) -> None:
    if not paddle.is_compiled_with_cuda():
        raise ModelError(
            f"device {device!r} needs a CUDA build of PaddlePaddle (paddlepaddle-gpu): "
            "install one or use device='cpu'"
        )


def amp_fp16_supported(paddle: Any, device_id: int = 0) -> bool:
    """Whether Paddle's FP16 autocast runs on the GPU ``device_id``: it needs compute capability 7.0 or
    higher, and below it Paddle turns autocast off with a plain UserWarning (P100, P4/P40, GTX 10xx ran
    fp32 while geoseg said fp16)."""
    major = paddle.device.cuda.get_device_capability(device_id)[0]
    return int(major) >= 7


def _check_batch(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", None)
        raise ModelError(f"predictor input must be an NCHW array, got shape {shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class InferencePredictor:
    """Run an exported graph with Paddle Inference: float32 NCHW in, float32 NCHW logits out.

    Successive calls may use different batch sizes and image sizes.  Not thread-safe: use
    one instance per thread, or one call at a time (:func:`geoseg.engine.build_predictor`'s
    predictor takes a lock around it).
    """

    def __init__(
        self,
        model_file: str | Path,
        params_file: str | Path,
        device: str = "cpu",
        precision: Precision = "fp32",
        threads: int | None = None,
    ) -> None:
        """Build the Paddle Inference predictor.

        Args:
            model_file: Program file (``.json`` or ``.pdmodel``), see :func:`find_model_files`.
            params_file: Parameters file (``.pdiparams``).
            device: ``"cpu"``, ``"gpu"`` or ``"gpu:N"``.
            precision: ``"fp32"`` or ``"fp16"`` (GPU mixed precision; on CPU a
                :class:`~geoseg.errors.PerformanceWarning` is issued and FP32 is used).
            threads: CPU math threads (default ``os.cpu_count()``); ignored on GPU.

        Raises:
            ModelError: Missing files, bad device/precision, GPU requested on a CPU-only
                build, or Paddle cannot load the graph.
        """
        paddle = require_paddle()
        from paddle import inference as pi

        model_file, params_file = Path(model_file), Path(params_file)
        for f in (model_file, params_file):
            if not f.is_file():
                raise ModelError(f"exported model file {f} does not exist: run export_model first")
        kind, device_id = _parse_device(device)
        fp16 = _check_precision(precision, kind)
        config = pi.Config(str(model_file), str(params_file))
        config.disable_glog_info()
        # No enable_memory_optim(): with PIR programs (Paddle 3.3) it makes create_predictor
        # fail ("Not find predictor_id 0 and pass_name memory_optimize_pass").
        if kind == "gpu":
            _check_gpu(paddle, device)
            if fp16:
                # Mixed precision: weights and most ops in FP16, inputs/outputs stay FP32.
                config.enable_use_gpu(256, device_id, pi.PrecisionType.Half)
            else:
                config.enable_use_gpu(256, device_id)
        else:
            config.disable_gpu()
            if hasattr(config, "enable_onednn"):
                config.enable_onednn()
            else:  # Paddle 2.x
                config.enable_mkldnn()
            for name in _BROKEN_ONEDNN_PASSES:
                config.delete_pass(name)
            n_threads = threads if threads is not None else (os.cpu_count() or 1)
            if n_threads < 1:
                raise ModelError(f"threads must be >= 1, got {threads!r}")
            config.set_cpu_math_library_num_threads(int(n_threads))
        try:
            self._predictor = pi.create_predictor(config)
        except Exception as exc:
            # (Paddle's message runs over several lines, with a C++ hint and source path: its first line only)
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ModelError(f"Paddle Inference cannot load {model_file} with {params_file.name}: {first}: the "
                             "export may be truncated or corrupt, or from a newer Paddle; export it again "
                             "(geoseg export)") from exc
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])
        self.device = device
        self.precision: Precision = "fp16" if fp16 else "fp32"
        logger.debug("Paddle Inference predictor on %s (%s) for %s", device, self.precision, model_file)

    @classmethod
    def from_dir(cls, directory_or_prefix: str | Path, **kwargs: Any) -> InferencePredictor:
        """Build a predictor from an export folder or prefix (see :func:`find_model_files`).

        Args:
            directory_or_prefix: Export folder or prefix.
            **kwargs: ``device``, ``precision``, ``threads`` as for the constructor.

        Returns:
            The predictor.
        """
        return cls(*find_model_files(directory_or_prefix), **kwargs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Predict logits for a batch.

        Args:
            x: Float32 array ``[N, C, H, W]`` (other dtypes are converted).

        Returns:
            Float32 logits ``[N, num_classes, H, W]`` (the graph's first output).
        """
        x = _check_batch(x)
        self._input.reshape(list(x.shape))
        self._input.copy_from_cpu(x)
        self._predictor.run()
        return np.asarray(self._output.copy_to_cpu(), dtype=np.float32)


class DygraphPredictor:
    """Run a ``paddle.nn.Layer`` eagerly: float32 NCHW in, float32 NCHW logits out.

    The model is put in eval mode and moved to ``device``.
    """

    def __init__(self, model: paddle.nn.Layer, device: str = "cpu", precision: Precision = "fp32") -> None:
        """Wrap ``model``.

        Args:
            model: Network returning a list of logits (main first) or a single tensor.
            device: ``"cpu"``, ``"gpu"`` or ``"gpu:N"``.
            precision: ``"fp32"`` or ``"fp16"`` (``paddle.amp.auto_cast`` O1 on GPU; on CPU a
                :class:`~geoseg.errors.PerformanceWarning` is issued and FP32 is used).

        Raises:
            ModelError: Bad device/precision, or GPU requested on a CPU-only build.
        """
        paddle = require_paddle()
        kind, device_id = _parse_device(device)
        self._fp16 = _check_precision(precision, kind)
        if kind == "gpu":
            _check_gpu(paddle, device)
            if self._fp16 and not amp_fp16_supported(paddle, device_id):
                warn(f"--precision fp16: the GPU {device_id} (compute capability below 7.0) has no FP16 "
                              "autocast in Paddle: running fp32", PerformanceWarning)
                self._fp16 = False
        self._paddle: Any = paddle
        self._place = paddle.CUDAPlace(device_id) if kind == "gpu" else paddle.CPUPlace()  # type: ignore[attr-defined]
        self.model = model
        self.model.eval()
        self.model.to(device=f"gpu:{device_id}" if kind == "gpu" else "cpu")
        self.device = device
        self.precision: Precision = "fp16" if self._fp16 else "fp32"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Predict logits for a batch.

        Args:
            x: Float32 array ``[N, C, H, W]`` (other dtypes are converted).

        Returns:
            Float32 logits ``[N, num_classes, H, W]`` (the model's first output).
        """
        paddle = self._paddle
        x = _check_batch(x)
        with paddle.no_grad():
            tensor = paddle.to_tensor(x, place=self._place)
            if self._fp16:
                with paddle.amp.auto_cast(level="O1"):
                    out = self.model(tensor)
            else:
                out = self.model(tensor)
            if isinstance(out, (list, tuple)):
                out = out[0]
            return np.asarray(out.astype("float32").numpy(), dtype=np.float32)
