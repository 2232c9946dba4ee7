"""``geoseg batch``: segment an archive of scenes once each, crash-safe, locally or on Dask."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from geoseg_cli import options as o


#: Loggers muted below -v: the engine's own per-scene line, and GDAL's error chatter (which
#: rasterio logs at INFO) for bad scenes, so that each scene gives one line.
_MUTED = ("geoseg.engine", "geoseg.vectorize", "rasterio", "pyogrio")
#: distributed's loggers in batch's own process (its client, and the scheduler of a --workers cluster) that
#: log a lost connection at ERROR, with a traceback (see geoseg.batch._StoppedRunNoise).
_NOISY = ("distributed.client", "distributed.scheduler")


#: The --log-file's line format: the pid tells apart the lines of overlapping runs (a run of the night
#: before still going, a manual run) appending to one log.
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


@contextlib.contextmanager
def _batch_logging(log_file: Path | None, verbosity: int, dask: bool = False, start: str | None = None
                   ) -> Iterator[None]:
    """One line per scene: engine INFO lines are muted unless -v; --log-file adds a timestamped copy.

    ``dask``: the run starts or joins a Dask cluster. Importing ``distributed`` sets its loggers to
    INFO (its config), and PaddlePaddle's root handler would print the scheduler's and nannies'
    start/stop chatter (~30 lines): it is imported first, so the level set here holds. Its warnings
    and errors (a worker process killed, a task given up after its workers died) go to the log file too.
    ``start``: the log file's first line of this run (what it runs on), before any other.
    """
    from geoseg.errors import BatchLockedError

    root = logging.getLogger("geoseg")
    names = _MUTED
    if dask:
        import distributed  # noqa: F401 - sets its loggers' levels on import

        names = (*_MUTED, "distributed")
    # before the loggers are muted: a refused --log-file must not leave them so (no finally yet)
    handler = _log_file_handler(log_file) if log_file is not None else None
    muted = [logging.getLogger(name) for name in names]
    old_levels = [lg.level for lg in muted]
    noise = forward = None
    if verbosity <= 0:
        for lg in muted:
            lg.setLevel(logging.WARNING)
        if dask:  # the client's "Failed to reconnect to scheduler" before geoseg's own line about it
            from geoseg.batch import _StoppedRunNoise

            noise = _StoppedRunNoise()
            for name in _NOISY:
                logging.getLogger(name).addFilter(noise)
    if handler is not None:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        if start:
            handler.handle(root.makeRecord(root.name, logging.INFO, __file__, 0, "%s", (start,), None))
        root.addHandler(handler)
        if dask:
            # (through a handler of its own: LocalCluster sets the level of every StreamHandler on the
            # "distributed" logger to WARNING while it runs, which took geoseg's INFO lines out of the file)
            forward = _Forward(handler, logging.WARNING if verbosity <= 0 else logging.NOTSET)
            logging.getLogger("distributed").addHandler(forward)
    try:
        yield
    except BaseException as exc:
        if handler is not None and handler.failure is None:
            # a refused or stopped run says why in the log file too, not only on stderr
            from geoseg_cli.main import stop_message

            root.removeHandler(handler)  # (not twice on stderr: only the file gets this line)
            # exit 4 (another run holds DIR) is to be ignored, as the README says: not an error
            locked = isinstance(exc, BatchLockedError)
            handler.handle(root.makeRecord(root.name, logging.WARNING if locked else logging.ERROR, __file__, 0,
                                           "warning: %s" if locked else "Error: %s", (stop_message(exc),), None))
        raise
    finally:
        for lg, level in zip(muted, old_levels):
            lg.setLevel(level)
        if noise is not None:
            for name in _NOISY:
                logging.getLogger(name).removeFilter(noise)
        if handler is not None:
            root.removeHandler(handler)
            if forward is not None:
                logging.getLogger("distributed").removeHandler(forward)
            handler.close()
    if handler is not None and handler.failure is not None:
        raise handler.error()


class _Forward(logging.Handler):
    """Hands the records of another logger tree (distributed's) to the --log-file's handler."""

    def __init__(self, target: logging.Handler, level: int) -> None:
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _LogFile(logging.FileHandler):
    """--log-file: a file that cannot be written (a full disk) says so once, in one line on stderr, and
    takes no more lines; the run goes on and then fails (exit 1) naming the log file. Python's logging
    printed a "--- Logging error ---" traceback per line, and the final flush's error blamed --out."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", errors="backslashreplace")
        self.path = path
        self.failure: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)

    def flush(self) -> None:
        if self.failure is not None:
            return
        try:
            super().flush()
        except OSError as exc:
            self._failed(exc)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self._failed(exc)
        else:
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # (the last lines, flushed when the stream closes)
            self._failed(exc)

    def _reason(self) -> str:
        from geoseg.atomic import no_space_reason

        exc = self.failure
        return no_space_reason(exc, self.path.absolute().parent) or (getattr(exc, "strerror", None) or str(exc))

    def _failed(self, exc: OSError) -> None:
        if self.failure is not None:
            return
        self.failure = exc  # (first: the line below reaches this handler too, which takes no more)
        logging.getLogger("geoseg").warning("warning: --log-file %s: cannot write it (%s): the rest of this run's "
                                            "log goes to stderr only", self.path, self._reason())

    def error(self) -> Exception:
        """The run's error once the log could not be written (the run itself went through)."""
        from geoseg.errors import OutputError

        return OutputError(f"--log-file {self.path}: cannot write it ({self._reason()}): free some space or give "
                           "another --log-file (the run itself went through: see its manifest)")


