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
    it ended in a traceback, or inside paddle's in "PaddlePaddle is not installed" (exit 1). SIGHUP as SIGTERM.

    Standard streams a cron job or a daemon closed (``2>&-``) are pointed at ``/dev/null``: Python's
    ``sys.stderr`` was None (an AttributeError ended predict before it wrote anything), and a file geoseg
    opened would take the free descriptor, where PaddlePaddle's and GDAL's messages to it would land."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    import os
    import sys

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:  # closed: /dev/null takes its number (the lowest free one)
            nul = os.open(os.devnull, os.O_RDWR)
            if nul != fd:
                os.dup2(nul, fd)
                os.close(nul)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))

    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        # a latin-1 or cp1252 stdout (a locale's, PYTHONIOENCODING's) took a class, model or scene name it cannot
        # encode for "unexpected error: UnicodeEncodeError", losing evaluate's whole table: escaped, as on stderr
        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (OSError, ValueError):
            pass
    try:  # before the imports: without a working folder some fail (Python 3.13's socket, paddle's)
        os.getcwd()
    except OSError:
        sys.stderr.write(f"Error: {NO_CWD}\n")
        raise SystemExit(1) from None
    from geoseg_cli.main import cli

    cli()
