"""Atomic publication of outputs: write to a temp name in the destination folder, then rename.

A killed run leaves at most a ``.geoseg-<name>.<host>-<pid>-<random>.tmp`` file behind (never a
truncated output under the real name); :func:`clean_temp_files` removes such leftovers of
processes that are gone, never those of a live run writing into the same folder.  The temp file is
flushed to disk (``fsync``) before the rename and the folder after it, so that a power cut too
leaves the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from geoseg.errors import GeosegWarning, NoRoomError, OutputError, OutputExistsError, warn

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
TMP_PREFIX = ".geoseg-"


def is_control(char: str) -> bool:
    """Whether ``char`` is a control character (a tab, a newline, DEL), which GDAL drops from the names it writes."""
    return ord(char) < 32 or char == "\x7f"


def printable(text: str) -> str:
    """``text`` as UTF-8 can hold it: the bytes of a name that is not valid UTF-8 (which Python keeps as
    surrogate escapes, ``caf\\udce9.tif``) as ``\\xe9`` (``caf\\xe9.tif``), for messages, logs and reports."""
    return text if is_utf8(text) else text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether ``text`` (a path) is valid UTF-8: GDAL (through rasterio), SQLite and JSON take no other names."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Check that ``path`` can be written; raise a one-line error otherwise.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: the parent folder is missing or not writable, or ``path`` is a folder.
    """
    path = Path(path)
    if not is_utf8(str(path)):  # (rasterio failed on it with "unexpected error: UnicodeEncodeError")
        raise OutputError(f"output {printable(str(path))}: the name is not valid UTF-8 (GDAL takes UTF-8 names only): "
                          "choose another name or --out")
    if any(map(is_control, str(path))):  # (also a folder's: GDAL drops them from its paths)
        # GDAL drops them from the names it creates: the GeoPackage landed under another name, its style
        # then failed ("no such table: gpkg_contents") and a temp file was left behind
        raise OutputError(f"output {str(path)!r} holds a control character (a tab, a newline): give a name and "
                          "folder without one (for a batch scene: rename the input)")
    limit = name_max(path.parent if str(path.parent) and path.parent.is_dir() else ".")
    if len(os.fsencode(path.name)) > limit:  # (it failed as "unexpected error: OSError: [Errno 36]")
        raise OutputError(f"output name {path.name[:40]}... is too long for its file system ({len(os.fsencode(path.name))} "
                          f"bytes, at most {limit}): give a shorter name (--out NAME.tif), or rename the input")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder: give a file name")
    if os.path.lexists(path) and not overwrite:  # (also a link to nothing: it was replaced without a word)
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output folder {parent} is a file, not a folder: choose another --out")
    if not parent.is_dir():
        above = file_above(parent)
        if above is not None:  # ("create it first": it cannot be)
            raise OutputError(f"output {path}: {above} is a file, not a folder: choose another --out")
        raise OutputError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {parent} is not writable: choose another --out")
    check_path_length(path)
    return path


#: The longest path SQLite opens, in bytes (its ``MAX_PATHNAME``), less its ``-journal`` suffix: Python's
#: ``sqlite3`` (geoseg's GeoPackage style table, batch's manifest) fails past it with "unable to open
#: database file", also through a symbolic link (SQLite resolves links).
SQLITE_PATH_MAX = 512 - len("-journal")


