"""Crash-safe batch segmentation of many scenes, in process or on a Dask cluster.

A batch maps input scenes to outputs under one folder ``DIR`` (mirroring the input tree) and
keeps a manifest in ``DIR/.geoseg/manifest.sqlite`` so that cron runs do each scene once:

* **Exactly once.**  For every scene the manifest stores the input fingerprint (size,
  mtime in ns and a SHA-256 of the file's first and last 64 KiB, which hold the TIFF header
  and IFDs), the model key (card digest + weights digest), the parameters that change the
  result, and each output's size and quick hash.  A scene is skipped when all of these match
  and its outputs are intact; ``force`` redoes it.  Failed and interrupted scenes are retried.
* **Crash safety.**  Before a scene runs its entry is set to ``running``; every output is
  published by :mod:`geoseg.atomic` (temp name + ``os.replace``); the ``done`` entry is
  committed only after all outputs are in place (SQLite WAL, one transaction per scene).
  A run killed at any moment leaves old or new complete files plus temp files, which the
  next run deletes before it starts, and redoes the scenes that were not ``done``.
* **One run at a time.**  :class:`BatchLock` takes ``fcntl.flock`` on ``DIR/.geoseg/lock``;
  the kernel drops it when its process dies, so a dead run's lock is taken over.  A file system
  without working locks is an error, never taken for another run holding the lock.
* **Failure isolation.**  A scene that cannot be read, does not suit the model, cannot be
  written, would write another scene's outputs or raises any other error is recorded as
  ``failed`` with its reason; the batch goes on.  Model problems are fatal, and so is a Dask cluster without a worker that can
  run the scenes (after a bounded wait: never a silent hang holding the lock), and a scene that
  finds no room to write (a full disk, the file-size limit): every later scene would fail the same
  way.  A fatal error found before the run starts (a missing weights file or input) is reported too.
  A scene during which the process died (:data:`STARTED`) runs last in the next run, and is held back
  after :data:`MAX_CRASHES` such deaths; on Dask, scenes failed with ``KilledWorker`` run again one at a
  time at the end of the run (Dask fails every task that was on a dying worker).
* **Scale-out.**  With a Dask ``distributed.Client`` each scene is one task; every worker
  loads the model once through :class:`ModelPlugin` and reuses it.  Results and failures
  come back to the client, the only writer of the manifest and the report, which releases each
  task as soon as its result is taken (a task kept would be run again when its worker dies).  Each
  run's plugin has a name of its own, so runs sharing a scheduler never remove each other's.

Units: seconds (wall clock), megapixels (10⁶ scene pixels), sizes in bytes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as _dt
import errno
import fnmatch
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from xml.etree import ElementTree

from geoseg.aoi import aoi_key
from geoseg.atomic import (
    atomic_write_text,
    clean_temp_files,
    disk_full,
    file_above,
    file_size_limit,
    is_control,
    is_utf8,
    mode_as_created,
    no_space_reason,
    SQLITE_PATH_MAX,
    printable,
    refuse_link,
    temp_name,
    too_large,
    write_error,
)
from geoseg.errors import (
    AoiOutsideError,
    BatchLockedError,
    BatchWarning,
    ClusterError,
    DependencyError,
    GeosegError,
    GeosegWarning,
    ModelError,
    NoRoomError,
    OutputError,
    ParameterError,
    PerformanceWarning,
    SceneReadError,
    noted_stop,
    warn,
)

log = logging.getLogger(__name__)

STATE_DIR = ".geoseg"
MANIFEST_NAME = "manifest.sqlite"
LOCK_NAME = "lock"
DEFAULT_PATTERNS = ("*.tif", "*.tiff")
#: Bytes hashed at each end of a file for its quick content hash.
QUICK_HASH_BYTES = 64 * 1024
SCHEMA_VERSION = 1

Status = Literal["ok", "skipped", "failed"]
#: Manifest status of a scene the area of interest misses: done, with nothing to write.
OUTSIDE_AOI = "outside_aoi"
OUTSIDE_AOI_REASON = "outside the AOI"
#: Dry-run reasons (:attr:`BatchResult.planned`) of a scene the run would skip.
SKIP_REASONS = (OUTSIDE_AOI_REASON,)
#: Dry-run reason of a scene that the run holding the lock is doing (or is about to do).
RUNNING_NOW_REASON = "running now (another batch holds the lock)"
#: Manifest status of the scene a batch running scenes in its own process is running: a run that finds it
#: (holding the lock, so its writer is gone) knows that the process died during that scene (a crash or
#: the kernel's out-of-memory killer in GDAL or Paddle, or a kill from outside).
STARTED = "started"
#: Runs in which the batch process may die during a scene before later runs hold it back (until the scene,
#: the model or the parameters change, or ``force``): one scene that kills the process (a corrupt file
#: that crashes a library) stopped every nightly run at the same place, and the scenes after it never ran.
MAX_CRASHES = 2
CRASHED_REASON = "held back: it crashed the process running it"


# ---- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """One input scene and where its outputs go.

    ``key`` is the scene's path relative to the output folder's tree (POSIX, e.g.
    ``2024/a/scene1.tif``): the manifest's primary key.  ``out_dir`` is relative to ``DIR``.
    ``conflict`` says why the scene cannot run (its outputs would overwrite another scene's):
    it is reported failed with that reason, and the other scenes run.
    """

    path: Path
    key: str
    out_dir: str
    conflict: str | None = None
    #: What kind of refusal ``conflict`` is (the report's ``reason``).
    refusal: str = "name clash"


def _list_file_entries(list_path: Path) -> list[Path]:
    """Paths from an ``@list.txt`` (one per line, ``#`` comments; relative to the list's folder)."""
    try:
        # UTF-8 whatever the locale (an ASCII one failed on "unexpected error: UnicodeDecodeError"), without the
        # byte-order mark Windows editors write (the first scene's name began with it: "cannot be read"); bytes
        # that are not UTF-8 are kept, and the scene fails alone (see _bad_name)
        text = list_path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise ParameterError(f"cannot read input list {list_path}: {exc.strerror}: check the @file path") from None
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        p = p if p.is_absolute() else list_path.parent / p
        if raw != line and not p.exists():  # a name that begins or ends with spaces, as it is written
            q = Path(raw).expanduser()
            q = q if q.is_absolute() else list_path.parent / q
            p = q if q.exists() else p
        out.append(p)
    return out


def _bad_name(path: Path) -> str | None:
    """Why ``path`` cannot be a scene for its name (a part that is not valid UTF-8: SQLite, the JSON
    report, the log file and GDAL take UTF-8 names), else None."""
    if is_utf8(str(path)):
        return None
    part = next((p for p in path.parts if not is_utf8(p)), path.name)
    what = "its name" if part == path.name else f"the name of its folder {printable(part)}"
    return (f"input {printable(str(path))}: {what} is not valid UTF-8 (batch keeps names as UTF-8 in its manifest, "
            "report and log): rename it")


def _controls_escaped(text: str) -> str:
    """``text`` with its control characters (a tab, a newline) written as ``\\x09``, ``\\x0a``: a scene's key
    on one line (a dry run's ``run|skip<TAB>scene<TAB>reason``, the log, the report)."""
    return "".join(f"\\x{ord(c):02x}" if is_control(c) else c for c in text)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)


def input_list(inputs: Any) -> list[Any]:
    """``inputs`` as a list: one path given alone (a string was read as its characters) or many."""
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def discover_scenes(
    inputs: Iterable[str | Path], out_dir: str | Path, patterns: Sequence[str] | None = None,
    case_insensitive: bool | None = None,
) -> list[Scene]:
    """Expand files, folders (recursive) and ``@list.txt`` files into scenes.

    A folder's scenes keep their sub-folders under ``out_dir``; files given directly (or
    listed) go to ``out_dir`` itself.  Hidden files and anything inside ``out_dir`` are
    ignored, so an output folder inside the archive is never fed back in; when ``out_dir`` is
    (or holds) an input folder, batch's own outputs there (recorded in its manifest, or named as
    batch names them: ``<stem>_landcover.tif``, ``_confidence.tif``, ... and the mosaics) are
    ignored, and the user's other files are scenes.  Symlinked files and folders are followed; a
    folder reached twice (by its real path: a link to a folder searched already, a link loop) is
    searched once, under its own name rather than a link's, with a warning naming the link.
    ``patterns`` (default ``*.tif``, ``*.tiff``) match file names case-insensitively.

    Scenes that would write the same outputs (``a.tif`` and ``a.tiff`` in one folder, or two input
    folders both holding ``a.tif``; ``A.tif`` and ``a.tif`` only where ``out_dir``'s file system
    ignores case: ``case_insensitive``, probed there when None) come back with a ``conflict``, each of
    them: one name clash must not stop a nightly run of the whole archive.  So does a file whose path
    is not valid UTF-8 (see :func:`printable`).

    Raises:
        ParameterError: a command-line input does not exist or is a GDAL virtual path.
    """
    pats = tuple(patterns) if patterns else DEFAULT_PATTERNS
    out_root = Path(out_dir).resolve()
    scenes: list[Scene] = []
    written: set[Path] | None = None  # batch's own outputs in out_dir, read when a walk enters it

    def under_out(p: Path) -> bool:
        return p == out_root or out_root in p.parents

    def is_output(p: Path) -> bool:
        """A file batch writes in ``out_dir`` (recorded in its manifest, or named as batch names them);
        ``p``: its real path."""
        nonlocal written
        if not under_out(p):
            return False  # a user's file elsewhere is never skipped
        if written is None:
            written = _recorded_outputs(out_root)
        return p in written or is_output_name(p.name, top=p.parent == out_root)

    def add_file(p: Path, rel_dir: Path) -> None:
        key = (rel_dir / p.name).as_posix()
        bad = _bad_name(p.absolute())
        if bad is not None:  # fails alone: SQLite, the report and the log take UTF-8 names only
            scenes.append(Scene(path=p.absolute(), key=printable(key), out_dir=printable(rel_dir.as_posix()),
                                conflict=bad, refusal="name not UTF-8"))
            return
        if _controls_escaped(key) != key:  # GDAL drops them from the names it writes: the polygons failed,
            shown = _controls_escaped(key)  # the mask landed (and the dry run's line broke in two)
            scenes.append(Scene(path=p.absolute(), key=shown, out_dir=_controls_escaped(rel_dir.as_posix()),
                                conflict=f"input {shown}: its name or its folder's holds a control character (a tab, "
                                "a newline), which GDAL drops from the names it writes: rename it",
                                refusal="name with a control character"))
            return
        scenes.append(Scene(path=p.absolute(), key=key, out_dir=rel_dir.as_posix()))

    def add_dir(d: Path) -> None:
        root = d.resolve()
        seen = {root}  # real paths of the folders searched (a folder reached twice is searched once)
        links: list[Path] = []  # symlinked folders met, searched after the real tree (whose names win)

        def walk(top: Path, real_top: Path) -> None:
            for dirpath, dirnames, filenames in os.walk(top):
                here = Path(dirpath)
                real_here = real_top / here.relative_to(top)  # (os.walk enters no link: nothing to resolve)
                keep = []
                for n in sorted(dirnames):
                    # the output folder nested in the input tree is not walked; an input inside it is (its
                    # outputs are told apart by is_output)
                    if n.startswith(".") or real_here / n == out_root:
                        continue
                    if (here / n).is_symlink():
                        links.append(here / n)
                    elif real_here / n in seen:  # (inside a linked folder: the real tree has it)
                        _searched_already(top, real_here / n)
                    else:
                        seen.add(real_here / n)
                        keep.append(n)
                dirnames[:] = keep
                for name in sorted(filenames):
                    if name.startswith(".") or not _matches(name, pats) or is_output(real_here / name):
                        continue
                    add_file(here / name, here.relative_to(root))

        walk(root, root)
        while links:
            link = links.pop(0)
            real = Path(os.path.realpath(link))
            if real == out_root or not real.is_dir():
                continue
            if real in seen:
                _searched_already(link, real)
                continue
            seen.add(real)
            walk(link, real)

    expanded: list[tuple[Path, bool]] = []  # (path, given on the command line)
    for item in input_list(inputs):
        s = os.fspath(item) if isinstance(item, os.PathLike) else str(item)
        if s.startswith("@"):
            expanded.extend((p, False) for p in _list_file_entries(Path(s[1:]).expanduser()))
        else:
            expanded.append((Path(s).expanduser(), True))
    from geoseg.io import is_virtual

    for p, _ in expanded:
        if is_virtual(p):
            raise ParameterError(f"input {p}: batch reads scenes from disk (it fingerprints each file to skip unchanged "
                                 "scenes); extract the archive first, or run geoseg predict on the /vsi path")
    for p, direct in expanded:
        if p.is_dir():
            add_dir(p)
        elif p.exists() or not direct:
            # A listed file that is missing becomes a failed scene, not a fatal error.
            add_file(p, Path("."))
        else:
            raise ParameterError(f"input {p} does not exist: check the path (or use @list.txt for lists)")
    # The same file given twice is one scene; files with the same key are one failed scene (the
    # manifest has one row per key), files with the same output names are failed scenes each.
    by_key: dict[str, list[Scene]] = {}
    for sc in scenes:
        same = by_key.setdefault(sc.key, [])
        if not any(s.path.resolve() == sc.path.resolve() for s in same):
            same.append(sc)
    unique = []
    for key, same in by_key.items():
        if len(same) > 1:
            names = " and ".join(printable(str(s.path)) for s in same)
            unique.append(dataclasses.replace(same[0], refusal="name clash", conflict=(
                f"{names} would {'both' if len(same) == 2 else 'all'} write {_outputs_named(key)}: "
                "give them separately into different --out folders")))
        else:
            unique.append(same[0])
    if case_insensitive is None:
        case_insensitive = ignores_case(out_root)
    by_stem: dict[str, list[int]] = {}
    for i, sc in enumerate(unique):
        stem = f"{sc.out_dir}/{Path(sc.key).stem}"
        by_stem.setdefault(stem.lower() if case_insensitive else stem, []).append(i)
    for idx in by_stem.values():
        if len(idx) > 1:
            names = " and ".join(printable(str(unique[i].path)) for i in idx)
            for i in idx:
                if unique[i].conflict is None:
                    unique[i] = dataclasses.replace(unique[i], conflict=(
                        f"{names} would write the same outputs (same name, same folder): rename one"))
    return unique


def _outputs_named(key: str) -> str:
    """``2024/b_landcover.*``: the outputs a scene of key ``2024/b.tif`` writes, for messages (the key is the
    input's name, not what is written)."""
    path = PurePosixPath(key)
    return str(path.with_name(f"{path.stem}_landcover.*"))


def _searched_already(link: Path, real: Path) -> None:
    warn(f"{printable(str(link))} leads to the folder {printable(str(real))}, which is searched already: its scenes "
         "are taken once", BatchWarning)


def ignores_case(folder: str | Path, probe: bool = False) -> bool:
    """Whether the file system of ``folder`` (or of its nearest existing parent) takes names that differ
    only in case for one file (macOS, Windows, ext4 with casefold).

    Asked of a name already there (looked up with its case swapped); with ``probe``, an empty folder
    gets a temp file for the question (removed at once).  Where it cannot be told: the platform's usual
    file systems say (case-insensitive on macOS and Windows).
    """
    d = Path(folder).absolute()
    while not d.is_dir() and d != d.parent:
        d = d.parent
    try:
        with os.scandir(d) as it:
            names = [e.name for e in itertools.islice(it, 256)]
    except OSError:
        names = []
    for name in names:
        if name.swapcase() != name:
            return _same_file(d / name, d / name.swapcase())
    if probe:
        tmp = temp_name(d / "case-probe")
        try:
            tmp.touch(exist_ok=False)
        except OSError:
            pass
        else:
            try:
                return _same_file(tmp, tmp.with_name(tmp.name.swapcase()))
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    if d.name.swapcase() != d.name and d.parent != d:
        return _same_file(d, d.parent / d.name.swapcase())
    return sys.platform in ("darwin", "win32")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: Ends of the names of the files batch writes per scene (mask, its .aux.xml and style, confidence,
#: probabilities, polygons), lower case.
OUTPUT_SUFFIXES = ("_landcover.tif", "_landcover.tif.aux.xml", "_landcover.qml", "_confidence.tif", "_confidence.qml",
                   "_probabilities.tif", "_probabilities.qml", "_landcover.gpkg", "_landcover.geojson", "_landcover.fgb")


def is_output_name(name: str, top: bool = False) -> bool:
    """Whether ``name`` is named as batch names its outputs; ``top``: in ``DIR`` itself (also the mosaics)."""
    from geoseg.mosaic import MOSAIC_STEM

    low = name.lower()
    if low.endswith(OUTPUT_SUFFIXES):
        return True
    return top and low.startswith(MOSAIC_STEM) and low.endswith((".vrt", ".qml"))


def _recorded_outputs(out_root: Path) -> set[Path]:
    """The outputs that ``out_root``'s manifest says batch wrote (resolved); empty without a manifest."""
    path = out_root / STATE_DIR / MANIFEST_NAME
    if not path.exists():
        return set()
    try:
        manifest = Manifest(out_root, readonly=True)
        try:
            return {(out_root / o["path"]).resolve() for e in manifest.entries() for o in e.outputs}
        finally:
            manifest.close()
    except sqlite3.Error:
        return set()  # the run itself says what is wrong with its manifest


# ---- fingerprints -----------------------------------------------------------------------------
def quick_hash(path: str | Path, nbytes: int = QUICK_HASH_BYTES) -> str:
    """SHA-256 (hex, 32 chars) of a file's first and last ``nbytes`` bytes and its size."""
    h = hashlib.sha256()
    # (non-blocking: opening a FIFO named *.tif waited forever for a writer, holding the batch lock)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            from geoseg.io import file_kind

            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(st.st_mode)})", str(path))
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        size = st.st_size
        h.update(str(size).encode())
        h.update(f.read(nbytes))
        if size > nbytes:
            f.seek(max(nbytes, size - nbytes))
            h.update(f.read(nbytes))
    return h.hexdigest()[:32]


