"""One map of many masks: a GDAL VRT mosaic of a batch's land-cover masks, styled for QGIS.

``geoseg batch`` writes one mask per scene; :func:`write_mosaics` lays them side by side in
``DIR/landcover.vrt`` (a VRT holds no pixels: it points at the masks, by paths relative to
itself), with the class palette and names and a ``landcover.qml`` style beside it, so the
whole archive opens in QGIS as one layer. Masks are grouped by CRS and pixel size (a VRT has
one grid): one group gives ``landcover.vrt``, several give one ``landcover_<crs>_<size>.vrt``
each. Each mask is a ``ComplexSource`` with its nodata value, so where scenes overlap, a
scene's nodata collar never hides its neighbour's classes (later scenes win elsewhere, as in
``gdalbuildvrt``). Masks whose grid a VRT cannot hold (no CRS, GCPs, rotation) are left out
and named in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import rasterio

from geoseg.atomic import atomic_write_text
from geoseg.card import ClassInfo
from geoseg.io import MASK_NODATA, class_colormap, classes_tag, write_qml

log = logging.getLogger(__name__)

__all__ = ["MOSAIC_STEM", "write_mosaics"]

#: Name of the mosaic (``<stem>.vrt`` + ``<stem>.qml``) in a batch's output folder.
MOSAIC_STEM = "landcover"
_STATE = "mosaics.json"  # in DIR/.geoseg: the mosaics the last run wrote (to remove stale ones)


def _grid_key(ds: Any) -> tuple[str, float, float] | None:
    t = ds.transform
    if ds.crs is None or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        return None
    return ds.crs.to_wkt(), round(t.a, 9), round(-t.e, 9)


def _group_name(crs_wkt: str, xres: float, yres: float, many: bool) -> str:
    if not many:
        return MOSAIC_STEM
    epsg = rasterio.crs.CRS.from_wkt(crs_wkt).to_epsg()
    code = f"epsg{epsg}" if epsg else "crs" + hashlib.sha1(crs_wkt.encode()).hexdigest()[:8]
    return f"{MOSAIC_STEM}_{code}_{xres:g}" + ("" if xres == yres else f"x{yres:g}")


def _offset(v: float) -> str:
    """A DstRect coordinate: whole pixels written as such (aligned grids), else fractional."""
    return str(round(v)) if abs(v - round(v)) < 1e-6 else f"{v:.6f}"


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


def write_mosaics(out_dir: str | Path, masks: Sequence[str | Path], classes: Sequence[ClassInfo],
                  state_dir: str | Path | None = None) -> list[Path]:
    """Write the VRT mosaic(s) of ``masks`` (inside ``out_dir``) with a QGIS style each; return them.

    Mosaics an earlier call wrote that this one does not (their group is gone) are removed,
    as recorded in ``state_dir/mosaics.json``. Written atomically; no masks, no mosaic.
    """
    out = Path(out_dir)
    groups: dict[tuple[str, float, float], list[tuple[Path, Any]]] = {}
    left_out: list[str] = []
    handles = []
    try:
        for m in masks:
            ds = rasterio.open(m)
            handles.append(ds)
            key = _grid_key(ds)
            if key is None:
                left_out.append(Path(m).name)
            else:
                groups.setdefault(key, []).append((Path(m), ds))
        written: list[Path] = []
        for (crs_wkt, xres, yres), sources in groups.items():
            name = _group_name(crs_wkt, xres, yres, len(groups) > 1)
            vrt = out / f"{name}.vrt"
            atomic_write_text(vrt, _vrt_xml(sources, vrt, classes))
            written += [vrt, write_qml(vrt, classes)]
    finally:
        for ds in handles:
            ds.close()
    if left_out:
        log.warning("warning: %d mask(s) not in the mosaic (no CRS, GCPs or a rotated grid): %s",
                    len(left_out), ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else ""))
    if state_dir is not None:
        state = Path(state_dir) / _STATE
        try:
            before = [out / p for p in json.loads(state.read_text())]
        except (OSError, ValueError):
            before = []
        for p in before:
            if p not in written:
                p.unlink(missing_ok=True)
        atomic_write_text(state, json.dumps(sorted(p.relative_to(out).as_posix() for p in written)))
    return written
