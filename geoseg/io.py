"""Raster input and output: scene metadata, window reads, staged Cloud-Optimized GeoTIFF writes.

Conventions: pixel arrays are CHW (bands first); a *valid* mask is HW bool, True where the
input has data.  A pixel is nodata when every selected band is nodata there (GDAL's dataset
mask convention): the nodata value, an internal mask, an alpha band or NaN.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PosixPath
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geoseg.atomic import atomic_output, atomic_write_text, is_utf8, printable, temp_name, write_error
from geoseg.card import ClassInfo
from geoseg.errors import NoCRSWarning, OutputError, SceneError, SceneReadError, gdal_reason, warn

log = logging.getLogger(__name__)

# rasterio.features (rasterize, shapes, sieve) works on in-memory datasets of its own, given the
# transform, and now and then warns that one "has no geotransform" (rasterio/rasterio#2497,
# rio-tiler#627; 2 `predict --aoi` runs in 12 here printed it): about no file of the user's, so not
# said. Only warnings raised inside rasterio.features are filtered (a scene's own are not).
warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning, module=r"rasterio\.features")

#: Dataset tag holding the class table (JSON list of {id, name, color}).
CLASSES_TAG = "GEOSEG_CLASSES"
MASK_NODATA = 255

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass(frozen=True)
class SceneMeta:
    """What geoseg needs to know about an input raster (no pixels)."""

    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None
    mask_flags: tuple[tuple[str, ...], ...]
    descriptions: tuple[str | None, ...]
    alpha_band: int | None = None
    block_shape: tuple[int, int] = (0, 0)
    tags: dict[str, str] = field(default_factory=dict)
    #: Ground control points ``(points, crs)`` of a scene georeferenced by GCPs instead of a
    #: geotransform (unrectified imagery), else None.
    gcps: Any = None
    #: Rational polynomial coefficients of a scene georeferenced by RPCs, else None.
    rpcs: Any = None
    #: The part of the file this describes (:meth:`subset`): ``(row, col)`` of its top-left pixel
    #: in the file, and the area of interest (:class:`geoseg.aoi.Aoi`) whose outside is nodata.
    origin: tuple[int, int] = (0, 0)
    aoi: Any = None
    #: Each band's ``(scale, offset)`` tags (physical value = stored × scale + offset). geoseg
    #: feeds the stored values, as training read them; these only explain a scene on another scale.
    scaling: tuple[tuple[float, float], ...] = ()
    #: Each band's nodata value (``nodata`` is band 1's; a VRT of single-band files may differ).
    nodatavals: tuple[float | None, ...] = ()
    #: Each band's data type (``dtype`` is band 1's; a VRT of single-band files may mix them).
    dtypes: tuple[str, ...] = ()
    #: The band tagged alpha when it is read as data (:meth:`for_bands`; an RGBN file whose NIR band
    #: GDAL tags alpha): it then marks no pixel as nodata (:attr:`alpha_band` is None).
    alpha_as_data: int | None = None

    def for_bands(self, bands: Sequence[int], hint: str = "") -> SceneMeta:
        """This scene as read through ``bands``: its :attr:`dtype` theirs (band 1 may be of another type,
        a VRT's band files not being read), or :class:`SceneError` when they differ in type among
        themselves (one model normalises one data type, and rasterio reads no mixed stack: "more than
        one 'dtype' found")."""
        kinds = {b: self.dtypes[b - 1] for b in bands} if self.dtypes else {}
        if len(set(kinds.values())) > 1:
            by_type: dict[str, list[int]] = {}
            for b, t in kinds.items():
                by_type.setdefault(t, []).append(b)
            said = ", ".join(f"{t} (band{'s' if len(bs) > 1 else ''} {','.join(map(str, bs))})" for t, bs in by_type.items())
            try:
                wide = str(np.result_type(*by_type))  # (one type that holds every band's values)
            except TypeError:  # (GDAL's complex integers: no numpy type)
                wide = next(iter(by_type))
            gdal_name = rasterio.dtypes.typename_fwd.get(rasterio.dtypes.dtype_rev.get(wide, -1), wide)
            raise SceneError(f"{self.path.name}: bands of more than one data type: {said}; geoseg reads one "
                             f"type per scene: make one first, e.g. gdalbuildvrt -ot {gdal_name} or gdal_translate "
                             f"-ot {gdal_name}{hint}")
        dtype = next(iter(kinds.values()), self.dtype)
        if self.alpha_band is not None and self.alpha_band in bands:
            return dataclasses.replace(self, dtype=dtype, alpha_band=None, alpha_as_data=self.alpha_band)
        return self if dtype == self.dtype else dataclasses.replace(self, dtype=dtype)

    def subset(self, window: Window, aoi: Any = None) -> SceneMeta:
        """The pixel ``window`` of this scene (its size and transform; reads are offset into the
        file, see :func:`read_scene_window`), with pixels outside ``aoi`` read as nodata."""
        r0, c0 = self.origin
        return dataclasses.replace(
            self, width=int(window.width), height=int(window.height),
            transform=self.transform @ self.transform.translation(window.col_off, window.row_off),
            origin=(r0 + int(window.row_off), c0 + int(window.col_off)), aoi=aoi)

    @property
    def has_nodata(self) -> bool:
        """True when some pixels may be nodata (value, internal mask, alpha or float NaN)."""
        return (
            self.nodata is not None
            or any(v is not None for v in self.nodatavals)
            or self.alpha_band is not None
            or any("per_dataset" in f for f in self.mask_flags)
            or self.dtype.startswith("float")
        )

    @property
    def data_bands(self) -> tuple[int, ...]:
        """1-based band indexes excluding an alpha band."""
        return tuple(b for b in range(1, self.count + 1) if b != self.alpha_band)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units (the lengths of a pixel's sides: a rotated grid's too)."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    def ground_pixel_m(self) -> float | None:
        """A pixel's ground size in metres (:func:`ground_pixel_size_m`); for a scene placed by
        ground control points, of the affine transform that best fits them; None when unknown."""
        if self.crs is not None:
            return ground_pixel_size_m(self.crs, self.transform, self.height, self.width)
        placed = self.gcp_transform()
        return None if placed is None else ground_pixel_size_m(self.gcps[1], placed, self.height, self.width)

    def gcp_transform(self) -> Any:
        """The affine transform that best fits the scene's ground control points (in their CRS),
        or None without GCPs (or with fewer than 3, or none in a known CRS)."""
        if self.crs is not None or not self.gcps or not self.gcps[1] or len(self.gcps[0]) < 3:
            return None
        try:
            return rasterio.transform.from_gcps(self.gcps[0])
        except Exception:  # noqa: BLE001 - degenerate GCPs (all on a line): no estimate
            return None


_ARCHIVE = re.compile(r"^(/vsi(?:zip|tar|7z|rar|gzip))/(/.*?\.(?:zip|tar|tgz|tar\.gz|gz|7z|rar))(/.*)?$", re.IGNORECASE)


class _GzipPath(PosixPath):
    """A ``/vsigzip//abs/a.tif.gz`` path (GDAL's gzip reader takes no braces): a Path collapses the ``//`` that
    makes the file absolute, and this one puts it back wherever it is written out (GDAL, messages); its name,
    stem and parent are a Path's."""

    __slots__ = ()

    def __str__(self) -> str:
        text = super().__str__()
        head = text[:len("/vsigzip/")]
        if head.lower() == "/vsigzip/" and not text[len(head):].startswith("/"):
            return f"{head}/{text[len(head):]}"
        return text

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"PosixPath({str(self)!r})"


def scene_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` that keeps a GDAL virtual path readable.

    ``/vsizip//abs/scenes.zip/a.tif`` (an absolute archive path) would lose its double slash in a
    Path and name a relative archive; it becomes GDAL's equivalent ``/vsizip/{/abs/scenes.zip}/a.tif``.
    ``/vsigzip//abs/a.tif.gz``, which takes no braces, keeps its ``//`` (:class:`_GzipPath`).
    """
    text = os.fspath(path)  # (str() of an os.PathLike that is not a Path names the object, not its path)
    m = _ARCHIVE.match(text)
    if m and m.group(1).lower() == "/vsigzip" and not m.group(3) and os.name == "posix":
        # (/vsigzip/ takes no braces: /vsigzip/{/abs/a.tif.gz} never opened)
        return _GzipPath(text)
    if m:
        return Path(f"{m.group(1)}/{{{m.group(2)}}}{m.group(3) or ''}")
    return Path(text)


def is_virtual(path: str | Path) -> bool:
    """True for a GDAL virtual file system path (``/vsizip/scenes.zip/a.tif``, ``/vsis3/bucket/a.tif``)."""
    return str(path).startswith("/vsi")


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (``a FIFO (named pipe)``, ...)."""
    import stat

    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "a special file"


def check_seekable(path: Path, what: str) -> None:
    """Refuse a FIFO, a pipe (``<(cat scene.tif)``), a socket or a device as ``what``: GDAL seeks in what it reads,
    and opening a FIFO waited for a writer for good (Ctrl-C then printed tracebacks); a pipe said "corrupt or
    truncated". Folders and virtual paths pass (a folder may be a dataset).

    Raises:
        SceneReadError: naming what the file is.
    """
    import stat

    if is_virtual(path):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # (missing, unreadable: the open says so)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SceneReadError(f"{what} {path} is not a regular file but {file_kind(mode)}: geoseg reads files it can "
                             "seek in: save it to a file first")


def tiff_named(path: str | Path) -> bool:
    """Whether ``path`` is named as a GeoTIFF (``.tif``, ``.tiff``, also gzipped: ``.tif.gz``, GDAL's /vsigzip/)."""
    return str(path).lower().removesuffix(".gz").endswith((".tif", ".tiff"))


def open_raster(path: str | Path, **kwargs: Any) -> Any:
    """``rasterio.open`` for reading, a file named as a GeoTIFF (:func:`tiff_named`) as a GeoTIFF only: GDAL opens by
    content, and an uploaded "scene.tif" that was a VRT or a WMS description fetched URLs, or read other users'
    files, into a nightly batch's outputs. Every read of a user's raster goes through it."""
    if tiff_named(path) and not is_virtual(path) and os.path.isdir(path):  # (GDAL: "not recognized as ... format")
        raise SceneReadError(f"{path} is a folder, not a GeoTIFF: give the raster file")
    return rasterio.open(path, driver="GTiff" if tiff_named(path) else None, **kwargs)


def open_scene(path: str | Path) -> SceneMeta:
    """Read a raster's metadata, with one-line errors for missing, non-raster or corrupt files.

    ``path`` is a file or a GDAL virtual file system path: a scene inside a zip or tar archive
    (``/vsizip/scenes.zip/a.tif``) or in object storage (``/vsis3/``, ``/vsigs/``, ``/vsiaz/``).

    Raises:
        SceneReadError: the file is missing, not a raster, or cannot be decoded.
        SceneError: the raster's dtype is not supported.
    """
    text = os.fspath(path)
    path = scene_path(path)
    if not is_utf8(text):  # (rasterio failed on it with "unexpected error: UnicodeEncodeError")
        raise SceneReadError(f"input {printable(text)}: the name is not valid UTF-8 (GDAL takes UTF-8 names only): "
                             "rename it (or its folder)")
    if re.match(r"^/vsicurl(_streaming)?[/?]", text):  # (its URL's '//' does not survive a path)
        raise SceneReadError(f"input {text}: HTTP paths (/vsicurl/) are not read; download the scene first, or give "
                             "its object storage path (/vsis3/bucket/scene.tif, /vsigs/, /vsiaz/)")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", text):
        text = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)", r"\1://", text)  # (a Path made 'http://' 'http:/')
        raise SceneReadError(f"input {text}: URLs are not read as such; give a file, or GDAL's form of it "
                             "(/vsizip/archive.zip/scene.tif, /vsis3/bucket/scene.tif)")
    if not is_virtual(path) and not path.exists():
        raise SceneReadError(f"input {path} does not exist: check the path")
    if path.is_dir():
        raise SceneReadError(f"input {path} is a folder: give a GeoTIFF file (or use 'geoseg batch')")
    check_seekable(path, "input")
    try:
        with open_raster(path) as ds:
            flags = tuple(tuple(f.name for f in band) for band in ds.mask_flag_enums)
            alpha = None
            for i, ci in enumerate(ds.colorinterp, start=1):
                if ci == ColorInterp.alpha:
                    alpha = i
            meta = SceneMeta(
                path=path,
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                crs=ds.crs,
                transform=ds.transform,
                nodata=ds.nodata,
                mask_flags=flags,
                descriptions=tuple(ds.descriptions),
                alpha_band=alpha,
                block_shape=tuple(ds.block_shapes[0]) if ds.block_shapes else (0, 0),  # type: ignore[arg-type]
                tags=dict(ds.tags()),
                gcps=ds.gcps if ds.gcps[0] else None,
                rpcs=ds.rpcs,
                scaling=tuple(zip(ds.scales, ds.offsets)),
                nodatavals=tuple(ds.nodatavals),
                dtypes=tuple(ds.dtypes),
            )
            # Decode one small window so a truncated/corrupt file fails here, not mid-run.
            ds.read(1, window=Window(0, 0, min(16, ds.width), min(16, ds.height)))
            ds.read(1, window=Window(max(0, ds.width - 16), max(0, ds.height - 16), min(16, ds.width), min(16, ds.height)))
    except RasterioIOError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_virtual(path) and ("No such file" in msg or "does not exist" in msg):
            raise SceneReadError(f"input {path} does not exist: check the path (and the name inside the archive)") from None
        if ("not recognized as" in msg or "not a supported file format" in msg) and tiff_named(path) \
                and not is_virtual(path) and path.suffix.lower() == ".gz":
            raise SceneReadError(f"input {path} is gzip-compressed: give it as /vsigzip/{text} (GDAL reads a "
                                 "gzipped GeoTIFF through /vsigzip/), or gunzip it first") from None
        if ("not recognized as" in msg or "not a supported file format" in msg) and tiff_named(path):
            raise SceneReadError(f"input {path} is not a raster GDAL can read as a GeoTIFF: files named .tif or .tiff "
                                 "are read as GeoTIFFs only: check the file (a download cut short?), or give another "
                                 "format, or a VRT, its own extension") from None
        if "not recognized as" in msg or "not a supported file format" in msg:
            raise SceneReadError(f"input {path} is not a raster GDAL can read: give a GeoTIFF") from None
        raise corrupt_input(path, exc, virtual=is_virtual(path)) from None
    except rasterio.errors.RasterioError as exc:
        raise SceneReadError(f"input {path} cannot be read ({exc}): the file may be corrupt") from None
    if meta.dtype not in SUPPORTED_DTYPES:
        raise SceneError(
            f"input {path} has pixel type {meta.dtype}: geoseg reads {', '.join(SUPPORTED_DTYPES)}; "
            + _convert_hint(meta.dtype, path.name)
        )
    check_transform(f"input {path}", path.name, meta.transform)
    check_latitudes(f"input {path}", path.name, meta.crs, meta.transform, meta.width, meta.height)
    return meta


def _convert_hint(dtype: str, name: str) -> str:
    """What to do with a scene of an unsupported pixel type ``dtype``."""
    if dtype.startswith("complex"):
        return f"take its amplitude first (e.g. gdal_calc.py -A {name} --calc 'absolute(A)' --type Float32)"
    wider = {"int8": "Int16", "int64": "Float64", "uint64": "Float64"}.get(dtype, "Float32")
    return f"convert it first (e.g. gdal_translate -ot {wider} {name} converted.tif)"


def check_transform(what: str, name: str, transform: Any) -> None:
    """Refuse a geotransform that cannot place pixels on the ground: a pixel width or height of 0 (or
    axes that are parallel: no area), or numbers that are not finite. Such a file (from a broken
    writer) would otherwise fail deep inside the run (a division by zero) or give empty polygons.

    Raises:
        SceneError: naming ``what`` (e.g. ``"input dir/scene.tif"``) and how to mend the file ``name``.
    """
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    if not all(np.isfinite(v) for v in (a, b, c, d, e, f)):
        raise SceneError(f"{what} has a geotransform with numbers that are not finite ({a}, {b}, {c}, {d}, {e}, {f}): "
                         f"set its georeferencing again (e.g. gdal_edit.py -a_ullr ULX ULY LRX LRY {name})")
    if a * e - b * d == 0:
        raise SceneError(f"{what} has a geotransform that gives its pixels no area (pixel size {a:g} x {e:g}, "
                         f"rotation terms {b:g}, {d:g}): set its georeferencing again "
                         f"(e.g. gdal_edit.py -a_ullr ULX ULY LRX LRY {name})")


def check_latitudes(what: str, name: str, crs: Any, transform: Any, width: int, height: int) -> None:
    """Refuse a grid of a geographic CRS whose pixel centres lie beyond the poles (a latitude past
    ±90°: a transform written in another CRS's units, or with its origin and size swapped): its
    ground sizes were NaN, and predict then failed on "simplify nan", vectorize on "cannot convert
    float NaN to integer", and info printed "nan m".

    Raises:
        SceneError: naming ``what`` and how to mend the file ``name``.
    """
    if crs is None or not crs.is_geographic or not width or not height:
        return
    k = degrees_per_unit(crs)
    lats = [k * (transform @ (c, r))[1] for c in (0.5, width - 0.5) for r in (0.5, height - 0.5)]
    if max(abs(v) for v in lats) > 90 + 1e-9:
        raise SceneError(f"{what} is in a geographic CRS ({crs.to_string() if crs.to_epsg() else 'degrees'}) but its "
                         f"pixels reach latitude {max(lats, key=abs):.6g}, beyond the poles: its georeferencing is "
                         f"wrong; set it again (e.g. gdal_edit.py -a_srs EPSG:XXXX -a_ullr ULX ULY LRX LRY {name})")


def check_georeferenced(meta: SceneMeta) -> None:
    """Warn (:class:`NoCRSWarning`) when the scene has no CRS.

    geoseg's policy: a scene without a CRS is still processed; outputs copy its transform and
    carry no CRS either, so they overlay the input in any tool that overlays the input.  A scene
    georeferenced by ground control points or RPCs (unrectified imagery) has no CRS of its own
    either: outputs carry the same GCPs/RPCs, so GIS tools place them as they place the scene.
    """
    if meta.crs is None:
        how = georeferencing(meta)
        if how:
            warn(
                f"{meta.path.name} is georeferenced by {how}, not a geotransform: the mask carries the same "
                f"{'GCPs' if meta.gcps else 'RPCs'}, so QGIS and gdalwarp place it as they place the scene",
                NoCRSWarning)
            return
        warn(
            f"{meta.path.name} has no CRS: outputs keep its pixel grid but are not georeferenced",
            NoCRSWarning)


def georeferencing(meta: SceneMeta) -> str:
    """'N ground control points', 'RPCs' or '' (how a scene without a geotransform is placed)."""
    if meta.gcps:
        return f"{len(meta.gcps[0])} ground control points"
    if meta.rpcs:
        return "RPCs"
    return ""


def polygons_skipped_reason(meta: SceneMeta) -> str | None:
    """Why polygons cannot be written for ``meta`` (no CRS), or None when they can."""
    if meta.crs is not None:
        return None
    how = georeferencing(meta)
    if how:
        return (f"{meta.path.name}: polygons are not written, they need a map grid and the scene has {how} "
                f"instead; warp the scene first (e.g. gdalwarp -t_srs EPSG:XXXX {meta.path.name} warped.tif)")
    return f"{meta.path.name} has no CRS: polygons are not written (the mask is)"


# ---- reading -----------------------------------------------------------------------------
_handles: dict[tuple[int, int, str], Any] = {}
_handles_lock = threading.Lock()
#: Handles one thread keeps open at most; reading windows of more files (training on many
#: scenes from disk) closes its least recently used one, so the open files stay bounded.
MAX_THREAD_HANDLES = 32


#: The handles a read is using right now: :func:`close_handles` leaves them open. Two threads that
#: segmented one scene at once closed each other's handles mid-read when the first finished:
#: segmentation faults, "Dataset is closed" reported as a corrupt file, or a hang.
_busy: set[tuple[int, int, str]] = set()


@contextlib.contextmanager
def _handle(path: Path) -> Iterator[Any]:
    """A dataset handle for ``path`` owned by the calling thread (GDAL handles are not shared), in use
    until the block ends.

    Reader threads keep their handle between windows; :func:`close_handles` closes them when a
    scene is done, so a long batch run does not accumulate open files, and one thread keeps at
    most :data:`MAX_THREAD_HANDLES` open (the least recently used goes first).
    """
    # The process id too: a forked worker (a DataLoader's) must not reuse its parent's handle.
    owner = (os.getpid(), threading.get_ident())
    key = (*owner, str(path))
    with _handles_lock:
        ds = _handles.pop(key, None)
        if ds is not None and not ds.closed:
            _handles[key] = ds  # most recently used last
            _busy.add(key)
        else:
            ds = None
    if ds is None:
        ds = open_raster(path)
        with _handles_lock:
            _handles[key] = ds
            _busy.add(key)
            mine = [k for k in _handles if k[:2] == owner and k not in _busy]
            for old in mine[: max(0, len(mine) + 1 - MAX_THREAD_HANDLES)]:
                _handles.pop(old).close()
    try:
        yield ds
    finally:
        with _handles_lock:
            _busy.discard(key)


def close_handles(path: str | Path) -> None:
    """Close the cached handles of ``path`` (every thread's) that no read is using now; one in use by
    another run reading the same file stays open for that run."""
    with _handles_lock:
        for key in [k for k in _handles if k[2] == str(path) and k not in _busy]:
            _handles.pop(key).close()


@atexit.register
def _close_all_handles() -> None:
    """Close the handles still cached when the interpreter exits (a training run's, an API
    user's), before it tears rasterio down: a dataset freed during that teardown makes Python
    3.13 print "Error in sys.excepthook" at exit."""
    with _handles_lock:
        while _handles:
            _handles.popitem()[1].close()


#: The class id a floating-point label raster's nodata and NaN pixels take (no class has it).
NO_LABEL = -1


def ids_by_text(by_name: Mapping[str, int], texts: Iterable[str], low: int, high: int) -> dict[str, int]:
    """``by_name`` (lower-case class names -> ids) with each of ``texts`` that names no class but is a
    whole number added as that id (a class field typed partly as names, partly as ids), kept within
    ``low - 1 .. high + 1`` so that the caller's range check refuses it rather than an overflow."""
    out = dict(by_name)
    for t in texts:
        if t.lower() not in out and re.fullmatch(r"[-+]?\d+", t.strip()):
            out[t.lower()] = max(low - 1, min(int(t), high + 1))
    return out


def whole_class_ids(block: np.ndarray, nodata: float | None, what: str, hint: str) -> np.ndarray:
    """A label block as class ids: an integer block as it is; a floating-point one (labels, a reference)
    as int64 with its nodata and NaN pixels :data:`NO_LABEL`, or a :class:`SceneError` "``what`` <dtype>
    values that are not whole class ids (e.g. 1.5): ``hint``" (probabilities, resampled labels: 1.5
    was cut to class 1 and NaN became a huge negative id, silently)."""
    if not np.issubdtype(block.dtype, np.floating):
        return block
    unlabelled = ~np.isfinite(block)
    if nodata is not None and np.isfinite(nodata):
        unlabelled |= block == nodata
    values = np.where(unlabelled, NO_LABEL, block)
    bad = (values != np.round(values)) | (np.abs(values) >= 2**31)
    if bad.any():
        raise SceneError(f"{what} {block.dtype} values that are not whole class ids (e.g. {values[bad][0]:g}): {hint}")
    return values.astype(np.int64)


def corrupt_input(name: str | Path, exc: BaseException, where: str = "", *, virtual: bool = False) -> SceneReadError:
    """The one-line error for an input GDAL cannot decode (``where``: e.g. " at column 261, row 0"): a
    file it reads that is missing (a VRT's source) or a remote one that cannot be reached is said so,
    not taken for corruption (``virtual``: the scene is a GDAL virtual path, where remote storage may
    be out of reach)."""
    reason = gdal_reason(exc)
    low = reason.lower()
    if any(t in low for t in ("no such file", "does not exist")):
        advice = "a file it reads is missing (a VRT's source?): check the paths it names"
    elif virtual and any(t in low for t in ("could not resolve", "http", "curl", "credential", "access denied",
                                            "forbidden", "timed out", "connection")):
        advice = "its storage cannot be reached: check the network, the path and the credentials (AWS_*, GS_*, AZURE_*)"
    else:
        advice = "the file may be corrupt or truncated; check it with gdalinfo -checksum"
    return SceneReadError(f"input {name} cannot be read{where} ({reason}): {advice}")


def read_window_gaps(
    path: str | Path, window: Window, bands: Sequence[int], alpha_band: int | None = None, *,
    alpha_as_data: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read ``bands`` (1-based) of ``window``, the window's valid mask, and where single bands
    have no data.

    A pixel is valid when any of its bands has data (so it gets a class), but a band can still
    lack data there: Landsat-7's SWIR2 has a wider nodata frame than its other bands, and SLC-off
    gaps differ a little from band to band. Those values must not reach a model as if they were
    measurements (a nodata 0 reads as the darkest possible value).

    Returns:
        ``(data, valid, missing)``: data CHW in the raster's dtype; valid HW bool (True = has
        data in some band); ``missing`` CHW bool (True = this band has no data here,
        including every band of an invalid pixel), or ``None`` when every value has data.
        ``alpha_as_data``: the band tagged alpha is one of ``bands`` (:attr:`SceneMeta.alpha_as_data`):
        no band's mask is it then, only the bands' nodata values.
    """
    try:
        with _handle(scene_path(path)) as ds:  # (a Path() of /vsigzip//abs/a.tif.gz lost its '//')
            data = ds.read(list(bands), window=window)
            return _valid_and_missing(ds, data, window, bands, alpha_band, alpha_as_data)
    except rasterio.errors.RasterioIOError as exc:
        raise corrupt_input(Path(path).name, exc, f" at column {int(window.col_off)}, row {int(window.row_off)}",
                            virtual=is_virtual(path)) from None


def has_mask_band(ds: Any) -> bool:
    """Whether band 1's no-data is a mask band (GDAL's per-dataset mask, e.g. a GeoTIFF's internal
    mask): a class raster's hidden pixels are no class (vectorize, evaluate, sample)."""
    return MaskFlags.per_dataset in ds.mask_flag_enums[0]


def _plain_nodata(ds: Any, bands: Sequence[int]) -> bool:
    """True when every band of ``bands`` has a nodata value that its dtype holds exactly (not NaN)."""
    values = [ds.nodatavals[b - 1] for b in bands]
    return all(v is not None and np.isfinite(v) and np.array(v, ds.dtypes[b - 1]) == v
               for v, b in zip(values, bands))


def _valid_and_missing(ds: Any, data: np.ndarray, window: Window, bands: Sequence[int],
                       alpha_band: int | None, alpha_as_data: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """See :func:`read_window_gaps`."""
    flags = [ds.mask_flag_enums[b - 1] for b in bands]
    if alpha_as_data:  # (GDAL's mask of each band is the alpha band: NIR 0 was nodata, the pixel lost)
        flags = [[MaskFlags.all_valid] if MaskFlags.alpha in f else f for f in flags]
    missing: np.ndarray | None
    if alpha_band is not None:
        valid = ds.read(alpha_band, window=window) > 0
        missing = np.broadcast_to(~valid, data.shape) if not valid.all() else None
        # a band with a nodata value of its own has gaps the alpha band does not show (GDAL's band
        # mask is that value then): they reach the model as its mean, not as measurements
        own = [i for i, b in enumerate(bands) if MaskFlags.nodata in flags[i] and ds.nodatavals[b - 1] is not None
               and np.isfinite(ds.nodatavals[b - 1])]
        if own:
            gaps = np.zeros(data.shape, bool)
            for i in own:
                gaps[i] = data[i] == data.dtype.type(ds.nodatavals[bands[i] - 1])
            if gaps.any():
                missing = gaps | ~valid[None]
                valid = valid & ~missing.all(axis=0)
    elif all(f == [MaskFlags.all_valid] for f in flags):
        valid = np.ones(data.shape[1:], bool)
        missing = None
    elif all(f == [MaskFlags.nodata] for f in flags) and _plain_nodata(ds, bands):
        # Same result as GDAL's nodata masks, without decoding the window a second time. Each
        # band has its own nodata value (a VRT of single-band files may give them different ones).
        values = np.array([ds.nodatavals[b - 1] for b in bands], dtype=data.dtype)
        missing = data == values[:, None, None]
        valid = ~missing.all(axis=0)
    else:
        missing = ds.read_masks(list(bands), window=window) == 0
        # a band's nodata value beside a mask band (an internal mask, a .msk file): GDAL's mask is the mask
        # band alone then, and a collar of nodata values got classes (and shifted its neighbours' classes)
        for i, b in enumerate(bands):
            value = ds.nodatavals[b - 1]
            if (value is not None and np.isfinite(value) and MaskFlags.nodata not in flags[i]
                    and MaskFlags.alpha not in flags[i] and _plain_nodata(ds, [b])):
                missing[i] |= data[i] == data.dtype.type(value)
        valid = ~missing.all(axis=0)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        missing = ~finite if missing is None else missing | ~finite
        # a pixel is nodata when every band is, whichever way each band says so (its nodata value in one
        # band, NaN in the others: it got a class)
        valid &= ~missing.all(axis=0)
    if missing is not None and not missing.any():
        missing = None
    return data, valid, missing


def read_scene_window(
    meta: SceneMeta, window: Window, bands: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """:func:`read_window_gaps` of ``window`` in the coordinates of ``meta`` (a scene or a
    :meth:`~SceneMeta.subset` of one): pixels outside its AOI are not valid, and a window that
    misses the AOI is not read at all (None)."""
    r0, c0 = meta.origin
    if r0 or c0:
        window = Window(window.col_off + c0, window.row_off + r0, window.width, window.height)
    inside = meta.aoi.pixels(window) if meta.aoi is not None else True
    if inside is False:
        return None
    data, valid, missing = read_window_gaps(meta.path, window, bands, meta.alpha_band,
                                            alpha_as_data=meta.alpha_as_data is not None)
    if inside is not True:
        valid &= inside
    return data, valid, missing


def windows_with_data(meta: SceneMeta, windows: Sequence[Window], cells: int = 2048) -> list[bool]:
    """Which of ``windows`` (in ``meta``'s pixel coordinates) hold a valid pixel, from one decimated
    read of the scene's validity mask (at most ``cells`` × ``cells``, averaged, so a cell with any
    valid pixel counts) and its area of interest. Cheap for a mosaic VRT (only its sources are
    read); for a dense file without overviews about one decoding pass at a fraction of the cost
    of predicting it."""
    r0, c0 = meta.origin
    rows, cols = min(meta.height, cells), min(meta.width, cells)
    if meta.alpha_as_data is not None:  # (the dataset's mask is the band read as data: every window is read)
        return [meta.aoi is None or meta.aoi.pixels(Window(w.col_off + c0, w.row_off + r0, w.width, w.height))
                is not False for w in windows]
    try:
        with _handle(meta.path) as ds:
            mask = ds.dataset_mask(window=Window(c0, r0, meta.width, meta.height), out_shape=(rows, cols),
                                   resampling=Resampling.average) > 0
    except rasterio.errors.RasterioIOError as exc:
        raise corrupt_input(meta.path.name, exc, virtual=is_virtual(meta.path)) from None
    fy, fx = rows / meta.height, cols / meta.width
    out = []
    for w in windows:
        a, b = int(w.row_off * fy), max(int(w.row_off * fy) + 1, math.ceil((w.row_off + w.height) * fy))
        c, d = int(w.col_off * fx), max(int(w.col_off * fx) + 1, math.ceil((w.col_off + w.width) * fx))
        inside = bool(mask[a:b, c:d].any())
        if inside and meta.aoi is not None:
            inside = meta.aoi.pixels(Window(w.col_off + c0, w.row_off + r0, w.width, w.height)) is not False
        out.append(inside)
    return out


# ---- vector data ---------------------------------------------------------------------------
#: Files read as vector data (labels, reference samples) rather than as rasters, by extension.
VECTOR_EXTENSIONS = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite")


def is_vector_path(path: str | Path) -> bool:
    """Whether ``path`` names a vector file (by its extension, see :data:`VECTOR_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VECTOR_EXTENSIONS


@dataclass(frozen=True)
class VectorData:
    """A vector file's features: attribute columns and shapely geometries (None where missing)."""

    fields: list[str]
    values: list[np.ndarray]
    geoms: np.ndarray
    #: The file's CRS (None when it has none).
    crs: Any


@contextlib.contextmanager
def ogr_path(path: str | Path) -> Iterator[Path]:
    """``path`` as pyogrio takes it, for the time of a read or a write: absolute, and without the marks
    pyogrio reads as a URI's (it parses every path as one): a ';' in the file's name begins URL parameters,
    dropped, and a '!' anywhere names an archive's member, so geoseg's own ``semi;colon_landcover.gpkg``
    could not be read back and nothing could be written into a folder ``run!1``. Such a path is reached
    through symbolic links in a private temporary folder: one to the file's folder (a '!' in a folder), or,
    for a name that holds them, one to the file and one to each of its sidecars (a shapefile's ``.dbf``,
    ``.shx``, ``.prj``), named ``v`` plus what follows the name's stem. GDAL's virtual paths pass as they are.
    """
    import shutil
    import tempfile

    path = Path(path)
    if is_virtual(path):
        yield path
        return
    path = path.absolute()
    odd_name, odd_folder = any(c in path.name for c in ";!"), "!" in str(path.parent)
    if not (odd_name or odd_folder):
        yield path
        return
    links = Path(tempfile.mkdtemp(prefix="geoseg-ogr-"))
    try:
        if odd_name:
            stem = path.stem
            os.symlink(path, links / ("v" + path.suffix))
            with contextlib.suppress(OSError):
                for other in os.listdir(path.parent):
                    if other.startswith(stem + ".") and other != path.name:
                        with contextlib.suppress(OSError):
                            os.symlink(path.parent / other, links / ("v" + other[len(stem):]))
            yield links / ("v" + path.suffix)
        else:
            os.symlink(path.parent, links / "d")
            yield links / "d" / path.name
    finally:
        shutil.rmtree(links, ignore_errors=True)


def _feature_layer(path: Path) -> str | None:
    """The one layer of ``path`` with geometries, when the file has other tables besides it (a
    GeoPackage's ``layer_styles``, which geoseg writes into its own): pyogrio read the first and
    warned "More than one layer found" for every GeoPackage geoseg made. None: pyogrio's default."""
    import pyogrio

    try:
        layers = pyogrio.list_layers(path)
    except Exception:  # noqa: BLE001 - unreadable: the read itself says so
        return None
    spatial = [str(name) for name, geometry in layers if geometry and str(name) != "layer_styles"]
    return spatial[0] if len(layers) > 1 and len(spatial) == 1 else None


#: Pieces an edge of a reprojected vector file is cut into, at most, per extent of the whole file
#: (:func:`read_vector`): a thousandth of it, where the edge bends.
VECTOR_DENSIFY = 1000


def read_vector(path: str | Path, crs: Any = None, *, missing: str, unreadable: str,
                near_x: float | None = None) -> VectorData:
    """Read a vector file (any format pyogrio reads) with its geometries in ``crs``.

    Geometries in another CRS are reprojected vertex by vertex, after adding vertices along their
    edges (an edge straight in the file's CRS bends in another: a latitude/longitude box's edges
    became chords in UTM, and a polar cap a line); a file without a CRS is taken to be in ``crs``
    already. On a geographic ``crs`` with ``near_x`` (the scene's middle longitude), longitudes
    are taken within half a turn of it, so an area across the antimeridian lies where a scene of
    longitudes 179..181 has it. ``missing`` is the error for a file that does not exist,
    ``unreadable`` the start of the error for one that cannot be read.

    Raises:
        ParameterError: the file does not exist or cannot be read.
    """
    import pyogrio.raw
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform as transform_xy

    from geoseg.errors import ParameterError

    path = Path(path)
    if not path.exists():
        raise ParameterError(missing)
    try:
        check_seekable(path, "vector file")  # (a FIFO: the read waited for a writer for good)
    except SceneReadError as exc:
        raise ParameterError(f"{unreadable}: {exc}") from None
    try:
        with ogr_path(path) as readable:
            try:
                info, _, wkb, values = pyogrio.raw.read(readable, layer=_feature_layer(readable))
            except Exception as exc:  # noqa: BLE001 - pyogrio raises several types
                # (named as the user gave it, not as the link it was read through)
                reason = str(exc).splitlines()[0].replace(str(readable), str(path))
                # (SQLite's statement, raw: "sqlite3_prepare_v2(SELECT COUNT(*) FROM sqlite_master ...) failed: file
                # is not a database; file is not a database")
                said = re.match(r"^sqlite3_\w+\(.*\) failed: (.*)$", reason)
                if said:
                    reason = "; ".join(dict.fromkeys(p.strip() for p in said.group(1).split(";") if p.strip()))
                raise ParameterError(f"{unreadable}: {reason}") from None
    except OSError as exc:  # (the links could not be made)
        raise ParameterError(f"{unreadable}: {exc}") from None
    geoms = shapely.from_wkb(wkb)
    src = CRS.from_user_input(info["crs"]) if info.get("crs") else None
    if src is not None and "undefined" in (src.to_wkt().split('"') + [""])[1].lower():
        src = None  # a GeoPackage's srs_id 0/-1 ("Undefined geographic/Cartesian SRS", older GDALs): none
    if src is None and crs is not None and len(geoms):
        warn(f"{path.name} has no CRS: its coordinates are taken to be in the scene's CRS", NoCRSWarning)
    if src is not None and crs is not None and src != crs:
        bad = f"{unreadable}: its coordinates do not fit its CRS ({src.to_string()[:60]})"
        if src.is_geographic and len(geoms):
            x0, y0, x1, y1 = shapely.total_bounds(geoms)
            if min(x0, y0) < -360 or max(x1, y1) > 360:  # GDAL reads a GeoJSON without "crs" as WGS 84
                raise ParameterError(f"{bad}: they are not longitudes/latitudes (a GeoJSON file must be in WGS 84, "
                                     "RFC 7946); write it with its real CRS, e.g. as a GeoPackage")

        def reproject(xy: np.ndarray) -> np.ndarray:
            xs, ys = transform_xy(src, crs, xy[:, 0], xy[:, 1])
            return np.column_stack([xs, ys])

        try:
            if len(geoms):
                x0, y0, x1, y1 = shapely.total_bounds(geoms)
                extent = max(x1 - x0, y1 - y0)
                if np.isfinite(extent) and extent > 0:
                    geoms = shapely.segmentize(geoms, extent / VECTOR_DENSIFY)
            geoms = shapely.transform(geoms, reproject)
        except Exception as exc:  # noqa: BLE001 - GDAL's CPLE_* errors (PROJ: ...) are not RasterioErrors
            raise ParameterError(f"{bad}: reprojecting them fails ({str(exc).splitlines()[0]}); "
                                 "check the file's CRS") from None
    if near_x is not None and crs is not None and crs.is_geographic and len(geoms):
        turn = 360.0 / degrees_per_unit(crs)

        def wrap(xy: np.ndarray) -> np.ndarray:
            return np.column_stack([near_x + (xy[:, 0] - near_x + turn / 2) % turn - turn / 2, xy[:, 1]])

        geoms = shapely.transform(geoms, wrap)
    return VectorData([str(f) for f in info["fields"]], list(values), geoms, src)


# ---- writing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridSpec:
    """The output grid: copied from the input scene."""

    width: int
    height: int
    crs: Any
    transform: Any
    gcps: Any = None
    rpcs: Any = None

    @classmethod
    def of(cls, meta: SceneMeta) -> GridSpec:
        """The grid of ``meta`` (with its GCPs or RPCs when it is georeferenced by those)."""
        return cls(meta.width, meta.height, meta.crs, meta.transform, meta.gcps, meta.rpcs)


class COGWriter:
    """Write a raster row-strip by row-strip, then publish it as a COG atomically.

    Strips go to a staging tiled GeoTIFF (temp name in the destination folder); ``close()``
    converts it with GDAL's COG driver (internal overviews) into another temp name and renames
    that into place.  If anything fails, or ``abort()`` is called, no output appears.
    """

    def __init__(
        self,
        path: str | Path,
        grid: GridSpec,
        profile: dict[str, Any],
        *,
        overwrite: bool = False,
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
        tags: dict[str, str] | None = None,
        description: str | Sequence[str] | None = None,
        count: int = 1,
        registry: list[COGWriter] | None = None,
    ) -> None:
        """``registry``: a list this writer joins as soon as its staging file exists, so a caller that
        aborts the writers of that list on any exception (SIGTERM included) never misses its file."""
        from geoseg.atomic import check_output

        self.path = check_output(path, overwrite)
        self.overwrite = overwrite
        self.profile = dict(profile)
        self.grid = grid
        self._staging = temp_name(self.path).with_suffix(".staging.tif")
        dtype = self.profile["dtype"]
        staging_profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": count,
            "dtype": dtype,
            "crs": grid.crs,
            "nodata": self.profile.get("nodata"),
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            # the staging copy is read once by the COG driver: compress it, but cheaply
            "compress": "ZSTD" if _has_zstd() else "DEFLATE",
            "zstd_level": 1,
            "zlevel": 1,
            "BIGTIFF": "IF_SAFER",
        }
        if grid.crs is not None or not (grid.transform is None or grid.transform.is_identity):
            # (an identity transform of an ungeoreferenced scene is not written: GDAL warns on it)
            staging_profile["transform"] = grid.transform
        self._ds: Any = None
        self._closed = False
        #: The ``<SRS>`` element GDAL keeps in a ``.aux.xml`` for a CRS the GeoTIFF keys cannot hold
        #: (known after :meth:`close`; ``None`` for every usual CRS).
        self.srs_xml: str | None = None
        # From here until the caller can abort this writer (it is in ``registry``), anything that stops
        # the set-up (an error, SIGTERM raised between two statements) removes the staging file here:
        # GDAL creates it inside rasterio.open, before a handle comes back.
        try:
            try:
                with warnings.catch_warnings():
                    # an ungeoreferenced grid: GDAL says so on opening; the GCPs/RPCs follow below
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    self._ds = rasterio.open(self._staging, "w", **staging_profile)
            except rasterio.errors.RasterioError as exc:
                raise OutputError(f"cannot create {self.path}: {exc}") from None
            if registry is not None:
                registry.append(self)
            if grid.crs is None and grid.gcps:
                self._ds.gcps = grid.gcps
            elif grid.crs is None and grid.rpcs:
                self._ds.rpcs = grid.rpcs
            if colormap:
                self._ds.write_colormap(1, colormap)
            if tags:
                self._ds.update_tags(**tags)
            for i, text in enumerate([description] if isinstance(description, str) else description or [], 1):
                self._ds.set_band_description(i, text)
        except BaseException:  # (a signal too): no staging file is left behind
            self.abort()
            raise

    def update_tags(self, **tags: str) -> None:
        """Add dataset tags before :meth:`close` (e.g. statistics known only once written)."""
        self._ds.update_tags(**tags)

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        """Write a strip starting at raster row ``row0`` (full width): HW for one band, CHW for all."""
        try:
            if data.ndim == 2:
                self._ds.write(data, 1, window=Window(0, row0, self.grid.width, data.shape[0]))
            else:
                self._ds.write(data, window=Window(0, row0, self.grid.width, data.shape[1]))
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise write_error(self.path, exc) from None

    def close(self, before_publish: Callable[[], None] | None = None, own_pam: bool = False) -> Path:
        """Convert the staging file to a COG and publish it; return the final path.
        ``before_publish`` runs when the COG is complete, just before it is renamed into place (then the
        ``.aux.xml`` with :attr:`srs_xml`, where needed, unless ``own_pam``: ``before_publish`` writes it)."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._ds.close()  # flushes the last blocks
        except (rasterio.errors.RasterioError, OSError) as exc:
            _remove(self._staging)
            raise write_error(self.path, exc) from None
        co = {k: v for k, v in self.profile.items() if k not in {"driver", "dtype", "nodata"}}
        if min(self.grid.width, self.grid.height) < 2:
            # a raster one pixel wide (or high) cannot be halved along that axis: GDAL wrote overviews
            # as wide as the raster (decimation 1), which COG validators refuse
            co["OVERVIEWS"] = "NONE"
        try:
            with atomic_output(self.path, self.overwrite) as tmp:
                with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
                    rasterio.shutil.copy(self._staging, tmp, driver="COG", **co)
                # A CRS that GeoTIFF keys cannot hold (a rotated pole ...) is kept by GDAL in a
                # .aux.xml beside the file: the temp's sidecar would be lost with the rename.
                self.srs_xml = _pam_srs(Path(f"{tmp}.aux.xml"))
                if before_publish is not None:
                    before_publish()
                if self.srs_xml is not None and not own_pam:
                    # (before the rename: a stop between the two left the raster without its CRS)
                    write_pam(self.path, srs_xml=self.srs_xml)
        except (rasterio.errors.RasterioError, OSError) as exc:
            if isinstance(exc, OutputError):
                raise
            raise write_error(self.path, exc) from None
        finally:
            _remove(self._staging)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._closed = True
            if self._ds is not None:
                self._ds.close()
        _remove(self._staging)

    def __enter__(self) -> COGWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _remove(p: Path) -> None:
    for q in (p, Path(str(p) + ".aux.xml")):
        with contextlib.suppress(OSError):  # (a cleanup: never in place of the error that brought it)
            q.unlink()


_ZSTD: bool | None = None


def _has_zstd() -> bool:
    """Whether this GDAL build can write ZSTD-compressed GeoTIFFs (probed once)."""
    global _ZSTD
    if _ZSTD is None:
        from rasterio.io import MemoryFile

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with MemoryFile() as mf, mf.open(
                    driver="GTiff", width=1, height=1, count=1, dtype="uint8", compress="ZSTD"
                ) as ds:
                    ds.write(np.zeros((1, 1, 1), np.uint8))
            _ZSTD = True
        except Exception:  # noqa: BLE001 - any failure means "not available"
            _ZSTD = False
    return _ZSTD


# ---- class metadata & QGIS sidecars -------------------------------------------------------
def class_colormap(classes: Sequence[ClassInfo]) -> dict[int, tuple[int, int, int, int]]:
    """GDAL colormap from class colours; nodata (255) and unused entries transparent black."""
    cmap = {i: (0, 0, 0, 0) for i in range(256)}
    for c in classes:
        cmap[c.id] = (*c.color, 255)
    return cmap


def classes_tag(classes: Sequence[ClassInfo]) -> dict[str, str]:
    """The dataset tag that stores the class table as JSON."""
    return {CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes])}


def read_classes(ds: Any) -> list[ClassInfo] | None:
    """Class table stored in an open dataset's ``GEOSEG_CLASSES`` tag; None if absent or malformed."""
    raw = ds.tags().get(CLASSES_TAG)
    if not raw:
        return None
    try:
        return [
            ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"])[:3])  # type: ignore[arg-type]
            for c in json.loads(raw)
        ]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring malformed %s tag in %s: %s", CLASSES_TAG, ds.name, exc)
        return None


def band_class_names(ds: Any) -> dict[int, str]:
    """Class names of band 1's ``CLASSES`` tag (``0=cloud,1=cloud_shadow,4=clear``, as other tools
    label class rasters), by class id; without one, band 1's GDAL category names (see
    :func:`category_names`); empty without either."""
    names: dict[int, str] = {}
    for item in (ds.tags(1).get("CLASSES") or "").split(","):
        key, _, name = item.partition("=")
        if key.strip().lstrip("-").isdigit() and name.strip():
            names[int(key)] = name.strip()
    return names or category_names(ds)


#: Class names that say a value is no class (a CLASSES tag's ``0=no_data``), spelt without case, spaces or marks.
_NO_DATA_NAMES = frozenset({"nodata", "novalue", "unlabelled", "unlabeled", "unclassified", "unknown", "void",
                            "fill", "ignore", "none", "empty", "masked", "missing"})


def means_no_data(name: str) -> bool:
    """Whether a class name says its value is no class (``no_data``, ``Unclassified``, ``void`` ...)."""
    return "".join(ch for ch in name.lower() if ch.isalnum()) in _NO_DATA_NAMES


def unmarked_255(ds: Any, nodata: float | None = None, given: bool = False) -> bool:
    """Whether 255 is no data in the class raster ``ds``: a uint8 raster without a nodata value (``nodata``
    when ``given``, else its own) whose class names (the ``GEOSEG_CLASSES`` tag, band 1's ``CLASSES`` tag,
    GDAL category names) do not name 255 as a class (geoseg's mask nodata; a 0/255 building mask tagged
    ``255=building`` lost its buildings)."""
    if np.dtype(ds.dtypes[0]) != np.uint8 or (nodata if given else ds.nodata) is not None:
        return False
    table = read_classes(ds)
    names = {c.id: c.name for c in table} if table else band_class_names(ds)
    return MASK_NODATA not in names or means_no_data(names[MASK_NODATA])


def category_names(ds: Any) -> dict[int, str]:
    """Band 1's GDAL category names (the ``CategoryNames`` a GeoTIFF's ``.aux.xml`` sidecar holds, as
    QGIS, ArcGIS, ``gdal_edit`` and geoseg's masks write them; the n-th name is value n's), by value,
    unnamed values left out; empty without a sidecar or names. rasterio does not expose them (a label
    raster named so had its classes called class_1, class_2, ...)."""
    from xml.etree import ElementTree

    pam = next((f for f in (getattr(ds, "files", None) or []) if str(f).lower().endswith(".aux.xml")), None)
    if pam is None or str(pam).startswith("/vsi"):
        return {}
    try:
        root = ElementTree.parse(pam).getroot()
    except (ElementTree.ParseError, OSError, ValueError):
        return {}
    for band in root.iter("PAMRasterBand"):
        if band.get("band", "1").strip() == "1":
            cats = band.find("CategoryNames")
            if cats is None:
                return {}
            return {i: el.text.strip() for i, el in enumerate(cats.iter("Category")) if el.text and el.text.strip()}
    return {}


#: A class raster without class names or colours and with more distinct values than this (in a 256²
#: sample) is taken for an image (a uint16 band: one polygon or sample point per grey value).
MAX_UNLABELLED_CLASSES = 256


def image_values(ds: Any) -> int | None:
    """The number of distinct values of band 1 in a sample of ``ds`` (16 full-resolution windows of 64²
    spread over it) when it is more than a class raster without class names holds
    (:data:`MAX_UNLABELLED_CLASSES`): an image band taken for a class map; ``None`` for a class raster:
    uint8 (256 values at most), or described by class names (the ``GEOSEG_CLASSES`` tag, a band
    ``CLASSES`` tag, GDAL category names) or a colour table."""
    if np.dtype(ds.dtypes[0]) == np.uint8 or read_classes(ds) or band_class_names(ds):
        return None
    with contextlib.suppress(ValueError, rasterio.errors.RasterioError):
        if ds.colormap(1):
            return None
    # full-resolution windows spread over the raster: a decimated read is served from the overviews, and a
    # COG's CUBIC overviews (GDAL's default without a colour table) of an 8-class uint16 map held 300 values
    h, w = min(ds.height, 64), min(ds.width, 64)
    rows = np.unique(np.linspace(0, ds.height - h, 4).round().astype(int))
    cols = np.unique(np.linspace(0, ds.width - w, 4).round().astype(int))
    seen: set[int] = set()
    for r in rows:
        for c in cols:
            seen.update(np.unique(ds.read(1, window=Window(int(c), int(r), w, h))).tolist())
    distinct = len(seen)
    return distinct if distinct > MAX_UNLABELLED_CLASSES else None


def write_aux_xml(mask_path: str | Path, classes: Sequence[ClassInfo], nodata_name: str = "nodata",
                  srs_xml: str | None = None) -> Path:
    """Write ``<mask>.aux.xml`` with GDAL category names (index = pixel value), and the mask's
    CRS where the GeoTIFF keys could not hold it (``srs_xml``, see :attr:`COGWriter.srs_xml`)."""
    names = [""] * 256
    for c in classes:
        names[c.id] = c.name
    names[MASK_NODATA] = nodata_name
    last = max([c.id for c in classes] + [MASK_NODATA])
    cats = "".join(f"<Category>{escape(n)}</Category>" for n in names[: last + 1])
    return write_pam(mask_path, srs_xml=srs_xml, band1=f"    <CategoryNames>{cats}</CategoryNames>\n")


def write_pam(raster_path: str | Path, *, srs_xml: str | None = None, band1: str = "") -> Path:
    """Write ``<raster>.aux.xml`` (GDAL's PAM sidecar) with a dataset ``<SRS>`` element and band 1's
    elements."""
    xml = "<PAMDataset>\n"
    if srs_xml:
        xml += f"  {srs_xml}\n"
    if band1:
        xml += f"  <PAMRasterBand band=\"1\">\n{band1}  </PAMRasterBand>\n"
    xml += "</PAMDataset>\n"
    out = Path(str(raster_path) + ".aux.xml")
    atomic_write_text(out, xml)
    return out


def _pam_srs(pam: Path) -> str | None:
    """The ``<SRS ...>...</SRS>`` element of a GDAL ``.aux.xml``, or None (no file, no element)."""
    try:
        text = pam.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    match = re.search(r"<SRS\b[^>]*>.*?</SRS>", text, re.S)
    return match.group(0) if match else None


def _raster_qml(renderer: str) -> str:
    """A QGIS 3.22 raster style (``.qml``) around a ``<rasterrenderer>`` element (band 1, no resampling)."""
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22.0" styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0">
  <pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
{renderer}
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" colorizeStrength="100" colorizeRed="255" colorizeGreen="128" colorizeBlue="128"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


_MIN_MAX_ORIGIN = """      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>"""


def write_qml(mask_path: str | Path, classes: Sequence[ClassInfo]) -> Path:
    """Write ``<mask stem>.qml``: a QGIS paletted style with one legend entry per class."""
    out = Path(mask_path).with_suffix(".qml")
    atomic_write_text(out, palette_qml(classes))
    return out


def palette_qml(classes: Sequence[ClassInfo]) -> str:
    """The text of :func:`write_qml`'s style."""
    entries = "\n".join(
        f'        <paletteEntry value="{c.id}" color="#{c.color[0]:02x}{c.color[1]:02x}{c.color[2]:02x}" '
        f'label="{escape(c.name, {chr(34): "&quot;"})}" alpha="255"/>'
        for c in classes
    )
    qml = _raster_qml(f"""    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
{_MIN_MAX_ORIGIN}
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>""")
    return qml


#: Colour ramps of :func:`write_ramp_qml` (position 0-1, RGB): red (unsure) to green (sure) for the
#: confidence raster (ColorBrewer RdYlGn), light to dark blue for a class probability (Blues).
RAMPS: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    "confidence": ((0.0, (215, 25, 28)), (0.25, (253, 174, 97)), (0.5, (255, 255, 191)), (0.75, (166, 217, 106)),
                   (1.0, (26, 150, 65))),
    "probability": ((0.0, (247, 251, 255)), (0.25, (198, 219, 239)), (0.5, (107, 174, 214)), (0.75, (33, 113, 181)),
                    (1.0, (8, 48, 107))),
}


