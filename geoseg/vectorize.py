"""Class raster -> clean, topologically valid land-cover polygons (GeoPackage, GeoJSON, FlatGeobuf).

Pipeline (:func:`vectorize_mask`):

1. **Sieve** (optional minimum mapping unit): regions smaller than ``min_pixels`` are merged
   into their largest neighbour with :func:`rasterio.features.sieve` (nodata is masked out,
   so it neither grows nor shrinks).  A speck whose only neighbours are nodata cannot be
   merged; its polygon is dropped (no hole appears).  A region whose neighbours are all as
   small as itself (GDAL's sieve merges a region only into a neighbour of the unit or more)
   stays, below the unit, rather than leave a hole.
2. **Polygonise** horizontal strips of ``block_size`` rows with
   :func:`rasterio.features.shapes` in *pixel space* (x = column, y = -row, integer
   coordinates, so seams are exact).  Nodata regions are polygonised too ("nodata faces")
   so that the strip's pieces cover its rectangle and class/nodata edges are inner edges of
   the coverage; they are never written.  GDAL puts vertices only where rings turn; every
   pixel corner where three or more values meet, and on the strip's top and bottom frame
   every corner where the row across the seam changes value, is added as a vertex
   (:func:`_junction_nodes`), which makes the pieces an edge-matched (valid) coverage whose
   seam vertices match those of the neighbouring strips.
3. **Simplify** each strip's pieces once, right away, with :func:`shapely.coverage_simplify`
   (Visvalingam-Whyatt that keeps shared edges shared) and ``simplify_boundary=False``: the
   strip's frame, seams included, stays exactly as polygonised, and edges crossing a seam are
   simplified on each side with their seam vertex fixed.  Pieces of one region in adjacent
   strips therefore share their seam segments exactly, and neighbours across a seam stay
   edge-matched.
4. **Merge across seams**: regions that continue across a seam are found from the two pixel
   rows on either side of it (4- or 8-connectivity, as for polygonising; the pixel -> piece
   labels are taken from the unsimplified pieces).  A region crossing seams is kept as a
   *group* of pieces (union-find across strips) and is *closed* once none of its pieces
   touches the current bottom seam; only then are its pieces unioned, once, with
   :func:`shapely.coverage_union_all` (exact on edge-matched pieces), and repaired if that
   gives an invalid polygon.  Closed regions are final and written straight away.  Work is
   linear in the number of strips; memory holds two strips (one is simplified in a helper
   thread while the next is polygonised) plus the pieces of open regions.
5. **Write** batches to a temp file with :func:`pyogrio.raw.write` (append), then rename it
   into place (:func:`geoseg.atomic.atomic_output`).  GeoPackages get a spatial index and a
   QGIS style (``layer_styles`` table) colouring classes by ``class_id``.

Units: ``min_area``, ``simplify``, ``area`` and ``perimeter`` are in the raster CRS's units
(metres for projected CRSs).  For a geographic CRS (degrees are no unit of area or of a
tolerance) they are metric: ``area`` (m²) and ``perimeter`` (m) geodesic on the CRS's
ellipsoid, ``min_area`` (m²) and ``simplify`` (m) converted to pixels with the geodesic size of
a pixel in the mask's middle row.

With ``simplify=0`` the output is pixel-exact (one vertex per pixel corner, by
:func:`shapely.segmentize`) and identical whatever ``block_size``.  With
simplification on, block-wise and whole-array runs give the same coverage up to vertex
choices near strip seams (edges crossing a seam are simplified in two steps, and the seam
lines themselves keep their pixel steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args
from xml.sax.saxutils import quoteattr

import numpy as np
import pyogrio.errors
import pyogrio.raw
import rasterio
import rasterio.errors
import rasterio.warp
import shapely
from affine import Affine
from rasterio import features
from rasterio.crs import CRS

from geoseg.atomic import atomic_output, check_output, remove_leftovers, staged_as, write_error
from geoseg.card import PALETTE, ClassInfo
from geoseg.config import checked_arguments, plain
from geoseg.errors import ParameterError, SceneError, SceneReadError, warn
from geoseg.io import (
    MASK_NODATA,
    area_units,
    band_class_names,
    means_no_data,
    unmarked_255,
    image_values,
    check_latitudes,
    check_seekable,
    check_transform,
    degrees_per_unit,
    distorts_areas,
    geodesic,
    geodetic_of,
    ground_pixel_area,
    has_mask_band,
    ogr_path,
    open_raster,
)
from geoseg.io import read_classes as read_tagged_classes

log = logging.getLogger(__name__)

VectorFormat = Literal["gpkg", "geojson", "fgb"]
#: Output formats, as accepted by ``fmt`` and ``--format``.
FORMATS: tuple[str, ...] = get_args(VectorFormat)
DRIVERS: dict[str, str] = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf"}
#: GeoJSON as RFC 7946 has it (WGS 84 coordinates, no ``crs`` member), with the layer's name.
GEOJSON_OPTIONS: dict[str, str] = {"RFC7946": "YES", "WRITE_NAME": "YES"}
EXTENSIONS: dict[str, str] = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson", ".fgb": "fgb"}
#: Each format's own extension (the one outputs get by default).
SUFFIXES: dict[str, str] = {"gpkg": ".gpkg", "geojson": ".geojson", "fgb": ".fgb"}

#: Integer dtypes that can hold class ids and that GDAL's polygoniser accepts.
CLASS_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16", "int32")
#: Default simplification tolerance, in pixels (VW removes stair steps of area < tol²).
DEFAULT_SIMPLIFY_PIXELS = 1.0
#: Pixels per strip when ``block_size`` is not given (bounds the Python objects of one strip).
STRIP_PIXELS = 1 << 22
#: Value changes between neighbouring pixels one strip may hold: a busier strip is cut shorter (its
#: polygons, about one per two or three changes, are Python objects of ~2 KB each until written; a
#: 1,024-px-wide strip of salt-and-pepper noise held 700,000 of them: 1.5-2.5 GB).
STRIP_EDGES = 1 << 17
#: GDAL block cache while vectorising (MB): enough for strip reads, small for RSS.
GDAL_CACHE_MB = 128

FIELDS: tuple[str, ...] = ("class_id", "class_name", "area", "perimeter", "scene")

# Pixel space: x = column, y = -row (a north-up grid of unit pixels with origin at the top left).
_PIXEL_SPACE = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class MaskInfo:
    """What :func:`open_mask` found out about a class raster.

    ``nodata`` is the class value that marks "no class" (``None``: every value is a class).
    ``pixel_size`` is the square root of a pixel's area, in CRS units.
    """

    path: Path
    width: int
    height: int
    dtype: str
    nodata: int | None
    crs: CRS
    transform: Affine
    classes: dict[int, ClassInfo]
    #: True when a GDAL mask band (an internal mask) marks pixels without a class: they are read
    #: as ``nodata`` (a value no class takes, chosen when the raster has no nodata value).
    masked: bool = False
    #: True when ``nodata`` is such a chosen value, not the raster's own.
    chosen_nodata: bool = False
    #: True when ``nodata`` is 255 in a uint8 raster without a nodata value (no data in geoseg's masks,
    #: as evaluate and sample take it).
    unmarked: bool = False

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in the units of ``min_area`` (see :func:`mask_pixel_area`)."""
        return mask_pixel_area(self.crs, self.transform, self.height, self.width)

    @property
    def pixel_size(self) -> float:
        """Square root of :attr:`pixel_area`: CRS units (projected), m (geographic)."""
        return math.sqrt(self.pixel_area)


