"""geoseg's exception tree and warning classes.

Every error geoseg raises on purpose derives from :class:`GeosegError`; most also derive
from a builtin so that callers who only know the builtin still catch them.  Messages are
one line and say what to do next.  This module never imports click: the CLI maps these
classes to exit codes in one place (``geoseg_cli.main``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any


class GeosegError(Exception):
    """Root of all geoseg errors."""


class SceneReadError(GeosegError, OSError):
    """An input raster is missing, unreadable, corrupt or not a raster."""


def gdal_reason(exc: BaseException) -> str:
    """What GDAL said behind ``exc``, in one line: rasterio raises "Read failed. See previous
    exception for details." from GDAL's own errors, the first naming the file and band, the last
    the cause (e.g. "ZIPDecode:Decoding error at scanline 256")."""
    said: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).splitlines()[0].strip() if str(e) else ""
        if text and "see previous exception" not in text.lower() and text not in said:
            said.append(text)
        e = e.__cause__ or e.__context__
    if not said:
        return type(exc).__name__
    return said[0] if len(said) == 1 else f"{said[0]} ({said[-1]})"


class SceneError(GeosegError, ValueError):
    """An input raster is readable but unsuitable (band count, dtype, CRS, size)."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output exists and ``overwrite`` was not given."""


class OutputError(GeosegError, OSError):
    """An output cannot be written (folder missing or not writable, disk full)."""


class NoRoomError(OutputError):
    """An output cannot be written for lack of room: a full disk or quota, or a file past the file-size
    limit (``ulimit -f``). Every later write to the same place would fail the same way."""


class ParameterError(GeosegError, ValueError):
    """A parameter is out of range or inconsistent with another one."""


class AoiOutsideError(ParameterError):
    """The area of interest does not cover any pixel of the scene (``batch`` skips such scenes)."""


class ModelError(GeosegError, ValueError):
    """Unknown model, bad model card, missing or mismatching weights."""


class WeightsError(ModelError):
    """A weights file cannot be loaded into the model (missing, corrupt, shape mismatch)."""


class DependencyError(GeosegError, ImportError):
    """An optional dependency (PaddlePaddle) is not installed."""


class GridMismatchError(GeosegError, ValueError):
    """Two rasters that must share a grid (CRS, transform, size) do not."""


class BatchLockedError(GeosegError, RuntimeError):
    """Another batch run holds the lock of the output folder."""


class ClusterError(GeosegError, RuntimeError):
    """The Dask cluster a batch runs on stopped working under it (its scheduler went away)."""


class RunStoppedError(GeosegError, RuntimeError):
    """The run this work belongs to was stopped (a batch stopped by a signal, its scene cancelled on a
    Dask worker): nothing more is written or published."""


class GeosegWarning(UserWarning):
    """Base class of geoseg's warnings."""


class NoCRSWarning(GeosegWarning):
    """The input has no CRS; outputs keep its transform but are not georeferenced."""


class PerformanceWarning(GeosegWarning):
    """A setting is valid but slow (e.g. FP16 requested on CPU)."""


class WindowSizeWarning(GeosegWarning):
    """The prediction window is far from the window size the model was trained on."""


class InputRangeWarning(GeosegWarning):
    """The scene's band values lie far from those the model was trained on (units, scale, band order)."""


class ResolutionWarning(GeosegWarning):
    """The scene's pixels are much larger or smaller on the ground than the model's training pixels."""


class AreaWarning(GeosegWarning):
    """Areas in the grid's map units are far from ground areas (a Web Mercator grid away from the equator).
    No longer raised: geoseg measures such grids' areas on the ellipsoid (kept for code that filters it)."""


class EvaluationWarning(GeosegWarning):
    """Part of the reference was not counted, or the comparison is weaker than it looks (reference
    samples outside the prediction or without a class, a region clipped to the raster, a sparse sample)."""


class TrainingWarning(GeosegWarning):
    """The labels will not teach the model what the configuration suggests (a class without labelled
    pixels, label values that are not classes, value 0 taken as unlabelled)."""


class BatchWarning(GeosegWarning):
    """A batch run's state or by-products need attention (a damaged manifest, another run's lock, an
    earlier output that cannot be removed, a mosaic split in several or not written)."""