def vrt_sources(path: str | Path) -> list[Path]:
    """The files a VRT reads (``SourceFilename``; relative ones resolved against the VRT's folder)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):
        return []  # reading the scene says what is wrong with it
    out = []
    for el in root.iter("SourceFilename"):
        name = (el.text or "").strip()
        if name:
            out.append(Path(path).parent / name if el.get("relativeToVRT") == "1" else Path(name))
    return out


#: Files beside a scene that GDAL reads with it and that change what predict makes of it: ``<file>``
#: + a PAM ``.aux.xml`` (a CRS, geotransform, nodata, RPCs) or an external ``.msk`` mask; ``<stem>`` + a
#: world file or RPC metadata (``.ovr`` overviews are not read: predict reads full resolution).
SIDECARS_OF_FILE = (".aux.xml", ".msk", ".MSK")
SIDECARS_OF_STEM = (".tfw", ".tifw", ".tiffw", ".wld", ".TFW", ".TIFW", ".WLD", ".rpb", ".RPB", "_rpc.txt", "_RPC.TXT")


def _sidecar_digest(path: Path) -> tuple[str, int] | None:
    """A digest of the sidecars beside ``path`` (:data:`SIDECARS_OF_FILE`, :data:`SIDECARS_OF_STEM`) and
    the newest one's modification time (ns), None when there are none. A ``.aux.xml`` counts without the
    statistics and histograms GDAL and QGIS cache in it: opening a scene in QGIS does not make it a
    changed input."""
    names = [f"{path.name}{s}" for s in SIDECARS_OF_FILE] + [path.stem + s for s in SIDECARS_OF_STEM]
    here = _names_in(path.parent)  # (one listing per folder, not 14 failed opens per scene on a network share)
    found = [path.with_name(n) for n in names if here is None or n in here]
    h, newest = hashlib.sha256(), None
    for side in found:
        try:
            data, mtime = side.read_bytes(), side.stat().st_mtime_ns
        except OSError:  # (missing, the usual case; unreadable ones GDAL cannot use either)
            continue
        if side.name.endswith(".aux.xml"):
            data = _pam_content(data, functools.partial(_own_descriptions, path))
            if data is None:
                continue  # statistics alone
        newest = mtime if newest is None else max(newest, mtime)
        h.update(f"|{side.name}|{len(data)}|".encode())
        h.update(hashlib.sha256(data).digest())
    return None if newest is None else (h.hexdigest()[:32], newest)


def _names_in(folder: Path) -> frozenset[str] | None:
    """The names in ``folder`` (None where it cannot be listed), listed again when it changed."""
    try:
        return _listing(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=32)
def _listing(folder: str, mtime_ns: int) -> frozenset[str]:
    """``folder``'s names as they were at its modification time ``mtime_ns`` (a new file changes it)."""
    return frozenset(os.listdir(folder))


def _own_descriptions(path: Path) -> tuple[str, ...]:
    """The band descriptions the raster ``path`` holds itself (its ``.aux.xml`` left out); () where it
    cannot be read."""
    import rasterio

    from geoseg.io import open_raster

    try:
        with rasterio.Env(GDAL_PAM_ENABLED="NO"), open_raster(path) as ds:
            return tuple(d or "" for d in ds.descriptions)
    except Exception:  # noqa: BLE001 - unreadable: the scene itself fails with its own error
        return ()