@dataclass(frozen=True)
class VectorizeResult:
    """Summary of one :func:`vectorize_mask` run.

    ``class_counts`` maps class id to the number of polygons written; ``simplify`` is the
    tolerance used, in CRS units; ``min_pixels`` is the sieve threshold (0: no sieve).
    """

    path: Path
    fmt: str
    layer: str
    polygons: int
    class_counts: dict[int, int]
    width: int
    height: int
    seconds: float
    min_pixels: int
    simplify: float
    connectivity: int
    area_units: str
    crs_wkt: str = field(repr=False)

    @property
    def megapixels_per_second(self) -> float:
        """Throughput in megapixels of mask per second."""
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, one key per field (``class_counts``' class ids as strings, as JSON keys are)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------------------------
# Input


def format_from_path(path: str | Path) -> VectorFormat | None:
    """The output format implied by a file extension (``.gpkg``, ``.geojson``/``.json``, ``.fgb``)."""
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    return fmt  # type: ignore[return-value]


def open_mask(path: str | Path, *, described: bool = False) -> MaskInfo:
    """Open and check a class raster; read its class names and colours.

    Raises:
        SceneReadError: missing file, not a raster.
        SceneError: not an integer class raster (``described``: class names are given, so many
            distinct values are not taken for an image), or no CRS.
    """
    path = Path(path)
    if not path.exists():
        raise SceneReadError(f"mask {path} does not exist: check the path")
    check_seekable(path, "mask")
    try:
        with open_raster(path) as ds:
            return _mask_info(path, ds, described)
    except rasterio.errors.RasterioIOError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise SceneReadError(f"mask {path} is not a readable raster ({msg}): give a GeoTIFF class mask") from None


def _mask_info(path: Path, ds: rasterio.DatasetReader, described: bool = False) -> MaskInfo:
    dtype = ds.dtypes[0]
    if dtype not in CLASS_DTYPES and np.issubdtype(np.dtype(dtype), np.integer):
        # (sample and evaluate take them: GDAL's polygonize and sieve do not)
        wider = "Int16" if dtype == "int8" else "Int32"
        raise SceneError(
            f"mask {path} has {dtype} class ids, which GDAL's polygonize does not take: convert it first "
            f"(gdal_translate -ot {wider} {path.name} {path.stem}_{wider.lower()}.tif"
            + (", if its ids fit in Int32)" if wider == "Int32" else ")")
        )
    if dtype not in CLASS_DTYPES:
        raise SceneError(
            f"mask {path} has {dtype} pixels, not class ids: vectorize an integer class raster "
            f"({', '.join(CLASS_DTYPES)}) such as geoseg predict's mask"
        )
    if ds.crs is None and (ds.gcps[0] or ds.rpcs):
        raise SceneError(f"mask {path} is georeferenced by {'ground control points' if ds.gcps[0] else 'RPCs'}, not a "
                         f"map grid: warp it first (e.g. gdalwarp -r near -t_srs EPSG:XXXX {path.name} warped.tif)")
    if ds.crs is None:
        raise SceneError(f"mask {path} has no CRS: assign one first (e.g. gdal_edit.py -a_srs EPSG:XXXX {path.name})")
    check_transform(f"mask {path}", path.name, ds.transform)
    check_latitudes(f"mask {path}", path.name, ds.crs, ds.transform, ds.width, ds.height)
    if ds.count > 1:
        raise SceneError(
            f"mask {path} has {ds.count} bands, a class raster has one: give the mask geoseg predict wrote "
            f"({path.stem}_landcover.tif), not the image it segmented"
        )
    nodata = ds.nodata
    if nodata is not None and (not float(nodata).is_integer() or not _fits(int(nodata), dtype)):
        nodata = None
    classes = read_classes(ds)
    masked = has_mask_band(ds)
    unmarked = unmarked_255(ds, nodata, given=True)
    if unmarked:  # (it was a class here, and no data to evaluate and sample; with a mask band, it was refused)
        nodata = MASK_NODATA
    chosen = masked and nodata is None
    if chosen:  # pixels the mask band hides are read as a value no class takes
        top = int(np.iinfo(np.dtype(dtype)).max)
        nodata = next(v for v in range(top, top - 257, -1) if v not in classes)
    distinct = None if described else image_values(ds)
    if distinct is not None:  # an image band (a panchromatic uint16 scene): one polygon per grey value
        raise SceneError(
            f"mask {path} has {distinct} distinct values in a sample and no class names: that is an image, not "
            f"class ids; give the mask geoseg predict wrote ({path.stem}_landcover.tif), or, if they are class ids, "
            "name them in band 1's CLASSES tag (gdal_edit.py -mo CLASSES=1=forest,2=water,...) or give --classes "
            "with those to write"
        )
    return MaskInfo(
        path=path,
        width=ds.width,
        height=ds.height,
        dtype=dtype,
        nodata=None if nodata is None else int(nodata),
        crs=ds.crs,
        transform=ds.transform,
        classes=classes,
        masked=masked,
        chosen_nodata=chosen,
        unmarked=unmarked,
    )


def _fits(value: int, dtype: str) -> bool:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min) <= value <= int(info.max)