def check_path_length(path: str | Path) -> None:
    """Refuse an output whose path, with geoseg's temp names, is longer than the file system takes (``PATH_MAX``),
    or, for a GeoPackage, longer than SQLite opens (:data:`SQLITE_PATH_MAX`): one line before any work. The
    GeoPackage's polygons were written and its style then failed ("unable to open database file"), after the
    mask had been published; past ``PATH_MAX`` the error was "unexpected error: OSError: [Errno 36]".

    Raises:
        OutputError: naming the limit and the length.
    """
    path = Path(path).absolute()
    work = temp_name(path)
    longest = len(os.fsencode(str(work))) + DERIVED_NAME_BYTES
    limit = 4096
    with contextlib.suppress(OSError, ValueError, AttributeError):
        limit = int(os.pathconf(path.parent, "PC_PATH_MAX")) or limit
    if longest > limit:
        raise OutputError(f"output {printable(str(path))[:60]}...: its path is too long for its file system ({longest:,} "
                          f"bytes with geoseg's temp names, at most {limit:,}): choose a shorter --out")
    if path.suffix.lower() == ".gpkg":
        # (SQLite measures the path with its links resolved: a short link to a deep folder fails, a long path
        # through links to a short one is fine)
        staged = len(os.fsencode(os.path.join(os.path.realpath(path.parent), work.name))) + len(".gpkg")  # (staged_as)
        if staged > SQLITE_PATH_MAX:
            raise OutputError(
                f"output {printable(str(path))[:60]}...: its path is too long for a GeoPackage (SQLite opens at most "
                f"{SQLITE_PATH_MAX} bytes; {staged} with geoseg's temp name): choose a shorter --out, or write the "
                "polygons as FlatGeobuf (.fgb; predict and batch: --vector fgb)")


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
    """Whether ``exc`` (or an exception it was raised from) says the disk is full, or, where it gives no
    other reason (GDAL's errors often carry no errno), ``folder``'s file system has less than
    :data:`LOW_SPACE_BYTES` free."""
    seen: set[int] = set()
    other = False  # an errno that says something else (a missing folder, a permission): believed
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in _FULL_ERRNOS or any(t in str(exc).lower() for t in _FULL_TEXTS):
            return True
        # (only an OS error's errno: GDAL's errors carry GDAL's own error class there, 1 for a failed write)
        other = other or (isinstance(exc, OSError) and exc.errno in errno.errorcode and not _is_gdal_error(exc))
        exc = exc.__cause__ or exc.__context__
    if folder is not None and not other:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    return False


