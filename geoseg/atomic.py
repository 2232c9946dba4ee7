"""Atomic publication of outputs: write to a temp name in the destination folder, then rename.

A killed run leaves at most a ``.<name>.<random>.tmp`` file behind (never a truncated
output under the real name); :func:`clean_temp_files` removes such leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from geoseg.errors import OutputError, OutputExistsError

TMP_SUFFIX = ".tmp"
TMP_PREFIX = ".geoseg-"


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Check that ``path`` can be written; raise a one-line error otherwise.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: the parent folder is missing or not writable, or ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder: give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output folder {parent} is a file, not a folder: choose another --out")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable: choose another --out")
    return path


def file_above(folder: str | Path) -> Path | None:
    """The nearest existing path above ``folder`` when it is a file, not a folder (``folder`` can
    then never be made), else None."""
    above = next((p for p in Path(folder).absolute().parents if p.exists() or p.is_symlink()), None)
    return above if above is not None and not above.is_dir() else None


#: Free space below which a failed write is put down to a full disk (GDAL often reports one only as
#: a later read error of the file it could not finish).
LOW_SPACE_BYTES = 16 * 2**20
_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


def disk_full(exc: BaseException | None, folder: str | Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full, or ``folder``'s
    file system has less than :data:`LOW_SPACE_BYTES` free."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in _FULL_ERRNOS or any(t in str(exc).lower() for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    if folder is not None:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    return False


def write_error(path: str | Path, exc: BaseException) -> OutputError:
    """A one-line error for a failed write of ``path``: says when the disk is full."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if disk_full(exc, folder):
        return OutputError(f"cannot write {path}: no space left on the device: free some space or choose another "
                           "--out (nothing half-written was left)")
    return OutputError(f"cannot write {path}: {exc}")


def temp_name(path: str | Path) -> Path:
    """A fresh temp file name next to ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path to write to; on success rename it to ``path``, on error delete it.

    Sidecar files GDAL may create next to the temp file (``.aux.xml``, ``.ovr``) are removed.
    """
    path = check_output(path, overwrite)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"nothing was written to {path}")
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        for side in (".aux.xml", ".ovr", ".msk"):
            _unlink(Path(str(tmp) + side))


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Delete geoseg temp and staging files left under ``folder`` (recursive) by killed runs.

    These names belong to geoseg's writers only (``.geoseg-<name>.<hex>.tmp…`` and
    ``.geoseg-<name>.<hex>.staging.tif…``). Call it only when no other geoseg run writes to
    ``folder`` (``geoseg batch`` does it while holding its lock). Returns what was removed.
    """
    removed = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name.startswith(TMP_PREFIX) and (TMP_SUFFIX in name or ".staging" in name):
                p = Path(dirpath) / name
                _unlink(p)
                removed.append(p)
    return removed


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


@contextlib.contextmanager
def staged_as(tmp: Path, ext: str) -> Iterator[Path]:
    """A work file beside the temp file ``tmp`` ending in ``.ext``, moved onto ``tmp`` when done.

    For writers that pick or check the format by extension (GDAL's FlatGeobuf needs it; its
    GeoPackage driver warns without it). SQLite's journal files are removed too.
    """
    work = tmp.with_name(tmp.name + "." + ext)
    try:
        yield work
        os.replace(work, tmp)
    finally:
        for p in (work, Path(f"{work}-journal"), Path(f"{work}-wal"), Path(f"{work}-shm")):
            _unlink(p)