def write_ramp_qml(raster_path: str | Path, maximum: float, ramp: str = "confidence", band: int = 1) -> Path:
    """Write ``<raster stem>.qml``: a QGIS single-band pseudocolour style of ``band`` from 0 to
    ``maximum`` (100 for geoseg's uint8 percent rasters, 1 for float32), so a confidence or
    probability raster opens with a fixed, readable legend instead of a grey min/max stretch."""
    stops = RAMPS[ramp]
    digits = 0 if maximum >= 10 else 2
    items = "\n".join(
        f'          <item value="{pos * maximum:g}" label="{pos * maximum:.{digits}f}" '
        f'color="#{r:02x}{g:02x}{b:02x}" alpha="255"/>'
        for pos, (r, g, b) in stops
    )
    inner = ":".join(f"{pos:g};{r},{g},{b},255" for pos, (r, g, b) in stops[1:-1])
    (_, first), (_, last) = stops[0], stops[-1]
    qml = _raster_qml(f"""    <rasterrenderer type="singlebandpseudocolor" band="{band}" opacity="1" alphaBand="-1" classificationMin="0" classificationMax="{maximum:g}" nodataColor="">
      <rasterTransparency/>
{_MIN_MAX_ORIGIN}
      <rastershader>
        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" minimumValue="0" maximumValue="{maximum:g}" labelPrecision="{digits}">
          <colorramp type="gradient" name="[source]">
            <prop k="color1" v="{first[0]},{first[1]},{first[2]},255"/>
            <prop k="color2" v="{last[0]},{last[1]},{last[2]},255"/>
            <prop k="discrete" v="0"/>
            <prop k="rampType" v="gradient"/>
            <prop k="stops" v="{inner}"/>
          </colorramp>
{items}
        </colorrampshader>
      </rastershader>
    </rasterrenderer>""")
    out = Path(raster_path).with_suffix(".qml")
    atomic_write_text(out, qml)
    return out

