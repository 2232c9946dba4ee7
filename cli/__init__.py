"""geoseg's command-line interface (installed as ``geoseg_cli``; console script ``geoseg``)."""

#: The error of a command started in a folder that no longer exists (a cron job's, deleted).
NO_CWD = ("the current folder no longer exists (it was deleted or moved): cd into an existing folder first "
          "(in a cron job: cd /some/folder && geoseg ...)")


def main() -> None:
    """The ``geoseg`` console script: SIGTERM is held back from the first line on, so that every
    thread the imports start (numpy's, GDAL's, PaddlePaddle's) inherits the block and the signal can
    only reach the main thread once geoseg's handler is set (see ``geoseg_cli.main``). A SIGTERM in the
    first second otherwise met PaddlePaddle's own handler in one of those threads: a C++ "FatalError"
    dump, death by the signal, and now and then a hang. SIGINT (Ctrl-C) too: in the middle of an import
    it ended in a traceback, or inside paddle's in "PaddlePaddle is not installed" (exit 1)."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    import os
    import sys

    try:  # before the imports: without a working folder some fail (Python 3.13's socket, paddle's)
        os.getcwd()
    except OSError:
        sys.stderr.write(f"Error: {NO_CWD}\n")
        raise SystemExit(1) from None
    from geoseg_cli.main import cli

    cli()
