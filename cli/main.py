"""Root ``geoseg`` command group: logging set-up, error-to-exit-code mapping, subcommands.

Exit codes (the same for every command):

* 0 — success
* 1 — failure (bad input, unwritable output, model problem ...): one line on stderr
* 2 — usage error (bad option value), as Click reports it
* 3 — partial batch: some scenes failed, the others succeeded
* 4 — another batch run holds the output folder's lock
* 141 — stdout was closed early (``geoseg info scene.tif | head -3``): no message, as Unix tools do
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

# Paddle's C++ log (glog) writes "W1123 ..." lines straight to stderr; keep errors only unless the
# user set it. Must happen before paddle is imported (the model commands import it lazily).
os.environ.setdefault("GLOG_minloglevel", "2")

import click

from geoseg import __version__
from geoseg.errors import BatchLockedError, GeosegError, GeosegWarning, forget_stop, note_stop, noted_stop, stop_signals

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_LOCKED = 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe


class GeosegClickError(click.ClickException):
    """A library error shown as one line, with a fixed exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def to_click_error(exc: BaseException) -> click.ClickException:
    """Map a library exception to a one-line Click error with the right exit code."""
    if isinstance(exc, BatchLockedError):
        return GeosegClickError(str(exc), EXIT_LOCKED)
    if isinstance(exc, GeosegError):
        return GeosegClickError(str(exc), EXIT_FAILURE)
    if isinstance(exc, MemoryError):
        return GeosegClickError("out of memory: lower --batch-size or --tile-size", EXIT_FAILURE)
    import rasterio.errors

    from geoseg.atomic import disk_full
    from geoseg.errors import gdal_reason

    if isinstance(exc, rasterio.errors.RasterioIOError) and "read failed" in str(exc).lower():
        return GeosegClickError(f"a raster cannot be read: {gdal_reason(exc)}: the file may be corrupt or truncated; "
                                "check it with gdalinfo -checksum", EXIT_FAILURE)

    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):  # (an OSError with no hint)
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return GeosegClickError(f"too many open files: this process may open {soft} (ulimit -n): raise the limit",
                                EXIT_FAILURE)
    if isinstance(exc, OSError) and disk_full(exc):
        import tempfile

        scratch = tempfile.gettempdir()
        name = getattr(exc, "filename", None)
        if name and _in_scratch(name, scratch):  # (a full TMPDIR was told like a full --out)
            return GeosegClickError(f"no space left on the device of the temporary folder {scratch} (writing "
                                    f"{name}): free some space there or point TMPDIR at a disk with room",
                                    EXIT_FAILURE)
        if name:
            return GeosegClickError(f"no space left on the device (writing {name}): free some space or "
                                    "write it elsewhere", EXIT_FAILURE)
        return GeosegClickError(f"no space left on the device: free some space where the outputs go, or in the "
                                f"temporary folder {scratch} (TMPDIR moves it)", EXIT_FAILURE)
    return GeosegClickError(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_FAILURE)