# ---- ground areas -----------------------------------------------------------------------------
def area_units(crs: Any, ground: bool = False) -> str:
    """Units of ground areas on ``crs`` (``m2`` for a geographic CRS or, with ``ground``, a projection
    whose areas geoseg measures on the ellipsoid, see :func:`distorts_areas`; ``pixels`` without a CRS)."""
    if crs is None:
        return "pixels"
    if crs.is_geographic or ground:
        return "m2"
    unit = (crs.linear_units or "unit").lower()
    return {"metre": "m2", "meter": "m2", "m": "m2", "foot": "ft2", "us survey foot": "ftUS2"}.get(unit, f"{unit}2")


def geodesic(crs: Any) -> Any:
    """A :class:`pyproj.Geod` on the ellipsoid of ``crs`` (WGS 84 when it names none)."""
    import pyproj

    return pyproj.CRS.from_wkt(crs.to_wkt()).get_geod() or pyproj.Geod(ellps="WGS84")


def degrees_per_unit(crs: Any) -> float:
    """Degrees in one of a geographic CRS's angular units (1 for degrees; 0.9 for the grads of
    NTF Paris, EPSG:4807): geodesic measures take degrees."""
    import pyproj

    try:
        radians = pyproj.CRS.from_wkt(crs.to_wkt()).axis_info[0].unit_conversion_factor
    except (pyproj.exceptions.CRSError, IndexError):
        return 1.0
    factor = math.degrees(radians) if radians else 1.0
    return 1.0 if math.isclose(factor, 1.0, rel_tol=1e-12) else factor