def _pam_content(data: bytes, own_descriptions: Callable[[], Sequence[str]] = tuple) -> bytes | None:
    """What a GDAL ``.aux.xml`` says, without its ``<Histograms>`` and ``STATISTICS_*`` metadata items, in
    a canonical form (None when nothing else is in it): GDAL rewrites the whole file when it caches
    statistics, with other spacing and number formats (630819.000000 as 6.3081900000000000e+05), and
    with each band's description (``<Description>B1_blue</Description>``) copied from the raster: a band
    description is left out where it is the raster's own (``own_descriptions``, read only then)."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return data
    descs = [(band, desc) for band in root.iter("PAMRasterBand") for desc in band.findall("Description")]
    own = own_descriptions() if descs else ()  # (the raster read only where a description is to compare)
    for band, desc in descs:
        i = int(band.get("band") or "0") - 1 if (band.get("band") or "").isdigit() else -1
        if 0 <= i < len(own) and (desc.text or "").strip() == own[i]:
            band.remove(desc)  # (the raster's own, copied by GDAL: says nothing new)

    def number(token: str) -> str:
        try:
            return str(int(token))  # (exact: 64-bit nodata values differ past float's 2**53)
        except ValueError:
            pass
        try:
            return repr(float(token))
        except ValueError:
            return token

    def canon(el: ElementTree.Element) -> str | None:
        if el.tag == "Histograms" or (el.tag == "MDI" and (el.get("key") or "").upper().startswith("STATISTICS_")):
            return None
        kids = [c for c in map(canon, el) if c is not None]
        text = (el.text or "").strip()
        if el.tag == "SRS" and text:  # (GDAL writes "EPSG:32633" back as the CRS's whole WKT)
            with contextlib.suppress(Exception):
                import rasterio.crs

                text = rasterio.crs.CRS.from_user_input(text).to_wkt()
            el.attrib.pop("dataAxisToSRSAxisMapping", None)  # (GDAL's own, for the traditional axis order)
        text = ",".join(number(t) for t in re.split(r"[\s,]+", text) if t)
        if not kids and not text and el.tag in ("Metadata", "PAMRasterBand"):
            return None  # (left empty by the statistics)
        attrs = ",".join(f"{k}={v}" for k, v in sorted(el.attrib.items()))
        return f"<{el.tag}[{attrs}]{text}{''.join(kids)}>"

    body = [c for c in map(canon, root) if c is not None]
    return "".join(body).encode() if body else None


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{size, mtime_ns, head_hash}`` of an input file.

    A VRT's ``head_hash`` also covers the size and modification time of every file it reads, so a
    band file replaced under an unchanged VRT counts as a changed input; any scene's covers the
    sidecars GDAL reads with it (:func:`_sidecar_digest`), so a georeference or mask that arrives as
    a ``.aux.xml`` or ``.msk`` does too.

    Raises:
        SceneReadError: the file is missing or unreadable.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            from geoseg.io import file_kind

            raise SceneReadError(f"input {path} is not a regular file but {file_kind(st.st_mode)}: batch reads "
                                 "files only; move it out of the input folder or change --pattern")
        head = quick_hash(path)
        if str(path).lower().endswith(".vrt"):
            h = hashlib.sha256(head.encode())
            for src in vrt_sources(path):
                try:
                    s = os.stat(src)
                    h.update(f"|{src}|{s.st_size}|{s.st_mtime_ns}".encode())
                except OSError:
                    h.update(f"|{src}|missing".encode())
            head = h.hexdigest()[:32]
        sidecars = _sidecar_digest(Path(path))
        head = f"{head}+{sidecars[0] if sidecars else ''}"  # (+: sidecars counted, none or theirs)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_hash": head,
                "sidecars_mtime_ns": sidecars[1] if sidecars else None}
    except SceneReadError:
        raise
    except OSError as exc:
        raise SceneReadError(f"input {path} cannot be read ({exc.strerror}): check the path and permissions") from None


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchModel:
    """The model of a batch, picklable for Dask workers.

    ``model``/``weights``/``card``/``classes`` are what :func:`geoseg.engine.resolve_model` takes.
    ``device``, ``precision``, ``runtime`` and ``threads`` go to
    :func:`geoseg.engine.build_predictor` (``threads`` caps Paddle Inference's CPU threads).
    """

    model: str | None = None
    weights: str | None = None
    card: str | None = None
    #: Class names of an exported model folder whose deploy.yaml has none (``--classes``: names or a file).
    classes: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "auto"
    threads: int | None = None

    def source(self) -> Any:
        """The resolved :class:`geoseg.engine.ModelSource`."""
        from geoseg.engine import resolve_model

        return resolve_model(self.model, self.weights, self.card, self.classes)

    def key(self) -> str:
        """What the manifest compares: ``<card's output digest>-<weights digest>/<whole card's digest>``. The
        card's output digest leaves out what changes no output (its description, recorded test figures: they
        redid every scene of an archive); the whole card's digest after ``/`` lets a manifest written before
        (``<whole card's digest>-<weights digest>``) be read as the same model (:func:`same_model`)."""
        from geoseg.engine import weights_digest

        src = self.source()
        return f"{src.card.output_digest()}-{weights_digest(src)}/{src.card.digest()}"

    def build(self) -> tuple[Callable[..., Any], str, Any]:
        """Load the model: ``(predictor, description, source)``.  The expensive step."""
        from geoseg.engine import build_predictor

        src = self.source()
        predictor, desc = build_predictor(src, self.device, self.precision, self.runtime, self.threads)  # type: ignore[arg-type]
        return predictor, desc, src


def result_params(options: Any, card: Any) -> dict[str, Any]:
    """The parameters of ``options`` (:class:`PredictOptions`) that change the outputs.

    Card defaults are filled in, so an explicit ``--tile-size`` equal to the card's counts
    as the same run.  Device, batch size, threads and I/O settings do not enter.
    """
    return {
        "tile_size": options.tile_size or card.tile_size,
        "overlap": card.overlap if options.overlap is None else options.overlap,
        "bands": list(options.bands) if options.bands else None,
        "blend": str(getattr(options.blend, "value", options.blend)),
        "confidence": options.confidence,
        **({"probabilities": options.probabilities} if options.probabilities != "none" else {}),
        "creation_options": dict(sorted(options.creation_options.items())),
        "precision": options.precision,
        "vector": options.vector,
        "min_area": options.min_area,
        "simplify": options.simplify,
        **({"vector_classes": [str(v) for v in options.vector_classes]} if options.vector_classes else {}),
        **({"tta": True} if options.tta else {}),
        **({"aoi": aoi_key(options.aoi)} if options.aoi else {}),
        **({"adapt_prior": True, "prior_max_ratio": options.prior_max_ratio, "prior_windows": options.prior_windows}
           if (card.adapt_prior if options.adapt_prior is None else options.adapt_prior) else {}),
    }


# ---- lock --------------------------------------------------------------------------------------
def _fcntl() -> Any:
    """The ``fcntl`` module, whose ``flock`` keeps batch runs apart; where the system has none (Windows), a
    one-line refusal (``import geoseg.batch`` failed there, and with it every batch and train command)."""
    try:
        import fcntl
    except ImportError:
        raise ParameterError("geoseg batch keeps runs on one --out apart with file locks (fcntl's flock), which this "
                             "system does not have (Windows): run batch under WSL, or geoseg predict for each "
                             "scene") from None
    return fcntl


class BatchLock:
    """An exclusive ``flock`` on ``DIR/.geoseg/lock`` holding ``pid host time`` of the holder.

    The kernel releases the lock when the holding process dies (even by ``kill -9``), so a
    stale lock is taken over by the next run.  Local file systems (and NFSv4) support it; a file
    system whose ``flock`` fails otherwise than "held by another" (``ENOLCK``: NFS without its lock
    service, ``EOPNOTSUPP``/``EINVAL``: some FUSE and SMB mounts) is refused with a
    :class:`ParameterError`, never taken for a live run (exit 4, which cron users ignore).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / STATE_DIR / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> BatchLock:
        """Take the lock or raise :class:`BatchLockedError` at once (never waits).

        Raises:
            BatchLockedError: another run holds the lock.
            ParameterError: the lock file's file system does not support ``flock``.
            OutputError: the holder's line cannot be written into the lock file (a :class:`NoRoomError`
                for a full disk); the lock is dropped again, never left held by this process.
            OSError: the lock file cannot be created or opened.
        """
        fcntl = _fcntl()
        refuse_link(self.path.parent, "the state folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # (less the umask: a group's run may take it too; never through a link: ELOOP)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                refuse_link(self.path, "the lock file")
            raise
        mode_as_created(self.path)  # (one made 0644 by geoseg before session 29)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_fd(fd).strip() or "unknown process"
            os.close(fd)
            if not _held_elsewhere(exc):
                raise self._unsupported(exc) from None
            raise BatchLockedError(
                f"{self.path.parent.parent} is locked by another geoseg batch run ({holder}): "
                "this run does nothing; wait for it to finish"
            ) from None
        try:
            previous = _read_fd(fd).strip()
            if previous:  # (what a lock of geoseg's holds, no more: never another file's lines)
                log.warning("taking over the lock of a batch run that died (%s)",
                            previous if re.fullmatch(r"pid \d+ on \S+ since \S+", previous) else "unreadable")
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)
            os.fsync(fd)
        except BaseException as exc:
            # Held and not handed to release(): a long-lived process (a pipeline worker, a notebook) kept
            # the lock, and every later run on DIR, from any process, was "locked by another run".
            _unlock_and_close(fd)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None
            raise
        self._fd = fd
        return self

    def _unsupported(self, exc: OSError) -> ParameterError:
        """The error of a lock file whose ``flock`` fails for another reason than a run holding it."""
        return ParameterError(
            f"cannot lock {self.path} ({exc.strerror or exc}): the file system of {self.path.parent.parent} does "
            "not support locks (flock), which keep two runs apart: put --out on a local disk")

    def _write_error(self, exc: OSError) -> OutputError:
        """The error of a lock file taken but not written (the holder's line): a full disk says so."""
        room = no_space_reason(exc, self.path.parent)
        if room is not None:
            todo = "raise the limit" if room.startswith("file too large") else "free some space"
            return NoRoomError(f"cannot write the lock file {self.path}: {room}: {todo} or choose another --out")
        return OutputError(f"cannot write the lock file {self.path} ({exc.strerror or exc}): check the disk or "
                           "choose another --out")

    def held_by(self) -> str | None:
        """Who holds the lock now (``pid ... on ... since ...``) when a live run holds it, else None.

        Tests the lock without taking it for long (a shared ``flock``, dropped at once); a lock file
        left by a run that died is free, as :meth:`acquire` sees it.

        Raises:
            ParameterError: the lock file's file system does not support ``flock`` (as :meth:`acquire`).
        """
        fcntl = _fcntl()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: no run ever held it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if not _held_elsewhere(exc):
                    raise self._unsupported(exc) from None
                return _read_fd(fd).strip() or "unknown process"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Empty the lock file (a clean exit) and release the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        _unlock_and_close(fd)

    def __enter__(self) -> BatchLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


#: ``flock`` errors that say another holds the lock (``EWOULDBLOCK``; ``EAGAIN`` and ``EACCES`` where ``flock``
#: is built on ``fcntl`` locks); any other (``ENOLCK``, ``EOPNOTSUPP``, ``EINVAL``, ``EIO``) says locks do not work.
_HELD_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


def _held_elsewhere(exc: OSError) -> bool:
    """Whether ``flock``'s ``exc`` says another process holds the lock."""
    return exc.errno in _HELD_ERRNOS


def _unlock_and_close(fd: int) -> None:
    """Drop the ``flock`` on ``fd`` and close it; never raises (a close that reports an error still frees
    the descriptor, and with it the lock)."""
    with contextlib.suppress(OSError):
        fcntl = _fcntl()
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


# ---- manifest ----------------------------------------------------------------------------------
@dataclass
class ManifestEntry:
    """One scene's row in the manifest."""

    key: str
    input: str
    size: int
    mtime_ns: int
    head_hash: str
    model: str
    params: str  # canonical JSON
    status: str  # "done", "failed", "running" (to do) or STARTED
    outputs: list[dict[str, Any]] = field(default_factory=list)  # {path (relative to DIR), size, hash}
    error: str | None = None
    seconds: float = 0.0
    windows: int = 0
    megapixels: float = 0.0
    worker: str | None = None
    finished: str | None = None
    #: Runs whose process died while it ran this scene (see :data:`STARTED`, :data:`MAX_CRASHES`); a
    #: ``STARTED`` entry's own crash is not counted yet.  0 once the scene runs to its end (done or failed)
    #: or changes; kept by a scene held back.
    crashes: int = 0


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the database file is damaged (not a database, malformed), not busy or locked."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+, raised by SQLite itself
    if code is not None:
        return code in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _quick_check(db: sqlite3.Connection) -> None:
    """Raise ``sqlite3.DatabaseError`` when SQLite finds the open database damaged (a truncated file
    opens and fails only at the first page it lacks: a check at open time, not halfway through a run)."""
    rows = db.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise sqlite3.DatabaseError(f"database disk image is malformed ({rows[0][0] if rows else 'no answer'})")


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open the manifest ``path`` for reading only, creating and changing nothing (a dry run "writes
    nothing", and may look at a ``DIR`` it cannot write, such as a read-only mount).

    SQLite opens a WAL database read-only only with its ``-shm`` file, which it creates when missing
    (``unable to open database file`` in a read-only folder).  Without a ``-wal`` file beside it every
    change is in the database file, read as immutable (no side files); with one (a run is writing, or
    one was killed), that run's ``-shm`` is used as SQLite does for any reader.
    """
    wal = Path(f"{path}-wal")
    try:
        live = wal.stat().st_size > 0
    except OSError:
        live = False
    uri = path.absolute().as_uri()
    if not live:
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return db
    except sqlite3.OperationalError as exc:  # a -wal without its -shm in a folder SQLite cannot write
        db.close()
        if _is_corrupt(exc):
            raise
        warn(f"cannot read {wal.name} beside the manifest {path} ({exc}): the changes of the run that wrote it "
             "are not seen here", BatchWarning)
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)


class Manifest:
    """The SQLite manifest of a batch output folder (WAL; one transaction per change).

    A damaged manifest (not a database, truncated) is moved aside to
    ``manifest.sqlite.corrupt-<UTC time>`` with a warning and a fresh one is started: the run then
    redoes every scene, instead of every nightly run failing on it until someone looks.  Read-only,
    a damaged manifest reads as empty (``corrupt`` is set).
    """

    COLUMNS = tuple(f.name for f in dataclasses.fields(ManifestEntry))

    def __init__(self, out_dir: str | Path, readonly: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / STATE_DIR / MANIFEST_NAME
        self.corrupt = False
        self._db: sqlite3.Connection | None = None
        self._columns: tuple[str, ...] = self.COLUMNS  # those the file has (a read-only older one may lack some)
        if readonly:
            if self.path.exists():
                db = _connect_readonly(self.path)
                try:
                    _quick_check(db)
                except sqlite3.DatabaseError as exc:
                    db.close()
                    if not _is_corrupt(exc):
                        raise
                    self.corrupt = True
                    return
                self._db = db
                have = {r[1] for r in db.execute("PRAGMA table_info(scenes)")}
                self._columns = tuple(c for c in self.COLUMNS if c in have)
            return
        _check_manifest_path(self.out_dir)
        refuse_link(self.path.parent, "the state folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for side in ("", "-wal", "-shm", "-journal"):
            refuse_link(f"{self.path}{side}", "the manifest file")
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            if not _is_corrupt(exc):
                raise self._write_error(exc) from None
            aside = self._move_aside()
            warn(f"the manifest {self.path} is damaged ({str(exc).splitlines()[0]}): moved it to {aside.name} and "
                 "started a new one; this run redoes every scene", BatchWarning)
            self._open()

    def _move_aside(self) -> Path:
        """Rename the damaged manifest and its WAL/shared-memory files (a stale WAL must never be
        applied to the new manifest) to ``<name>.corrupt-<time>``; return the new name."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for side in ("-wal", "-shm", ""):  # the database last: a crash in between leaves it to be moved again
            src = Path(f"{self.path}{side}")
            if src.exists():
                os.replace(src, f"{aside}{side}")
        return aside

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, timeout=30)
        _quick_check(self._db)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scenes (key TEXT PRIMARY KEY, input TEXT, size INTEGER, mtime_ns INTEGER, "
                "head_hash TEXT, model TEXT, params TEXT, status TEXT, outputs TEXT, error TEXT, seconds REAL, "
                "windows INTEGER, megapixels REAL, worker TEXT, finished TEXT, crashes INTEGER NOT NULL DEFAULT 0)"
            )
            if "crashes" not in {r[1] for r in self._db.execute("PRAGMA table_info(scenes)")}:  # (before session 28)
                self._db.execute("ALTER TABLE scenes ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        # SQLite makes its files 0644 whatever the umask (the WAL and shared-memory files it makes later take
        # the database's mode): under umask 002 another member of the group could not run batch on the folder
        for side in ("", "-wal", "-shm"):
            mode_as_created(Path(f"{self.path}{side}"))

    def get(self, key: str) -> ManifestEntry | None:
        """The entry of ``key`` or None."""
        if self._db is None:
            return None
        row = self._db.execute(f"SELECT {', '.join(self._columns)} FROM scenes WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        d = dict(zip(self._columns, row))
        d["outputs"] = json.loads(d["outputs"] or "[]")
        return ManifestEntry(**d)

    def put(self, *entries: ManifestEntry) -> None:
        """Insert or replace ``entries`` in one committed transaction."""
        assert self._db is not None
        rows = []
        for entry in entries:
            d = dataclasses.asdict(entry)
            d["outputs"] = json.dumps(d["outputs"])
            rows.append(tuple(d[c] for c in self.COLUMNS))
        try:
            with self._db:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO scenes ({', '.join(self.COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(self.COLUMNS))})",
                    rows,
                )
        except sqlite3.OperationalError as exc:
            raise self._write_error(exc) from None

    def _write_error(self, exc: sqlite3.DatabaseError) -> Exception:
        """A one-line :class:`OutputError` naming the manifest for a write SQLite could not do for lack of
        room (a full disk, the file-size limit of ``ulimit -f``) or an I/O error; ``exc`` itself otherwise
        (busy, locked: not about the disk)."""
        code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
        text = str(exc).lower()
        full = code == 13 or "disk is full" in text  # SQLITE_FULL (also a write cut short by a size limit)
        io_error = (code is not None and code & 0xFF == 10) or "disk i/o error" in text  # SQLITE_IOERR_*
        if not (full or io_error):
            return exc
        limit = file_size_limit()
        sizes = [os.stat(f).st_size for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-journal"))
                 if os.path.exists(f)]
        if limit is not None and max(sizes, default=0) + 2**16 >= limit:  # (SQLite says EFBIG as an I/O error)
            room: str | None = f"file too large: this process may not write files over {limit} bytes (ulimit -f)"
            todo = "raise the limit"
        elif full or disk_full(None, self.path.parent):
            room, todo = "no space left on the device", "free some space"
        else:
            room, todo = None, "check the disk"
        return (NoRoomError if room is not None else OutputError)(
            f"cannot write the manifest {self.path}: {room or str(exc)}: {todo} or choose another --out "
            "(the next run redoes the scenes not recorded as done)")

    def entries(self) -> list[ManifestEntry]:
        """All entries, sorted by key."""
        if self._db is None:
            return []
        keys = [r[0] for r in self._db.execute("SELECT key FROM scenes ORDER BY key")]
        return [e for k in keys if (e := self.get(k)) is not None]

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None


def outputs_intact(out_dir: Path, outputs: Sequence[dict[str, Any]]) -> str | None:
    """None when every recorded output exists with its size and quick hash, else why not."""
    if not outputs:
        return "no outputs recorded"
    for o in outputs:
        p = out_dir / o["path"]
        try:
            if p.name.lower().endswith((".aux.xml", ".qml")):
                # GDAL and QGIS cache a raster's statistics in its .aux.xml (gdalinfo -stats, opening
                # the mask), and QGIS saves a style the analyst changed into its .qml: looking at or
                # restyling an output is not damaging it
                p.stat()
                continue
            if p.stat().st_size != o["size"]:
                return f"output {o['path']} changed size"
            if quick_hash(p) != o["hash"]:
                return f"output {o['path']} changed"
        except OSError:
            return f"output {o['path']} is missing"
    return None


def _adopted(entry: ManifestEntry, fp: Mapping[str, Any]) -> str:
    """``entry``'s head hash as the fingerprint ``fp``'s when it was written before sidecars counted (no
    ``+`` part), the file's own part is unchanged and its sidecars are no newer than the entry: a scene
    done before session 26 with a world file or .aux.xml beside it is not redone for a sidecar it already
    had (the run records the sidecars then; a later change of them counts, as does one that came after)."""
    recorded, now = entry.head_hash, fp["head_hash"]
    if "+" in recorded or now.split("+", 1)[0] != recorded:
        return recorded
    newest = fp.get("sidecars_mtime_ns")
    if newest is None:
        return now
    try:
        done = _dt.datetime.fromisoformat(entry.finished or "").timestamp() * 1e9
    except ValueError:
        return recorded
    return now if newest <= done else recorded  # (finished is cut to whole seconds: in doubt, it runs)


def why_run(
    entry: ManifestEntry | None, fp: dict[str, Any], model_key: str, params_json: str, out_dir: Path, force: bool
) -> str | None:
    """Why a scene must run (a short reason), or None when it is done and intact."""
    if force:
        return "forced"
    if entry is None:
        return "new"
    if entry.status == STARTED:
        return _changed(entry, fp, model_key, params_json) or "the batch process died while running it (runs last)"
    if entry.status == "failed":
        return "failed before"
    if entry.status not in ("done", OUTSIDE_AOI):
        return "not finished by an interrupted run"  # (queued or running when it stopped)
    changed = _changed(entry, fp, model_key, params_json)
    if changed is not None:
        return changed
    if entry.status == OUTSIDE_AOI:
        return None  # nothing to write for it
    return outputs_intact(out_dir, entry.outputs)


def same_model(recorded: str, model_key: str) -> bool:
    """Whether the manifest's ``recorded`` model key is the model of ``model_key`` (:meth:`BatchModel.key`): the
    same card output digest and weights, or, recorded before session 29 (``<whole card's digest>-<weights>``), the
    same whole card and weights."""
    if recorded == model_key:
        return True
    ours, _, whole = model_key.partition("/")
    theirs, _, their_whole = recorded.partition("/")
    if their_whole:
        return theirs == ours
    weights = ours.partition("-")[2]
    return bool(whole) and recorded == f"{whole}-{weights}"


def _changed(entry: ManifestEntry, fp: dict[str, Any], model_key: str, params_json: str) -> str | None:
    """What changed since the scene's entry was written (its input, the model, the parameters), or None."""
    if (entry.size, entry.mtime_ns, _adopted(entry, fp)) != (fp["size"], fp["mtime_ns"], fp["head_hash"]):
        return "input changed"
    if not same_model(entry.model, model_key):
        return "model changed"
    if entry.params != params_json:
        return "parameters changed"
    return None


def crashes_of(entry: ManifestEntry | None, fp: dict[str, Any], model_key: str, params_json: str) -> int:
    """The runs whose process died while it ran the scene, with the crash a :data:`STARTED` entry says (the
    run reading it holds the lock: its writer is gone); 0 when the scene, the model or the parameters changed
    since (a fixed file gets its tries again)."""
    if entry is None or _changed(entry, fp, model_key, params_json) is not None:
        return 0
    return entry.crashes + (entry.status == STARTED)


def held_back_error(crashes: int) -> str:
    """The one-line error of a scene held back after ``crashes`` (≥ :data:`MAX_CRASHES`) crashes."""
    return (f"the process died {crashes} times while running this scene (the batch process or its Dask worker: a "
            "crash or an out-of-memory kill in GDAL or Paddle, or a kill from outside): later runs hold it back until "
            "it changes; try it alone with 'geoseg predict', or give --force to run it again")


# ---- running one scene (in process or on a worker) ---------------------------------------------
@dataclass
class SceneOutcome:
    """What happened to one scene; also what a Dask task returns to the client."""

    key: str
    input: str
    status: Status
    reason: str = ""  # why it ran, or why it was skipped
    seconds: float = 0.0
    windows: int = 0
    megapixels: float = 0.0
    outputs: list[str] = field(default_factory=list)  # absolute paths
    error: str | None = None
    error_type: str | None = None
    fatal: bool = False  # a model problem: every other scene would fail the same way
    #: No room to write it (a full disk, the file-size limit): every later scene would fail the same way.
    no_room: bool = False
    worker: str | None = None
    model_loads: int = 0  # models loaded by this worker process so far (Dask)
    warnings: list[str] = field(default_factory=list)  # geoseg's warnings about this scene, one line each
    class_pixels: dict[str, int] = field(default_factory=dict)  # pixels of each class in the mask
    class_area: dict[str, float] | None = None  # in class_area_units (see geoseg.engine.PredictResult.class_area)
    class_area_units: str | None = None  # m2, ftUS2, ... (None without a CRS)
    #: Its process died under it (a Dask worker that died again when the scene ran alone): counted in the
    #: manifest's ``crashes``, as a batch process's death is.
    crashed: bool = False

    @property
    def megapixels_per_s(self) -> float:
        """Scene megapixels per second, end to end."""
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    def to_report(self, out_dir: Path) -> dict[str, Any]:
        """The scene's record in the JSON run report."""
        return {
            "key": self.key,
            "input": self.input,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "windows": self.windows,
            "megapixels": round(self.megapixels, 4),
            "megapixels_per_s": round(self.megapixels_per_s, 4),
            "outputs": self.outputs,
            "error": self.error,
            "warnings": self.warnings,
            "class_pixels": self.class_pixels,
            "class_area": self.class_area,
            "class_area_units": self.class_area_units,
            "worker": self.worker,
        }


def run_scene(
    scene: Scene, out_dir: str | Path, options: Any, predictor: Callable[..., Any], source: Any,
    stopped: Callable[[], bool] | None = None,
) -> SceneOutcome:
    """Segment one scene into ``out_dir/scene.out_dir`` with a ready predictor.

    Scene errors (unreadable, unsuitable, unwritable) come back as a ``failed`` outcome;
    model errors as a ``fatal`` one.  Any other ``Exception`` of the scene (a ``ZeroDivisionError`` from a
    degenerate transform, a library's own error class) fails that scene alone too, in one line naming the
    exception's type: one bad scene must not stop a nightly run of the archive every night.  Only
    ``KeyboardInterrupt`` and ``SystemExit`` (a stopped run) pass through.  geoseg's warnings about
    the scene (e.g. values far from the model's training data) come back in the outcome, so a
    Dask worker's reach the client's log and the run report as they do in a local run.
    ``stopped`` (see :func:`geoseg.engine.segment_scene`) ends the scene unpublished once it says True.
    """
    from geoseg.engine import segment_scene

    t0 = time.perf_counter()
    dest = Path(out_dir) / scene.out_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeosegWarning)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            opts = dataclasses.replace(options, overwrite=True)
            res = segment_scene(scene.path, dest, source=source, predictor=predictor, options=opts, stopped=stopped)
        except Exception as exc:  # noqa: BLE001 - a stop first, then one scene's failure, whatever raised it
            out = _scene_failure(scene, exc, t0)
        else:
            out = SceneOutcome(
                key=scene.key, input=str(scene.path), status="ok", seconds=time.perf_counter() - t0,
                windows=res.windows, megapixels=res.megapixels, outputs=[str(p) for p in res.outputs],
                class_pixels=res.class_pixels, class_area=res.class_area, class_area_units=res.area_units,
            )
    out.warnings += _geoseg_warnings(caught)
    return out


def _scene_failure(scene: Scene, exc: Exception, t0: float) -> SceneOutcome:
    """The outcome of a scene whose run raised ``exc`` (see :func:`run_scene`); a stop a signal asked for
    is raised again (paddle's C++ code turns the signal's KeyboardInterrupt into another error, a
    ModelError once geoseg wraps it: the scene was taken for failed and the run went on)."""
    stop = noted_stop()
    if stop is not None:
        raise stop from None
    if isinstance(exc, (ModelError, DependencyError)):
        return _failed(scene, exc, t0, fatal=True)
    if isinstance(exc, AoiOutsideError):
        return SceneOutcome(key=scene.key, input=str(scene.path), status="skipped", seconds=time.perf_counter() - t0,
                            reason=OUTSIDE_AOI_REASON, error=str(exc).splitlines()[0])
    if not isinstance(exc, (GeosegError, OSError, ValueError, RuntimeError, MemoryError, *_gdal_errors())):
        log.debug("%s failed with an unexpected %s", scene.key, type(exc).__name__, exc_info=True)
    out = _failed(scene, exc, t0)
    out.no_room = _no_room(exc)
    out.error = _in_batch_words(out.error or "")
    return out


def _no_room(exc: BaseException) -> bool:
    """Whether a scene's write failed for lack of room: a full disk or quota (``ENOSPC``, ``EDQUOT``) or
    a file past the file-size limit (``EFBIG``), raised as such or as geoseg's :class:`NoRoomError`
    (:func:`geoseg.atomic.write_error`).  Not a low free space alone: a corrupt scene on a nearly full
    disk is that scene's failure."""
    return isinstance(exc, NoRoomError) or disk_full(exc) or too_large(exc)


#: predict's advice after its polygons could not be written ("...; the mask X is complete: write its polygons
#: with geoseg vectorize X, or run predict again with --overwrite"): batch redoes the scene itself.
_PREDICT_ADVICE = re.compile(r"; the mask .+ is complete: write its polygons with geoseg vectorize .*$")


def _in_batch_words(error: str) -> str:
    """A scene's error as batch says it: without predict's advice to run predict again (a failed scene is
    redone by the next batch run)."""
    return _PREDICT_ADVICE.sub("", error)


def _geoseg_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """The first lines of geoseg's warnings among ``caught`` (recorded under ``catch_warnings``); the
    others are said again as if they had not been caught."""
    said = []
    for w in caught:
        if issubclass(w.category, GeosegWarning):
            said.append(str(w.message).splitlines()[0])
        else:  # not ours: as if it had not been caught
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return said


def _gdal_errors() -> tuple[type[Exception], ...]:
    """rasterio's and GDAL's own error classes: a scene's read or write can raise them unwrapped (e.g.
    ``CPLE_OpenFailedError`` when its staging file vanished), and they derive from neither ``OSError``
    nor each other; one scene's I/O error must fail that scene, not the batch."""
    import rasterio.errors

    out: tuple[type[Exception], ...] = (rasterio.errors.RasterioError,)
    with contextlib.suppress(ImportError, AttributeError):
        from rasterio._err import CPLE_BaseError

        out += (CPLE_BaseError,)
    return out


def _outside_aoi(scene: Scene, aoi: str) -> SceneOutcome | None:
    """The skipped outcome of a scene the AOI misses, else None (the scene runs; a scene that cannot
    be read here, or whose header fails the test in any other way, such as a transform that cannot be
    inverted, is left to its run, which fails it alone)."""
    from geoseg.aoi import load_aoi
    from geoseg.io import open_scene

    t0 = time.perf_counter()
    try:
        load_aoi(aoi, open_scene(scene.path))
    except AoiOutsideError as exc:
        return SceneOutcome(key=scene.key, input=str(scene.path), status="skipped", seconds=time.perf_counter() - t0,
                            reason=OUTSIDE_AOI_REASON, error=str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - the scene's own run says what is wrong with it
        log.debug("cannot tell whether the AOI misses %s (%s: %s): it runs", scene.key, type(exc).__name__, exc)
    return None


def _failed(scene: Scene, exc: BaseException, t0: float, fatal: bool = False) -> SceneOutcome:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not isinstance(exc, GeosegError):
        msg = f"{type(exc).__name__}: {msg}"
    return SceneOutcome(
        key=scene.key, input=str(scene.path), status="failed", seconds=time.perf_counter() - t0,
        error=msg, error_type=type(exc).__name__, fatal=fatal,
    )


# ---- Dask ----------------------------------------------------------------------------------------
PLUGIN_PREFIX = "geoseg-model-"
#: Seconds to wait for a first worker to join the scheduler before any scene is submitted (a scheduler
#: without workers took the tasks and waited forever, holding the batch lock: every later cron run
#: then exited 4).
WORKER_WAIT_S = 60.0
#: Seconds a running batch waits while the cluster has no worker that can run its scenes (all died,
#: or none offers the --resources asked) before it stops with an error; the scenes it did not finish
#: stay ``running`` in the manifest and are redone by the next run.
NO_WORKER_GRACE_S = 120.0
#: Seconds between two looks at the cluster's workers while the scenes run.
WORKER_POLL_S = 5.0
_GONE = ("closing", "closing_gracefully", "closed", "failed", "dont_reply")


class ModelPlugin:
    """A Dask worker plugin that loads the batch's model once per worker and lends it to tasks.

    Loading is lazy (first task on the worker) and guarded by a lock, so a worker with several
    threads still loads once; ``loads`` counts the loads of this worker process.
    """

    def __init__(self, model: BatchModel, name: str, quiet_loggers: tuple[str, ...] = (), own_cluster: bool = False
                 ) -> None:
        self.model = model
        self.name = name
        self.quiet_loggers = quiet_loggers
        self.own_cluster = own_cluster
        self.worker_name: Any = None  # the worker's name (batch's own LocalCluster: 0 .. N-1), set up on it
        self.loads = 0
        self._loaded: tuple[Callable[..., Any], str, Any] | None = None
        self._lock: threading.Lock | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "name": self.name, "quiet_loggers": self.quiet_loggers,
                "own_cluster": self.own_cluster}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["name"], state.get("quiet_loggers", ()),  # type: ignore[misc]
                      state.get("own_cluster", False))

    def setup(self, worker: Any) -> None:
        """Called by Dask when the plugin is registered on a worker."""
        self._lock = threading.Lock()
        self.worker_name = getattr(worker, "name", None)
        # The caller asked for quiet workers (a cron run's stderr takes one line per scene).
        for name in self.quiet_loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.quiet_loggers:  # as the CLI does in its own process: paddle's build-tool notice at import
            import warnings

            warnings.filterwarnings("ignore", message="No ccache found")
            # as the CLI: geoseg's own warning says what a scene without georeferencing gets
            import rasterio.errors

            warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
            # a run stopped by a signal cancels the scenes still running (one line each) and closes
            # the scheduler under a worker's heartbeat (a traceback): not for a cron job's stderr
            for name in ("distributed.worker.state_machine", "distributed.worker"):
                logging.getLogger(name).addFilter(_StoppedRunNoise())
        if self.own_cluster and threading.current_thread() is threading.main_thread():
            # A worker of batch's own LocalCluster: Ctrl-C reaches every process of the terminal's
            # group, and each worker printed a KeyboardInterrupt traceback; the client stops the run
            # and closes the cluster, which ends the workers.
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Paddle's import replaces SIGTERM's handler with one that prints a C++ "FatalError" dump
            # (a cron job's `timeout` signals the whole group: one dump per worker). Imported here, in
            # the worker's main thread, the handler before it is put back (require_paddle); imported
            # later in a task's thread, it could not be.
            from geoseg.errors import GeosegError, require_paddle

            with contextlib.suppress(GeosegError):  # (no paddle: the model's loading says so, once)
                require_paddle()

    def device(self) -> str:
        """The model's device on this worker. The workers of batch's own LocalCluster (named 0 .. N-1) are
        spread over the GPUs this machine's CUDA shows (worker i on GPU i mod count): every one of them
        ran on GPU 0, the others idle. A user's cluster is left as it is (one GPU per worker process
        by ``CUDA_VISIBLE_DEVICES``)."""
        name = self.worker_name
        if not self.own_cluster or self.model.device not in ("auto", "gpu") or not isinstance(name, int):
            return self.model.device
        count = gpu_count()
        return f"gpu:{name % count}" if count > 1 else self.model.device

    def teardown(self, worker: Any) -> None:
        """Drop the model."""
        self._loaded = None

    def get(self) -> tuple[Callable[..., Any], str, Any]:
        """``(predictor, description, source)``, loading the model on first use."""
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            if self._loaded is None:
                self._loaded = dataclasses.replace(self.model, device=self.device()).build()
                self.loads += 1
                log.debug("worker loaded model %s (%s)", self._loaded[2].label, self._loaded[1])
            return self._loaded


