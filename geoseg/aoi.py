"""Areas of interest: predict only the part of a scene a user needs.

An AOI is polygons from a vector file (any CRS pyogrio reads, reprojected to the scene's) or a
bounding box ``minx,miny,maxx,maxy`` in the scene's CRS. :func:`load_aoi` turns it into the
pixel window of the scene that holds it (on the scene's own pixel grid, so the outputs line up
with the scene) and a test of which pixels of a window lie inside it (pixel centres, as
``rasterio.features.rasterize`` burns them). Predict runs the windows of the whole scene's grid
that meet it (so its pixels get exactly the classes a whole-scene run gives them, prior
adaptation aside) and writes its bounding box; windows that miss the AOI are never read, and
pixels outside it are nodata in every output.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.windows import Window

from geoseg.errors import AoiOutsideError, ParameterError

__all__ = ["Aoi", "aoi_key", "load_aoi"]

log = logging.getLogger(__name__)

#: GEOS builds a prepared geometry's indexes lazily and shapely runs predicates without the GIL,
#: while Dask's reader threads (and the scenes of a multi-threaded worker) share one cached AOI:
#: they ask it one at a time (cheap next to reading and rasterising a window).
_GEOS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Aoi:
    """An area of interest on a scene's pixel grid.

    ``window`` is the scene window holding it (whole pixels, clipped to the scene); ``transform``
    is the scene's geotransform. Windows given to :meth:`pixels` are scene pixel windows.
    """

    geometry: Any  # shapely (multi)polygon in the scene's CRS
    window: Window
    transform: Any
    source: str

    def __post_init__(self) -> None:
        import shapely

        with _GEOS_LOCK:
            shapely.prepare(self.geometry)

    def _box(self, window: Window) -> Any:
        import shapely

        t = self.transform
        xs, ys = zip(*(t @ (c, r) for c in (window.col_off, window.col_off + window.width)
                       for r in (window.row_off, window.row_off + window.height)))
        return shapely.box(min(xs), min(ys), max(xs), max(ys))

    def pixels(self, window: Window) -> np.ndarray | bool:
        """Which pixels of ``window`` lie inside: ``True`` (all), ``False`` (none) or an HW bool array."""
        import shapely
        from rasterio.features import rasterize

        box = self._box(window)
        with _GEOS_LOCK:
            if not shapely.intersects(self.geometry, box):
                return False
            if shapely.contains(self.geometry, box):
                return True
            # the AOI's part in this window only (a long boundary is rasterised a window at a time)
            part = shapely.clip_by_rect(self.geometry, *box.buffer(abs(self.transform.a) + abs(self.transform.e)).bounds)
        h, w = int(window.height), int(window.width)
        t = self.transform @ Affine.translation(window.col_off, window.row_off)
        inside = rasterize([(part, 1)], out_shape=(h, w), transform=t, fill=0, dtype="uint8")
        return inside.astype(bool) if inside.any() else False


def load_aoi(spec: str | Path, meta: Any) -> Aoi:
    """The AOI ``spec`` (vector file, or ``minx,miny,maxx,maxy`` in the scene's CRS) on the grid of
    ``meta`` (:class:`~geoseg.io.SceneMeta`).

    Raises:
        ParameterError: the scene has no geotransform, the file cannot be read or holds no
            polygons, or the AOI does not overlap the scene.
    """
    import shapely

    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if meta.transform is None or (meta.crs is None and meta.transform.is_identity):
        raise ParameterError(f"--aoi needs a scene on a map grid; {meta.path.name} has no geotransform "
                             "(warp it first, e.g. gdalwarp -t_srs EPSG:XXXX, the CRS of your AOI's area)")
    if not text.strip() or (Path(text).is_dir() and not text.lower().endswith((".gdb", ".gpkg"))):
        # (a folder, "" too, was "unexpected error: IsADirectoryError")
        raise ParameterError(f"--aoi {text!r} is {'empty' if not text.strip() else 'a folder'}: give a vector file "
                             "(GeoPackage, shapefile, GeoJSON ...) or minx,miny,maxx,maxy in the scene's CRS")
    box = _parse_box(text)
    if box is not None:
        x0, y0, x1, y1 = box
        geometry = shapely.box(x0, y0, x1, y1)
        source = f"box {x0:.10g},{y0:.10g},{x1:.10g},{y1:.10g}"  # (:g rounded a UTM northing to 10 m)
    else:
        path = Path(text)
        if not path.exists():
            raise ParameterError(f"--aoi {path} does not exist: give a vector file (GeoPackage, shapefile, GeoJSON ...) "
                                 "or minx,miny,maxx,maxy in the scene's CRS")
        t = meta.transform  # the scene's middle longitude, on a degree grid (an AOI across the antimeridian)
        near_x = (round(t.a * meta.width / 2 + t.b * meta.height / 2 + t.c, 6)
                  if meta.crs is not None and meta.crs.is_geographic else None)
        geometry = _file_geometry(str(path.resolve()), _content_digest(path),
                                  meta.crs.to_wkt() if meta.crs is not None else None, near_x)
        source = path.name
        if meta.crs is None:  # (the AOI's coordinates were taken for the scene's without a word)
            _tell_no_scene_crs(path, meta)
    # the scene pixels whose centres lie within the AOI's bounds, on the scene's own grid
    inv = ~meta.transform
    bx0, by0, bx1, by1 = geometry.bounds
    cols, rows = zip(*(inv @ (x, y) for x in (bx0, bx1) for y in (by0, by1)))
    if min(cols) >= meta.width or max(cols) <= 0 or min(rows) >= meta.height or max(rows) <= 0:
        sx0, sy0 = meta.transform @ (0, meta.height)
        sx1, sy1 = meta.transform @ (meta.width, 0)
        raise AoiOutsideError(f"--aoi {source} does not overlap {meta.path.name} (AOI bounds {bx0:.10g},{by0:.10g},"
                             f"{bx1:.10g},{by1:.10g}; scene bounds {min(sx0, sx1):.10g},{min(sy0, sy1):.10g},"
                             f"{max(sx0, sx1):.10g},{max(sy0, sy1):.10g} in its CRS)")
    # the centres strictly inside the bounds, and a row or column of centres on the bounds where GDAL's
    # rasterize burns a pixel of it (its rule for a centre on the boundary differs by side: a box through
    # pixel centres lost its top, bottom and right rows, which GDAL burns; taking all centres on the
    # bounds kept a column of nodata on its left)
    c0, c1 = max(0, math.floor(min(cols) - 0.5) + 1), min(meta.width, math.ceil(max(cols) - 0.5))
    r0, r1 = max(0, math.floor(min(rows) - 0.5) + 1), min(meta.height, math.ceil(max(rows) - 0.5))

    def on(index: int, bound: float) -> bool:  # whether pixel ``index``'s centre lies on a bound (in pixels)
        return abs(index + 0.5 - bound) < 1e-6

    c0 -= c0 > 0 and on(c0 - 1, min(cols))
    c1 += c1 < meta.width and on(c1, max(cols))
    r0 -= r0 > 0 and on(r0 - 1, min(rows))
    r1 += r1 < meta.height and on(r1, max(rows))
    if c1 <= c0 or r1 <= r0:
        raise AoiOutsideError(f"--aoi {source} covers no pixel centre of {meta.path.name}: give a larger area")
    aoi = Aoi(geometry, Window(c0, r0, c1 - c0, r1 - r0), meta.transform, source)
    if c1 - c0 > 1 and on(c0, min(cols)) and aoi.pixels(Window(c0, r0, 1, r1 - r0)) is False:
        c0 += 1
    if c1 - c0 > 1 and on(c1 - 1, max(cols)) and aoi.pixels(Window(c1 - 1, r0, 1, r1 - r0)) is False:
        c1 -= 1
    if r1 - r0 > 1 and on(r0, min(rows)) and aoi.pixels(Window(c0, r0, c1 - c0, 1)) is False:
        r0 += 1
    if r1 - r0 > 1 and on(r1 - 1, max(rows)) and aoi.pixels(Window(c0, r1 - 1, c1 - c0, 1)) is False:
        r1 -= 1
    window = Window(c0, r0, c1 - c0, r1 - r0)
    aoi = Aoi(geometry, window, meta.transform, source)
    if window.width * window.height <= 2**24:
        inside = aoi.pixels(window)
        if inside is False:
            raise AoiOutsideError(f"--aoi {source} covers no pixel centre of {meta.path.name}: give a larger area")
        if isinstance(inside, np.ndarray):  # rows or columns at the edges with no pixel inside go (the bounds'
            # box of an AOI on a rotated grid, or of a polygon, held a row of nodata at an edge, half the time)
            rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
            window = Window(c0 + int(cols[0]), r0 + int(rows[0]), int(cols[-1] - cols[0]) + 1,
                            int(rows[-1] - rows[0]) + 1)
            aoi = Aoi(geometry, window, meta.transform, source)
    return aoi


def _parse_box(text: str) -> tuple[float, float, float, float] | None:
    """``minx,miny,maxx,maxy`` of an AOI given as a box, or None for a file name.

    Raises:
        ParameterError: four comma-separated parts that are not an ordered box.
    """
    from geoseg.io import is_vector_path

    parts = text.replace(" ", "").split(",")
    if len(parts) != 4 or is_vector_path(text):
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except ValueError:
        raise ParameterError(f"--aoi {text!r}: give a vector file or minx,miny,maxx,maxy in the scene's CRS") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ParameterError(f"--aoi {text!r}: minx,miny,maxx,maxy must be finite numbers in the scene's CRS")
    if not (x0 < x1 and y0 < y1):
        raise ParameterError(f"--aoi {text!r}: minx,miny,maxx,maxy needs minx < maxx and miny < maxy")
    return x0, y0, x1, y1


def _content_digest(path: Path) -> str:
    """SHA-256 of a vector file's bytes (and of a shapefile's .dbf/.prj/.shx beside it)."""
    import hashlib

    h = hashlib.sha256()
    sides = [".shx", ".dbf", ".prj", ".cpg"] if path.suffix.lower() == ".shp" else []
    for f in [path, *(path.with_suffix(ext) for ext in sides)]:
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _file_geometry(path: str, digest: str, crs_wkt: str | None, near_x: float | None = None) -> Any:
    """The union of a vector file's polygons in ``crs_wkt`` (cached: a batch reads one AOI for every
    scene; the content digest is part of the key, so an edited file is read again); ``near_x``: see
    :func:`geoseg.io.read_vector`.

    The polygons of geometry collections count (an overlay's output); an invalid polygon is
    repaired into polygons only (a digitising spike's collapsed part is no line of AOI pixels)."""
    import shapely
    from rasterio.crs import CRS

    from geoseg.io import read_vector

    name = Path(path).name
    crs = CRS.from_wkt(crs_wkt) if crs_wkt else None
    vec = read_vector(path, crs, missing=f"--aoi {path} does not exist", unreadable=f"--aoi {path} cannot be read as "
                      "vector data", near_x=near_x)
    polys = _polygon_parts(np.array([g for g in vec.geoms if g is not None], dtype=object))
    if len(polys):
        polys = _polygon_parts(shapely.make_valid(polys, method="structure", keep_collapsed=False))
    if not len(polys):
        raise ParameterError(f"--aoi {name} has no polygons: give the area as polygons")
    return shapely.union_all(polys)


def _tell_no_scene_crs(path: Path, meta: Any) -> None:
    """Warn that the AOI file's coordinates are taken as the scene's, which has no CRS, when the file has one."""
    import pyogrio

    with contextlib.suppress(Exception):  # (reading the AOI itself says what is wrong with the file)
        if pyogrio.read_info(str(path)).get("crs"):
            from geoseg.errors import NoCRSWarning, warn

            warn(f"{meta.path.name} has no CRS: the coordinates of --aoi {path.name} are taken as they are (assign the "
                 "scene its CRS: gdal_edit.py -a_srs EPSG:XXXX)", NoCRSWarning)


def _polygon_parts(geoms: np.ndarray) -> np.ndarray:
    """The non-empty polygons of ``geoms``, multipolygons and collections taken apart."""
    import shapely

    parts = shapely.get_parts(shapely.get_parts(geoms))  # (a collection may hold multipolygons)
    return parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)]


def aoi_key(spec: str | Path) -> str:
    """What identifies the AOI ``spec`` for ``batch``'s manifest: the box as given, or a digest of a
    file's geometries and CRS (so an edited AOI file re-runs the scenes; its name does not count).

    Raises:
        ParameterError: the file does not exist or cannot be read.
    """
    import hashlib

    import shapely

    from geoseg.io import read_vector

    text = str(spec)
    box = _parse_box(text)
    if box is not None:
        return ",".join(repr(v) for v in box)  # full precision: two boxes never share a key
    vec = read_vector(text, missing=f"--aoi {text} does not exist: give a vector file or minx,miny,maxx,maxy",
                      unreadable=f"--aoi {text} cannot be read as vector data")
    h = hashlib.sha256(str(vec.crs).encode())
    for g in vec.geoms:
        h.update(b"" if g is None else shapely.to_wkb(g))
    return "sha256:" + h.hexdigest()[:16]