class GeoAreas:
    """Ground areas (geodesic m² on the CRS's ellipsoid) of a geographic grid's pixels, a block of
    rows at a time: a degree grid's pixels shrink with the cosine of the latitude, so degrees² are
    no area. On a north-up grid a row's pixels share a latitude: one area per row, each the
    geodesic area of the row's pixel. A rotated grid's row crosses latitudes: one area per pixel,
    from the ellipsoid's radii of curvature at its centre (within 1e-8 of the geodesic area for
    pixels up to 0.01 degrees)."""

    def __init__(self, crs: Any, transform: Any, height: int) -> None:
        self.geod = geodesic(crs)
        self.k = degrees_per_unit(crs)
        self.transform = transform
        t = transform
        self.rotated = bool(t.b or t.d)
        self._rows: np.ndarray | None = None
        if not self.rotated:
            out = np.empty(height)
            for r in range(height):
                lon = [self.k * (t.a * c + t.c) for c in (0, 1, 1, 0)]
                lat = [self.k * (t.e * row + t.f) for row in (r, r, r + 1, r + 1)]
                out[r] = abs(self.geod.polygon_area_perimeter(lon, lat)[0])
            self._rows = out

    def block(self, row0: int, nrows: int, col0: int = 0, ncols: int = 1) -> np.ndarray:
        """Areas of rows ``[row0, row0 + nrows)``: shape ``(nrows,)`` on a north-up grid, ``(nrows,
        ncols)`` (columns from ``col0``) on a rotated one."""
        if self._rows is not None:
            return self._rows[row0:row0 + nrows]
        t, k = self.transform, self.k
        rows = np.arange(row0, row0 + nrows, dtype=np.float64)[:, None] + 0.5
        cols = np.arange(col0, col0 + ncols, dtype=np.float64)[None, :] + 0.5
        lat = np.radians(k * (t.d * cols + t.e * rows + t.f))
        s2 = np.sin(lat) ** 2
        a, es = self.geod.a, self.geod.es
        radii = a * a * (1 - es) / (1 - es * s2) ** 2  # meridian × prime vertical radius of curvature
        return radii * np.cos(lat) * abs(t.determinant) * math.radians(k) ** 2


