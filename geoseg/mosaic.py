"""One map of many masks: a GDAL VRT mosaic of a batch's land-cover masks, styled for QGIS.

``geoseg batch`` writes one mask per scene; :func:`write_mosaics` lays them side by side in
``DIR/landcover.vrt`` (a VRT holds no pixels: it points at the masks, by paths relative to
itself), with the class palette and names and a ``landcover.qml`` style beside it, so the
whole archive opens in QGIS as one layer. Masks are grouped by CRS and pixel size (a VRT has
one grid), by grid alignment (origins a whole number of pixels apart: a VRT never resamples a
mask) and by class table (a VRT has one palette and one set of class names): one group gives
``landcover.vrt``, several give one ``landcover_<what differs>.vrt`` each (see
:func:`_group_names`), with a warning when the mosaic splits. Each mask is a ``ComplexSource`` with its nodata value, so where scenes overlap, a
scene's nodata collar never hides its neighbour's classes (later scenes win elsewhere, as in
``gdalbuildvrt``). Masks whose grid a VRT cannot hold (no CRS, GCPs, rotation) are left out
and named in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

import rasterio

from geoseg.atomic import atomic_write_text
from geoseg.card import ClassInfo
from geoseg.errors import BatchWarning, warn
from geoseg.io import MASK_NODATA, class_colormap, classes_tag, palette_qml, read_classes

log = logging.getLogger(__name__)

__all__ = ["MOSAIC_STEM", "write_mosaics"]

#: Name of the mosaic (``<stem>.vrt`` + ``<stem>.qml``) in a batch's output folder.
MOSAIC_STEM = "landcover"
_STATE = "mosaics.json"  # in DIR/.geoseg: the mosaics the last run wrote (to remove stale ones)


#: Pixels by which two grids may be off a whole-pixel shift and still share a VRT (no resampling).
GRID_TOLERANCE = 1e-3


def _grid_key(ds: Any) -> tuple[str, float, float, tuple[int, int]] | None:
    """``(crs, xres, yres, phase)`` of a mask, or None when a VRT cannot hold its grid.

    ``phase`` is where the mask's origin falls inside a pixel of its own size (in thousandths of a
    pixel, wrapped): masks on one CRS and pixel size share a VRT only if their grids line up, else
    GDAL would resample one of them (a half-pixel offset moves it by half a pixel).
    """
    t = ds.transform
    if ds.crs is None or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        return None
    steps = round(1 / GRID_TOLERANCE)
    phase = (round((t.c / t.a % 1) * steps) % steps, round((t.f / -t.e % 1) * steps) % steps)
    return ds.crs.to_wkt(), round(t.a, 9), round(-t.e, 9), phase


def _join_close_phases(groups: dict[Any, list[Any]]) -> dict[Any, list[Any]]:
    """``groups`` with those of one CRS, pixel size and class table whose grid phases are within one
    step (a thousandth of a pixel, wrapping around) joined: rounding put grids 0.0002 px apart into
    two mosaics (0.0004 and 0.0006 round to 0 and 1)."""
    steps = round(1 / GRID_TOLERANCE)
    out: dict[Any, list[Any]] = {}
    for key in sorted(groups, key=lambda k: (k[:3], k[4], k[3])):
        near = next((k for k in out if k[:3] == key[:3] and k[4] == key[4] and all(
            min((a - b) % steps, (b - a) % steps) <= 1 for a, b in zip(k[3], key[3]))), None)
        if near is None:
            out[key] = list(groups[key])
        else:
            out[near] += groups[key]
    return out


def _why_not(ds: Any) -> str:
    """Why a mask whose :func:`_grid_key` is None cannot be laid into a VRT."""
    t = ds.transform
    if ds.crs is None:
        return "GCPs" if ds.gcps[0] else "no CRS"
    if t.b != 0 or t.d != 0:
        return "rotated grid"
    return "north-down grid" if t.e > 0 else "right-to-left grid"


def _classes_key(classes: Sequence[ClassInfo]) -> str:
    return json.dumps([[c.id, c.name, list(c.color)] for c in classes])


def _crs_code(crs_wkt: str) -> str:
    epsg = rasterio.crs.CRS.from_wkt(crs_wkt).to_epsg()
    return f"epsg{epsg}" if epsg else "crs" + hashlib.sha1(crs_wkt.encode()).hexdigest()[:8]


def _group_names(keys: Sequence[tuple[str, float, float, tuple[int, int], str]]) -> list[str]:
    """One file stem per group: ``landcover`` alone, else ``landcover`` + what tells the groups apart.

    ``_<crs>_<size>`` when CRSs or pixel sizes differ, ``_classes<hash>`` when class tables differ
    among groups of one CRS and size, ``_grid<x>x<y>`` (the origin's phase in thousandths of a pixel)
    when grids of one CRS, size and class table are not aligned: each part only where it tells
    groups apart (a 28.5 m and a 10 m group were also named by their grids' phases).
    """
    if len(keys) <= 1:
        return [MOSAIC_STEM] * len(keys)
    by_grid = len({k[:3] for k in keys}) > 1
    names = []
    for crs_wkt, xres, yres, phase, classes in keys:
        name = MOSAIC_STEM
        if by_grid:
            # (9 digits, as the groups are keyed: 6 gave 29.998712 m and 29.998734 m one name)
            name += f"_{_crs_code(crs_wkt)}_{xres:.9g}" + ("" if xres == yres else f"x{yres:.9g}")
        same_grid = [k for k in keys if k[:3] == (crs_wkt, xres, yres)]
        if len({k[4] for k in same_grid}) > 1:
            name += "_classes" + hashlib.sha1(classes.encode()).hexdigest()[:8]
        if len({k[3] for k in same_grid if k[4] == classes}) > 1:
            name += f"_grid{phase[0]:03d}x{phase[1]:03d}"
        names.append(name)
    # groups the parts above cannot tell apart (two WKTs of one EPSG code): a hash of the whole key,
    # never one file written twice (the second group's VRT replaced the first's)
    twice = {n for n in names if names.count(n) > 1}
    return [n + "_" + hashlib.sha1(repr(k).encode()).hexdigest()[:8] if n in twice else n for n, k in zip(names, keys)]


def _offset(v: float) -> str:
    """A DstRect coordinate: whole pixels written as such (aligned grids), else fractional."""
    return str(round(v)) if abs(v - round(v)) <= GRID_TOLERANCE else f"{v:.6f}"


def _vrt_xml(sources: list[tuple[Path, Any]], out: Path, classes: Sequence[ClassInfo]) -> str:
    """The VRT document of ``sources`` (``(path, open dataset)``, all on one CRS and pixel size)."""
    first = sources[0][1]
    xres, yres = first.transform.a, -first.transform.e
    x0 = min(ds.bounds.left for _, ds in sources)
    y1 = max(ds.bounds.top for _, ds in sources)
    width = math.ceil(round((max(ds.bounds.right for _, ds in sources) - x0) / xres, 6))
    height = math.ceil(round((y1 - min(ds.bounds.bottom for _, ds in sources)) / yres, 6))
    cmap = class_colormap(classes)
    last = max([c.id for c in classes] + [MASK_NODATA])
    names = [""] * (last + 1)
    for c in classes:
        names[c.id] = c.name
    names[MASK_NODATA] = "nodata"
    tags = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in classes_tag(classes).items())
    xml = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
           f"  <SRS>{escape(first.crs.to_wkt())}</SRS>",  # no axis mapping given: GDAL's traditional GIS order
           f"  <GeoTransform>{x0!r}, {xres!r}, 0.0, {y1!r}, 0.0, {-yres!r}</GeoTransform>",
           f"  <Metadata>{tags}</Metadata>",  # the class table, as in each mask (vectorize/evaluate read it)
           '  <VRTRasterBand dataType="Byte" band="1">',
           f"    <NoDataValue>{MASK_NODATA}</NoDataValue>",
           "    <ColorInterp>Palette</ColorInterp>",
           "    <CategoryNames>" + "".join(f"<Category>{escape(n)}</Category>" for n in names) + "</CategoryNames>",
           "    <ColorTable>" + "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>'
                                        for r, g, b, a in (cmap[i] for i in range(256))) + "</ColorTable>"]
    for path, ds in sources:
        rel = Path(path).resolve().relative_to(out.parent.resolve()).as_posix()
        bx, by = ds.block_shapes[0][1], ds.block_shapes[0][0]
        xml += ["    <ComplexSource>",
                f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                "      <SourceBand>1</SourceBand>",
                f'      <SourceProperties RasterXSize="{ds.width}" RasterYSize="{ds.height}" DataType="Byte" '
                f'BlockXSize="{bx}" BlockYSize="{by}"/>',
                f'      <SrcRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>',
                f'      <DstRect xOff="{_offset((ds.bounds.left - x0) / xres)}" yOff="{_offset((y1 - ds.bounds.top) / yres)}" '
                f'xSize="{_offset(ds.width * ds.transform.a / xres)}" ySize="{_offset(ds.height * -ds.transform.e / yres)}"/>',
                f"      <NODATA>{MASK_NODATA}</NODATA>",
                "    </ComplexSource>"]
    xml += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    return "\n".join(xml)


class _MaskFacts(NamedTuple):
    """What a mosaic needs of one mask (its dataset closed)."""

    width: int
    height: int
    transform: Any
    crs: Any
    bounds: Any
    block_shapes: Any
    gcps: Any


def _bounds(transform: Any, width: int, height: int) -> Any:
    """rasterio's ``dataset.bounds``, with ``@`` for its corners: rasterio's own maps a rotated grid's with ``*``,
    which affine deprecates, and the warning named geoseg's line (under ``-W error``: no mosaic)."""
    from rasterio.coords import BoundingBox

    a, b, c, d, e, f = transform[:6]
    if b == d == 0:
        return BoundingBox(c, f + e * height, c + a * width, f)
    xs, ys = zip(*(transform @ (col, row) for col, row in ((0, 0), (0, height), (width, height), (width, 0))))
    return BoundingBox(min(xs), min(ys), max(xs), max(ys))


def write_mosaics(out_dir: str | Path, masks: Sequence[str | Path], classes: Sequence[ClassInfo],
                  state_dir: str | Path | None = None) -> list[Path]:
    """Write the VRT mosaic(s) of ``masks`` (inside ``out_dir``) with a QGIS style each; return them.

    Mosaics an earlier call wrote that this one does not (their group is gone) are removed,
    as recorded in ``state_dir/mosaics.json``. Written atomically; no masks, no mosaic.
    """
    out = Path(out_dir)
    state = Path(state_dir) / _STATE if state_dir is not None else None
    before, styles_before, inputs_before = _read_state(state, out)
    inputs = _inputs_digest(masks, classes)
    if state is not None and inputs is not None and inputs == inputs_before and before and all(p.exists() for p in before):
        # the masks (names, sizes, times) and classes of the last run's mosaic: it stands (every mask was opened
        # again each night, about 2.5 ms a mask: 4 minutes for an archive of 100,000)
        log.debug("the mosaic is unchanged: %d mask(s), as the last run wrote it", len(masks))
        return sorted(before, key=lambda p: (p.with_suffix(""), p.suffix != ".vrt"))  # (each VRT, then its style)
    groups: dict[tuple[str, float, float, tuple[int, int], str], list[tuple[Path, Any]]] = {}
    tables: dict[str, Sequence[ClassInfo]] = {}
    left_out: list[str] = []
    for m in masks:
        # what the VRT needs of each mask, read and closed at once (every mask held open at once: an
        # archive of more masks than the open-file limit, 1024 by default, got no mosaic, exit 0)
        with rasterio.open(m) as ds:
            facts = _MaskFacts(ds.width, ds.height, ds.transform, ds.crs, _bounds(ds.transform, ds.width, ds.height),
                               ds.block_shapes, ds.gcps)
            key = _grid_key(facts)
            table = (read_classes(ds) or list(classes)) if key is not None else []  # the mask's own palette and names
        if key is None:
            left_out.append(f"{Path(m).name} ({_why_not(facts)})")
            continue
        ck = _classes_key(table)
        tables.setdefault(ck, table)
        groups.setdefault((*key, ck), []).append((Path(m), facts))
    groups = _join_close_phases(groups)
    written: list[Path] = []
    styles: dict[str, str] = {}
    for name, (key, sources) in zip(_group_names(list(groups)), groups.items()):
        vrt = out / f"{name}.vrt"
        atomic_write_text(vrt, _vrt_xml(sources, vrt, tables[key[4]]))
        qml, text = vrt.with_suffix(".qml"), palette_qml(tables[key[4]])
        styles[qml.name] = ours = _digest(text)
        if styles_before.get(qml.name) == ours and _digest_of(qml) not in (None, ours):
            # the analyst restyled the mosaic in QGIS (its classes unchanged): kept, not rewritten each night
            log.info("kept %s: changed since geoseg wrote it", qml.name)
        else:
            atomic_write_text(qml, text)
        written += [vrt, qml]
    if left_out:
        warn(f"{len(left_out)} mask(s) not in the mosaic (a VRT takes north-up map grids only): "
             + ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else ""), BatchWarning)
    if written:
        log.info("mosaic of %d mask(s): %s", sum(len(v) for v in groups.values()),
                 ", ".join(p.name for p in written if p.suffix == ".vrt"))
    if state is not None:
        for p in before:
            if p not in written:
                p.unlink(missing_ok=True)
        atomic_write_text(state, json.dumps({"files": sorted(p.relative_to(out).as_posix() for p in written),
                                             "styles": styles, "inputs": inputs}))
        _warn_if_split(before, written)
    return written


def _read_state(state: Path | None, out: Path) -> tuple[list[Path], dict[str, str], str | None]:
    """The mosaics the last run wrote, the digests of the styles it wrote (a list of paths alone before
    session 26: no digests) and the digest of its inputs (:func:`_inputs_digest`; none before session 28)."""
    if state is None:
        return [], {}, None
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], {}, None
    files, styles = (data, {}) if isinstance(data, list) else (
        (data.get("files"), data.get("styles")) if isinstance(data, dict) else ([], {}))
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        files, inputs = [], None  # (a damaged state file: no mosaic to remove, none to keep a style of)
    # only names geoseg gives its mosaics, in DIR itself: the run removes the ones it does not write again, and a
    # state file naming "/home/x/file" or "../file" (anyone who can write DIR) had any file deleted
    files = [p for p in files if re.fullmatch(rf"{MOSAIC_STEM}[\w.+-]*\.(vrt|qml)", p)]
    return ([out / p for p in files], dict(styles) if isinstance(styles, dict) else {},
            inputs if isinstance(inputs, str) else None)


def _inputs_digest(masks: Sequence[str | Path], classes: Sequence[ClassInfo]) -> str | None:
    """A digest of what a mosaic is made of: each mask's path, size and modification time (in order: the
    newest on top) and the default classes; None when a mask cannot be looked at."""
    h = hashlib.sha256(repr(list(classes)).encode())
    try:
        for m in masks:
            st = os.stat(m)
            h.update(f"{m}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return h.hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _digest_of(path: Path) -> str | None:
    try:
        return _digest(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _warn_if_split(before: Sequence[Path], written: Sequence[Path]) -> None:
    """One warning line when the mosaic is newly split in several VRTs, or a VRT of the last run is gone
    (a step reading ``landcover.vrt`` would otherwise break silently)."""
    old = sorted(p.name for p in before if p.suffix == ".vrt")
    new = sorted(p.name for p in written if p.suffix == ".vrt")
    gone = [n for n in old if n not in new]
    if gone or (len(new) > 1 and new != old):
        warn(f"the mosaic is now {len(new)} VRT(s) (masks differ in CRS, pixel size, class table or grid alignment): "
             + (", ".join(new) or "none") + (f"; removed {', '.join(gone)}" if gone else ""), BatchWarning)