def gpu_count() -> int:
    """GPUs Paddle's CUDA sees here (see :func:`geoseg.engine.gpu_count`)."""
    from geoseg.engine import gpu_count as count

    return count()


class _StoppedRunNoise(logging.Filter):
    """Drops what distributed logs when the run is stopped under it: the workers' 'Async instruction
    ... ended with CancelledError' and 'Failed to communicate with scheduler during heartbeat', the
    client's 'Failed to reconnect to scheduler' and its tracebacks of a lost connection (a scheduler
    restarted under the run: ~40 lines of ConnectionRefusedError / CommClosedError), a local scheduler's
    'broadcast to ... failed: CommClosedError' as the group's SIGTERM ends its workers (geoseg's own line
    says the scheduler was lost, or the run stopped)."""

    #: Exceptions of a connection that went away, logged with their traceback.
    LOST = frozenset({"CommClosedError", "ConnectionRefusedError", "CancelledError", "StreamClosedError"})

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None and record.exc_info[0].__name__ in self.LOST:
            return False
        if "broadcast to" in text and "CommClosedError" in text:
            return False
        return not any(t in text for t in ("ended with CancelledError", "Failed to communicate with scheduler",
                                           "Failed to reconnect to scheduler"))


def _make_worker_plugin(model: BatchModel, name: str, quiet_loggers: tuple[str, ...] = (),
                        own_cluster: bool = False) -> Any:
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Plugin(ModelPlugin, WorkerPlugin):  # type: ignore[misc]
        pass

    return _Plugin(model, name, quiet_loggers, own_cluster)