#: How far (as a ratio) a projected grid's areas in map units may be from ground areas anywhere in the grid before
#: geoseg measures its areas on the ellipsoid (:func:`distorts_areas`): UTM is within 0.2 %, a national grid
#: within a few per mille, Web Mercator 2.6 times too large at 52° N.
MAP_AREA_TOLERANCE = 1.05


def geodetic_of(crs: Any) -> tuple[Any, Any] | None:
    """``(to_geodetic, geod)`` of a projected CRS: a pyproj transformer from map coordinates to longitudes
    and latitudes (degrees) of its geodetic CRS, and that CRS's ellipsoid; None where pyproj cannot make them."""
    try:
        import pyproj

        src = pyproj.CRS.from_wkt(crs.to_wkt())
        return pyproj.Transformer.from_crs(src, src.geodetic_crs, always_xy=True), geodesic(crs)
    except Exception:  # noqa: BLE001 - pyproj's errors for CRSs it cannot handle
        return None


def _map_xy(t: Any, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of the (fractional) pixel positions ``cols, rows`` of a grid of transform ``t``."""
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


#: Pixels from a pole within which a pixel's ground area is its corners' geodesic polygon: the longitude and
#: latitude differences the area element takes break down near a pole (3 % off for the pixels on it, 1e-4 at
#: 28 pixels away).
POLE_PIXELS = 300


def _ground_areas(crs: Any, t: Any, cols: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """Ellipsoidal areas (m²) of the pixels of a projected grid (transform ``t``) centred at the fractional
    positions ``cols, rows``: the pixel's sides in longitude and latitude (central differences over the
    pixel) spanning the ellipsoid's area element there, ``M·N·cos(φ)·dφ·dλ`` (within 1e-6 for pixels of up
    to tens of kilometres), or within :data:`POLE_PIXELS` of a pole the geodesic polygon of its corners.
    Not the projection's ``areal_scale``: Web Mercator's is the sphere's, 0.2 % off the ellipsoid's. NaN for
    a pixel off the projection's domain (the corners of a full-disk geostationary grid); None where pyproj
    cannot take the CRS."""
    made = geodetic_of(crs)
    if made is None:
        return None
    to_geo, geod = made
    cols, rows = np.asarray(cols, np.float64).ravel(), np.asarray(rows, np.float64).ravel()
    dc = np.array([0.0, -0.5, 0.5, 0.0, 0.0])[:, None]
    dr = np.array([0.0, 0.0, 0.0, -0.5, 0.5])[:, None]
    x, y = _map_xy(t, cols[None, :] + dc, rows[None, :] + dr)
    with np.errstate(all="ignore"):
        try:
            lon, lat = (np.asarray(v, np.float64) for v in to_geo.transform(x.ravel(), y.ravel()))
        except Exception:  # noqa: BLE001 - pyproj's errors for points it cannot transform
            return np.full(cols.shape, np.nan)
        lon, lat = lon.reshape(5, -1), lat.reshape(5, -1)
        dlon_c, dlon_r = ((lon[2] - lon[1] + 180) % 360 - 180), ((lon[4] - lon[3] + 180) % 360 - 180)  # (the antimeridian)
        det = np.abs(dlon_c * (lat[4] - lat[3]) - dlon_r * (lat[2] - lat[1]))
        phi = np.radians(lat[0])
        a, es = geod.a, geod.es
        area = a * a * (1 - es) / (1 - es * np.sin(phi) ** 2) ** 2 * np.cos(phi) * det * math.radians(1) ** 2
        area[~(np.isfinite(area) & (area > 0)) | ~np.all(np.isfinite(lat), axis=0)] = np.nan
        pole_m = (90.0 - np.abs(lat[0])) * math.radians(1) * a  # (about: a degree of latitude near a pole)
        near = np.flatnonzero(np.isfinite(lat[0]) & (pole_m < POLE_PIXELS * math.sqrt(_map_m2(crs, t))))
    if near.size:
        edge = np.linspace(-0.5, 0.5, 5)[:-1]  # each side in 4 pieces
        ring_c = np.r_[edge, np.full(4, 0.5), -edge, np.full(4, -0.5)]
        ring_r = np.r_[np.full(4, -0.5), edge, np.full(4, 0.5), -edge]
        for i in near:
            cx, cy = _map_xy(t, cols[i] + ring_c, rows[i] + ring_r)
            try:
                area[i] = abs(geod.polygon_area_perimeter(*to_geo.transform(cx, cy))[0])
            except Exception:  # noqa: BLE001 - pyproj's errors for points it cannot transform
                area[i] = np.nan
    return area


def _map_m2(crs: Any, transform: Any) -> float:
    """A pixel's area in map units converted to m² (its CRS's linear unit in metres, squared)."""
    try:
        metres = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - rasterio raises CRSError for CRSs without linear units
        metres = 1.0
    return abs(transform.determinant) * metres * metres


def _centre_degrees(crs: Any, transform: Any, width: int, height: int) -> tuple[float, float] | None:
    """The grid's centre as whole degrees of longitude and latitude (a cache key), or None."""
    made = geodetic_of(crs)
    if made is None:
        return None
    try:
        with np.errstate(all="ignore"):
            lon, lat = made[0].transform(*(transform @ (width / 2, height / 2)))
    except Exception:  # noqa: BLE001 - pyproj's errors for points it cannot transform
        return None
    return (float(round(lon)), float(round(lat))) if np.isfinite(lon) and np.isfinite(lat) else None