def read_classes(ds: rasterio.DatasetReader) -> dict[int, ClassInfo]:
    """Class names and colours stored in a mask, by class id.

    Looks at the ``GEOSEG_CLASSES`` dataset tag (JSON list of ``{"id", "name", "color"}``,
    written by ``geoseg predict``), then a band tag ``CLASSES`` like ``1=forest,2=water``
    for names and the band's colour table for colours.  Classes not described there get
    ``class_<id>`` and a palette colour when they are looked up (:func:`class_lookup`).
    """
    tagged = read_tagged_classes(ds)
    if tagged is not None:
        return {c.id: c for c in tagged}
    out: dict[int, ClassInfo] = {}
    names = band_class_names(ds)
    colors: dict[int, tuple[int, int, int]] = {}
    with contextlib.suppress(ValueError, rasterio.errors.RasterioError):
        colors = {int(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in ds.colormap(1).items()}
    for cid in sorted(set(names) | (set(colors) if names else set())):
        if 0 <= cid <= 254 and cid in names:
            out[cid] = ClassInfo(cid, names[cid], colors.get(cid, PALETTE[cid % len(PALETTE)]))
        elif cid in names and cid != ds.nodata and not means_no_data(names[cid]):  # (255=building: class_255)
            out[cid] = _LooseClass(cid, names[cid], colors.get(cid, PALETTE[cid % len(PALETTE)]))  # type: ignore[assignment]
    # colour-only classes are resolved lazily in class_lookup (a palette may have 256 entries)
    if not names and colors:
        out = {cid: ClassInfo(cid, f"class_{cid}", rgb) for cid, rgb in colors.items() if 0 <= cid <= 254}
    return out


def class_lookup(classes: dict[int, ClassInfo], cid: int) -> ClassInfo:
    """The class record for ``cid``, or a generic ``class_<id>`` one with a palette colour."""
    if cid in classes:
        return classes[cid]
    color = PALETTE[cid % len(PALETTE)]
    if 0 <= cid <= 254:
        return ClassInfo(cid, f"class_{cid}", color)
    return _LooseClass(cid, f"class_{cid}", color)  # type: ignore[return-value]


def resolve_classes(wanted: Sequence[int | str], classes: Mapping[int, ClassInfo], what: str) -> tuple[int, ...]:
    """Class ids of ``wanted`` (whole ids, or names in ``classes``, case-insensitive), in order.

    ``what`` names the class table in the error (e.g. the mask or the model). An id that is not
    in a non-empty table is refused too (a typo would silently write no polygon).
    """
    by_name = {c.name.lower(): int(c.id) for c in classes.values()}
    ids: list[int] = []
    for item in wanted:
        text = str(item).strip()
        cid = int(text) if text.lstrip("-").isdigit() else by_name.get(text.lower())
        if cid is None or (classes and cid not in classes):
            known = (", ".join(f"{c.id} {c.name}" for c in classes.values()) if classes
                     else "it has no class table: give class ids")
            raise ParameterError(f"class {text!r} is not one of {what}'s classes ({known})")
        if cid not in ids:
            ids.append(cid)
    if not ids:
        raise ParameterError("give at least one class to keep polygons of")
    return tuple(ids)


@dataclass(frozen=True)
class _LooseClass:
    """A class record for ids outside ClassInfo's 0..254 range (uint16 rasters)."""

    id: int
    name: str
    color: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Array-level building blocks


def min_pixels_for(min_area: float | None, min_pixels: int | None, pixel_area: float,
                   shape: tuple[int, int] | None = None) -> int:
    """The sieve threshold in pixels from ``min_area`` (units of ``pixel_area``) or ``min_pixels``.

    ``min_area`` is rounded up to whole pixels.  Returns 0 when neither is given (no sieve).
    With ``shape`` (rows, cols of the mask), a threshold that is not smaller than the whole mask
    is refused (every region would have to merge into a neighbour it does not have).
    """
    if min_area is not None and min_pixels is not None:
        raise ParameterError("give either --min-area or --min-pixels, not both")
    px = 0
    if min_area is not None:
        if not math.isfinite(min_area) or min_area < 0:
            raise ParameterError(f"--min-area {min_area:g} is not allowed: use an area >= 0 in map units²")
        px = int(math.ceil(min_area / pixel_area - 1e-9)) if min_area > 0 else 0
    if min_pixels is not None:
        if min_pixels < 0:
            raise ParameterError(f"--min-pixels {min_pixels} is not allowed: use a count >= 0")
        px = int(min_pixels)
    if shape is not None and px > 1 and px >= shape[0] * shape[1]:
        given = f"--min-area {min_area:g} ({px:.4g} pixels of {pixel_area:.4g})" if min_area is not None else f"--min-pixels {px}"
        raise ParameterError(f"{given} is not smaller than the whole mask ({shape[1]} x {shape[0]} = "
                             f"{shape[0] * shape[1]} pixels): use a smaller minimum mapping unit")
    return px


def mask_pixel_area(crs: CRS | None, transform: Affine, height: int, width: int | None = None) -> float:
    """A mask pixel's area in the units of ``min_area``: CRS units² (projected), geodesic m² in the
    middle row (geographic), ellipsoidal m² at the centre of a grid of ``width`` whose projection distorts
    areas (:func:`geoseg.io.distorts_areas`, Web Mercator), pixel units² without a CRS."""
    return ground_pixel_area(crs, transform, height, width) or abs(transform.determinant)


def vector_settings(min_area: float | None, min_pixels: int | None, simplify: float | None, pixel_area: float,
                    shape: tuple[int, int]) -> tuple[int, float]:
    """The sieve threshold in pixels and the simplification tolerance (map units; ``None`` = one
    pixel) of a mask of ``shape`` whose pixels cover ``pixel_area`` (see :attr:`MaskInfo.pixel_area`),
    or a ParameterError: what :func:`vectorize_mask` runs with, checked before a mask exists."""
    min_px = min_pixels_for(min_area, min_pixels, pixel_area, shape)
    if simplify is None:
        simplify = DEFAULT_SIMPLIFY_PIXELS * math.sqrt(pixel_area)
    if not math.isfinite(simplify) or simplify < 0:
        raise ParameterError(f"--simplify {simplify:g} is not allowed: use a tolerance >= 0 in map units (0 keeps pixel edges)")
    return min_px, float(simplify)


def sieve_array(array: np.ndarray, min_pixels: int, *, nodata: int | None = None, connectivity: int = 4) -> np.ndarray:
    """Merge regions smaller than ``min_pixels`` into their largest neighbour (HW array).

    Nodata pixels are masked out: they keep their value and never absorb a region.
    Returns a new array (the input if ``min_pixels`` <= 1).
    """
    _check_connectivity(connectivity)
    if min_pixels <= 1:
        return array
    min_pixels_for(None, min_pixels, 1.0, array.shape)  # refuses a threshold the whole array does not exceed
    mask = None if nodata is None else (array != nodata)
    return _sieve(array, int(min_pixels), mask, connectivity)


def _sieve(source: Any, min_pixels: int, mask: np.ndarray | None, connectivity: int,
           out: np.ndarray | None = None) -> np.ndarray:
    """:func:`rasterio.features.sieve` with thresholds rising to ``min_pixels`` (2, 4, 8, ...): GDAL's sieve
    merges no two small regions that are each other's largest neighbour (a 1-px and a 3-px region with a
    unit of 4 both stayed, and the polygons below the unit then left a hole beside data); at a lower
    threshold first, the smaller one joins the larger, which then reaches the unit."""
    steps = []
    t = 2
    while t < min_pixels:
        steps.append(t)
        t *= 2
    steps.append(min_pixels)
    for i, t in enumerate(steps):  # (a new array each pass: GDAL's sieve reads and writes two bands)
        last = i == len(steps) - 1
        source = features.sieve(source, t, out=out if last else None, mask=mask, connectivity=connectivity)
    return source


def polygonize_array(
    array: np.ndarray,
    transform: Affine = Affine.identity(),
    *,
    nodata: int | None = None,
    connectivity: int = 4,
    simplify: float = 0.0,
    min_pixels: int = 0,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Polygonise a class array (HW, integer) into one polygon per connected region.

    Args:
        array: class ids, shape (rows, cols); ``nodata`` pixels are left out.
        transform: pixel -> map affine transform; output coordinates are map coordinates.
        nodata: value that marks "no class" (``None``: every value is a class).
        connectivity: 4 or 8.
        simplify: coverage simplification tolerance in map units (0: pixel edges).
        min_pixels: drop polygons smaller than this many pixels (no sieving: see :func:`sieve_array`).
        block_size: rows per strip (``None``: the whole array at once).

    Returns:
        ``(polygons, class_ids)``: object array of shapely (Multi)Polygons and int64 array.
    """
    geoms: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    def emit(g: np.ndarray, v: np.ndarray) -> None:
        geoms.append(to_map(g, transform))
        vals.append(v)

    rows = array.shape[0]
    _polygonize_strips(
        lambda r0, r1: array[r0:r1],
        array.shape,
        nodata=nodata,
        connectivity=connectivity,
        tol_px=simplify / math.sqrt(abs(transform.determinant)) if simplify else 0.0,
        min_pixels=min_pixels,
        block_size=block_size or max(rows, 1),
        emit=emit,
    )
    if not geoms:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    return np.concatenate(geoms), np.concatenate(vals)


def to_map(geoms_px: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel-space geometries (x = col, y = -row) -> map coordinates through ``transform``."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def fn(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0], -xy[:, 1]
        return np.column_stack((a * col + b * row + c, d * col + e * row + f))

    return shapely.transform(geoms_px, fn)


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ParameterError(f"connectivity {connectivity} is not allowed: use 4 or 8")


def _junction_nodes(
    array: np.ndarray, r0: int, above: np.ndarray | None, below: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel corners ``(rows, cols)`` that must be vertices of every polygon passing through them.

    GDAL puts a vertex only where a ring turns.  Two polygons sharing an edge are
    edge-matched (a valid coverage) once every corner where three or more values meet is a
    vertex of both: a polygon runs straight through a corner only if the two pixels on its
    side have its value, and its neighbour turns there only if the two pixels on the other
    side differ.  On the strip's top and bottom frame (the seams) the corners where the row
    across the seam changes value are added too, so that pieces in both strips match.
    """
    a, b, c, d = array[:-1, :-1], array[:-1, 1:], array[1:, :-1], array[1:, 1:]
    three = ((b != a) & (c != a) & (c != b)) | ((d != a) & (d != b) & (d != c) & ((b != a) | (c != a) | (c != b)))
    rows, cols = np.nonzero(three)
    rows, cols = [rows + (r0 + 1)], [cols + 1]
    for row, line in ((r0, above), (r0 + array.shape[0], below)):
        if line is not None:
            change = np.flatnonzero(line[1:] != line[:-1]) + 1
            rows.append(np.full(change.size, row, dtype=np.int64))
            cols.append(change)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _insert_nodes(
    coords: np.ndarray, lengths: np.ndarray, nodes: tuple[np.ndarray, np.ndarray], r0: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``nodes`` (pixel corners) as vertices of the axis-parallel rings that pass through them.

    ``coords`` are the closed rings' vertices (x = col, y = -row) of a strip of ``shape``
    starting at row ``r0``, ``lengths`` their vertex counts.  Returns the new coordinates
    and lengths.
    """
    n_rows, n_cols = nodes
    if n_rows.size == 0 or coords.shape[0] == 0:
        return coords, lengths
    r_min, span, width = r0, shape[0] + 1, shape[1]
    key_h = np.sort((n_rows - r_min) * (width + 1) + n_cols)  # row-major: a horizontal edge is a key range
    key_v = np.sort(n_cols * span + (n_rows - r_min))  # column-major: a vertical edge is a key range
    col = coords[:, 0].astype(np.int64)
    row = (-coords[:, 1]).astype(np.int64) - r_min
    last = np.cumsum(lengths) - 1  # closing vertex of each ring: no edge starts there
    start = np.ones(coords.shape[0], dtype=bool)
    start[last] = False
    s = np.flatnonzero(start)
    c0, c1, q0, q1 = col[s], col[s + 1], row[s], row[s + 1]
    horiz = q0 == q1
    first = np.empty(s.size, dtype=np.int64)
    stop = np.empty(s.size, dtype=np.int64)
    h, v = np.flatnonzero(horiz), np.flatnonzero(~horiz)
    base = q0[h] * (width + 1)
    first[h] = np.searchsorted(key_h, base + np.minimum(c0[h], c1[h]), "right")
    stop[h] = np.searchsorted(key_h, base + np.maximum(c0[h], c1[h]), "left")
    base = c0[v] * span
    first[v] = np.searchsorted(key_v, base + np.minimum(q0[v], q1[v]), "right")
    stop[v] = np.searchsorted(key_v, base + np.maximum(q0[v], q1[v]), "left")
    extra = np.maximum(stop - first, 0)
    if not extra.any():
        return coords, lengths
    total = int(extra.sum())
    seg = np.repeat(np.arange(s.size), extra)
    k = np.arange(total) - np.repeat(np.cumsum(extra) - extra, extra)
    rising = np.where(horiz, c1 > c0, q1 > q0)[seg]
    idx = np.where(rising, first[seg] + k, stop[seg] - 1 - k)
    h = horiz[seg]
    kh = key_h[np.where(h, idx, 0)]
    kv = key_v[np.where(h, 0, idx)]
    new_col = np.where(h, kh % (width + 1), kv // span)
    new_row = np.where(h, kh // (width + 1), kv % span) + r_min
    per_vertex = np.ones(coords.shape[0], dtype=np.int64)
    per_vertex[s] += extra
    pos = np.cumsum(per_vertex) - per_vertex  # where each old vertex goes
    out = np.empty((int(per_vertex.sum()), 2), dtype=np.float64)
    out[pos] = coords
    ins = np.repeat(pos[s] + 1, extra) + k
    out[ins, 0] = new_col
    out[ins, 1] = -new_row.astype(np.float64)
    ring = np.repeat(np.arange(lengths.size), lengths)
    return out, np.bincount(ring, weights=per_vertex, minlength=lengths.size).astype(np.int64)


def _shapes_px(
    array: np.ndarray, r0: int, connectivity: int, above: np.ndarray | None = None, below: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All regions of a strip (nodata included) as edge-matched pixel-space polygons.

    ``above``/``below`` are the rows just outside the strip (``None`` at the raster's edge):
    their value changes become vertices on the seams (see :func:`_junction_nodes`).
    """
    tr = _PIXEL_SPACE @ Affine.translation(0, r0)
    rings: list[list[tuple[float, float]]] = []
    owner: list[int] = []
    vals: list[float] = []
    for k, (geom, value) in enumerate(features.shapes(array, connectivity=connectivity, transform=tr)):
        for ring in geom["coordinates"]:
            rings.append(ring)
            owner.append(k)
        vals.append(value)
    if not vals:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    lengths = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(rings))
    coords = np.fromiter(flat, dtype=np.float64, count=2 * int(lengths.sum())).reshape(-1, 2)
    del rings
    # junction vertices: makes GDAL's output edge-matched (a valid coverage)
    coords, lengths = _insert_nodes(coords, lengths, _junction_nodes(array, r0, above, below), r0, array.shape)
    ring_geoms = shapely.linearrings(coords, indices=np.repeat(np.arange(lengths.size), lengths))
    polys = shapely.polygons(ring_geoms, indices=np.asarray(owner))
    if connectivity == 8:
        # GDAL's 8-connected regions may touch themselves at a pixel corner (invalid for GEOS)
        bad = ~shapely.is_valid(polys)
        if bad.any():
            polys[bad] = shapely.make_valid(polys[bad], method="structure", keep_collapsed=False)
    return polys, np.asarray(vals).astype(np.int64)


def _row_labels(geoms: np.ndarray, row: int, width: int) -> np.ndarray:
    """Index into ``geoms`` of the polygon covering each pixel of pixel row ``row`` (-1: none)."""
    if geoms.size == 0:
        return np.full(width, -1, dtype=np.int32)
    tr = _PIXEL_SPACE @ Affine.translation(0, row)
    # clip to the row first: rasterize converts whole geometries to GeoJSON in Python
    pieces = shapely.clip_by_rect(geoms, 0.0, -(row + 1.0), float(width), -float(row))
    keep = np.flatnonzero(~shapely.is_empty(pieces))
    if keep.size == 0:
        return np.full(width, -1, dtype=np.int32)
    return features.rasterize(
        zip(pieces[keep], keep.tolist()), out_shape=(1, width), transform=tr, fill=-1, dtype="int32"
    )[0]


def _pieces_of(labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``index[labels]`` where ``labels >= 0``, else -1 (``index`` may be empty: a seam row of nodata)."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    hit = labels >= 0
    out[hit] = index[labels[hit]]
    return out


def _seam_edges(
    lab_a: np.ndarray, lab_b: np.ndarray, above: np.ndarray, below: np.ndarray, connectivity: int
) -> np.ndarray:
    """Unique ``(label above, label below)`` pairs of pixels connected across a seam.

    ``lab_a``/``lab_b`` label the pixels of the rows on either side of the seam (-1: none),
    ``above``/``below`` are their class values (4- or 8-connectivity, as for polygonising).
    """
    pairs = [(lab_a, lab_b, above == below)]
    if connectivity == 8:
        pairs.append((lab_a[:-1], lab_b[1:], above[:-1] == below[1:]))
        pairs.append((lab_a[1:], lab_b[:-1], above[1:] == below[:-1]))
    a_idx = np.concatenate([la[m] for la, _, m in pairs])
    b_idx = np.concatenate([lb[m] for _, lb, m in pairs])
    ok = (a_idx >= 0) & (b_idx >= 0)
    if not ok.any():
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.column_stack((a_idx[ok], b_idx[ok])).astype(np.int64), axis=0)


def _find(parent: dict[int, int], i: int) -> int:
    """Root of ``i`` in a union-find forest stored as a dict (absent: its own root)."""
    root = i
    while parent.get(root, root) != root:
        root = parent[root]
    while i != root:
        parent[i], i = root, parent[i]
    return root


def _object_array(items: list) -> np.ndarray:  # type: ignore[type-arg]
    """A 1-D object array of geometries."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _union_group(pieces: list, connectivity: int = 4) -> shapely.Geometry:  # type: ignore[type-arg]
    """One region from its edge-matched pieces (strips of it), valid.

    A piece's holes lie strictly inside its strip (a hole reaching the strip's frame would be
    open), so they touch no other piece and pass into the region unchanged.  For 4-connected
    regions only the pieces' shells are therefore unioned and checked (cheap: the holes of a
    large region are most of its vertices), and the pieces' holes are added back; the union
    of all pieces with a validity check remains the fallback.
    """
    if len(pieces) == 1:
        return pieces[0]
    arr = _object_array(pieces)
    if connectivity == 4 and (shapely.get_type_id(arr) == 3).all():
        n_holes = shapely.get_num_interior_rings(arr)
        shell = shapely.coverage_union_all(shapely.polygons(shapely.get_exterior_ring(arr)))
        # a 4-connected region is one polygon; a self-touching shell goes the long way
        if shell.geom_type == "Polygon" and shapely.is_valid(shell):
            if not n_holes.any():
                return shell
            rings = shapely.get_rings(arr)
            is_hole = np.ones(rings.size, dtype=bool)
            is_hole[np.cumsum(n_holes + 1) - (n_holes + 1)] = False  # each piece's exterior ring
            holes = np.concatenate((shapely.get_rings(shell)[1:], rings[is_hole]))
            return shapely.polygons(shapely.get_exterior_ring(shell), holes=holes)
    geom = shapely.coverage_union_all(arr)
    if not shapely.is_valid(geom):
        # a region touching itself at a pixel corner comes out as a self-touching ring
        geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    return geom


def _busy_rows(strip: np.ndarray) -> int:
    """How many of ``strip``'s rows hold at most :data:`STRIP_EDGES` value changes between
    neighbouring pixels (at least one row): the number of polygons a strip makes grows with them."""
    changes = np.count_nonzero(strip[:, 1:] != strip[:, :-1], axis=1)
    changes[1:] += np.count_nonzero(strip[1:] != strip[:-1], axis=1)
    total = np.cumsum(changes)
    return max(1, int(np.searchsorted(total, STRIP_EDGES, side="right")))


def _polygonize_strips(
    read: Callable[[int, int], np.ndarray],
    shape: tuple[int, int],
    *,
    nodata: int | None,
    connectivity: int,
    tol_px: float,
    min_pixels: int,
    block_size: int,
    emit: Callable[[np.ndarray, np.ndarray], None],
) -> None:
    """Strip-wise polygonise, simplify, merge; call ``emit(pixel_space_polygons, class_ids)`` per batch.

    Work is linear in the number of strips: each strip's pieces are simplified once, and a
    region crossing seams is kept as a *group* of pieces (union-find across strips) that is
    unioned once, when it closes (no piece touches the current bottom seam).

    Pipelined over two threads: a strip's coverage simplification (GEOS, without the GIL) runs in a
    helper thread while this one polygonises the next strip (GDAL's polygoniser and its Python
    objects hold the GIL) and merges and emits the previous one. Strips are still merged and
    emitted in order, so the output is the same; at most two strips' pieces are held at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    _check_connectivity(connectivity)
    if block_size < 1:
        raise ParameterError(f"block_size {block_size} is not allowed: use >= 1 rows")
    height, width = shape

    def prepare(r0: int, prev_row: np.ndarray | None, simplifier: ThreadPoolExecutor) -> dict[str, Any]:
        """What a strip gives on its own: its pieces (simplification started), seam labels, next start."""
        r1 = min(height, r0 + block_size)
        strip = np.ascontiguousarray(read(r0, r1))
        rows = _busy_rows(strip)
        if rows < r1 - r0:  # a busy strip (noise, speckle): fewer rows, so its polygons fit in memory
            r1 = r0 + rows
            strip = np.ascontiguousarray(strip[:rows])
        below = np.asarray(read(r1, r1 + 1))[0] if r1 < height else None
        geoms, vals = _shapes_px(strip, r0, connectivity, prev_row, below)
        n = len(geoms)
        is_data = np.ones(n, dtype=bool) if nodata is None else vals != nodata
        bounds = shapely.bounds(geoms) if n else np.empty((0, 4))
        area_px = shapely.area(geoms) if n else np.empty(0)
        # seam labels come from the raster geometry, before simplification moves vertices
        lab_top = None
        if n and prev_row is not None:
            top = np.flatnonzero(is_data & (bounds[:, 3] >= -r0))
            lab_top = _pieces_of(_row_labels(geoms[top], r0, width), top)
        touches_bottom = is_data & (bounds[:, 1] <= -r1) if r1 < height else np.zeros(n, dtype=bool)
        bottom = np.flatnonzero(touches_bottom)
        lab_bot = np.empty(0, dtype=np.int64)
        if r1 < height:
            lab_bot = _pieces_of(_row_labels(geoms[bottom], r1 - 1, width), bottom)
        simplified = None
        if tol_px > 0 and n:
            # all pieces of the strip (nodata faces too) cover its rectangle: the frame, seams
            # included, stays fixed (with a vertex at every value change on either side of
            # it), so pieces in adjacent strips stay edge-matched
            simplified = simplifier.submit(shapely.coverage_simplify, geoms, tol_px, simplify_boundary=False)
        return {"r0": r0, "r1": r1, "n": n, "geoms": geoms, "vals": vals, "is_data": is_data, "area_px": area_px,
                "lab_top": lab_top, "touches_bottom": touches_bottom, "lab_bot": lab_bot, "first_row": strip[0].copy(),
                "last_row": strip[-1].copy(), "prev_row": prev_row, "simplified": simplified}

    # open groups: simplified pieces, class value, unsimplified pixel area
    open_pieces: list[list[shapely.Geometry]] = []
    open_vals: list[int] = []
    open_area: list[float] = []
    open_lab = np.empty(0, dtype=np.int64)  # open group of each pixel of the row above the seam

    def finish(p: dict[str, Any]) -> None:
        """Merge a prepared strip with the open groups above it; emit the regions it closes."""
        nonlocal open_pieces, open_vals, open_area, open_lab
        r0, r1, n, vals, is_data = p["r0"], p["r1"], p["n"], p["vals"], p["is_data"]
        area_px, touches_bottom, lab_bot, prev_row = p["area_px"], p["touches_bottom"], p["lab_bot"], p["prev_row"]
        n_open = len(open_pieces)
        edges = np.empty((0, 2), dtype=np.int64)
        if n_open and prev_row is not None and p["lab_top"] is not None:
            edges = _seam_edges(open_lab, p["lab_top"], prev_row, p["first_row"], connectivity)
        geoms = p["simplified"].result() if p["simplified"] is not None else p["geoms"]
        p.clear()  # (the unsimplified pieces go now)

        # union-find over open groups (0..n_open-1) and the strip's pieces (n_open + i)
        parent: dict[int, int] = {}
        for a, b in edges.tolist():
            ra, rb = _find(parent, a), _find(parent, n_open + b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        # pieces on their own (no seam on either side): final as they are
        linked = np.zeros(n, dtype=bool)
        linked[edges[:, 1]] = True
        single = np.flatnonzero(is_data & ~linked & ~touches_bottom)
        # everything else forms groups
        members: dict[int, list[int]] = {}
        for node in list(range(n_open)) + (n_open + np.flatnonzero(is_data & (linked | touches_bottom))).tolist():
            members.setdefault(_find(parent, node), []).append(node)
        new_pieces: list[list[shapely.Geometry]] = []
        new_vals: list[int] = []
        new_area: list[float] = []
        piece_group = np.full(n, -1, dtype=np.int64)
        out_g: list[shapely.Geometry] = []
        out_v: list[int] = []
        out_a: list[float] = []
        for nodes in members.values():
            pieces: list[shapely.Geometry] = []
            area = 0.0
            value = None
            is_open = False
            strip_idx = []
            for node in nodes:
                if node < n_open:
                    pieces.extend(open_pieces[node])
                    area += open_area[node]
                    value = open_vals[node]
                else:
                    i = node - n_open
                    strip_idx.append(i)
                    pieces.append(geoms[i])
                    area += float(area_px[i])
                    value = int(vals[i])
                    is_open = is_open or bool(touches_bottom[i])
            if is_open:
                piece_group[strip_idx] = len(new_pieces)
                new_pieces.append(pieces)
                new_vals.append(value)  # type: ignore[arg-type]
                new_area.append(area)
            else:
                out_g.append(_union_group(pieces, connectivity))
                out_v.append(value)  # type: ignore[arg-type]
                out_a.append(area)
        done_g = np.concatenate((geoms[single], _object_array(out_g)))
        done_v = np.concatenate((vals[single], np.asarray(out_v, dtype=np.int64)))
        if min_pixels > 1:
            # specks the sieve could not merge (only nodata around them)
            keep = np.concatenate((area_px[single], np.asarray(out_a, dtype=np.float64))) >= min_pixels - 0.5
            done_g, done_v = done_g[keep], done_v[keep]
        if done_g.size:
            if tol_px == 0:
                # pixel-exact output keeps one vertex per pixel corner, as it always had
                done_g = shapely.segmentize(done_g, 1.0)
            emit(done_g, done_v)
        open_pieces, open_vals, open_area = new_pieces, new_vals, new_area
        open_lab = np.where(lab_bot >= 0, piece_group[np.maximum(lab_bot, 0)], -1) if lab_bot.size else lab_bot
        log.debug("rows %d-%d: %d pieces, %d closed, %d open regions", r0, r1, n, done_g.size, len(open_pieces))

    with ThreadPoolExecutor(1, thread_name_prefix="geoseg-simplify") as simplifier:
        pending: dict[str, Any] | None = None
        r1 = 0
        prev_row: np.ndarray | None = None
        try:
            while r1 < height:
                ready = prepare(r1, prev_row, simplifier)  # (while the previous strip simplifies)
                r1, prev_row = ready["r1"], ready["last_row"]
                if pending is not None:
                    finish(pending)
                pending = ready
            if pending is not None:
                finish(pending)
        finally:
            if pending is not None and pending.get("simplified") is not None:
                pending["simplified"].cancel()


# ---------------------------------------------------------------------------------------------
# Output


def _measure(geoms: np.ndarray, crs: CRS, step: float | None = None, ground: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Area and perimeter of map-coordinate polygons (geodesic m²/m for geographic CRSs and, with
    ``ground``, for a projection that distorts areas, see :func:`geoseg.io.distorts_areas`).

    A polygon's edges on a degree grid (or a Mercator grid) run along parallels, but a geodesic between
    two points of a parallel bends poleward (over a long simplified edge, by percents of the area): edges
    are measured in pieces of at most ``step`` map units (a pixel), along which the two agree.
    """
    if ground and not crs.is_geographic:
        made = geodetic_of(crs)
        assert made is not None  # (ground: distorts_areas measured the grid with it)
        to_geo = made[0]
        if step:
            geoms = shapely.segmentize(geoms, step)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(to_geo.transform(xy[:, 0], xy[:, 1])))
        step = None  # (pieces of a pixel already)
    elif not crs.is_geographic:
        return shapely.area(geoms), shapely.length(geoms)
    else:
        k = degrees_per_unit(crs)
        if k != 1.0:  # grads or radians: pyproj's geodesic takes degrees
            geoms = shapely.transform(geoms, lambda xy: xy * k)
            step = step * k if step else step
    if step:
        geoms = shapely.segmentize(geoms, step)
    geod = geodesic(crs)
    # Each ring by itself: its area whatever its orientation (pyproj sums signed ring areas, and orienting
    # the rings in longitudes wrapped at 180° flipped an exterior but not its hole there: the hole added,
    # +31 %), and its length: a polygon's perimeter counts its holes' boundaries too (as shapely.length does
    # on a projected grid; pyproj's polygon perimeter is the exterior's only).
    area = np.zeros(len(geoms))
    perimeter = np.zeros(len(geoms))
    for i, g in enumerate(geoms):
        for part in shapely.get_parts(g):
            for j, ring in enumerate(shapely.get_rings(part)):
                a, length = geod.polygon_area_perimeter(*shapely.get_coordinates(ring)[:-1].T)
                area[i] += abs(a) if j == 0 else -abs(a)
                perimeter[i] += length
    return np.abs(area), perimeter


def check_geojson_crs(crs: CRS, what: str, at: tuple[float, float] = (0.0, 0.0)) -> None:
    """Refuse GeoJSON output for a CRS that has no way to WGS 84 (an engineering or local CRS): GeoJSON
    is in longitudes/latitudes (RFC 7946), and the write failed after the mask with "unexpected error:
    CPLE_NotSupportedError: Cannot find coordinate operations from '{...PROJJSON...}'". ``at``: a point of
    the data (the grid's centre), converted as a test (0, 0 lies outside some projections' domain).

    Raises:
        ParameterError: naming ``what`` and the formats that keep the CRS.
    """
    try:
        rasterio.warp.transform(crs, "EPSG:4326", [float(at[0])], [float(at[1])])
    except Exception:  # noqa: BLE001 - rasterio raises CPLE_* errors of several kinds
        raise ParameterError(f"{what}: its CRS cannot be converted to longitudes/latitudes, and GeoJSON (RFC 7946) holds "
                             "only those: write GeoPackage or FlatGeobuf polygons (--vector gpkg, vectorize's --format "
                             "gpkg), which keep the CRS") from None


def to_wgs84(geoms: np.ndarray, crs: CRS) -> np.ndarray:
    """Geometries in ``crs`` as longitudes/latitudes (WGS 84), vertex by vertex (GeoJSON's CRS)."""
    def fn(xy: np.ndarray) -> np.ndarray:
        if xy.shape[0] == 0:
            return xy
        lon, lat = rasterio.warp.transform(crs, "EPSG:4326", xy[:, 0], xy[:, 1])
        return np.column_stack((np.asarray(lon), np.asarray(lat)))

    return shapely.transform(geoms, fn)


class _LayerWriter:
    """Appends batches of features to one layer with pyogrio; creates it on first use."""

    def __init__(self, path: Path, driver: str, layer: str, crs_wkt: str, geometry_type: str) -> None:
        self.path, self.driver, self.layer, self.crs_wkt, self.geometry_type = path, driver, layer, crs_wkt, geometry_type
        self.count = 0
        self.started = False
        self.layer_options = dict(GEOJSON_OPTIONS) if driver == "GeoJSON" else {}
        if driver == "GPKG":
            self.layer_options = {"SPATIAL_INDEX": "YES"}

    def write(self, geoms: np.ndarray, ids: np.ndarray, names: np.ndarray, area: np.ndarray, perim: np.ndarray, scene: str) -> None:
        n = len(geoms)
        if n == 0 and self.started:
            return
        # one ring orientation whatever the raster's (a south-up grid mirrors rings): exterior rings
        # counter-clockwise, holes clockwise (OGC simple features; RFC 7946's right-hand rule)
        wkb = shapely.to_wkb(shapely.orient_polygons(geoms)) if n else np.empty(0, dtype=object)
        data = [
            np.asarray(ids, dtype=np.int32),
            np.asarray(names, dtype=object),
            np.asarray(area, dtype=np.float64),
            np.asarray(perim, dtype=np.float64),
            np.full(n, scene, dtype=object),
        ]
        pyogrio.raw.write(
            str(self.path), wkb, data, list(FIELDS), layer=self.layer, driver=self.driver,
            geometry_type=self.geometry_type, crs=self.crs_wkt, append=self.started,
            promote_to_multi=self.geometry_type.startswith("Multi"), layer_options=self.layer_options,
        )
        self.started = True
        self.count += n


def style_qml(classes: Sequence[ClassInfo], attribute: str = "class_id") -> str:
    """A QGIS style (QML) with a categorized fill renderer: one category per class id."""
    cats, syms = [], []
    for k, c in enumerate(classes):
        cats.append(f'   <category value="{int(c.id)}" label={quoteattr(str(c.name))} symbol="{k}" render="true" type="long"/>')
        rgba = ",".join(str(int(v)) for v in (*c.color, 255))
        syms.append(
            f'   <symbol type="fill" name="{k}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            '    <layer class="SimpleFill" enabled="1" pass="0" locked="0">\n'
            '     <Option type="Map">\n'
            f'      <Option name="color" type="QString" value="{rgba}"/>\n'
            '      <Option name="joinstyle" type="QString" value="bevel"/>\n'
            '      <Option name="outline_color" type="QString" value="35,35,35,255"/>\n'
            '      <Option name="outline_style" type="QString" value="solid"/>\n'
            '      <Option name="outline_width" type="QString" value="0.1"/>\n'
            '      <Option name="outline_width_unit" type="QString" value="MM"/>\n'
            '      <Option name="style" type="QString" value="solid"/>\n'
            '     </Option>\n'
            '    </layer>\n'
            '   </symbol>'
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology">\n'
        f' <renderer-v2 type="categorizedSymbol" attr="{attribute}" symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">\n'
        "  <categories>\n" + "\n".join(cats) + "\n  </categories>\n"
        "  <symbols>\n" + "\n".join(syms) + "\n  </symbols>\n"
        " </renderer-v2>\n"
        "</qgis>\n"
    )


def write_gpkg_style(path: str | Path, layer: str, qml: str, *, geometry_column: str = "geom", name: str = "geoseg classes",
                     durable: bool = True) -> None:
    """Store ``qml`` as the default QGIS style of ``layer`` in the GeoPackage's ``layer_styles`` table.

    The table is registered in ``gpkg_contents`` as an attributes table, as QGIS does. ``durable=False``
    leaves out SQLite's journal and syncs, for a temp file its writer flushes and renames into place
    itself (as vectorize's: two fsyncs or more a GeoPackage, a tenth of a small scene's time in batch);
    a file in place keeps them (a crash in the middle could damage it).
    """
    con = sqlite3.connect(str(path))
    try:
        if not durable:
            con.execute("PRAGMA synchronous=OFF")
            con.execute("PRAGMA journal_mode=MEMORY")
        with con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
                "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
                "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), "
                "update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
            )
            con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                "VALUES ('', '', ?, ?, ?, ?, '', 1, 'classes coloured as in the model card', '', NULL)",
                (layer, geometry_column, name, qml),
            )
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
                "VALUES ('layer_styles', 'attributes', 'layer_styles', '', strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
            )
    finally:
        con.close()