def run_plugin_name(model: BatchModel, client_id: str = "") -> str:
    """The name of one run's :class:`ModelPlugin` on the cluster: the model's digest, a part of this run's
    own and, after an ``@``, the id of its Dask client. Runs sharing a scheduler (two archives' cron jobs,
    the same weights) each register and unregister their own: a name of the model alone was one plugin
    for both, and the first run to finish removed it from every worker, failing the other run's scenes
    ("KeyError: 'geoseg-model-…'"), while each new registration under it threw away the other run's loaded
    model. The client's id lets a later run remove the plugin of a run killed before it could
    (:func:`_remove_orphan_plugins`)."""
    return f"{PLUGIN_PREFIX}{hashlib.sha256(repr(model).encode()).hexdigest()[:12]}-{uuid.uuid4().hex[:12]}@{client_id}"


def _remove_orphan_plugins(client: Any) -> list[str]:
    """Unregister the geoseg model plugins of clients no longer connected to the scheduler: a run killed
    (kill -9, out of memory) or cut off from it never removed its plugin, whose model then stayed loaded
    on every worker, and on every worker joining later, for good. Returns the names removed; a scheduler
    that cannot be asked is let be."""
    def state(dask_scheduler: Any) -> tuple[list[str], list[str]]:
        return list(dask_scheduler.clients), list(dask_scheduler.worker_plugins)

    try:
        connected, names = client.run_on_scheduler(state)
    except Exception:  # noqa: BLE001 - housekeeping only
        return []
    orphans = [n for n in names if n.startswith(PLUGIN_PREFIX) and "@" in n and n.rsplit("@", 1)[1] not in connected]
    for n in orphans:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(n)
            log.info("removed the model plugin %s of a batch run that is gone", n)
    return orphans


def dask_scene_task(scene: Scene, out_dir: str, options: Any, plugin_name: str) -> SceneOutcome:
    """Dask task: run one scene with the worker's cached model (see :class:`ModelPlugin`), the plugin of
    the run that submitted it (``plugin_name``, see :func:`run_plugin_name`).

    Raises:
        ClusterError: this worker lacks that plugin (it was removed under the run).
    """
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None:
        raise ClusterError(f"the worker {worker.address} lacks this run's model plugin {plugin_name} (was it "
                           "unregistered by another client of the scheduler?): the next run redoes the scene")
    # the model loads with this worker's first scene: its warnings (e.g. fp16 on a CPU) come back with
    # that scene, as run_scene's own do, to the client's log and the report
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GeosegWarning)
        try:
            loaded: tuple[Callable[..., Any], str, Any] | GeosegError = plugin.get()
        except GeosegError as exc:
            loaded = exc
    if isinstance(loaded, GeosegError):
        out = _failed(scene, loaded, time.perf_counter(), fatal=True)
    else:
        predictor, _, source = loaded
        out = run_scene(scene, out_dir, options, predictor, source, stopped=task_cancelled(worker))
    out.warnings[:0] = _geoseg_warnings(caught)
    out.worker = worker.address
    out.model_loads = plugin.loads
    return out


def task_cancelled(worker: Any) -> Callable[[], bool] | None:
    """For the Dask task running in this thread: a check that says True once the task is cancelled (the
    batch was stopped: the client cancels its futures and closes its own cluster) or its worker is
    closing. A running task's thread cannot be interrupted: without this a scene went on after the run
    had stopped and published its mask while the manifest said "not finished". None outside a task."""
    from distributed.worker import thread_state

    key = getattr(thread_state, "key", None)
    tasks = getattr(getattr(worker, "state", None), "tasks", None)
    if key is None or tasks is None:
        return None

    def cancelled() -> bool:
        ts = tasks.get(key)
        status = getattr(getattr(worker, "status", None), "name", "running")
        return ts is None or ts.state == "cancelled" or status in ("closing", "closed", "failed")

    return cancelled