def _off_the_ground(ratio: np.ndarray) -> bool:
    ratio = ratio[np.isfinite(ratio)]
    return bool(ratio.size) and not bool(np.all((1 / MAP_AREA_TOLERANCE <= ratio) & (ratio <= MAP_AREA_TOLERANCE)))


@functools.lru_cache(maxsize=64)
def _crs_distorts(wkt: str, near: tuple[float, float] | None = None) -> bool:
    """Whether the projection's areas are more than :data:`MAP_AREA_TOLERANCE` off the ground's somewhere in its
    area of use (Web Mercator's: the world): then every grid of it is measured on the ellipsoid, and neighbouring
    tiles of an archive never switch between map units and m² (a 5 % jump at the seam). A CRS without an area
    of use (a custom one) is tried within 10° of ``near`` (a grid's centre, as longitude and latitude, whole
    degrees), as far as neighbouring tiles would reach."""
    try:
        import pyproj

        src = pyproj.CRS.from_wkt(wkt)
        use = src.area_of_use
        if use is None and (code := src.to_epsg(min_confidence=90)) is not None:  # (GDAL's WKT leaves it out)
            use = pyproj.CRS.from_epsg(code).area_of_use
        if use is not None:
            west, south, north = use.west, use.south, use.north
            east = use.east if use.east >= use.west else use.east + 360.0
        elif near is not None:
            west, east = near[0] - 10.0, near[0] + 10.0
            south, north = max(-85.0, near[1] - 10.0), min(85.0, near[1] + 10.0)
        else:
            return False
        lon, lat = np.meshgrid(np.linspace(west, east, 9), np.linspace(south, north, 9))
        lon = (lon + 180.0) % 360.0 - 180.0
        with np.errstate(all="ignore"):
            k = np.asarray(pyproj.Proj(src).get_factors(lon.ravel(), lat.ravel(), errcheck=False).areal_scale)
    except Exception:  # noqa: BLE001 - pyproj's errors for CRSs it cannot handle
        return False
    return _off_the_ground(k.astype(np.float64))