def _is_gdal_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of rasterio's CPLE_* errors (its ``errno`` is GDAL's error class, no OS errno)."""
    return any(c.__name__ == "CPLE_BaseError" for c in type(exc).__mro__)


_TOO_LARGE_TEXTS = ("file too large",)


def too_large(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says a file grew past the largest size this
    process may write (``EFBIG``: the file-size limit of ``ulimit -f``, or the file system's own)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.EFBIG or any(t in str(exc).lower() for t in _TOO_LARGE_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, bytes), or None when unlimited."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def no_space_reason(exc: BaseException | None, folder: str | Path | None = None) -> str | None:
    """Why a write failed for lack of room, in words (``"no space left on the device"``, ``"file too large
    (...)"``), or None when ``exc`` is not about room (see :func:`disk_full`, :func:`too_large`)."""
    if too_large(exc):
        limit = file_size_limit()
        said = f"this process may not write files over {limit} bytes (ulimit -f)" if limit is not None else \
            "larger than the file system allows"
        return f"file too large: {said}"
    if disk_full(exc, folder):
        return "no space left on the device"
    return None


def write_error(path: str | Path, exc: BaseException, option: str = "--out") -> OutputError:
    """A one-line error for a failed write of ``path``: says when the disk is full, or the file grew past
    the file-size limit; ``option`` is the command-line option that chose the path."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    room = no_space_reason(exc, folder)
    if room is not None and room.startswith("file too large"):
        return NoRoomError(f"cannot write {path}: {room}: raise the limit or choose another {option} "
                           "(nothing half-written was left)")
    if room is not None:
        return NoRoomError(f"cannot write {path}: {room}: free some space or choose another {option} "
                           "(nothing half-written was left)")
    if getattr(exc, "winerror", None) in (32, 33):  # (Windows: a file open elsewhere cannot be replaced)
        return OutputError(f"cannot write {path}: it is open in another program (QGIS, a viewer of its mosaic): close "
                           "it there and run again; Windows cannot replace a file in use")
    limit = file_size_limit()
    if limit is None:
        return OutputError(f"cannot write {path}: {exc}")
    # (GDAL often loses the errno of a write past the limit: "Failed to commit transaction")
    return NoRoomError(f"cannot write {path}: {exc} (this process may not write files over {limit} bytes: ulimit -f)")


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex digits naming this machine in temp names (a folder may be shared over NFS), and its PID
    namespace: containers that share a host name (Docker's --network host, Kubernetes' hostNetwork)
    do not see each other's processes, and a cleanup in one took a live writer's file in another for
    a dead run's."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:  # (no /proc: the host name alone)
        pid_ns = ""
    return hashlib.sha256((socket.gethostname() + (f"|{pid_ns}" if pid_ns else "")).encode()).hexdigest()[:8]


#: Bytes kept free in a temp name for the names derived from it (``….staging.tif``, GDAL's ``.aux.xml``,
#: ``.ovr.tmp``, ``.msk``, a ``.gpkg`` work file and SQLite's ``-journal``).
DERIVED_NAME_BYTES = 32


def name_max(folder: str | Path) -> int:
    """The longest file name (bytes) ``folder``'s file system takes (``PC_NAME_MAX``; 255 where unknown)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        n = os.pathconf(folder if str(folder) else ".", "PC_NAME_MAX")
        if n and n > 0:
            return int(n)
    return 255


def _shorten(name: str, nbytes: int) -> str:
    """The longest start of ``name`` whose file system encoding takes at most ``nbytes`` bytes (whole
    characters only)."""
    if len(os.fsencode(name)) <= nbytes:
        return name
    out, used = [], 0
    for ch in name:
        size = len(os.fsencode(ch))
        if used + size > nbytes:
            break
        out.append(ch)
        used += size
    return "".join(out)


def temp_name(path: str | Path) -> Path:
    """A fresh temp file name next to ``path`` (same folder, so the rename is atomic), naming the
    writing process (host and pid) so that a cleanup can tell a dead run's leftover from a live
    run's file (see :func:`clean_temp_files`).

    The part taken from ``path``'s name is shortened where the temp name (and the names derived from
    it, see :data:`DERIVED_NAME_BYTES`) would pass the file system's name limit: a legal output
    name of 200 characters failed with "File name too long" on its temp name.
    """
    path = Path(path)
    tail = f".{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    folder = path.parent if str(path.parent) else Path(".")
    room = name_max(folder) - len(TMP_PREFIX) - len(tail) - DERIVED_NAME_BYTES
    # pyogrio reads a path as a URI: ';' starts its parameters and '!' an archive member, so a vector
    # file written under a temp name holding one landed elsewhere (at '.geoseg-a' for 'a;b_landcover.gpkg',
    # left there for good) and the run failed; the final name may hold them (the rename takes any name)
    name = path.name.translate(_URI_MARKS)
    return path.with_name(f"{TMP_PREFIX}{_shorten(name, max(room, 1))}{tail}")


#: Characters of a file name that pyogrio takes for URI syntax (see :func:`temp_name`).
_URI_MARKS = str.maketrans({";": "_", "!": "_"})


#: The writer in a temp name of :func:`temp_name` (and names derived from it: ``.staging.tif``, ...).
_OWNER = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.")
#: A temp file of another machine's writer (a folder shared over NFS) counts as left over once it is
#: this old (seconds): no write keeps a file unchanged this long.
STALE_TEMP_S = 24 * 3600.0


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (where that cannot be asked: assumed so)."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process there (Windows): psutil asks
        try:
            import psutil

            return bool(psutil.pid_exists(pid))
        except Exception:  # noqa: BLE001 - cannot be asked: assumed alive (its files are kept)
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
        fsync_file(tmp)  # the data on disk before the name: a power cut never leaves a short file
        mode_as_created(tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent if str(path.parent) else Path("."))  # the rename itself
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        for side in (".aux.xml", ".ovr", ".msk"):
            _unlink(Path(str(tmp) + side))


def _umask() -> int | None:
    """This process's umask, read without changing it (``os.umask`` sets it process-wide, a race with other
    threads creating files): Linux's ``/proc/self/status``; None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def refuse_link(path: str | Path, what: str) -> None:
    """Refuse a symbolic link where geoseg keeps its own state (a batch's lock, manifest, ``.geoseg`` folder; a
    train run's lock): a link there, planted by anyone who can write the folder, had the file it points at
    truncated, re-moded, printed in the log or overwritten with a database.

    Raises:
        OutputError: naming the link.
    """
    if os.path.islink(path):
        raise OutputError(f"{what} {path} is a symbolic link: geoseg keeps its own state there and never writes "
                          "through a link: remove the link (and check who made it)")


def mode_as_created(path: Path) -> None:
    """Give an output at least the mode a file the user creates gets (0666 less the umask): SQLite creates its files
    0644 whatever the umask, so a GeoPackage in a group's shared folder (umask 002) was the only output
    the group could not edit."""
    mask = _umask()
    if mask is None:
        return
    # By name, never through a descriptor: closing any descriptor of a file drops every POSIX lock this process
    # holds on it, and SQLite's on the batch manifest (its -shm) went, so another process reset the -shm that this
    # one had mapped (SIGBUS). Not through a link (lstat; a link swapped in between is a narrow race).
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        if mode | (0o666 & ~mask) != mode:  # bits added, none taken (a default ACL may have given more)
            os.chmod(path, mode | (0o666 & ~mask))


#: fsync errors that only say the file system does not do it (special or network file systems).
_NO_FSYNC_ERRNOS = (errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL))


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (``fsync``); a file system that does not support it is let be.

    Raises:
        OSError: the data could not be written (EIO, ENOSPC on a network file system, ...).
    """
    # (Windows flushes through a handle that may write only: EBADF on a read-only one failed every output)
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FSYNC_ERRNOS:
            raise
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Flush ``folder``'s entries (a rename into it) to disk, where the OS allows: never raises (the file
    itself is in place; a folder that cannot be opened or synced is as safe as the OS makes it)."""
    if os.name != "posix":  # folders cannot be opened for fsync there
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FSYNC_ERRNOS:
            log.debug("cannot fsync the folder %s: %s", folder, exc)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")  # (XML and styles declare UTF-8, whatever the locale)
    return Path(path)


def clean_temp_files(folder: str | Path, recursive: bool = True, stuck: set[Path] | None = None) -> list[Path]:
    """Delete geoseg temp and staging files left in ``folder`` (and below, if ``recursive``) by
    runs that were killed.

    These names belong to geoseg's writers only (``.geoseg-<name>.<host>-<pid>-<hex>.tmp…`` and
    ``….staging.tif…``). A file whose writer still runs on this machine is kept (it was deleted: a
    batch starting on a folder killed a predict or another batch writing below it); see
    :func:`is_leftover`. Returns what was removed.

    Housekeeping never fails the work it precedes: a leftover that cannot be removed (a folder below
    that this user may not write, a read-only mount) is a warning naming it, and the others are still
    removed; a folder that cannot be read is passed over.  Never raises :class:`OSError`.  ``stuck``
    collects the leftovers that could not be removed; those already in it are let be (said once per run).
    """
    removed = []
    now = time.time()
    # (os.walk passes over a folder it cannot read: onerror is None)
    for dirpath, _, filenames in os.walk(folder) if recursive else [(str(folder), [], _files(folder))]:
        for name in filenames:
            if name.startswith(TMP_PREFIX) and (TMP_SUFFIX in name or ".staging" in name):
                p = Path(dirpath) / name
                if (stuck is not None and p in stuck) or not is_leftover(p, now):
                    continue
                if _remove_leftover(p):
                    removed.append(p)
                elif stuck is not None:
                    stuck.add(p)
    return removed


def _remove_leftover(p: Path) -> bool:
    """Delete the leftover temp file ``p``; whether it was deleted here. One that cannot be (``EACCES``,
    ``EPERM``, ``EBUSY``, ...) is a warning naming it."""
    try:
        p.unlink()
    except FileNotFoundError:
        return False  # (gone already: its writer, or another cleanup, removed it)
    except OSError as exc:
        warn(f"cannot remove {p}, a temp file left by a killed run ({exc.strerror or exc}): remove it by hand "
             "(nothing reads it; this run goes on)", GeosegWarning)
        return False
    return True


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