def default_out_path(mask_path: str | Path, fmt: str = "gpkg") -> Path:
    """``<mask folder>/<mask stem>.<ext>`` for a format."""
    return Path(mask_path).with_suffix(SUFFIXES[fmt])


@checked_arguments
def vectorize_mask(
    mask_path: str | Path,
    out_path: str | Path,
    *,
    fmt: VectorFormat | None = None,
    min_area: float | None = None,
    min_pixels: int | None = None,
    connectivity: int = 4,
    simplify: float | None = None,
    classes: Sequence[ClassInfo] | None = None,
    keep_classes: Sequence[int | str] | None = None,
    scene_name: str | None = None,
    layer: str | None = None,
    overwrite: bool = False,
    block_size: int | None = None,
) -> VectorizeResult:
    """Vectorise a class raster into land-cover polygons and write them atomically.

    Args:
        mask_path: single-band integer class raster with a CRS (band 1 is used); its nodata
            value marks "no class".
        out_path: output file; nothing is left there on error.
        fmt: ``gpkg``, ``geojson`` (RFC 7946, WGS 84) or ``fgb``; default from the extension,
            else ``gpkg``.
        min_area: minimum mapping unit in CRS units² (m² on a geographic CRS or a projection that
            distorts areas, see :func:`geoseg.io.distorts_areas`); smaller regions merge into neighbours.
        min_pixels: the same in pixels (give one of the two).
        connectivity: 4 or 8, for regions and the sieve.
        simplify: coverage simplification tolerance in CRS units (m where ``min_area`` is m²);
            ``None`` = one pixel, 0 = keep pixel edges.
        classes: class names/colours overriding those stored in the mask.
        keep_classes: write the polygons of these classes only (ids or names), e.g. the
            buildings of a building/background mask; the sieve and the simplification still see
            every class, so the polygons kept are those of the full coverage.
        scene_name: value of the ``scene`` field (default: the mask's stem without ``_mask``).
        layer: layer name (default: ``landcover``).
        overwrite: replace an existing output.
        block_size: rows per strip (default: about 4 Mpx per strip, at least 64 rows); bounds
            memory to one strip plus the polygons crossing the current seam.

    Returns:
        A :class:`VectorizeResult`.
    """
    t0 = time.perf_counter()
    mask_path = Path(mask_path)
    out_path = Path(out_path)
    if fmt is not None and fmt not in FORMATS:
        raise ParameterError(f"format {fmt!r} is not known: use one of {', '.join(FORMATS)}")
    if classes is not None and not all(isinstance(c, ClassInfo) for c in classes):
        # (names gave "AttributeError: 'str' object has no attribute 'id'")
        raise ParameterError("classes: give ClassInfo entries (names and colours for the mask's ids); the polygons of "
                             "some classes only are keep_classes (ids or names)")
    if out_path.is_dir():  # (it said "output tmp: name it .gpkg ...")
        raise ParameterError(f"output {out_path} is a folder: give a file name (.gpkg, .geojson or .fgb)")
    named = format_from_path(out_path)
    if named is None:  # GDAL would write the format asked for under any name: a .shp holding a GeoPackage
        raise ParameterError(f"output {out_path.name}: name it .gpkg, .geojson or .fgb (GeoPackage, GeoJSON, "
                             "FlatGeobuf); other formats: convert the GeoPackage with ogr2ogr")
    if fmt is not None and fmt != named:
        raise ParameterError(f"output {out_path.name} is named as {named} but the format asked for is {fmt}: "
                             f"name it {out_path.stem}{SUFFIXES[fmt]} or drop --format")
    fmt = named
    _check_connectivity(connectivity)
    if block_size is not None and block_size < 1:
        raise ParameterError(f"block_size {block_size} is not allowed: use >= 1 rows")
    info = open_mask(mask_path, described=classes is not None or keep_classes is not None)
    if block_size is None:
        block_size = max(64, STRIP_PIXELS // max(info.width, 1))
    if out_path.resolve() == mask_path.resolve():
        raise ParameterError(f"output {out_path} is the input mask: choose another --out")
    check_output(out_path, overwrite)
    remove_leftovers(out_path.parent)  # a killed run's temp files (never a live one's)
    min_px, simplify = vector_settings(min_area, min_pixels, simplify, info.pixel_area, (info.height, info.width))
    class_map = dict(info.classes)
    if classes is not None:
        class_map = {int(c.id): c for c in classes}
    keep = None if keep_classes is None else np.array(resolve_classes(keep_classes, class_map, mask_path.name))
    scene = scene_name if scene_name is not None else _scene_from_mask(mask_path)
    layer = layer or "landcover"
    driver = DRIVERS[fmt]
    geojson = fmt == "geojson"
    if geojson:
        check_geojson_crs(info.crs, f"mask {mask_path.name}", info.transform @ (info.width / 2, info.height / 2))
    crs_wkt = "EPSG:4326" if geojson else info.crs.to_wkt()
    ground = distorts_areas(info.crs, info.transform, info.width, info.height)  # (Web Mercator: measured on the ellipsoid)
    units = area_units(info.crs, ground)
    gtype = "MultiPolygon" if connectivity == 8 else "Polygon"
    counts: dict[int, int] = {}
    log.debug(
        "vectorizing %s (%dx%d, sieve %d px, simplify %g, %d-connected)",
        mask_path.name, info.width, info.height, min_px, simplify, connectivity,
    )

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_raster(mask_path) as ds:  # (bytes, as an int)
        tell = _unmarked_teller(info) if info.unmarked else None
        telling = tell if info.masked else None  # (with a mask band, _read_strip tells of visible 255s)
        if min_px > 1:
            read = _sieved_reader(ds, info, min_px, connectivity, block_size, telling)
        else:

            def read(r0: int, r1: int) -> np.ndarray:
                return _read_strip(ds, info, r0, r1, telling)

        if tell is not None and not info.masked:
            read = _telling_unmarked(read, tell)

        with atomic_output(out_path, overwrite) as tmp, staged_as(tmp, fmt) as work, ogr_path(work) as ogr_work:
            writer = _LayerWriter(ogr_work, driver, layer, crs_wkt, gtype)

            def emit(geoms_px: np.ndarray, ids: np.ndarray) -> None:
                if keep is not None:
                    sel = np.isin(ids, keep)
                    geoms_px, ids = geoms_px[sel], ids[sel]
                geoms = to_map(geoms_px, info.transform)
                area, perim = _measure(geoms, info.crs, min(abs(info.transform.a), abs(info.transform.e)) or None, ground)
                names = np.array([class_lookup(class_map, int(i)).name for i in ids], dtype=object)
                if geojson:
                    geoms = to_wgs84(geoms, info.crs)
                for i in ids:
                    counts[int(i)] = counts.get(int(i), 0) + 1
                writer.write(geoms, ids, names, area, perim, scene)

            try:
                _polygonize_strips(  # (the sieve removed what goes: no polygon is dropped for its size)
                    read, (info.height, info.width), nodata=info.nodata, connectivity=connectivity,
                    tol_px=simplify / info.pixel_size, min_pixels=0, block_size=block_size, emit=emit,
                )
                if not writer.started:  # all nodata: an empty layer with the full schema
                    writer.write(np.empty(0, dtype=object), np.empty(0), np.empty(0), np.empty(0), np.empty(0), scene)
                if fmt == "gpkg":
                    used = sorted(counts) or sorted(class_map)
                    write_gpkg_style(work, layer, style_qml([class_lookup(class_map, c) for c in used]),  # type: ignore[misc]
                                     durable=False)  # (a temp file, flushed before its rename)
            except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, sqlite3.Error) as exc:
                raise write_error(out_path, exc) from None
    if keep is not None and len(keep) and not set(counts) >= set(keep.tolist()):
        absent = [int(k) for k in keep if int(k) not in counts]  # (0 polygons were written without a word)
        warn(f"classes {absent} have no pixel in mask {mask_path.name} (after the sieve): no polygons for them")
    seconds = time.perf_counter() - t0
    result = VectorizeResult(
        path=out_path, fmt=fmt, layer=layer, polygons=writer.count, class_counts=dict(sorted(counts.items())),
        width=info.width, height=info.height, seconds=seconds, min_pixels=min_px, simplify=float(simplify),
        connectivity=connectivity, area_units=units, crs_wkt=crs_wkt,
    )
    log.info("wrote %d polygons to %s in %.1f s", result.polygons, out_path, seconds)
    return result