@functools.lru_cache(maxsize=64)
def _distorts(wkt: str, transform: Any, width: int, height: int) -> bool:
    crs = CRS.from_wkt(wkt)
    if _crs_distorts(wkt, _centre_degrees(crs, transform, width, height)):
        return True
    c, r = np.meshgrid(np.linspace(0.5, width - 0.5, 5), np.linspace(0.5, height - 0.5, 5))  # (a full disk's corners
    area = _ground_areas(crs, transform, c, r)  # are off the Earth: its inner points tell)
    return area is not None and _off_the_ground(_map_m2(crs, transform) / area)


def distorts_areas(crs: Any, transform: Any, width: int, height: int) -> bool:
    """Whether a projected grid's areas in map units are more than :data:`MAP_AREA_TOLERANCE` off the
    ground's somewhere in the grid (at 5 × 5 points from corner to corner) or somewhere in its CRS's area of
    use: Web Mercator, World Mercator, a polar stereographic, a continental conformal conic; not UTM, national
    grids or equal-area projections. geoseg then measures areas,
    perimeters, ``min_area`` and ``simplify`` on the ellipsoid (m², m), as on a geographic CRS: in map
    units, a Web Mercator scene's areas were 2.6 times the ground's at 52° N. False on a geographic CRS
    (measured on the ellipsoid anyway), without a CRS, or where pyproj cannot tell."""
    if crs is None or crs.is_geographic or width <= 0 or height <= 0:
        return False
    return _distorts(crs.to_wkt(), transform, int(width), int(height))