def _in_scratch(name: Any, folder: str) -> bool:
    """Whether the file ``name`` lies in one of geoseg's scratch folders (``geoseg-*``) in the temporary
    folder ``folder`` (by resolved paths; False when unsure): not an output written there (``--out /tmp/x``:
    its temporary file lies beside it, and TMPDIR would not help)."""
    try:
        rel = Path(os.fsdecode(name)).resolve().relative_to(Path(folder).resolve())
    except (OSError, TypeError, ValueError, RuntimeError):
        return False
    return len(rel.parts) > 1 and rel.parts[0].startswith("geoseg-")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, cron's ``timeout``, a container stopping) or SIGHUP (the terminal closed) raised in
    the main thread, so the same clean-up runs as for Ctrl-C: temp files removed, nothing half-written left
    behind. ``signum``: the signal (exit status 128 + it)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__()
        self.signum = int(signum)

    @property
    def signame(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise note_stop(Terminated(signum))


def _on_sigint(signum: int, frame: Any) -> None:
    raise note_stop(KeyboardInterrupt())


#: Commands that run a Paddle model. PaddlePaddle installs its own SIGTERM handler when imported (it
#: prints a C++ "FatalError" and dies, leaving temp files): for these, paddle is imported before
#: geoseg's handler is set, so geoseg's wins.
_PADDLE_COMMANDS = frozenset({"predict", "batch", "train", "export", "ensemble"})


def _import_paddle_first() -> None:
    import importlib.util

    if importlib.util.find_spec("paddle") is not None:  # missing: the command itself says how to install it
        from geoseg.errors import require_paddle

        with contextlib.suppress(Exception):
            require_paddle()  # (which puts back what the import changes: OMP_NUM_THREADS stayed 1 in train)


class GeosegGroup(click.Group):
    """A group whose subcommands turn library errors into one-line messages, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", GeosegWarning)
                warnings.showwarning = _show_warning
                rv = super().invoke(ctx)
            try:
                sys.stdout.flush()  # a closed pipe found only here (output still buffered) ends quietly too
            except BrokenPipeError:
                raise
            except OSError as exc:  # (stdout on a full device: the error blamed the disk of the outputs)
                _stdout_to_devnull()
                raise GeosegClickError(f"cannot write to the standard output ({exc.strerror or exc}); the command "
                                       "itself went through", EXIT_FAILURE) from None
            return rv
        except BrokenPipeError:
            _quiet_broken_pipe()
        except click.BadParameter as exc:
            _name_the_variable(exc, ctx)
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as exc:  # (Terminated too) paddle's C++ code may raise another in its place:
            raise _stop_error(noted_stop() or exc) from None  # the signal's own is the one noted
        except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
            logging.getLogger("geoseg").debug("error details", exc_info=True)
            stop = noted_stop()  # (a signal's KeyboardInterrupt that paddle's C++ code turned into another error)
            if stop is not None:
                raise _stop_error(stop) from None
            if isinstance(exc, OSError) and _from_echo(exc):  # (stdout on a full device: not the outputs' disk)
                _stdout_to_devnull()
                raise GeosegClickError(f"cannot write to the standard output ({exc.strerror or exc})",
                                       EXIT_FAILURE) from None
            error = to_click_error(exc)
            error.message = _say_which_variable(error.message, ctx)
            raise error from None


def _from_echo(exc: BaseException) -> bool:
    """Whether ``exc`` was raised writing the command's output to stdout (in ``click.echo``)."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("echo", "secho") and "click" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _stop_error(stop: BaseException) -> GeosegClickError:
    """The error a command stopped by ``stop`` (a signal's KeyboardInterrupt) ends with: 143 for SIGTERM, 130 else."""
    return GeosegClickError(stop_message(stop), 128 + stop.signum if isinstance(stop, Terminated) else 130)


def stop_message(exc: BaseException) -> str:
    """The one line a command stopped by ``exc`` ends with (as :class:`GeosegGroup` prints it), for a
    log file that must say it too (a cron job sends stderr nowhere)."""
    if isinstance(exc, Terminated):
        return f"terminated ({exc.signame}): finished outputs are whole, nothing half-written was left"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: finished outputs are whole, nothing half-written was left"
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, Exception):
        return to_click_error(exc).format_message()
    return type(exc).__name__


def _name_the_variable(exc: click.BadParameter, group_ctx: click.Context) -> None:
    """A bad value that came from a GEOSEG_* environment variable: say so in the error (Click names
    only the option, which the user never typed)."""
    from click.core import ParameterSource

    ctx, param = exc.ctx, exc.param
    if ctx is None or param is None or param.name is None:
        # raised by the command's own parsing of a value (parse_co: param_hint="--co")
        if isinstance(exc.param_hint, str) and exc.param_hint in (found := _set_by_environment(group_ctx)):
            exc.param_hint = f"{exc.param_hint} (set by the environment variable {found[exc.param_hint]})"
        return
    if ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
        exc.param_hint = f"{param.get_error_hint(ctx)} (set by the environment variable {_variable_read(ctx, param)})"