def warn(message: str, category: type[Warning] = GeosegWarning) -> None:
    """:func:`warnings.warn` attributed to the first caller outside geoseg (a notebook cell, a pipeline
    step, the CLI command), however deep in geoseg it is said: ``-W error::...``, ``catch_warnings`` and
    the warning's file and line then name the caller's code. Python's default filter shows it once per
    caller's line and message; the CLI (and ``batch``, for each scene) shows every one."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and _in_geoseg(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _in_geoseg(module: str) -> bool:
    return module == "geoseg" or module.startswith("geoseg.")


#: The stop a signal handler raised in this process (see :func:`note_stop`), or none.
_STOPS: list[BaseException] = []


def note_stop(exc: BaseException) -> BaseException:
    """Record ``exc`` (a ``KeyboardInterrupt`` a signal handler is about to raise) and return it. Raised
    inside paddle's C++ code, it comes out as another error ("SystemError: (Fatal) Call
    static_op_arg_pre_cast_hook failed"): a command then ended "unexpected error" (exit 1) on SIGTERM,
    and a batch took its scene for failed and went on. :func:`noted_stop` tells them it was a stop."""
    _STOPS[:] = [exc]
    return exc


def noted_stop() -> BaseException | None:
    """The stop :func:`note_stop` recorded since :func:`forget_stop`, or None."""
    return _STOPS[0] if _STOPS else None


def forget_stop() -> None:
    """Forget a recorded stop (a command starting)."""
    _STOPS.clear()


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a command cleanly: SIGINT (Ctrl-C), SIGTERM and, where there is one, SIGHUP."""
    import signal

    return (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block with SIGINT's, SIGTERM's and SIGHUP's Python handlers held back: a signal that comes meanwhile
    is handled (its handler called) when the block ends. For paddle's program translation (the export):
    the KeyboardInterrupt a handler raised inside it came back as paddle's own error, or the process died
    of a segmentation fault (a SIGTERM a second into a first predict). Only the main thread can set
    handlers, and only there do they run: elsewhere the block runs as it is."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[tuple[int, Any]] = []
    kept: dict[int, Any] = {}
    for sig in stop_signals():
        handler = signal.getsignal(sig)
        if callable(handler):  # (SIG_DFL, SIG_IGN: the system's, nothing raised in Python)
            kept[sig] = handler
            signal.signal(sig, lambda signum, frame: came.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        if came:  # (SIGTERM or SIGHUP before SIGINT when both came: the stronger request)
            signum, frame = next((c for c in came if c[0] != signal.SIGINT), came[0])
            kept[signum](signum, frame)


#: One import of paddle at a time: a second thread found the half-built module in sys.modules
#: ("partially initialized module 'paddle' has no attribute 'is_compiled_with_cuda'"), and the
#: process state put back after the import is the whole process's.
_PADDLE_LOCK = threading.Lock()
_paddle_ready = False


def require_paddle() -> object:
    """Import and return :mod:`paddle`, or raise :class:`DependencyError` saying how to get it."""
    global _paddle_ready
    if _paddle_ready and sys.modules.get("paddle") is not None:  # (None: marked missing, as a test does)
        return sys.modules["paddle"]
    with _PADDLE_LOCK:
        if sys.modules.get("paddle") is not None:  # imported by the application (Python's own lock waits
            import paddle  # for an import another of its threads has under way)
        else:
            paddle = _import_paddle()
        _paddle_ready = True
        return paddle


#: The most OpenMP threads ``OMP_NUM_THREADS`` may ask for (or 64 per CPU core, where more). Paddle's
#: OpenMP runtime sizes per-thread state by it when paddle loads: 10,000,000 was killed for memory, 2**31-1
#: crashed it (SIGSEGV) in the predictor's creation, with a C++ dump and no word on why.
OMP_THREADS_MAX = 4096


def check_omp_threads() -> None:
    """Refuse an ``OMP_NUM_THREADS`` past :data:`OMP_THREADS_MAX` before paddle loads, in one line.

    (Values that are not numbers are left to the OpenMP runtime, which says so and uses its default.)

    Raises:
        ParameterError: its first value is a number of threads no machine here can run.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    try:
        asked = int(value.split(",")[0])  # ("4,2": threads per nesting level, outermost first)
    except ValueError:
        return
    cores = os.cpu_count() or 1
    most = max(OMP_THREADS_MAX, 64 * cores)
    if asked > most:
        raise ParameterError(
            f"OMP_NUM_THREADS={value} asks for more threads than this machine can run ({cores} CPU cores; past "
            f"{most:,} PaddlePaddle runs out of memory or crashes): set it to {cores} or fewer, or unset it")


def _import_paddle() -> Any:
    check_omp_threads()  # (read by paddle's OpenMP runtime as it loads)
    kept = _ProcessState()
    # Paddle's C++ log (glog) writes "W1130 ..." lines straight to stderr ("PIR not support input out
    # tensor" on every export): errors only unless the user set it; read when paddle is first imported
    # (and put back after, as the rest of the process's state)
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        with warnings.catch_warnings(), _without_paddle_thread_advice():
            warnings.filterwarnings("ignore", message="No ccache found")  # (a C++ compiler cache, for its builds)
            import paddle
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            "PaddlePaddle is not installed: pip install 'paddlepaddle>=3' (the 'cpu' extra of geoseg: "
            "pip install '.[cpu]' in its source folder) or a GPU build (see README, 'gpu' extra)"
        ) from exc
    finally:
        kept.restore()
    if kept.sigterm is None and hasattr(paddle, "disable_signal_handler"):
        # Imported outside the main thread (a Dask task, an application's worker thread), where no Python
        # handler can be set again: paddle's C++ handlers printed a "FatalError" dump to stdout on SIGTERM
        # (a pipeline's stdout). Off, SIGTERM ends the process as it would have without paddle.
        paddle.disable_signal_handler()
    return paddle


@contextlib.contextmanager
def _without_paddle_thread_advice() -> Iterator[None]:
    """Paddle's import prints "WARNING: OMP_NUM_THREADS set to 4, not 1. The computation speed will not be
    optimized if you use data parallel ..." and "PLEASE USE OMP_NUM_THREADS WISELY." on stderr whenever a
    user gives it more than one thread: advice for Paddle's distributed training, not for geoseg. Those two
    lines are left out; everything else written to ``sys.stderr`` meanwhile passes."""
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", "1"))
    except ValueError:
        asked = 1
    if asked <= 1:
        yield
        return
    real = sys.stderr
    sys.stderr = _DropLines(real, ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY"))
    try:
        yield
    finally:
        if isinstance(sys.stderr, _DropLines):
            sys.stderr = real


class _DropLines:
    """A text stream passing every write to ``stream`` but the ones starting with ``prefixes`` (and the
    line end ``print`` writes after them)."""

    def __init__(self, stream: Any, prefixes: tuple[str, ...]) -> None:
        self._stream, self._prefixes, self._dropped = stream, prefixes, False

    def write(self, text: str) -> int:
        if text.startswith(self._prefixes) or (self._dropped and text == "\n"):
            self._dropped = text != "\n"
            return len(text)
        self._dropped = False
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ProcessState:
    """What importing paddle changes for the whole process, put back afterwards (geoseg used as a
    library must not take them over): its SIGTERM handler replaced the application's (a service's
    graceful shutdown, Airflow's on_kill) with a C++ "FatalError" dump, and a stderr handler on the
    root logger at INFO printed every library's INFO lines and made the application's later
    ``logging.basicConfig`` do nothing; and it sets ``OMP_NUM_THREADS=1`` where it was unset, which
    every process the application starts later inherited (numpy, scikit-learn on one core), and which
    geoseg train then took for the user's thread count. (Paddle has read it by then: putting it back
    changes nothing in this process's Paddle.) (The CLI sets its own SIGTERM handler and log levels.)"""

    ENVIRON = ("OMP_NUM_THREADS", "GLOG_minloglevel", "CUSTOM_DEVICE_ROOT")

    def __init__(self) -> None:
        import logging
        import signal
        import threading

        self.root = logging.getLogger()
        self.handlers, self.level = list(self.root.handlers), self.root.level
        self.environ = {k: os.environ.get(k) for k in self.ENVIRON}
        self.sigterm = None
        if threading.current_thread() is threading.main_thread():  # (only there can it be set again)
            self.sigterm = signal.getsignal(signal.SIGTERM)

    def restore(self) -> None:
        import signal

        for h in [h for h in self.root.handlers if h not in self.handlers]:
            self.root.removeHandler(h)
        self.root.setLevel(self.level)
        for k, v in self.environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self.sigterm is not None:  # (None: a handler not set from Python, left alone)
            signal.signal(signal.SIGTERM, self.sigterm)