# ---- the batch -----------------------------------------------------------------------------------
#: Most worker processes of batch's own local cluster per CPU core (``--workers``).
MAX_WORKERS_PER_CORE = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's CPU set), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs (besides the predict options).

    ``scheduler`` is a Dask scheduler address (``tcp://host:8786``); ``workers`` > 0 starts a
    ``LocalCluster`` of that many single-threaded worker processes instead.  ``resources``
    are the Dask resources each scene task needs (e.g. ``{"GPU": 1}``).
    """

    force: bool = False
    dry_run: bool = False
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    scheduler: str | None = None
    workers: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    report: Path | None = None
    #: Loggers set to WARNING in Dask workers (e.g. ``("geoseg.engine", "rasterio")``).
    quiet_worker_loggers: tuple[str, ...] = ()
    #: After the run, lay every done mask of ``DIR`` into ``DIR/landcover.vrt`` (+ .qml), one map.
    mosaic: bool = True

    def __post_init__(self) -> None:
        from geoseg.config import check_fields, materialise_iterators

        materialise_iterators(self)
        check_fields(self, "BatchOptions")  # (force="no" forced every scene)
        cores = usable_cores()
        if self.workers < 0 or (not self.scheduler and self.workers > MAX_WORKERS_PER_CORE * cores):
            # (100,000 worker processes were started one by one on 2 cores, making no progress for minutes)
            raise ParameterError(f"--workers {self.workers}: use 0 (scenes here) to {MAX_WORKERS_PER_CORE * cores} on "
                                 f"this machine's {cores} cores (each worker is a process with its own model)")


@dataclass
class BatchResult:
    """What a batch did; ``exit_status`` is 0 (all ok or skipped) or 3 (some failed)."""

    out_dir: Path
    scenes: list[SceneOutcome]
    seconds: float
    #: Dry run: ``(scene, reason)``: why it would run, :data:`OUTSIDE_AOI_REASON` for a skip outside the AOI, or
    #: None for a skip of a scene done and unchanged (see :meth:`plan`).
    planned: list[tuple[Scene, str | None]] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)  # Dask worker → model loads
    #: Why the run stopped before every scene was finished (a signal, a fatal error); None when it ran through.
    stopped: str | None = None
    stop_status: int = 0  # the exit status of a stopped run (130 Ctrl-C, 143 SIGTERM, 1 an error)
    not_finished: list[str] = field(default_factory=list)  # keys of the scenes a stopped run did not finish

    def plan(self) -> list[tuple[str, Scene, str]]:
        """A dry run's :attr:`planned` as ``(action, scene, reason)``: ``action`` is ``run`` or ``skip`` (done
        and unchanged, or outside the AOI), as the run would log it."""
        return [("skip", sc, reason or "done, unchanged") if reason in (None, *SKIP_REASONS) else ("run", sc, reason)
                for sc, reason in self.planned]

    def count(self, status: Status) -> int:
        """How many scenes ended with ``status``."""
        return sum(1 for s in self.scenes if s.status == status)

    @property
    def failed(self) -> list[SceneOutcome]:
        """The failed scenes."""
        return [s for s in self.scenes if s.status == "failed"]

    @property
    def exit_status(self) -> int:
        """0 when no scene failed, 3 otherwise (the CLI's partial-batch code); a stopped run's own."""
        if self.stopped is not None:
            return self.stop_status
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        """The run report (:meth:`report`), under the name every geoseg result gives its plain data."""
        return self.report()

    def report(self) -> dict[str, Any]:
        """The JSON run report (``stopped``: null, or why the run stopped and which scenes it did not finish)."""
        return {
            "out": str(self.out_dir),
            "seconds": round(self.seconds, 3),
            "counts": {s: self.count(s) for s in ("ok", "skipped", "failed")},
            "exit_status": self.exit_status,
            "stopped": None if self.stopped is None else {"reason": self.stopped, "not_finished": self.not_finished},
            "workers": self.workers,
            "scenes": [s.to_report(self.out_dir) for s in self.scenes],
        }


def _log_outcome(o: SceneOutcome, i: int, n: int) -> None:
    width = len(str(n))
    prefix = f"[{i:>{width}}/{n}]"
    for w in o.warnings:
        log.warning("warning: %s", w)
    if o.status == "ok":
        log.info("%s ok      %s  %d window%s  %.1f s  %.2f Mpx/s%s", prefix, o.key, o.windows,
                 "" if o.windows == 1 else "s", o.seconds,
                 o.megapixels_per_s, f"  on {o.worker}" if o.worker else "")
    elif o.status == "skipped":
        log.info("%s skip    %s  (%s)", prefix, o.key, o.reason or "done, unchanged")
    else:
        log.error("%s FAILED  %s: %s", prefix, o.key, o.error)


def run_batch(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    model: BatchModel | str | Path,
    options: Any = None,
    batch: BatchOptions | Mapping[str, Any] | None = None,
    client: Any = None,
) -> BatchResult:
    """Segment every scene of ``inputs`` into ``out_dir`` once (see the module docstring).

    ``options`` is a :class:`geoseg.engine.PredictOptions` (its ``overwrite`` is ignored:
    the manifest decides).  ``client`` is an existing ``distributed.Client``; otherwise
    ``batch.scheduler``/``batch.workers`` choose Dask, or scenes run here one by one.

    Raises:
        BatchLockedError: another run holds ``out_dir``'s lock.
        ParameterError: bad inputs (missing path), an unwritable ``batch.report`` path, a Dask
            cluster without a worker that can run the scenes (after a bounded wait), an ``out_dir`` on a
            file system without working locks.
        ModelError: the model cannot be loaded (fatal: no scene could run).
        OutputError: no room to write (a full disk or the file-size limit, under a scene's outputs, the
            lock file, the manifest or the report).

    Any of these but the lock (and but an unwritable report path) still writes ``batch.report``, saying
    why the run stopped and which scenes it did not finish.
    """
    from geoseg.engine import PredictOptions

    from geoseg.config import options_of

    t0 = time.perf_counter()
    inputs = input_list(inputs)
    options = options_of(options, PredictOptions, "options")
    batch = options_of(batch, BatchOptions, "batch")
    if isinstance(model, (str, Path)):  # a shipped model's name, an export folder
        model = BatchModel(model=str(model))
    elif not isinstance(model, BatchModel):
        raise ParameterError(f"model must be a model name, an export folder or a geoseg.batch.BatchModel, got "
                             f"{type(model).__name__}")
    out = Path(out_dir).absolute()
    if batch.report is not None and not batch.dry_run:
        _check_report_path(Path(batch.report))
    scenes: list[Scene] = []
    try:
        from geoseg.profiles import get_profile

        get_profile("mask", options.creation_options)  # a --co GDAL refuses is one error, not a failure per scene
        if options.aoi is not None and Path(options.aoi).exists():  # workers may run in another folder
            options = dataclasses.replace(options, aoi=str(Path(options.aoi).absolute()))
        # and so may the model's files (a relative --weights "did not exist" on every worker of a
        # --scheduler run); an export folder too (a name that is no folder is a shipped model's)
        # (a model's name stays a name: made the folder's path, `--model unet` beside a folder unet/ ran that folder
        # without a word, where resolve_model refuses it, as for predict)
        from geoseg.models import MODEL_NAMES

        model = dataclasses.replace(model, **{
            f: str(Path(v).absolute()) for f in ("model", "weights", "card", "classes")
            if (v := getattr(model, f)) is not None and not (f == "model" and v in MODEL_NAMES)
            and (os.path.isdir(v) if f == "model" else os.path.isfile(v) if f == "classes" else os.path.exists(v))})
        if batch.scheduler and client is None:
            _check_scheduler_address(batch.scheduler)
        _fcntl()  # (before any work: a system without file locks cannot run batch)
        if batch.resources and not (batch.scheduler or batch.workers or client is not None):
            # (ignored without a word: a GEOSEG_BATCH_RESOURCES meant for the cluster's runs, or a missing --workers)
            warn(f"--resources {_fmt_resources(batch.resources)} places scene tasks on Dask workers: without "
                 "--scheduler or --workers the scenes run in this process and it is ignored", BatchWarning)
        from geoseg.engine import max_windows

        max_windows()  # (a bad GEOSEG_MAX_WINDOWS: one line, not every scene failed)
        _check_out_dir(out, batch.dry_run)
        scenes = discover_scenes(inputs, out, batch.patterns,
                                 case_insensitive=ignores_case(out, probe=not batch.dry_run))
        if not scenes:
            log.warning("no scenes found in %s (patterns %s): nothing to do", ", ".join(map(str, inputs)),
                        " ".join(batch.patterns))
        source = model.source()  # fails early on a bad card or weights path
        if options.vector_classes is not None:  # a typo would fail every scene
            from geoseg.vectorize import resolve_classes

            resolve_classes(options.vector_classes, {c.id: c for c in source.card.classes}, source.card.name)
        from geoseg.tiling import check_tile_params

        # a window grid no scene can take (--overlap -1, or as large as the window) failed every scene, and
        # the manifest then took the archive's done scenes for failed (their masks left the mosaic)
        check_tile_params(options.tile_size or source.card.tile_size,
                          source.card.overlap if options.overlap is None else options.overlap)
        model_key = model.key()
        params_json = json.dumps(result_params(options, source.card), sort_keys=True)

        if batch.dry_run:
            return _dry_run(scenes, out, model_key, params_json, batch.force, t0, options.aoi)

        try:  # only now: a run refused above (a name clash, a bad model) leaves no empty folder
            out.mkdir(exist_ok=True)
            lock = BatchLock(out).acquire()
        except OSError as exc:
            if isinstance(exc, GeosegError):  # (the lock file taken but not written: it says why)
                raise
            raise ParameterError(f"cannot create the output folder {out} or its {STATE_DIR}/lock ({exc.strerror}): "
                                 "give a writable folder for --out") from None
    except (KeyboardInterrupt, Exception) as exc:
        # A run refused before it started (a missing --weights file or input folder, a bad --out) still says
        # so in its report, as a stopped one does; a run locked out by another writes none (nothing was done,
        # and the report path may be the live run's).
        if batch.report is not None and not batch.dry_run and not isinstance(exc, BatchLockedError):
            _write_stopped_report(exc, scenes, {}, out, Path(batch.report), t0)
        raise
    try:
        stuck: set[Path] = set()  # leftovers that cannot be removed: said once, at the start
        try:
            _remove_temp_files(out, "removed %d temp file(s) left by an interrupted run", stuck)
            manifest = Manifest(out)
        except (KeyboardInterrupt, Exception) as exc:  # (a full disk under the manifest)
            if batch.report is not None:
                _write_stopped_report(exc, scenes, {}, out, Path(batch.report), t0)
            raise
        try:
            return _run_locked(scenes, out, model, source, model_key, params_json, options, batch, manifest, client, t0)
        finally:
            manifest.close()
            # a Dask worker that died mid-scene left its staging file (the scene itself was redone on
            # another worker): gone at the end of this run, not of the next (only dead writers' files)
            _remove_temp_files(out, "removed %d temp file(s) of workers that died during this run", stuck)
    finally:
        lock.release()


def _remove_temp_files(out: Path, said: str, stuck: set[Path]) -> None:
    """:func:`geoseg.atomic.clean_temp_files` of ``out``, ``said`` (with their number) in the log; ``stuck``:
    see there.

    Housekeeping, never the run's failure: a leftover that cannot be removed (a folder of ``DIR`` this
    user may not write) is a warning naming it (see there); at the start it stopped every run before any
    scene, and at the end it turned a finished run into exit 1 while its report said 0."""
    try:
        removed = clean_temp_files(out, stuck=stuck)
    except OSError as exc:  # (it raises none: in a finally, the more so never)
        warn(f"the temp files left in {out} were not removed ({exc}): the next run tries again", BatchWarning)
        return
    if removed:
        log.info(said, len(removed))


def _check_manifest_path(out: Path) -> None:
    """Refuse an output folder whose manifest's path is longer than SQLite opens (it failed as "unexpected error:
    OperationalError: unable to open database file")."""
    # (with its links resolved, as SQLite measures it; a folder not made yet: its parent's, resolved)
    real = os.path.realpath(out) if out.exists() else os.path.join(os.path.realpath(out.parent), out.name)
    if len(os.fsencode(os.path.join(real, STATE_DIR, MANIFEST_NAME))) > SQLITE_PATH_MAX:
        raise OutputError(f"output folder {printable(str(out))[:60]}...: its path is too long for the batch manifest "
                          f"{STATE_DIR}/{MANIFEST_NAME} (SQLite opens at most {SQLITE_PATH_MAX} bytes): choose a "
                          "shorter --out")


def _check_out_dir(out: Path, dry_run: bool) -> None:
    """Refuse an output folder that cannot be one, before any work (one line, not a traceback)."""
    if any(map(is_control, str(out.absolute()))):  # (every scene failed, and said to rename it)
        raise ParameterError(f"--out {str(out)!r} holds a control character (a tab, a newline), which GDAL drops from "
                             "the names it writes: choose a folder without one")
    _check_manifest_path(out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} is a file, not a folder: give a folder for batch outputs")
    above = file_above(out)
    if above is not None:
        raise ParameterError(f"--out {out}: {above} is a file, not a folder: give a folder for batch outputs")
    if not dry_run and not out.exists():
        if not out.parent.exists():
            raise ParameterError(f"output folder {out.parent} does not exist: create it first")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise ParameterError(f"cannot create the output folder {out}: {out.parent} is not writable: "
                                 "give a writable folder for --out")


def _check_report_path(path: Path) -> None:
    """Refuse a ``--report`` path that cannot be written before any scene runs (it was found out only
    after every scene had run, and blamed on --out).  Creates its folder, as writing it would."""
    if path.is_dir():
        raise ParameterError(f"--report {path} is a folder: give a file name for the run report")
    above = file_above(path)
    if above is not None:
        raise ParameterError(f"--report {path}: {above} is a file, not a folder: give another path for --report")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = temp_name(path)  # os.access says yes to root on a read-only or virtual file system (/proc)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise ParameterError(f"--report {path}: cannot write in {parent} ({exc.strerror}): "
                             "give a writable path for --report") from None


def _dry_run(scenes: list[Scene], out: Path, model_key: str, params_json: str, force: bool, t0: float,
             aoi: str | None = None) -> BatchResult:
    """What a run would do with each scene (:attr:`BatchResult.planned`), as the run itself decides it: a scene
    the ``aoi`` misses is a skip "outside the AOI" (also one the run would test from its header first)."""
    manifest = Manifest(out, readonly=True)
    if manifest.corrupt:
        warn(f"the manifest {manifest.path} is damaged: a run will move it aside and redo every scene", BatchWarning)
    try:
        holder = BatchLock(out).held_by()
    except ParameterError as exc:  # (no working locks there: a dry run reads, and says what a run would meet)
        warn(f"{exc}; a run there stops at once (exit 1)", BatchWarning)
        holder = None
    if holder is not None:
        warn(f"another batch run holds the lock of {out} ({holder}): scenes it is running may be done by then",
             BatchWarning)
    planned: list[tuple[Scene, str | None]] = []
    try:
        for sc in scenes:
            if sc.conflict is not None:
                planned.append((sc, f"fails: {sc.conflict}"))
                continue
            try:
                fp = input_fingerprint(sc.path)
            except SceneReadError as exc:
                planned.append((sc, f"unreadable: {exc}"))
                continue
            entry = manifest.get(sc.key)
            reason = why_run(entry, fp, model_key, params_json, out, force)
            if holder is None and not force and (n := crashes_of(entry, fp, model_key, params_json)) >= MAX_CRASHES:
                reason = f"fails: {CRASHED_REASON} {n} times (--force runs it)"
            elif reason is None and entry is not None and entry.status == OUTSIDE_AOI:
                reason = OUTSIDE_AOI_REASON  # (it was: "done, unchanged", as if its masks were there)
            elif holder is not None and entry is not None and entry.status in ("running", STARTED) and not force:
                reason = RUNNING_NOW_REASON
            elif reason is not None and aoi is not None and _outside_aoi(sc, aoi) is not None:
                reason = OUTSIDE_AOI_REASON  # the run tests it from the header first, and skips it
            planned.append((sc, reason))
    finally:
        manifest.close()
    return BatchResult(out_dir=out, scenes=[], seconds=time.perf_counter() - t0, planned=planned)


def _run_locked(
    scenes: list[Scene], out: Path, model: BatchModel, source: Any, model_key: str, params_json: str,
    options: Any, batch: BatchOptions, manifest: Manifest, client: Any, t0: float,
) -> BatchResult:
    outcomes: dict[str, SceneOutcome] = {}
    try:
        result = _run_scenes(scenes, out, model, source, model_key, params_json, options, batch, manifest, client, t0,
                             outcomes)
    except (KeyboardInterrupt, Exception) as exc:
        # A stopped run (Ctrl-C, SIGTERM, a fatal error) still says what it did: the scenes finished so
        # far, and which were not (they are redone by the next run).  Then it stops as it would have.
        if batch.report is not None:
            _write_stopped_report(exc, scenes, outcomes, out, batch.report, t0)
        raise
    log.info("batch done in %.1f s: %d ok, %d skipped, %d failed", result.seconds, result.count("ok"),
             result.count("skipped"), result.count("failed"))
    if batch.report is not None:
        try:
            write_report(result, batch.report)
        except OutputError as exc:  # (the report's disk is full): the scenes themselves are recorded
            raise OutputError(f"{exc}; the run itself went through ({result.count('ok')} ok, "
                              f"{result.count('skipped')} skipped, {result.count('failed')} failed: see the "
                              "manifest)") from None
    return result