def _scene_from_mask(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_mask")] if stem.endswith("_mask") and len(stem) > 5 else stem


def _read_strip(ds: rasterio.DatasetReader, info: MaskInfo, r0: int, r1: int,
                tell: Callable[[], None] | None = None) -> np.ndarray:
    """Rows ``[r0, r1)`` of band 1, with the pixels a mask band hides set to ``info.nodata``; ``tell()``
    when pixels the mask band shows hold 255 in an :attr:`MaskInfo.unmarked` mask."""
    window = ((r0, r1), (0, info.width))
    block = ds.read(1, window=window)
    if info.masked:
        hidden = ds.read_masks(1, window=window) == 0
        if tell is not None and (block[~hidden] == MASK_NODATA).any():
            tell()
        if info.chosen_nodata and (block[~hidden] == info.nodata).any():
            raise SceneError(f"mask {info.path} hides pixels by a mask band and uses every value up to {info.nodata} "
                             "as a class: give it a nodata value that no class takes (gdal_edit.py -a_nodata V)")
        block[hidden] = info.nodata
    return block


def _telling_unmarked(read: Callable[[int, int], np.ndarray], tell: Callable[[], None]
                      ) -> Callable[[int, int], np.ndarray]:
    """``read``, calling ``tell()`` (:func:`_unmarked_teller`) when a strip holds 255."""

    def telling(r0: int, r1: int) -> np.ndarray:
        block = read(r0, r1)
        if (block == MASK_NODATA).any():
            tell()
        return block

    return telling


def _unmarked_teller(info: MaskInfo) -> Callable[[], None]:
    """A function that warns, the first time it is called, that 255 is taken as no data in the uint8 mask
    without a nodata value of ``info`` (:attr:`MaskInfo.unmarked`)."""
    told = False

    def tell() -> None:
        nonlocal told
        if not told:
            told = True
            warn(f"mask {info.path.name} has no nodata value: its pixels of value 255 are taken as no data, as in "
                 "geoseg's masks (if 255 is a class, give the mask another nodata value: gdal_edit.py -a_nodata V)")

    return tell


def _has_small_nodata_group(mask: np.ndarray, min_px: int, connectivity: int) -> bool:
    """Whether some group of nodata pixels (``mask`` 0) is smaller than ``min_px`` pixels (stops at the
    first: a scene's nodata is mostly one frame, or a few large areas)."""
    nodata = (mask == 0).view(np.uint8)
    return any(shapely.geometry.shape(g).area < min_px
               for g, _ in features.shapes(nodata, mask=nodata, connectivity=connectivity))


def _drop_small_groups(mask: np.ndarray, out: np.ndarray, min_px: int, connectivity: int, nodata: Any,
                       block_size: int) -> None:
    """Set to ``nodata`` in ``out`` every group of data pixels (``mask`` 1, ``connectivity``-connected)
    smaller than ``min_px`` pixels: the data mask's polygons, a strip of ``block_size`` rows at a time (a
    group below the unit spans fewer than ``min_px`` rows: with that many rows more below each strip, the
    groups that start in the strip are whole in it)."""
    height = mask.shape[0]
    margin = min(min_px, height)
    for r0 in range(0, height, block_size):
        # one row above the strip: a group reaching it started in an earlier strip, which counted it whole
        ra, r1, r2 = max(0, r0 - 1), min(height, r0 + block_size), min(height, r0 + block_size + margin)
        part = mask[ra:r2]
        small = []
        for g, _ in features.shapes(part, mask=part, connectivity=connectivity):
            poly = shapely.geometry.shape(g)  # (pixel coordinates of the strip: an area is a pixel count)
            top, bottom = poly.bounds[1] + ra, poly.bounds[3] + ra
            if poly.area < min_px and r0 <= top < r1 and not (r2 < height and bottom >= r2):
                small.append(poly)
        if small:
            gone = features.rasterize(small, out_shape=part.shape, dtype=np.uint8).astype(bool)
            out[ra:r2][gone] = nodata


def _sieved_reader(
    ds: rasterio.DatasetReader, info: MaskInfo, min_px: int, connectivity: int, block_size: int,
    tell: Callable[[], None] | None = None,
) -> Callable[[int, int], np.ndarray]:
    """Sieve the whole band (needs whole-raster connectivity) into memory; return a strip reader.

    Memory: the sieved array plus a one-byte-per-pixel mask, both ``height * width``.
    """
    out = np.empty((info.height, info.width), dtype=info.dtype)
    mask = None
    source: Any = rasterio.band(ds, 1)
    if info.masked:  # the mask band's pixels become nodata first (one more array in memory)
        source = np.empty((info.height, info.width), dtype=info.dtype)
        for r0 in range(0, info.height, block_size):
            r1 = min(info.height, r0 + block_size)
            source[r0:r1] = _read_strip(ds, info, r0, r1, tell)
    if info.nodata is not None:
        mask = np.empty((info.height, info.width), dtype=np.uint8)
        for r0 in range(0, info.height, block_size):
            r1 = min(info.height, r0 + block_size)
            block = source[r0:r1] if info.masked else ds.read(1, window=((r0, r1), (0, info.width)))
            mask[r0:r1] = block != info.nodata
    _sieve(source, min_px, mask, connectivity, out=out)
    del source
    if mask is not None:
        # A speck below the unit with only nodata (or the border) around cannot be merged: it goes. Found
        # as a group of data pixels below the unit, whatever their classes; a small region beside data
        # that the sieve could not merge (regions all below the unit, each other's largest neighbour)
        # stays: dropping it left a hole beside data (three fields of 6 px, a unit of 7: no polygon at all).
        if _has_small_nodata_group(mask, min_px, connectivity):
            # A sieve of the 0/1 mask is not exact then: it filled a nodata hole below the unit before a
            # speck inside it went (the speck joined the field around it), and it leaves a small group
            # whose neighbours are all small nodata groups: the groups are counted exactly.
            _drop_small_groups(mask, out, min_px, connectivity, info.nodata, block_size)
        else:  # (each small data group's largest neighbour is nodata of the unit or more: it goes there)
            kept = features.sieve(mask, min_px, connectivity=connectivity)  # (mask: 1 data, 0 nodata)
            out[(mask == 1) & (kept == 0)] = info.nodata
            del kept
    del mask

    def read(r0: int, r1: int) -> np.ndarray:
        return out[r0:r1]

    return read