def _variable_read(ctx: click.Context, param: click.Parameter) -> str:
    """The environment variable Click took ``param``'s value from (the first set one of its names)."""
    names = _envvar_names(ctx, param)
    return next((n for n in names if os.environ.get(n)), names[0] if names else "")


class CommandContext(click.Context):
    """A subcommand's context, kept in the context tree's shared ``meta`` so that the group can still
    ask, when the command fails, which of its options came from GEOSEG_* variables."""

    META_KEY = "geoseg.command_context"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.parent is not None:
            self.meta[self.META_KEY] = self


def _set_by_environment(group_ctx: click.Context) -> dict[str, str]:
    """``{"--co": "GEOSEG_PREDICT_CO", ...}``: the failed command's long options whose value came from
    an environment variable, and that variable."""
    from click.core import ParameterSource

    ctx = group_ctx.meta.get(CommandContext.META_KEY)
    if ctx is None:
        return {}
    found = {}
    for param in ctx.command.params:
        if (isinstance(param, click.Option) and param.name
                and ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT):
            var = _variable_read(ctx, param)
            found.update({opt: var for opt in param.opts if opt.startswith("--")})
    return found


def _say_which_variable(message: str, group_ctx: click.Context) -> str:
    """``message`` with, for each option it names whose value came from the environment, the variable
    that set it: a library error says "--co FOO=BAR: ...", and the user never typed --co."""
    import re

    for opt, var in _set_by_environment(group_ctx).items():
        # the option, or its library keyword at the message's start ("min_pixels -3 is not allowed",
        # "overlap -1 is negative": the library's own checks name their parameter)
        keyword = opt.lstrip("-").replace("-", "_")
        if re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", message) or re.match(rf"{re.escape(keyword)}\b", message):
            message += f" ({opt} was set by the environment variable {var})"
    return message


def _envvar_names(ctx: click.Context, param: click.Parameter) -> list[str]:
    """The variables Click reads for ``param``, in its order: ``envvar``, then the automatic name."""
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    if getattr(param, "allow_from_autoenv", False) and ctx.auto_envvar_prefix and param.name:
        names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return names


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``| head``): stop without a message, as Unix tools do. stdout is
    pointed at devnull so that the interpreter's final flush of what is still buffered cannot fail
    again ("Exception ignored ... BrokenPipeError"); see Python's docs on SIGPIPE."""
    _stdout_to_devnull()
    raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None