def _run_scenes(
    scenes: list[Scene], out: Path, model: BatchModel, source: Any, model_key: str, params_json: str,
    options: Any, batch: BatchOptions, manifest: Manifest, client: Any, t0: float, outcomes: dict[str, SceneOutcome],
) -> BatchResult:
    """The work of :func:`_run_locked`; ``outcomes`` fills in as scenes finish (a stopped run reports them)."""
    n = len(scenes)
    fingerprints: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Scene, str]] = []
    last: list[tuple[Scene, str]] = []  # scenes the batch process died on: run after the others
    crashes: dict[str, int] = {}
    done_count = 0
    no_fingerprint = {"size": -1, "mtime_ns": -1, "head_hash": ""}

    def finish(o: SceneOutcome) -> None:
        nonlocal done_count
        done_count += 1
        outcomes[o.key] = o
        _log_outcome(o, done_count, n)

    decided: list[SceneOutcome] = []  # (logged after the run's first line, which counts them)

    def decide(o: SceneOutcome) -> None:
        outcomes[o.key] = o
        decided.append(o)

    try:
        for sc in scenes:
            if sc.conflict is not None:  # its outputs would overwrite another scene's: it fails, the others run
                o = SceneOutcome(key=sc.key, input=printable(str(sc.path)), status="failed", reason=sc.refusal,
                                 error=sc.conflict, error_type="ParameterError")
                _record(manifest, o, no_fingerprint, model_key, params_json, out)
                decide(o)
                continue
            entry = manifest.get(sc.key)
            try:
                fp = input_fingerprint(sc.path)
            except SceneReadError as exc:
                o = _failed(sc, exc, time.perf_counter())
                _record(manifest, o, no_fingerprint, model_key, params_json, out)
                decide(o)
                continue
            crashes[sc.key] = crashes_of(entry, fp, model_key, params_json)
            if crashes[sc.key] >= MAX_CRASHES and not batch.force:
                assert entry is not None
                o = SceneOutcome(key=sc.key, input=str(sc.path), status="failed", reason=CRASHED_REASON,
                                 error=held_back_error(crashes[sc.key]), error_type="Crashed")
                if entry.status == STARTED:  # (its last crash, counted now)
                    manifest.put(dataclasses.replace(entry, status="failed", crashes=crashes[sc.key], error=o.error,
                                                     finished=_now()))
                decide(o)
                continue
            reason = why_run(entry, fp, model_key, params_json, out, batch.force)
            if reason is None and entry is not None and (entry.head_hash != fp["head_hash"] or entry.model != model_key):
                # its sidecars, adopted; the model's key of today (an older geoseg's key, read as the same model,
                # would have been "model changed" after the card's next edit of what changes no output)
                manifest.put(dataclasses.replace(entry, head_hash=fp["head_hash"], model=model_key))
            if reason is None:
                decide(SceneOutcome(key=sc.key, input=str(sc.path), status="skipped",
                                    reason=OUTSIDE_AOI_REASON if entry and entry.status == OUTSIDE_AOI else "done, unchanged"))
                continue
            fingerprints[sc.key] = fp
            missed = _outside_aoi(sc, options.aoi) if options.aoi is not None else None
            if missed is not None:  # known from the scene's header: no task, no model for it
                _record(manifest, missed, fp, model_key, params_json, out)
                decide(missed)
                continue
            (last if crashes[sc.key] else todo).append((sc, reason))
        todo += last
        clashes = sum(sc.conflict is not None and sc.refusal == "name clash" for sc in scenes)
        bad_names = sum(sc.conflict is not None for sc in scenes) - clashes
        held = sum(o.reason == CRASHED_REASON for o in outcomes.values())
        why = collections.Counter("an output missing or changed" if r.startswith("output ") else
                                  "crashed the process running it" if r.startswith("the batch process died") else r
                                  for _, r in todo)
        log.info("%d scene(s): %d to run%s, %d skipped, %d unreadable%s%s%s", n, len(todo),
                 # (why: a night that redoes an archive says so in its log, not only in a dry run or the report)
                 f" ({', '.join(f'{r}: {k}' for r, k in why.most_common())})" if todo else "",
                 sum(o.status == "skipped" for o in outcomes.values()),
                 sum(o.status == "failed" for o in outcomes.values()) - clashes - bad_names - held,
                 f", {clashes} with clashing output names" if clashes else "",
                 f", {bad_names} with names geoseg cannot write (not UTF-8, or a tab or newline)" if bad_names else "",
                 f", {held} held back (they crashed the process running them)" if held else "")
    finally:  # the run's first line, then the scenes decided before any work; on a stop in this pass those alone
        for o in decided:
            finish(o)

    def record_and_finish(o: SceneOutcome, reason: str) -> None:
        o.reason = o.reason or reason  # why it ran, unless it was skipped (outside the AOI)
        _record(manifest, o, fingerprints[o.key], model_key, params_json, out)
        finish(o)

    if todo:
        # A crash from here on re-runs these scenes, whatever their old entries said.
        running = {sc.key: _running_entry(manifest, sc, fingerprints[sc.key], model_key, params_json, crashes[sc.key])
                   for sc, _ in todo}
        manifest.put(*running.values())
        if client is not None or batch.scheduler or batch.workers:
            _run_dask(todo, out, model, options, batch, client, record_and_finish)
        else:
            def mark(key: str, status: str) -> None:
                if status != STARTED and (now := manifest.get(key)) is not None and now.status != STARTED:
                    return  # (a stop after the scene's record, in its log line: it stays done)
                manifest.put(dataclasses.replace(running[key], status=status))

            _run_here(todo, out, model, options, record_and_finish, mark)

    if batch.mosaic:
        # a failed scene keeps an earlier run's outputs on disk (nothing is removed), out of the mosaic
        stale = [sc.key for sc in scenes if outcomes.get(sc.key) is not None and outcomes[sc.key].status == "failed"
                 and (out / sc.out_dir / f"{Path(sc.key).stem}_landcover.tif").exists()]
        if stale:
            log.info("the mosaic leaves out %d mask(s) of scenes that failed this run (their earlier outputs stay on "
                     "disk): %s%s", len(stale), ", ".join(stale[:5]), " ..." if len(stale) > 5 else "")
        _write_mosaic(out, manifest, source.card.classes)
    ordered = [outcomes[sc.key] for sc in scenes if sc.key in outcomes]
    return BatchResult(out_dir=out, scenes=ordered, seconds=time.perf_counter() - t0,
                       workers=_worker_loads(ordered))


def _write_stopped_report(exc: BaseException, scenes: list[Scene], outcomes: dict[str, SceneOutcome], out: Path,
                          path: Path, t0: float) -> None:
    """The report of a run stopped by ``exc``: the scenes finished so far, why it stopped, and which
    scenes it did not finish.  Never raises (the stop itself is what the user must hear about)."""
    exc = noted_stop() or exc  # (a signal's stop that paddle's code turned into another error, see run_scene)
    if isinstance(exc, KeyboardInterrupt):
        # the CLI raises SIGTERM as its KeyboardInterrupt subclass Terminated (geoseg_cli.main)
        if type(exc).__name__ == "Terminated":  # (SIGTERM, or SIGHUP: its signame and signum)
            why, status = f"terminated ({getattr(exc, 'signame', 'SIGTERM')})", 128 + getattr(exc, "signum", 15)
        else:
            why, status = "interrupted (SIGINT, Ctrl-C)", 130
    elif isinstance(exc, GeosegError):
        why, status = str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 1
    else:
        why, status = f"unexpected error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 1
    result = BatchResult(
        out_dir=out, scenes=[outcomes[sc.key] for sc in scenes if sc.key in outcomes],
        seconds=time.perf_counter() - t0, stopped=why, stop_status=status,
        not_finished=[sc.key for sc in scenes if sc.key not in outcomes], workers=_worker_loads(outcomes.values()),
    )
    try:
        write_report(result, path)
    except (OSError, GeosegError) as err:
        log.warning("warning: the report of the stopped run was not written to %s: %s", path, err)
    except KeyboardInterrupt:  # a second Ctrl-C while writing it: stop now
        pass


def _worker_loads(outcomes: Iterable[SceneOutcome]) -> dict[str, int]:
    """Each Dask worker that ran a scene → the models it had loaded by then (its most)."""
    loads: dict[str, int] = {}
    for o in outcomes:
        if o.worker:
            loads[o.worker] = max(loads.get(o.worker, 0), o.model_loads)
    return loads


def _write_mosaic(out: Path, manifest: Manifest, classes: Any) -> None:
    """The VRT mosaic of every done scene's mask in ``out`` (never fails the batch)."""
    import rasterio.errors

    from geoseg.mosaic import write_mosaics

    # the newest last: a VRT draws its later sources over the earlier ones, so where masks overlap (a
    # corrected scene under a new name beside the old one's mask) the latest run shows, not the name
    # that sorts last
    done = sorted((e for e in manifest.entries() if e.status == "done"), key=lambda e: (e.finished or "", e.key))
    masks = [out / o["path"] for e in done for o in e.outputs if o["path"].endswith("_landcover.tif")]
    gone = [e.key for e in done if not Path(e.input).exists()]
    if gone:  # (kept: an archive that moves scenes away once done keeps their land cover)
        log.info("the mosaic keeps %d mask(s) whose scene is no longer there: %s%s", len(gone), ", ".join(gone[:5]),
                 " ..." if len(gone) > 5 else "")
    try:  # (it logs what it wrote, and which masks it left out)
        write_mosaics(out, [m for m in masks if m.exists()], classes, state_dir=out / STATE_DIR)
    except (OSError, rasterio.errors.RasterioError, ValueError) as exc:
        warn(f"the mosaic of the masks was not written: {str(exc).splitlines()[0]}", BatchWarning)


def write_report(result: BatchResult, path: str | Path) -> Path:
    """Write the JSON run report atomically."""
    path = Path(path)
    try:
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(result.report(), indent=2) + "\n")
    except OSError as exc:  # (a full disk: the report's own, not --out's)
        if isinstance(exc, GeosegError):
            raise
        raise write_error(path, exc, option="--report") from None


def _running_entry(manifest: Manifest, sc: Scene, fp: dict[str, Any], model_key: str, params_json: str,
                   crashes: int = 0) -> ManifestEntry:
    old = manifest.get(sc.key)
    return ManifestEntry(
        key=sc.key, input=str(sc.path), size=fp["size"], mtime_ns=fp["mtime_ns"], head_hash=fp["head_hash"],
        model=model_key, params=params_json, status="running", outputs=old.outputs if old else [],
        error=old.error if old else None, crashes=crashes,
    )


def _now() -> str:
    """Now in UTC, to the second (the manifest's ``finished``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _record(manifest: Manifest, o: SceneOutcome, fp: dict[str, Any], model_key: str, params_json: str, out: Path) -> None:
    """Write the scene's manifest entry (after its outputs are in place)."""
    outputs: list[dict[str, Any]] = []
    status = OUTSIDE_AOI if o.status == "skipped" else "failed"  # a scene that ran is skipped only outside the AOI
    if o.status == "ok":
        try:
            for p in o.outputs:
                pp = Path(p)
                rel = os.path.relpath(pp, out)
                outputs.append({"path": rel, "size": pp.stat().st_size, "hash": quick_hash(pp)})
            status = "done"
        except OSError as exc:
            o.status, o.error = "failed", f"output vanished after writing ({exc}): check the output folder"
            outputs = []
    if status in ("done", OUTSIDE_AOI):
        _remove_stale_outputs(manifest.get(o.key), outputs, out)
    crashes = 0
    if o.crashed:  # (the run's entry holds the crashes counted before)
        crashes = ((now := manifest.get(o.key)) and now.crashes or 0) + 1
    manifest.put(ManifestEntry(
        key=o.key, input=o.input, size=fp["size"], mtime_ns=fp["mtime_ns"], head_hash=fp["head_hash"],
        model=model_key, params=params_json, status=status, outputs=outputs, error=o.error,
        seconds=o.seconds, windows=o.windows, megapixels=o.megapixels, worker=o.worker, finished=_now(),
        crashes=crashes,
    ))


def _remove_stale_outputs(old: ManifestEntry | None, outputs: list[dict[str, Any]], out: Path) -> None:
    """Delete the outputs an earlier run of the scene recorded that this run did not write again
    (e.g. a confidence raster or polygons no longer asked for).

    Called once the new outputs are in place and before the ``done`` entry is committed: a crash
    in between leaves the scene to be redone (its entry still lists the old outputs), never an
    unrecorded file.  Only files the manifest says batch wrote, inside ``out``, are touched.
    """
    if old is None:
        return
    keep = {o["path"] for o in outputs}
    root = out.resolve()
    for o in old.outputs:
        rel = o.get("path", "")
        p = out / rel
        if rel in keep or Path(rel).is_absolute() or root not in p.resolve().parents:
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            warn(f"cannot remove {p} left by an earlier run of {old.key} ({exc.strerror}): remove it by hand",
                 BatchWarning)
            continue
        log.info("removed %s (written by an earlier run of %s, not by this one)", rel, old.key)


def _run_here(
    todo: list[tuple[Scene, str]], out: Path, model: BatchModel, options: Any,
    finish: Callable[[SceneOutcome, str], None], mark: Callable[[str, str], None],
) -> None:
    """Run the scenes one by one in this process; ``mark(key, status)`` sets a scene's manifest entry
    :data:`STARTED` while it runs (a process that dies leaves it so), back to ``running`` when the run
    stops in it (a signal, a fatal error: not the scene's crash)."""
    predictor, desc, source = model.build()  # once for the whole batch; ModelError is fatal
    log.debug("model %s on %s", source.label, desc)
    for sc, reason in todo:
        mark(sc.key, STARTED)
        try:
            o = run_scene(sc, out, options, predictor, source)
            if o.fatal:
                raise ModelError(f"{o.key}: {o.error}")
            if o.no_room:
                raise _no_room_error(o)
            finish(o, reason)
        except BaseException:
            with contextlib.suppress(Exception):  # (the manifest's disk may be the full one)
                mark(sc.key, "running")
            raise


def _no_room_error(o: SceneOutcome) -> NoRoomError:
    """The run-level error of a scene that could not be written for lack of room: every later scene would
    fail the same way, after running the model for nothing."""
    return NoRoomError(f"{o.key}: {o.error}; the run stopped (the next run redoes the scenes not finished)")


