"""geoseg's command-line interface (installed as ``geoseg_cli``; console script ``geoseg``)."""


def main() -> None:
    """The ``geoseg`` console script: SIGTERM is held back from the first line on, so that every
    thread the imports start (numpy's, GDAL's, PaddlePaddle's) inherits the block and the signal can
    only reach the main thread once geoseg's handler is set (see ``geoseg_cli.main``). A SIGTERM in the
    first second otherwise met PaddlePaddle's own handler in one of those threads: a C++ "FatalError"
    dump, death by the signal, and now and then a hang."""
    import signal

    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    from geoseg_cli.main import cli

    cli()