def _stdout_to_devnull() -> None:
    """Point stdout's descriptor at /dev/null: what is still buffered then goes nowhere at exit, without a
    second error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no real descriptor (CliRunner)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


_PATH_TEXT_OPTIONS = frozenset({"model", "aoi", "classes", "num_classes"})  # (text options that may name a file)


def _expand_home_in_variables(param: click.Option) -> None:
    """A path option set by a variable takes ``~`` as the home folder, as the shell does on a command line: a
    crontab's ``GEOSEG_BATCH_OUT=~/results`` (cron expands no ``~``) wrote into a folder named ``~`` in the
    working folder."""
    resolve = param.resolve_envvar_value

    def resolve_expanded(ctx: click.Context) -> str | None:
        value = resolve(ctx)
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    param.resolve_envvar_value = resolve_expanded  # type: ignore[method-assign]


def _document_envvars(group: click.Group) -> None:
    """Let ``GEOSEG_<COMMAND>_<OPTION>`` (the long option name, dashes as underscores) set every option,
    as the README says. Click's automatic name comes from the Python parameter name, which differs for
    some options (``--json`` is ``as_json``: GEOSEG_INFO_AS_JSON); that name keeps working too."""
    prefix = (group.context_settings.get("auto_envvar_prefix") or "GEOSEG").upper()
    for cmd_name, cmd in group.commands.items():
        cmd_prefix = f"{prefix}_{cmd_name.upper()}"
        cmd.context_class = CommandContext  # (the group finds its context again when it fails)
        for param in cmd.params:
            if not isinstance(param, click.Option) or not param.allow_from_autoenv or not param.name:
                continue
            if isinstance(param.type, click.Path) or param.name in _PATH_TEXT_OPTIONS:
                _expand_home_in_variables(param)
            documented = [f"{cmd_prefix}_{opt.lstrip('-').replace('-', '_').upper()}"
                          for opt in param.opts if opt.startswith("--")]
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            wanted = [n for n in documented if n not in names]
            if not wanted or (not names and documented == [f"{cmd_prefix}_{param.name.upper()}"]):
                continue  # already read: an explicit envvar, or Click's automatic name is the documented one
            # explicit names first (--scheduler's GEOSEG_SCHEDULER); Click still falls back to the automatic
            # name when none of these is set
            param.envvar = [*names, *wanted]


def _warn_unread_variables(ctx: click.Context) -> None:
    """Warn about each set ``GEOSEG_<COMMAND>_*`` variable of the command being run that sets none of
    its options: ``GEOSEG_BATCH_NO_MOSAIC=1`` (a --mosaic/--no-mosaic pair is set by
    ``GEOSEG_BATCH_MOSAIC=0``) or a misspelt name changed nothing, and nothing said so."""
    import difflib

    name = ctx.invoked_subcommand
    group = ctx.command
    cmd = group.get_command(ctx, name) if name and isinstance(group, click.Group) else None
    if cmd is None or not ctx.auto_envvar_prefix:
        return
    prefix = f"{ctx.auto_envvar_prefix}_{name.upper().replace('-', '_')}"  # (Click's own for the command)
    read: dict[str, click.Option] = {}
    for param in cmd.params:
        if isinstance(param, click.Option):
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            if param.allow_from_autoenv and param.name:
                names.append(f"{prefix}_{param.name.upper()}")
            read.update(dict.fromkeys(names, param))
    # the off side of a --x/--no-x (or --half/--float32) pair has no variable of its own
    off = {f"{prefix}_{opt.lstrip('-').replace('-', '_').upper()}": (opt, p) for p in set(read.values())
           for opt in p.secondary_opts if p.is_flag and p.name}
    for var in sorted(v for v in os.environ if v.startswith(f"{prefix}_") and v not in read):
        if var in off:
            opt, flag = off[var]
            on = next((n for n, p in read.items() if p is flag and n.startswith(prefix)), f"{prefix}_{flag.name.upper()}")
            hint = f"{opt} is set by {on}=0"
        else:
            close = difflib.get_close_matches(var, list(read), n=1)
            hint = f"did you mean {close[0]}?" if close else f"see geoseg {name} --help for its options"
        warnings.warn(f"the environment variable {var} sets no option of geoseg {name} and is not read: {hint}",
                      GeosegWarning, stacklevel=1)


def _stop_cleanly_on_sigterm(ctx: click.Context) -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the command runs (main thread, default handler
    only: under nohup SIGHUP stays ignored). SIGHUP (a closed terminal) ended a run with exit 129 and no word,
    its mask published without its polygons and temp files left."""
    import signal
    import threading

    held = set(stop_signals())
    forget_stop()  # (one a command before this one in the process noted)
    ctx.call_on_close(forget_stop)  # (the process may go on: an application calling the CLI)
    block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    try:
        if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return
        previous = signal.getsignal(signal.SIGTERM)
        if block:
            # SIGTERM is held back while paddle loads (about a second; the console script holds it back
            # from its first line, see geoseg_cli.main): paddle's own handler, installed during the
            # import, printed a C++ "FatalError" dump and died by the signal, and a few signals at that
            # moment hung the process for good. Threads started meanwhile inherit the block; once
            # geoseg's handler is set, a signal held back reaches it (a clean exit 143). SIGINT too: a
            # Ctrl-C inside paddle's import came out as "PaddlePaddle is not installed" (exit 1); held
            # back, it ends the command as one at any other moment (exit 130).
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        if ctx.invoked_subcommand in _PADDLE_COMMANDS and not {"-h", "--help"} & set(ctx.args):
            _import_paddle_first()
        signal.signal(signal.SIGTERM, _on_sigterm)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, _on_sigterm)
            ctx.call_on_close(lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (Python's: not an application's)
            signal.signal(signal.SIGINT, _on_sigint)
            ctx.call_on_close(lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings become one 'warning: ...' log line on stderr (no source line)."""
    logging.getLogger("geoseg").warning("warning: %s", message)


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    logger = logging.getLogger("geoseg")
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_geoseg", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"))
    handler._geoseg = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
    # PaddlePaddle installs a root handler at import; keep GDAL/rasterio/distributed chatter
    # out of the user's terminal unless -v asked for it.
    # -v: their INFO lines; -vv: their DEBUG too (rasterio says one line per dataset opened: ~1,100
    # for one small scene)
    for noisy in ("rasterio", "distributed", "paddle", "pyogrio"):
        logging.getLogger(noisy).setLevel({1: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 1 else logging.WARNING))
    warnings.filterwarnings("ignore", message="No ccache found")
    # rasterio says "Dataset has no geotransform, gcps, or rpcs. The identity matrix will be returned."
    # each time a file without georeferencing is opened (4 times in one predict): geoseg says once, in
    # its own words, what that means for the outputs (NoCRSWarning) or refuses what needs a CRS
    import rasterio.errors

    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    # Paddle's BatchNorm says this on every training forward pass; it is not about the user's run.
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")


@click.group(cls=GeosegGroup, context_settings={"auto_envvar_prefix": "GEOSEG", "help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv: the libraries' debug lines too).")
@click.option("-q", "--quiet", count=True, help="Only errors; no progress bar.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, allow_from_autoenv=False,
              callback=lambda ctx, _, v: _version(ctx, v),
              help="Show geoseg's version and those of the libraries it runs on (for bug reports), and exit.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """geoseg: tiled segmentation of GeoTIFFs into QGIS-ready land-cover maps.

    Exit codes: 0 ok, 1 failure, 2 usage error, 3 batch finished with failed scenes,
    4 batch output folder locked by another run, 130 interrupted, 141 stdout closed early
    (e.g. by | head; no message), 143 terminated (SIGTERM), 129 hung up (SIGHUP).
    """
    verbosity = verbose - quiet
    _setup_logging(verbosity)
    try:
        os.getcwd()
    except OSError:  # paddle's import then failed with "partially initialized module 'paddle'"
        from geoseg_cli import NO_CWD

        raise GeosegClickError(NO_CWD, EXIT_FAILURE) from None
    _stop_cleanly_on_sigterm(ctx)
    _warn_unread_variables(ctx)
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbosity
    ctx.obj["quiet"] = quiet > 0


def _version(ctx: click.Context, value: bool) -> None:
    """Print geoseg's version and its libraries' (read from package metadata: nothing heavy is imported)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib import metadata

    parts = []
    for dist in ("rasterio", "numpy", "shapely", "pyogrio", "pyproj", "dask", "distributed", "paddlepaddle", "paddlepaddle-gpu"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    if not any(p.startswith("paddlepaddle") for p in parts):
        parts.append("PaddlePaddle not installed (pip install 'paddlepaddle>=3')")
    import rasterio

    parts.insert(1, f"GDAL {rasterio.__gdal_version__}")
    try:  # runs while the arguments are parsed, before GeosegGroup.invoke: `geoseg --version | head -1`
        click.echo(f"geoseg {__version__}\n" + "\n".join(f"  {p}" for p in parts))
    except BrokenPipeError:
        _quiet_broken_pipe()
    ctx.exit()


def _register() -> None:
    from geoseg_cli import info, predict

    cli.add_command(info.info)
    cli.add_command(predict.predict)
    for name in ("vectorize", "train", "evaluate", "sample", "export", "ensemble", "batch"):
        try:
            module = __import__(f"geoseg_cli.{name}", fromlist=[name])
        except ModuleNotFoundError as exc:
            if exc.name != f"geoseg_cli.{name}":
                raise
            continue
        cli.add_command(getattr(module, name))


_register()
_document_envvars(cli)

if __name__ == "__main__":  # pragma: no cover
    cli()