def _log_file_handler(log_file: Path) -> _LogFile:
    """Open --log-file for appending, creating its folder(s) as --report does: a cron job that hides
    stderr otherwise did nothing at all when logs/ was not there yet. One line (exit 1) when it cannot."""
    from geoseg.atomic import file_above
    from geoseg.errors import ParameterError

    if not log_file.name.strip():  # (GEOSEG_BATCH_LOG_FILE=" " appended the log to a file named " ")
        raise ParameterError(f"--log-file {str(log_file)!r} has a blank name: give a file name for the log")
    if log_file.is_dir():
        raise ParameterError(f"--log-file {log_file} is a folder: give a file name for the log")
    above = file_above(log_file)
    if above is not None:
        raise ParameterError(f"--log-file {log_file}: {above} is a file, not a folder: give another path for --log-file")
    try:
        log_file.absolute().parent.mkdir(parents=True, exist_ok=True)
        return _LogFile(log_file)
    except OSError as exc:
        raise ParameterError(f"--log-file {log_file}: cannot write it ({exc.strerror}): "
                             "give a writable path for --log-file") from None


class _BatchCommand(click.Command):
    """``batch``, whose refused command lines also reach its --log-file: a bad option value (Click's usage
    error, before the run opens its log) went to stderr only, which a cron job often sends nowhere."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        raw = [str(a) for a in args]  # (parsing consumes them)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            _usage_error_to_log_file(raw, exc)
            raise


def _usage_error_to_log_file(args: list[str], exc: click.ClickException) -> None:
    """Append the usage error to the --log-file the command line (or GEOSEG_BATCH_LOG_FILE) names, if any
    can be written; never raises (the error itself is what the user must see)."""
    import os
    import time

    path = os.path.expanduser(os.environ.get("GEOSEG_BATCH_LOG_FILE") or "") or None  # (~ as the option's)
    for i, arg in enumerate(args):
        if arg == "--log-file" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--log-file="):
            path = arg.split("=", 1)[1]
    if not path:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError):
        Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{stamp} [{os.getpid()}] ERROR Error: {exc.format_message()}\n")


@click.command(cls=_BatchCommand, short_help="Segment many scenes once each (crash-safe; local or Dask).")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder: outputs mirror the input tree here; holds the manifest and lock in .geoseg/.")
@o.model_opt
@o.weights_opt
@o.card_opt
@o.classes_opt
@o.predict_options
@click.option("--pattern", "patterns", multiple=True, metavar="GLOB",
              help="File name pattern in input folders (repeatable; case-insensitive). Default: *.tif and *.tiff.")
@click.option("--force", is_flag=True, help="Redo every scene, even those done and unchanged.")
@click.option("--dry-run", is_flag=True, help="Only list what would run (stdout: run|skip<TAB>scene<TAB>reason).")
@click.option("--mosaic/--no-mosaic", default=True, show_default=True,
              help="After the run, lay every done mask of DIR into DIR/landcover.vrt (+ .qml): the whole archive "
                   "as one styled layer (one VRT per CRS, pixel size, grid alignment and class table).")
@click.option("--report", type=click.Path(path_type=Path), default=None,  # a folder: geoseg.batch's one line, exit 1
              help="Write a JSON run report: per scene status, seconds, windows, megapixels/s, outputs, error.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="Also append the log, with timestamps, to this file (its folder is created if need be).")
@click.option("--scheduler", envvar=["GEOSEG_SCHEDULER", "GEOSEG_BATCH_SCHEDULER"], default=None, metavar="ADDRESS",
              help="Run scenes as tasks on this Dask scheduler, e.g. tcp://host:8786 (env GEOSEG_SCHEDULER).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start a local Dask cluster of N worker processes (0: run scenes in this process).")
@click.option("--resources", default=None, metavar="NAME=N,...",
              help="Dask resources each scene task needs, e.g. GPU=1 (workers started with --resources GPU=1).")
@click.option("--threads", type=int, default=None, callback=o._positive,
              help="CPU threads per model (default: all cores; with --workers, cores / workers).")
@click.pass_context
def batch(
    ctx: click.Context, inputs: tuple[str, ...], out: Path, model: str | None, weights: Path | None,
    card: Path | None, classes: str | None, patterns: tuple[str, ...], force: bool, dry_run: bool, mosaic: bool, report: Path | None,
    log_file: Path | None, scheduler: str | None, workers: int, resources: str | None, threads: int | None,
    **predict_opts: Any,
) -> None:
    """Segment every scene of INPUT... into --out DIR, each once, surviving crashes.

    INPUT is a GeoTIFF, a folder (searched recursively for *.tif/*.tiff, or --pattern) or
    @list.txt (one path per line; relative paths are relative to the list's folder).
    A scene is skipped when its input, model and parameters are unchanged and its outputs
    are intact (manifest DIR/.geoseg/manifest.sqlite); --force redoes it. Failed scenes are
    recorded and retried on the next run.

    \b
    Exit codes: 0 every scene done (or skipped), 3 some scenes failed (the others are done),
    1 fatal error (model, inputs, output folder or a file system of it without working locks,
    --report or --log-file path, a Dask cluster without a usable worker), 2 usage, 4 DIR
    locked by another run (only then). A stopped run (Ctrl-C,
    SIGTERM, a fatal error) still writes its --report, saying which scenes it did not finish.
    Every option can be set as GEOSEG_BATCH_<OPTION> (the long name, dashes as underscores),
    e.g. GEOSEG_BATCH_WEIGHTS, GEOSEG_BATCH_LOG_FILE;
    --scheduler also as GEOSEG_SCHEDULER.

    \b
    Examples:
      geoseg batch /archive/new --out /data/landcover --weights m.pdparams --report run.json
      geoseg batch @scenes.txt --out out/ --workers 4
      geoseg batch /archive --out /shared/lc --scheduler tcp://head:8786 --resources GPU=1
    """
    from geoseg.batch import BatchModel, BatchOptions, parse_resources, run_batch

    if scheduler and workers:
        import os

        from_env = ctx.get_parameter_source("scheduler") == click.core.ParameterSource.ENVIRONMENT
        name = next((v for v in ("GEOSEG_SCHEDULER", "GEOSEG_BATCH_SCHEDULER") if os.environ.get(v)), None)
        said = f" (--scheduler was set by the environment variable {name}: unset it)" if from_env and name else ""
        raise click.UsageError(f"give either --scheduler (an existing cluster) or --workers (a local one), not both{said}")
    try:
        res = parse_resources(resources)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resources") from None
    quiet = ctx.obj.get("quiet", False)
    # a terminal gets a bar per scene, a log file a line a minute (not from Dask workers)
    progress = False if quiet or scheduler or workers else True if sys.stderr.isatty() else "log"
    opts = o.make_predict_options(**predict_opts, progress=progress, threads=threads)
    device, precision = predict_opts["device"], predict_opts["precision"]
    bm = BatchModel(model=model, weights=str(weights) if weights else None, card=str(card) if card else None,
                    classes=classes, device=device, precision=precision, threads=threads)
    bo = BatchOptions(force=force, dry_run=dry_run, mosaic=mosaic, patterns=patterns or BatchOptions.patterns,
                      scheduler=scheduler, workers=workers, resources=res, report=report,
                      quiet_worker_loggers=(*_MUTED, "distributed") if ctx.obj.get("verbosity", 0) <= 0 else ())
    with _batch_logging(log_file, ctx.obj.get("verbosity", 0), dask=bool(scheduler or workers),
                        start=_start_line(inputs, out, dry_run)):
        result = run_batch(inputs, out, bm, opts, bo)
    if dry_run:
        for action, scene, reason in result.plan():  # (a skip says why: done and unchanged, or outside the AOI)
            click.echo(f"{action}\t{scene.key}\t{reason}")
        return
    if result.failed:
        from geoseg_cli.main import EXIT_PARTIAL

        ctx.exit(EXIT_PARTIAL)


def _start_line(inputs: tuple[str, ...], out: Path, dry_run: bool) -> str:
    """The log file's first line of a run: which geoseg, on which machine, over what (the pid is in every line)."""
    import socket

    from geoseg import __version__

    what = "dry run" if dry_run else "run"
    return f"geoseg {__version__} batch {what} started on {socket.gethostname()}: {' '.join(inputs)} --out {out}"
