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


@contextlib.contextmanager
def _batch_logging(log_file: Path | None, verbosity: int, dask: bool = False) -> Iterator[None]:
    """One line per scene: engine INFO lines are muted unless -v; --log-file adds a timestamped copy.

    ``dask``: the run starts or joins a Dask cluster. Importing ``distributed`` sets its loggers to
    INFO (its config), and PaddlePaddle's root handler would print the scheduler's and nannies'
    start/stop chatter (~30 lines): it is imported first, so the level set here holds.
    """
    root = logging.getLogger("geoseg")
    names = _MUTED
    if dask:
        import distributed  # noqa: F401 - sets its loggers' levels on import

        names = (*_MUTED, "distributed")
    # before the loggers are muted: a refused --log-file must not leave them so (no finally yet)
    handler = _log_file_handler(log_file) if log_file is not None else None
    muted = [logging.getLogger(name) for name in names]
    old_levels = [lg.level for lg in muted]
    noise = None
    if verbosity <= 0:
        for lg in muted:
            lg.setLevel(logging.WARNING)
        if dask:  # the client's "Failed to reconnect to scheduler" before geoseg's own line about it
            from geoseg.batch import _StoppedRunNoise

            noise = _StoppedRunNoise()
            logging.getLogger("distributed.client").addFilter(noise)
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    try:
        yield
    except BaseException as exc:
        if handler is not None:  # a refused or stopped run says why in the log file too, not only on stderr
            from geoseg_cli.main import stop_message

            root.removeHandler(handler)  # (not twice on stderr: only the file gets this line)
            handler.handle(root.makeRecord(root.name, logging.ERROR, __file__, 0, "Error: %s",
                                           (stop_message(exc),), None))
        raise
    finally:
        for lg, level in zip(muted, old_levels):
            lg.setLevel(level)
        if noise is not None:
            logging.getLogger("distributed.client").removeFilter(noise)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()


def _log_file_handler(log_file: Path) -> logging.FileHandler:
    """Open --log-file for appending, creating its folder(s) as --report does: a cron job that hides
    stderr otherwise did nothing at all when logs/ was not there yet. One line (exit 1) when it cannot."""
    from geoseg.atomic import file_above
    from geoseg.errors import ParameterError

    if log_file.is_dir():
        raise ParameterError(f"--log-file {log_file} is a folder: give a file name for the log")
    above = file_above(log_file)
    if above is not None:
        raise ParameterError(f"--log-file {log_file}: {above} is a file, not a folder: give another path for --log-file")
    try:
        log_file.absolute().parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(log_file, encoding="utf-8")
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

    path = os.environ.get("GEOSEG_BATCH_LOG_FILE") or None
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
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} ERROR Error: {exc.format_message()}\n")


@click.command(cls=_BatchCommand, short_help="Segment many scenes once each (crash-safe; local or Dask).")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder: outputs mirror the input tree here; holds the manifest and lock in .geoseg/.")
@o.model_opt
@o.weights_opt
@o.card_opt
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
    card: Path | None, patterns: tuple[str, ...], force: bool, dry_run: bool, mosaic: bool, report: Path | None,
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
    1 fatal error (model, inputs, output folder, --report or --log-file path, a Dask cluster
    without a usable worker), 2 usage, 4 DIR locked by another run. A stopped run (Ctrl-C,
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
        raise click.UsageError("give either --scheduler (an existing cluster) or --workers (a local one), not both")
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
                    device=device, precision=precision, threads=threads)
    bo = BatchOptions(force=force, dry_run=dry_run, mosaic=mosaic, patterns=patterns or BatchOptions.patterns,
                      scheduler=scheduler, workers=workers, resources=res, report=report,
                      quiet_worker_loggers=(*_MUTED, "distributed") if ctx.obj.get("verbosity", 0) <= 0 else ())
    with _batch_logging(log_file, ctx.obj.get("verbosity", 0), dask=bool(scheduler or workers)):
        result = run_batch(inputs, out, bm, opts, bo)
    if dry_run:
        for scene, reason in result.planned:
            click.echo(f"skip\t{scene.key}\tdone, unchanged" if reason is None else f"run\t{scene.key}\t{reason}")
        return
    if result.failed:
        from geoseg_cli.main import EXIT_PARTIAL

        ctx.exit(EXIT_PARTIAL)