class ProjectedAreas(GeoAreas):
    """Ground areas (ellipsoidal m²) of the pixels of a projected grid that distorts areas
    (:func:`distorts_areas`), a block of rows at a time, pixel by pixel (see :func:`_ground_areas`),
    computed every :attr:`step` pixels and interpolated linearly between: at most :attr:`STEP` pixels
    and :attr:`SPACING_M` metres of map apart, over which the interpolation stays within 1e-6 (Web
    Mercator at 70° N)."""

    #: Most pixels between two computed areas, along rows and columns.
    STEP = 16
    #: Most map metres between two computed areas (linear interpolation of 1/cos² over 20 km pixels
    #: 16 apart was 3e-4 off).
    SPACING_M = 2000.0

    def __init__(self, crs: Any, transform: Any) -> None:
        self.crs = crs
        self.transform = transform
        self.rotated = True  # (one area per pixel)
        self._rows = None
        self.step = max(1, min(self.STEP, int(self.SPACING_M / math.sqrt(_map_m2(crs, transform)))))

    def block(self, row0: int, nrows: int, col0: int = 0, ncols: int = 1) -> np.ndarray:
        """Areas (m²) of the pixels of rows ``[row0, row0 + nrows)``, columns ``[col0, col0 + ncols)``:
        shape ``(nrows, ncols)``."""
        step = self.step
        lr = np.unique(np.r_[np.arange(row0, row0 + nrows, step), row0 + nrows - 1]) + 0.5
        lc = np.unique(np.r_[np.arange(col0, col0 + ncols, step), col0 + ncols - 1]) + 0.5
        c, r = np.meshgrid(lc, lr)
        area = _ground_areas(self.crs, self.transform, c, r)
        rows = np.arange(row0, row0 + nrows, dtype=np.float64) + 0.5
        cols = np.arange(col0, col0 + ncols, dtype=np.float64) + 0.5
        if area is None or not np.all(np.isfinite(area)):
            # points off the projection's domain (the Earth's limb on a full-disk grid): every pixel of the
            # block by itself, no area off the Earth (such pixels are the scene's nodata)
            c, r = np.meshgrid(cols, rows)
            area = _ground_areas(self.crs, self.transform, c, r)
            area = np.zeros(c.size) if area is None else np.nan_to_num(area, nan=0.0)
            return area.reshape(nrows, ncols)
        area = area.reshape(len(lr), len(lc))
        by_col = np.stack([np.interp(cols, lc, ar) for ar in area])  # (len(lr), ncols)
        if len(lr) == 1:
            return np.broadcast_to(by_col, (nrows, ncols)).copy()
        i = np.clip(np.searchsorted(lr, rows, side="right") - 1, 0, len(lr) - 2)
        w = ((rows - lr[i]) / (lr[i + 1] - lr[i]))[:, None]
        return by_col[i] * (1 - w) + by_col[i + 1] * w


def pixel_areas(crs: Any, transform: Any, height: int, width: int | None = None) -> float | GeoAreas | None:
    """Ground area of a grid's pixels: one number for a projected CRS (``|det(transform)|`` in its
    units², m² for most), a :class:`GeoAreas` for a geographic CRS (geodesic m² row by row, or
    pixel by pixel on a rotated grid) or, given the grid's ``width``, a projected one that distorts areas
    (:class:`ProjectedAreas`, ellipsoidal m² pixel by pixel), ``None`` without a CRS."""
    if crs is None:
        return None
    if not crs.is_geographic:
        if width is not None and distorts_areas(crs, transform, width, height):
            return ProjectedAreas(crs, transform)
        return abs(transform.determinant)
    return GeoAreas(crs, transform, height)


def add_area_counts(out: np.ndarray, block: np.ndarray, areas: np.ndarray) -> None:
    """Add to ``out[v]`` the ground area of the pixels of value ``v`` in the HW integer ``block``:
    ``areas`` is one area per row (no per-pixel weight array) or one per pixel (HW)."""
    if areas.ndim == 2:
        n = np.bincount(block.ravel(), weights=areas.ravel())[: len(out)]
        out[: len(n)] += n
        return
    for row, area in zip(block, areas):
        n = np.bincount(row.ravel())[: len(out)]
        out[: len(n)] += n * area


def ground_pixel_area(crs: Any, transform: Any, height: int, width: int | None = None) -> float | None:
    """One pixel's ground area as :func:`pixel_areas` gives it, in the grid's middle row for a
    geographic CRS, at its centre for a projected grid of ``width`` that distorts areas (the units of a
    ``min_area``: m² there); ``None`` without a CRS."""
    if crs is not None and not crs.is_geographic and width is not None and distorts_areas(crs, transform, width, height):
        return float(ProjectedAreas(crs, transform).block(height // 2, 1, width // 2, 1)[0, 0])
    if crs is None or not crs.is_geographic:
        return pixel_areas(crs, transform, height)  # type: ignore[return-value]
    mid = transform @ transform.translation(0, height // 2)
    return float(np.mean(GeoAreas(crs, mid, 1).block(0, 1)))


def ground_pixel_size_m(crs: Any, transform: Any, height: int, width: int | None = None) -> float | None:
    """A pixel's ground size in metres (the square root of :func:`ground_pixel_area`, in the
    grid's middle row for a geographic CRS, at its centre for a grid of ``width`` that distorts areas);
    ``None`` without a CRS or with unknown units."""
    area = ground_pixel_area(crs, transform, height, width)
    if area is None:
        return None
    if crs.is_geographic or (width is not None and distorts_areas(crs, transform, width, height)):
        return float(np.sqrt(area))
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - rasterio raises CRSError for CRSs without linear units
        return None
    return float(np.sqrt(area)) * factor


__all__ = [
    "add_area_counts",
    "area_units",
    "CLASSES_TAG",
    "COGWriter",
    "GridSpec",
    "MASK_NODATA",
    "MaskFlags",
    "SceneMeta",
    "check_georeferenced",
    "band_class_names",
    "category_names",
    "means_no_data",
    "unmarked_255",
    "distorts_areas",
    "check_transform",
    "georeferencing",
    "degrees_per_unit",
    "geodesic",
    "geodetic_of",
    "GeoAreas",
    "ProjectedAreas",
    "has_mask_band",
    "ground_pixel_area",
    "ground_pixel_size_m",
    "pixel_areas",
    "is_virtual",
    "polygons_skipped_reason",
    "scene_path",
    "class_colormap",
    "classes_tag",
    "close_handles",
    "open_scene",
    "read_classes",
    "read_scene_window",
    "read_window_gaps",
    "write_aux_xml",
    "write_qml",
    "write_ramp_qml",
]