def parse_resources(text: str | None) -> dict[str, float]:
    """``"GPU=1,MEM=4e9"`` → ``{"GPU": 1.0, "MEM": 4e9}``.

    Raises:
        ParameterError: an item is not ``NAME=NUMBER``.
    """
    out: dict[str, float] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            raise ParameterError(f"--resources {text!r}: use NAME=NUMBER pairs separated by commas, e.g. GPU=1") from None
        if not name:
            raise ParameterError(f"--resources {text!r}: a resource has no name: use e.g. GPU=1")
        if name in out:  # (GPU=1,GPU=2 kept the last without a word)
            raise ParameterError(f"--resources {text!r}: {name} is given twice: give it once")
        if not amount > 0 or amount == float("inf"):  # (GPU=0: Dask places no task on a worker without GPU: a hang)
            raise ParameterError(f"--resources {text!r}: {name}={value} asks for no amount of it: give a number > 0 "
                                 f"(e.g. {name}=1), or leave {name} out")
        out[name] = amount
    return out


def _check_scheduler_address(address: str) -> None:
    """A :class:`ParameterError` naming ``--scheduler`` for an address Dask cannot parse (``foo:bar``,
    a missing port), before the run takes its lock and marks its scenes running."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except ValueError as exc:
        raise ParameterError(f"--scheduler {address}: not a Dask scheduler address ({exc}): give one like "
                             "tcp://host:8786") from None


@contextlib.contextmanager
def dask_client(batch: BatchOptions) -> Iterator[Any]:
    """A ``distributed.Client`` for ``batch``: the given scheduler or a new ``LocalCluster``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise DependencyError("dask.distributed is not installed: pip install 'distributed'") from exc
    if batch.scheduler:
        try:
            client = Client(batch.scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ParameterError(f"cannot reach the Dask scheduler {batch.scheduler} ({exc}): check --scheduler") from None
        with client:
            yield client
        return
    import tempfile

    import dask

    # (inside Dask's own temporary-directory where set, DASK_TEMPORARY_DIRECTORY: a scratch disk; made if missing, as
    # Dask makes it; where it cannot be made or written, the temp folder, as Dask falls back too)
    base = dask.config.get("temporary-directory", None) or None
    try:
        if base is not None:
            os.makedirs(base, exist_ok=True)
        scratch_dir = tempfile.TemporaryDirectory(prefix="geoseg-dask-", ignore_cleanup_errors=True, dir=base)
    except OSError:
        scratch_dir = tempfile.TemporaryDirectory(prefix="geoseg-dask-", ignore_cleanup_errors=True)
    scratch = scratch_dir.name
    muted: list[tuple[logging.Logger, int]] = []
    interrupted = _InterruptedSyncNoise()
    logging.getLogger("tornado.application").addFilter(interrupted)
    try:
        with LocalCluster(
            n_workers=batch.workers, threads_per_worker=1, processes=True, dashboard_address=None,
            # the scheduler's HTTP server (health checks) starts even without a dashboard, on 8787 unless
            # told: a second run on the machine (another archive's cron job) then warned in three lines; on
            # this machine only (':0' listened on every network interface: a firewall's prompt on Windows and
            # macOS that a scheduled task cannot answer, and a port open to the network)
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            worker_dashboard_address="127.0.0.1:0",  # (each worker's HTTP server: every interface on distributed 2023)
            resources=batch.resources or None,
            # the workers' scratch space in a private folder (0700) of this run's, not the shared, predictable
            # /tmp/dask-scratch-space other local users can write
            local_directory=scratch,
        ) as cluster, Client(cluster) as client:
            try:
                yield client
            except KeyboardInterrupt:
                # Stopped by a signal (Ctrl-C, SIGTERM): cron's `timeout` signals the whole group, so
                # the workers are gone already; the scheduler, nannies and tornado of batch's own
                # cluster then logged ~40 lines of broken connections and restarts while it closed.
                names = [n for n in list(logging.root.manager.loggerDict)
                         if n.split(".")[0] in ("distributed", "tornado", "asyncio")]
                muted = [(lg, lg.level) for lg in map(logging.getLogger, {"distributed", "tornado", "asyncio", *names})]
                for lg, _ in muted:
                    lg.setLevel(logging.CRITICAL)
                raise
    finally:
        for lg, level in muted:
            lg.setLevel(level)
        logging.getLogger("tornado.application").removeFilter(interrupted)
        scratch_dir.cleanup()


class _InterruptedSyncNoise(logging.Filter):
    """Drops the traceback distributed's own ``sync`` logs through tornado when Ctrl-C or SIGTERM
    interrupts it ("Exception in callback ... cancel ... NameError: cannot access free variable
    'future'"): a bug of distributed's, said in 10 lines on a stopped cron run's stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "'future'" in str(exc) and "cancel" in record.getMessage())


def _scheduler_lost(exc: BaseException, client: Any) -> bool:
    """Whether a task's error says the client lost its scheduler (the scenes themselves are not at fault)."""
    from concurrent.futures import CancelledError

    if getattr(exc, "reason", None) == "scheduler-connection-lost":
        return True
    return isinstance(exc, CancelledError) and getattr(client, "status", "running") not in ("running", "newly-created")


def _fmt_resources(resources: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in resources.items())


def _workers(client: Any, resources: dict[str, float]) -> tuple[int, int, list[str]]:
    """``(alive, suitable, offers)``: the cluster's workers that are not closing, how many of them offer
    ``resources`` (every one when none are asked), and the resources each offers (for messages)."""
    info = client.scheduler_info()
    alive = [w for w in (info.get("workers") or {}).values() if w.get("status", "running") not in _GONE]
    offers = [_fmt_resources(w.get("resources") or {}) or "none" for w in alive]
    suitable = [w for w in alive
                if all(k in (w.get("resources") or {}) and float(w["resources"][k]) >= v for k, v in resources.items())]
    return len(alive), len(suitable), offers


def _wait_for_workers(client: Any, resources: dict[str, float], where: str) -> None:
    """Wait up to :data:`WORKER_WAIT_S` for a worker, then refuse at once when none offers ``resources``.

    Raises:
        ParameterError: no worker joined in time, or none offers the resources asked.
    """
    import asyncio

    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (TimeoutError, asyncio.TimeoutError):
        raise ParameterError(f"no Dask worker joined the scheduler {where} within {WORKER_WAIT_S:g} s: start workers "
                             f"(dask worker {where}) or check --scheduler") from None
    if resources:
        alive, suitable, offers = _workers(client, resources)
        if not suitable:
            asked = _fmt_resources(resources)
            raise ParameterError(
                f"no worker of the Dask scheduler {where} offers --resources {asked} (its {alive} worker(s) offer: "
                f"{'; '.join(offers) or 'none'}): start workers with --resources {asked}, or change --resources")


def _watch_workers(client: Any, resources: dict[str, float], where: str, since: float | None, left: int
                   ) -> float | None:
    """One look at the cluster while scenes run: None when a worker can run them, else since when none
    could (warned once); raise when that has lasted :data:`NO_WORKER_GRACE_S`.

    Raises:
        ParameterError: no (suitable) worker for the grace period.
    """
    try:
        _, suitable, _ = _workers(client, resources)
    except Exception as exc:  # noqa: BLE001 - the scheduler itself is gone or not answering: no worker either
        log.debug("cannot ask %s for its workers: %s", where, exc)
        suitable = 0
    if suitable:
        if since is not None:
            log.info("the Dask cluster %s has a worker again", where)
        return None
    kind = f" offering --resources {_fmt_resources(resources)}" if resources else ""
    now = time.monotonic()
    if since is None:
        log.warning("warning: the Dask cluster %s has no worker%s now: %d scene(s) wait; giving up after %g s "
                    "without one", where, kind, left, NO_WORKER_GRACE_S)
        return now
    if now - since >= NO_WORKER_GRACE_S:
        raise ParameterError(
            f"the Dask cluster {where} has had no worker{kind} for {NO_WORKER_GRACE_S:g} s: stopped with {left} "
            "scene(s) not finished (the next run redoes them): start workers, or check --scheduler")
    return since


def _run_dask(
    todo: list[tuple[Scene, str]], out: Path, model: BatchModel, options: Any, batch: BatchOptions, client: Any,
    finish: Callable[[SceneOutcome, str], None], own_cluster: bool = False,
) -> None:
    if client is None:
        if batch.workers and model.threads is None:
            # Worker processes share this machine's cores.
            model = dataclasses.replace(model, threads=max(1, (os.cpu_count() or 1) // batch.workers))
        with dask_client(batch) as c:  # a LocalCluster of batch's own unless --scheduler names one
            _run_dask(todo, out, model, options, batch, c, finish, own_cluster=not batch.scheduler)
            return

    where = getattr(client.scheduler, "address", None) or "the Dask scheduler"
    if own_cluster and batch.workers > 1 and model.device in ("auto", "gpu") and 0 < (gpus := gpu_count()) < batch.workers:
        warn(f"--workers {batch.workers} on {gpus} GPU(s): workers share a GPU, each with its own copy of the model "
             f"and its batches in GPU memory; --workers {gpus} runs one per GPU", PerformanceWarning)
    if own_cluster and batch.workers > (cores := usable_cores()):
        warn(f"--workers {batch.workers} on {cores} CPU cores: the workers' model threads compete for the cores "
             f"(on 2 cores, 2 workers were slower than scenes run here); --workers {cores} or fewer", PerformanceWarning)
    _wait_for_workers(client, batch.resources, where)
    _remove_orphan_plugins(client)
    name = run_plugin_name(model, str(getattr(client, "id", "")))
    plugin = _make_worker_plugin(model, name, batch.quiet_worker_loggers, own_cluster)
    # register_plugin since distributed 2023.9; register_worker_plugin (deprecated since) before it
    register = getattr(client, "register_plugin", None) or client.register_worker_plugin
    register(plugin, name=name)
    opts = dataclasses.replace(options, progress=False)
    reasons = {sc.key: reason for sc, reason in todo}
    scenes = {sc.key: sc for sc, _ in todo}
    try:
        killed = _run_tasks(list(scenes.values()), out, opts, name, batch, client, where, reasons, finish,
                            retry_killed=True)
        if killed:
            # Dask fails every task that was on a worker each time one dies under it (allowed-failures): the
            # scene that killed it and those queued beside it.  Alone, only the scene that kills its worker
            # fails again.
            log.info("%d scene(s) were on Dask workers that died: running them again, one at a time", len(killed))
        for key in killed:
            _run_tasks([scenes[key]], out, opts, name, batch, client, where, reasons, finish, retry_killed=False)
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)  # (this run's own: another run's plugin is left alone)


def _killed_worker(exc: BaseException) -> bool:
    """Whether a task's error is Dask's ``KilledWorker``: its workers died under it too often."""
    return type(exc).__name__ == "KilledWorker" and type(exc).__module__.startswith("distributed")


def _run_tasks(
    todo: list[Scene], out: Path, opts: Any, name: str, batch: BatchOptions, client: Any, where: str,
    reasons: dict[str, str], finish: Callable[[SceneOutcome, str], None], retry_killed: bool,
) -> list[str]:
    """Submit one task per scene of ``todo`` and finish each as its result comes back; return the keys of
    the scenes that failed with ``KilledWorker`` when ``retry_killed`` (not finished: to run again)."""
    futures = {}
    for sc in todo:
        fut = client.submit(
            dask_scene_task, sc, str(out.absolute()), opts, name, key=f"geoseg-scene-{name}-{sc.key}-{time.time_ns()}",
            resources=batch.resources or None, pure=False, retries=0,
        )
        futures[fut] = sc.key
    scenes = {sc.key: sc for sc in todo}
    if retry_killed:
        log.info("submitted %d scene(s) to %s", len(todo), where)
    killed: list[str] = []
    # as_completed's own iterator blocks until a task ends, forever when no worker is left to run one:
    # poll it, and look at the cluster's workers every WORKER_POLL_S. It gathers each result as its task
    # ends (with_results): a result left on its worker until the next poll was recomputed when that
    # worker died meanwhile, and the finished scene ran again.
    from distributed import as_completed

    pending = as_completed(list(futures), with_results=True, raise_errors=False)
    no_worker_since: float | None = None
    next_look = time.monotonic() + WORKER_POLL_S
    try:
        while not pending.is_empty():
            ready = pending.next_batch(block=False)
            if not ready:
                now = time.monotonic()
                if now >= next_look:
                    next_look = now + WORKER_POLL_S
                    no_worker_since = _watch_workers(client, batch.resources, where, no_worker_since, pending.count())
                time.sleep(0.1)
                continue
            for fut, got in ready:
                key = futures[fut]
                try:
                    o = got if isinstance(got, SceneOutcome) else fut.result()  # (an error: raised here)
                except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
                    if _scheduler_lost(exc, client):
                        # not the scenes' failure: every scene not finished was reported failed with
                        # "scheduler-connection-lost", also those a worker was about to finish
                        raise ClusterError(
                            f"lost the connection to the Dask scheduler {where}: {len(futures)} scene(s) "
                            "not finished (the next run redoes them): check the scheduler") from None
                    o = _failed(scenes[key], exc, time.perf_counter())
                    o.error = f"task failed on the cluster: {o.error}"
                    if _killed_worker(exc):
                        if retry_killed:
                            killed.append(key)
                        else:
                            o.error += " (its worker died again when it ran alone)"
                            o.crashed = True
                # The result is taken: forget the task at once.  A future kept (here, or anything holding
                # its key) makes the scheduler recompute the task when the worker holding its result dies
                # (kill -9, OOM): the scene ran again and rewrote outputs already recorded done.
                del futures[fut]
                fut.release()
                if key in killed:
                    continue
                if o.fatal:
                    raise ModelError(f"the model failed on the worker {o.worker} ({o.key}): {o.error}")
                if o.no_room:
                    raise _no_room_error(o)
                finish(o, reasons[key])
    except BaseException:
        for f in futures:  # (a LocalCluster of batch's own closes anyway; a user's cluster must not go on)
            with contextlib.suppress(Exception):
                f.cancel()
        raise
    return killed
