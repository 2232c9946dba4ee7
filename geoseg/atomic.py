"""Atomic publication of outputs: write to a temp name in the destination folder, then rename.

A killed run leaves at most a ``.geoseg-<name>.<host>-<pid>-<random>.tmp`` file behind (never a
truncated output under the real name); :func:`clean_temp_files` removes such leftovers of
processes that are gone, never those of a live run writing into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from geoseg.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)

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


def _host_tag() -> str:
    """8 hex digits naming this machine in temp names (a folder may be shared over NFS)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(path: str | Path) -> Path:
    """A fresh temp file name next to ``path`` (same folder, so the rename is atomic), naming the
    writing process (host and pid) so that a cleanup can tell a dead run's leftover from a live
    run's file (see :func:`clean_temp_files`)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


#: The writer in a temp name of :func:`temp_name` (and names derived from it: ``.staging.tif``, ...).
_OWNER = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.")
#: A temp file of another machine's writer (a folder shared over NFS) counts as left over once it is
#: this old (seconds): no write keeps a file unchanged this long.
STALE_TEMP_S = 24 * 3600.0


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (where that cannot be asked: assumed so)."""
    if os.name != "posix":  # os.kill(pid, 0) would send a signal there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    except OSError:
        return True
    return True


def is_leftover(path: Path, now: float | None = None) -> bool:
    """Whether the geoseg temp file ``path`` was left by a run that is gone: its writer (named in it)
    is not running on this machine; a writer on another machine: the file is older than
    :data:`STALE_TEMP_S`; no writer named (geoseg before 2026-11-30): yes, as then."""
    m = _OWNER.search(path.name)
    if m is None:
        return True
    if m["host"] == _host_tag():
        return not is_alive(int(m["pid"]))
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_TEMP_S


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


def clean_temp_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete geoseg temp and staging files left in ``folder`` (and below, if ``recursive``) by
    runs that were killed.

    These names belong to geoseg's writers only (``.geoseg-<name>.<host>-<pid>-<hex>.tmp…`` and
    ``….staging.tif…``). A file whose writer still runs on this machine is kept (it was deleted: a
    batch starting on a folder killed a predict or another batch writing below it); see
    :func:`is_leftover`. Returns what was removed.
    """
    removed = []
    now = time.time()
    for dirpath, _, filenames in os.walk(folder) if recursive else [(str(folder), [], _files(folder))]:
        for name in filenames:
            if name.startswith(TMP_PREFIX) and (TMP_SUFFIX in name or ".staging" in name):
                p = Path(dirpath) / name
                if is_leftover(p, now):
                    _unlink(p)
                    removed.append(p)
    return removed


def remove_leftovers(folder: str | Path) -> list[Path]:
    """:func:`clean_temp_files` of ``folder`` itself (not below), said in the log: what predict and
    vectorize do beside their outputs before writing them."""
    removed = clean_temp_files(folder if str(folder) else ".", recursive=False)
    if removed:
        log.info("removed %d temp file(s) of killed runs in %s", len(removed), folder)
    return removed


def _files(folder: str | Path) -> list[str]:
    with contextlib.suppress(OSError):
        return [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    return []


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
