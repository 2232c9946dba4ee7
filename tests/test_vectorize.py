"""Tests of geoseg.vectorize and ``geoseg vectorize`` on tiny generated rasters."""

from __future__ import annotations

import sqlite3
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio import features

from geoseg import vectorize as vec
from geoseg.card import ClassInfo
from geoseg.errors import OutputExistsError, ParameterError, SceneError, SceneReadError
from tests.conftest import class_image, write_raster

sys.path.insert(0, str(Path(__file__).parent))
from _rasters import CLASSES, CRS, NODATA, PIXEL, TRANSFORM, class_array, write_mask  # noqa: E402

NAMES = {c["id"]: c["name"] for c in CLASSES}


def no_overlaps(geoms: np.ndarray) -> bool:
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="overlaps")
    return not np.any(i != j)


def burn(geoms: np.ndarray, ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return features.rasterize(zip(geoms, ids.tolist()), out_shape=shape, transform=TRANSFORM, fill=NODATA, dtype="uint8")


@pytest.fixture
def mask_path(tmp_path: Path) -> Path:
    return write_mask(tmp_path / "scene_mask.tif", class_array())


# --- array level ---------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [4, 8])
def test_exact_polygons_reproduce_mask(connectivity: int) -> None:
    a = class_array()
    geoms, ids = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0)
    assert shapely.is_valid(geoms).all()
    assert no_overlaps(geoms)
    assert NODATA not in ids
    for cid in (1, 2, 3):
        union = shapely.union_all(geoms[ids == cid])
        assert union.area == pytest.approx((a == cid).sum() * PIXEL**2, abs=1e-6)
    np.testing.assert_array_equal(burn(geoms, ids, a.shape), a)
    assert shapely.coverage_is_valid(geoms)


def test_one_polygon_per_region() -> None:
    a = np.full((6, 6), 1, dtype=np.uint8)
    a[1, 1] = 2
    a[2, 2] = 2  # diagonal neighbour: two regions with 4-connectivity, one with 8
    g4, v4 = vec.polygonize_array(a, TRANSFORM, connectivity=4, simplify=0)
    g8, v8 = vec.polygonize_array(a, TRANSFORM, connectivity=8, simplify=0)
    assert (v4 == 2).sum() == 2 and (v8 == 2).sum() == 1
    assert shapely.is_valid(g8).all()


@pytest.mark.parametrize("connectivity", [4, 8])
def test_simplified_is_valid_coverage(connectivity: int) -> None:
    a = class_array()
    exact, _ = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0)
    geoms, ids = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=PIXEL)
    assert len(geoms) == len(exact)
    assert shapely.is_valid(geoms).all()
    assert shapely.coverage_is_valid(geoms)
    assert no_overlaps(geoms)
    total = (a != NODATA).sum() * PIXEL**2
    assert abs(shapely.area(geoms).sum() - total) / total < 0.005
    assert shapely.get_num_coordinates(geoms).sum() < 0.7 * shapely.get_num_coordinates(exact).sum()


@pytest.mark.parametrize("connectivity", [4, 8])
def test_blockwise_equals_whole_array(connectivity: int) -> None:
    a = class_array()
    whole, wid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0)
    for block in (1, 7, 16):
        blocks, bid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0, block_size=block)
        assert len(blocks) == len(whole)
        key_w = np.lexsort((shapely.bounds(whole)[:, 1], shapely.bounds(whole)[:, 0], wid))
        key_b = np.lexsort((shapely.bounds(blocks)[:, 1], shapely.bounds(blocks)[:, 0], bid))
        np.testing.assert_array_equal(wid[key_w], bid[key_b])
        assert shapely.equals(whole[key_w], blocks[key_b]).all()
        # simplified: still a valid coverage of the same area, same regions
        simp, sid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=PIXEL, block_size=block)
        assert len(simp) == len(whole) and shapely.is_valid(simp).all()
        assert shapely.coverage_is_valid(simp)
        assert shapely.area(simp).sum() == pytest.approx(shapely.area(whole).sum(), rel=0.005)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_nodata_rows_at_strip_seams(connectivity: int) -> None:
    """Rows of nodata at and around the seams (a scene's empty top, an orbit edge, an AOI's bounding
    box): strips with no data piece on their bottom or top row crashed ("index 0 is out of bounds")."""
    a = class_array()
    a[:12] = NODATA  # whole strips of nodata first
    a[20] = NODATA  # a nodata row exactly on a seam (block 10) and one just below another
    a[31] = NODATA
    a[35:] = NODATA
    whole, wid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0)
    np.testing.assert_array_equal(burn(whole, wid, a.shape), a)
    for block in (1, 5, 10, 11):
        exact, eid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0,
                                          block_size=block)
        assert len(exact) == len(whole) and shapely.area(exact).sum() == shapely.area(whole).sum()
        np.testing.assert_array_equal(burn(exact, eid, a.shape), a)
        simp, _ = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=PIXEL,
                                       block_size=block)
        assert len(simp) == len(whole) and shapely.coverage_is_valid(simp)
    a[:] = NODATA
    a[3:6, 4:9] = 1  # one small region far from the seams of the last strips
    assert len(vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, block_size=4)[0]) == 1


def test_sieve_no_small_polygons_no_holes() -> None:
    a = class_array()
    a[30, 2] = 3  # a speck surrounded by nodata cannot merge: it is dropped
    a[29:32, 1:4] = np.where(a[29:32, 1:4] == 3, 3, NODATA)
    sieved = vec.sieve_array(a, 6, nodata=NODATA)
    assert (sieved == NODATA).sum() == (a == NODATA).sum()
    geoms, ids = vec.polygonize_array(sieved, TRANSFORM, nodata=NODATA, simplify=0, min_pixels=6)
    assert shapely.area(geoms).min() >= 6 * PIXEL**2
    expected = sieved.copy()
    expected[30, 2] = NODATA
    np.testing.assert_array_equal(burn(geoms, ids, a.shape), expected)
    # the polygons fill every data pixel but the dropped speck: no holes
    assert shapely.union_all(geoms).area == pytest.approx(((a != NODATA).sum() - 1) * PIXEL**2)


@pytest.mark.parametrize("nodata", [0, None])
def test_regions_the_sieve_cannot_merge_leave_no_hole(tmp_path: Path, nodata: int | None) -> None:
    """GDAL's sieve merges no two small regions that are each other's largest neighbour: a 1-px and a
    3-px region with a unit of 4 both stayed, and every polygon below the unit was then dropped (a hole
    beside data); three fields of 6 px with a unit of 7 gave no polygon at all."""
    a = np.array([[1, 1, 1, 0, 0, 0, 0],
                  [1, 1, 1, 2, 1, 2, 2],  # (1,3) class 2, (1,4) class 1, (1,5) (1,6) (2,6) class 2
                  [1, 1, 1, 0, 0, 0, 2],
                  [1, 1, 1, 0, 0, 0, 0]], np.uint8)
    if nodata is None:
        a[a == 0] = 3
    path = write_mask(tmp_path / "m.tif", a, nodata=nodata, tags=False, colormap=False)
    vec.vectorize_mask(path, tmp_path / "m.gpkg", min_pixels=4, simplify=0)
    _, _, wkb, (ids, *_) = pyogrio.raw.read(tmp_path / "m.gpkg", layer="landcover")
    back = features.rasterize(zip(shapely.from_wkb(wkb), ids), out_shape=a.shape, transform=TRANSFORM, fill=0,
                              dtype="uint8")
    data = a != 0 if nodata is not None else np.ones(a.shape, bool)
    assert (back[data] != 0).all()  # every data pixel in a polygon: no hole
    if nodata is not None:  # the 1-px region joined the 3-px one, which reached the unit
        assert sorted(shapely.area(shapely.from_wkb(wkb)) / PIXEL**2) == [4.0, 13.0]
    fields = np.array([[1, 1, 2, 2, 3, 3]] * 3, np.uint8)  # no region reaches the unit: all stay
    path = write_mask(tmp_path / "f.tif", fields, nodata=nodata, tags=False, colormap=False)
    assert vec.vectorize_mask(path, tmp_path / "f.gpkg", min_pixels=7, simplify=0).polygons == 3
    # a speck with only nodata around it still goes
    speck = np.zeros((6, 6), np.uint8)
    speck[:, :4], speck[0, 5] = 1, 2
    if nodata is not None:
        path = write_mask(tmp_path / "s.tif", speck, nodata=nodata, tags=False, colormap=False)
        res = vec.vectorize_mask(path, tmp_path / "s.gpkg", min_pixels=3, simplify=0)
        assert res.polygons == 1 and res.class_counts == {1: 1}


def test_a_speck_in_a_small_nodata_hole_goes(tmp_path: Path) -> None:
    """A 1-px speck inside a nodata ring smaller than the unit, inside a large field: the sieve of the
    0/1 data mask filled the ring first, the speck joined the field there and was written (100 m²
    with a unit of 10 pixels)."""
    a = np.ones((40, 40), np.uint8)
    a[20:] = 2
    a[9:12, 9:12] = 0  # an 8-px nodata ring ...
    a[10, 10] = 3  # ... around a 1-px speck
    a[30:35, 30:35] = 0  # a 25-px nodata hole ...
    a[32, 32] = 3  # ... with a speck too
    a[0, 39] = 3  # a speck alone in a corner hole of 3 px (no small hole: the sieve alone finds it)
    a[0, 38] = a[1, 38] = a[1, 39] = 0
    path = write_mask(tmp_path / "m.tif", a, nodata=0, tags=False, colormap=False)
    for block in (None, 3, 7):  # (groups counted a strip at a time: the same whatever the strips)
        kw = {} if block is None else {"block_size": block}
        res = vec.vectorize_mask(path, tmp_path / f"m{block}.gpkg", min_pixels=10, simplify=0, **kw)
        assert res.class_counts == {1: 1, 2: 1}, block
        _, _, wkb, _ = pyogrio.raw.read(tmp_path / f"m{block}.gpkg", layer="landcover")
        # the holes stay holes (nodata is not filled), the fields keep every other pixel
        assert sorted(shapely.area(shapely.from_wkb(wkb)) / PIXEL**2) == [(a == 2).sum(), (a == 1).sum()]


def test_small_groups_fenced_by_small_nodata_groups_go(tmp_path: Path) -> None:
    """GDAL's sieve leaves two small regions that are each other's largest neighbour: a 3-px group fenced
    by 1-px nodata gaps (and 1-px specks) stayed below the unit beside a 12-px field."""
    rows = ["##.#......",
            "#.#.......",
            ".#........",
            "#.........",
            "......####",
            "......####",
            "......####"]
    a = np.array([[1 if c == "#" else 0 for c in r] for r in rows], np.uint8)
    path = write_mask(tmp_path / "f.tif", a, nodata=0, tags=False, colormap=False)
    res = vec.vectorize_mask(path, tmp_path / "f.gpkg", min_pixels=4, simplify=0)
    _, _, wkb, _ = pyogrio.raw.read(tmp_path / "f.gpkg", layer="landcover")
    assert res.polygons == 1 and shapely.area(shapely.from_wkb(wkb)).tolist() == [12 * PIXEL**2]


def test_a_vectorize_result_is_plain_json_data(mask_path: Path, tmp_path: Path) -> None:
    """VectorizeResult holds a path and numpy-made counts: ``to_dict()`` is what ``json.dumps`` takes."""
    import dataclasses
    import json

    res = vec.vectorize_mask(mask_path, tmp_path / "lc.gpkg", min_pixels=4)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert list(d) == [f.name for f in dataclasses.fields(res)]
    assert d["path"] == str(res.path) and Path(d["path"]).exists() and d["fmt"] == "gpkg" and d["layer"] == res.layer
    assert d["polygons"] == res.polygons == sum(d["class_counts"].values())
    assert d["class_counts"] == {str(k): v for k, v in res.class_counts.items()}  # JSON's keys are strings
    assert (d["width"], d["height"], d["min_pixels"], d["connectivity"]) == (res.width, res.height, 4, res.connectivity)
    assert d["simplify"] == res.simplify and d["area_units"] == res.area_units and d["crs_wkt"] == res.crs_wkt


def test_min_area_to_pixels() -> None:
    assert vec.min_pixels_for(250.0, None, 100.0) == 3
    assert vec.min_pixels_for(None, 4, 100.0) == 4
    assert vec.min_pixels_for(None, None, 100.0) == 0
    with pytest.raises(ParameterError):
        vec.min_pixels_for(1.0, 2, 100.0)
    with pytest.raises(ParameterError):
        vec.min_pixels_for(-1.0, None, 100.0)


# --- files ---------------------------------------------------------------------------------


def test_gpkg_output(mask_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lc.gpkg"
    res = vec.vectorize_mask(mask_path, out, min_pixels=4, block_size=9)
    assert res.path == out and res.fmt == "gpkg" and res.polygons >= 3
    info = pyogrio.read_info(out, layer="landcover")
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == rasterio.crs.CRS.from_user_input(CRS)
    assert list(info["fields"]) == list(vec.FIELDS)
    assert info["features"] == res.polygons == sum(res.class_counts.values())
    _, _, wkb, fields = pyogrio.raw.read(out, layer="landcover")
    geoms = shapely.from_wkb(wkb)
    cid, name, area, perim, scene = fields
    assert shapely.is_valid(geoms).all() and shapely.coverage_is_valid(geoms)
    assert set(cid) <= {1, 2, 3}
    assert all(n == NAMES[c] for c, n in zip(cid, name))
    np.testing.assert_allclose(area, shapely.area(geoms))
    np.testing.assert_allclose(perim, shapely.length(geoms))
    assert set(scene) == {"scene"}
    assert area.min() >= 4 * PIXEL**2
    con = sqlite3.connect(out)
    try:
        qml, table, default = con.execute("SELECT styleQML, f_table_name, useAsDefault FROM layer_styles").fetchone()
        assert table == res.layer and default == 1
        assert 'attr="class_id"' in qml and 'value="0,120,0,255"' in qml and 'label="forest"' in qml
        assert con.execute("SELECT data_type FROM gpkg_contents WHERE table_name='layer_styles'").fetchone() == ("attributes",)
        assert con.execute("SELECT count(*) FROM gpkg_extensions WHERE extension_name='gpkg_rtree_index'").fetchone()[0] == 1
    finally:
        con.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_classes_writes_only_their_polygons_of_the_full_coverage(mask_path: Path, tmp_path: Path) -> None:
    """--classes forest: the forest polygons exactly as in the full run (sieved and simplified with
    every class), no other class; names work as ids; an unknown class is refused before writing."""
    full = vec.vectorize_mask(mask_path, tmp_path / "all.gpkg", min_pixels=4)
    forest = next(c["id"] for c in CLASSES if c["name"] == "forest")
    for keep in ([forest], ["Forest"], [str(forest)]):
        out = tmp_path / f"k{len(list(tmp_path.iterdir()))}.gpkg"
        res = vec.vectorize_mask(mask_path, out, min_pixels=4, keep_classes=keep)
        assert res.class_counts == {forest: full.class_counts[forest]} and res.polygons == full.class_counts[forest]
        _, _, wkb, fields = pyogrio.raw.read(out, layer="landcover")
        _, _, wkb_all, fields_all = pyogrio.raw.read(tmp_path / "all.gpkg", layer="landcover")
        mine = shapely.from_wkb(wkb_all)[fields_all[0] == forest]
        assert set(fields[0]) == {forest}
        assert shapely.equals(shapely.from_wkb(wkb), mine).all()  # the same polygons, in the same order
    with pytest.raises(ParameterError, match=r"class 'roads' is not one of scene_mask.tif's classes \(1 "):
        vec.vectorize_mask(mask_path, tmp_path / "x.gpkg", keep_classes=["roads"])
    with pytest.raises(ParameterError, match=r"class '9' is not one of"):
        vec.vectorize_mask(mask_path, tmp_path / "x.gpkg", keep_classes=[9])
    assert not (tmp_path / "x.gpkg").exists()


def test_rings_oriented_whatever_the_grid(tmp_path: Path) -> None:
    """A south-up mask (positive row step) gives the same polygons as its north-up twin, and every
    polygon has a counter-clockwise shell and clockwise holes (OGC; RFC 7946's right-hand rule)."""
    from affine import Affine

    arr = class_array()
    north = write_mask(tmp_path / "north.tif", arr)
    t = TRANSFORM
    south_t = Affine(t.a, t.b, t.c, t.d, -t.e, t.f + t.e * arr.shape[0])
    south = write_mask(tmp_path / "south.tif", arr[::-1].copy(), transform=south_t)
    got = []
    for src in (north, south):
        out = tmp_path / f"{src.stem}.gpkg"
        vec.vectorize_mask(src, out, min_pixels=1, simplify=0)
        _, _, wkb, fields = pyogrio.raw.read(out, layer="landcover")
        geoms = shapely.from_wkb(wkb)
        polys = shapely.get_parts(geoms)
        assert shapely.is_ccw(shapely.get_exterior_ring(polys)).all()
        holes = np.concatenate([shapely.get_rings(p)[1:] for p in polys])
        assert len(holes) and not shapely.is_ccw(holes).any()
        got.append(shapely.normalize(shapely.union_all(geoms[fields[0] == 1])))
    assert shapely.equals(got[0], got[1])


def test_geojson_is_wgs84(mask_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lc.geojson"
    res = vec.vectorize_mask(mask_path, out, scene_name="S2A_test")
    info = pyogrio.read_info(out, layer="landcover")
    assert info["crs"] == "EPSG:4326" and info["features"] == res.polygons
    xmin, ymin, xmax, ymax = shapely.total_bounds(shapely.from_wkb(pyogrio.raw.read(out, layer="landcover")[2]))
    assert -82 < xmin < xmax < -80 and 36 < ymin < ymax < 36.2  # UTM 17N, 500 km E, 4000 km N
    fields = pyogrio.raw.read(out, layer="landcover")[3]
    assert set(fields[4]) == {"S2A_test"}
    assert fields[2].sum() == pytest.approx(((class_array() != NODATA).sum()) * PIXEL**2, rel=0.005)


def test_fgb_output_and_class_override(mask_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lc.fgb"
    classes = [ClassInfo(1, "urban", (1, 2, 3)), ClassInfo(2, "trees", (4, 5, 6))]
    res = vec.vectorize_mask(mask_path, out, classes=classes, connectivity=8, simplify=0)
    info = pyogrio.read_info(out, layer="landcover")
    assert info["features"] == res.polygons and info["geometry_type"] == "MultiPolygon"
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == rasterio.crs.CRS.from_user_input(CRS)
    cid, name = pyogrio.raw.read(out, layer="landcover")[3][:2]
    assert {n for c, n in zip(cid, name)} == {"urban", "trees", "class_3"}


def test_names_from_colormap_only(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "m.tif", class_array(), tags=False)
    out = tmp_path / "m.gpkg"
    vec.vectorize_mask(path, out)
    assert set(pyogrio.raw.read(out, layer="landcover")[3][1]) == {"class_1", "class_2", "class_3"}
    with sqlite3.connect(out) as con:
        assert 'value="0,0,255,255"' in con.execute("SELECT styleQML FROM layer_styles").fetchone()[0]


def test_all_nodata_gives_empty_layer(tmp_path: Path) -> None:
    path = write_mask(tmp_path / "empty.tif", np.full((8, 8), NODATA, dtype=np.uint8))
    for ext in ("gpkg", "fgb"):
        res = vec.vectorize_mask(path, tmp_path / f"empty.{ext}")
        info = pyogrio.read_info(tmp_path / f"empty.{ext}", layer="landcover")
        assert res.polygons == 0 and len(pyogrio.raw.read(tmp_path / f"empty.{ext}", layer="landcover")[2]) == 0
        assert list(info["fields"]) == list(vec.FIELDS)
    assert vec.vectorize_mask(path, tmp_path / "empty.geojson").polygons == 0


@pytest.mark.parametrize("nodata", [None, 0])
@pytest.mark.parametrize("min_area_px", [0, 5])
def test_pixels_a_mask_band_hides_get_no_polygons(tmp_path: Path, nodata: int | None, min_area_px: int) -> None:
    """A class raster whose no-data pixels are marked by an internal mask band (GDAL_TIFF_INTERNAL_MASK),
    not a nodata value: its hidden pixels were polygonised as classes."""
    a = np.ones((30, 40), dtype=np.uint8)
    a[:, 20:] = 2
    a[10:12, 25:27] = 3  # a 4-pixel island inside the visible part
    hidden = np.zeros(a.shape, bool)
    hidden[:, :10] = True  # the left 10 columns hold class 1 values but have no data
    path = write_mask(tmp_path / "masked.tif", a, nodata=nodata)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        ds.write_mask(np.where(hidden, 0, 255).astype(np.uint8))
    with rasterio.open(path) as ds:
        assert "per_dataset" in [f.name for f in ds.mask_flag_enums[0]]
    res = vec.vectorize_mask(path, tmp_path / "m.gpkg", simplify=0, min_pixels=min_area_px or None)
    _, _, wkb, (ids, *_) = pyogrio.raw.read(tmp_path / "m.gpkg", layer="landcover")
    burned = features.rasterize(zip(shapely.from_wkb(wkb), ids), out_shape=a.shape, transform=TRANSFORM, fill=0,
                                dtype="uint8")
    expected = np.where(hidden, 0, a)
    if min_area_px:
        expected[10:12, 25:27] = 2  # the island is sieved into its neighbour
    np.testing.assert_array_equal(burned, expected)
    assert res.polygons == len(ids)


@pytest.mark.parametrize("min_px", [None, 5])
def test_visible_255s_of_a_masked_uint8_mask_without_nodata_are_no_data(tmp_path: Path, min_px: int | None) -> None:
    """A uint8 class raster with a mask band and no nodata value: its visible 255s are no data, as in
    an unmasked one and as evaluate and sample take them (vectorize refused the mask)."""
    a = np.ones((30, 40), dtype=np.uint8)
    a[:, 20:] = 2
    a[20:, 30:] = 255  # no data the mask band does not hide
    hidden = np.zeros(a.shape, bool)
    hidden[:, :10] = True
    path = write_mask(tmp_path / "masked.tif", a, nodata=None, tags=False, colormap=False)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        ds.write_mask(np.where(hidden, 0, 255).astype(np.uint8))
    with pytest.warns(UserWarning, match="value 255 are taken as no data") as told:
        vec.vectorize_mask(path, tmp_path / "m.gpkg", simplify=0, min_pixels=min_px)
    assert len([w for w in told if "255" in str(w.message)]) == 1
    _, _, wkb, (ids, *_) = pyogrio.raw.read(tmp_path / "m.gpkg", layer="landcover")
    burned = features.rasterize(zip(shapely.from_wkb(wkb), ids), out_shape=a.shape, transform=TRANSFORM, fill=0,
                                dtype="uint8")
    np.testing.assert_array_equal(burned, np.where(hidden | (a == 255), 0, a))
    a[20:, 30:] = 2  # no visible 255: no warning
    path = write_mask(tmp_path / "clean.tif", a, nodata=None, tags=False, colormap=False)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        ds.write_mask(np.where(hidden, 0, 255).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec.vectorize_mask(path, tmp_path / "c.gpkg", simplify=0, min_pixels=min_px)


def test_geographic_area_in_grads_is_converted_to_degrees(tmp_path: Path) -> None:
    """NTF Paris (EPSG:4807) counts its angles in grads: areas were measured as if they were
    degrees (+10 % at 49 degrees north)."""
    pyproj = pytest.importorskip("pyproj")
    from geoseg.io import pixel_areas

    a = np.ones((20, 30), dtype=np.uint16)
    a[:, 10:] = 2
    grads = rasterio.transform.from_origin(1.0, 54.5, 0.002, 0.002)  # about 49 degrees north
    path = write_mask(tmp_path / "ntf.tif", a, crs="EPSG:4807", nodata=0, transform=grads, tags=False, colormap=False)
    geod = pyproj.CRS.from_epsg(4807).get_geod()
    lat = 0.9 * (54.5 - 0.002 * np.arange(21))
    row = np.array([abs(geod.polygon_area_perimeter([0, 0.0018, 0.0018, 0], [lat[r], lat[r], lat[r + 1], lat[r + 1]])[0])
                    for r in range(20)])
    with rasterio.open(path) as ds:
        assert pixel_areas(ds.crs, ds.transform, ds.height).block(0, ds.height) == pytest.approx(row, rel=1e-9)
    vec.vectorize_mask(path, tmp_path / "ntf.gpkg", simplify=0)
    _, _, _, (ids, _, area, _, _) = pyogrio.raw.read(tmp_path / "ntf.gpkg", layer="landcover")
    for c, cols in ((1, 10), (2, 20)):
        assert area[ids == c].sum() == pytest.approx(cols * row.sum(), rel=1e-6)


def test_geographic_area_is_geodesic(tmp_path: Path) -> None:
    a = np.ones((10, 10), dtype=np.uint16)
    a[:, 5:] = 2
    tr = rasterio.transform.from_origin(10.0, 1.0, 0.001, 0.001)  # near the equator
    path = write_mask(tmp_path / "geo.tif", a, crs="EPSG:4326", nodata=0, transform=tr, tags=False, colormap=False)
    res = vec.vectorize_mask(path, tmp_path / "geo.gpkg", simplify=0)
    assert res.area_units == "m2"
    area = pyogrio.raw.read(tmp_path / "geo.gpkg", layer="landcover")[3][2]
    assert area.sum() == pytest.approx((0.01 * 111_320) ** 2, rel=0.01)
    # blocky classes (polygons with holes, joined across strips): each class's area is its pixels' ground
    # area, row by row (a hole subtracts, whatever the ring orientation the joins leave)
    pyproj = pytest.importorskip("pyproj")
    a = class_image(60, 40, 4).astype(np.uint16) + 1
    specks = np.random.default_rng(0).random(a.shape) < 0.1
    a[specks] = a[specks] % 4 + 1  # one-pixel islands: holes in the blocks
    tr = rasterio.transform.from_origin(10.0, 61.0, 0.01, 0.01)
    path = write_mask(tmp_path / "blocks.tif", a, crs="EPSG:4326", nodata=0, transform=tr, tags=False, colormap=False)
    geod = pyproj.Geod(ellps="WGS84")
    lat = 61.0 - 0.01 * np.arange(61)
    row = np.array([abs(geod.polygon_area_perimeter([10, 10.01, 10.01, 10], [lat[r], lat[r], lat[r + 1], lat[r + 1]])[0])
                    for r in range(60)])
    for block in (4, 16, None):
        vec.vectorize_mask(path, tmp_path / "blocks.gpkg", simplify=0, block_size=block, overwrite=True)
        _, _, _, (ids, _, area, _, _) = pyogrio.raw.read(tmp_path / "blocks.gpkg", layer="landcover")
        for c in range(1, 5):
            assert area[ids == c].sum() == pytest.approx(((a == c) * row[:, None]).sum(), rel=1e-6), (block, c)


def _pixel_ground_areas(crs: str, tr: rasterio.Affine, shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's geodesic area from its corners (sides in 8 pieces), in longitudes/latitudes: a reference."""
    pyproj = pytest.importorskip("pyproj")
    to_geo = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    geod = pyproj.Geod(ellps="WGS84")
    t = np.linspace(0, 1, 9)[:-1]
    ring_c, ring_r = np.r_[t, np.ones(8), 1 - t, np.zeros(8)], np.r_[np.zeros(8), t, np.ones(8), 1 - t]
    out = np.empty(shape)
    for r in range(shape[0]):
        for c in range(shape[1]):
            x, y = tr * (c + ring_c, r + ring_r)
            out[r, c] = abs(geod.polygon_area_perimeter(*to_geo.transform(x, y))[0])
    return out


def test_a_hole_across_the_antimeridian_is_subtracted(tmp_path: Path) -> None:
    """On Web Mercator across 180°, a polygon whose hole lies east of it had the hole added (+31 %): its rings
    were oriented in longitudes wrapped at 180°, which flipped the exterior and not the hole."""
    a = np.zeros((64, 64), np.uint16)
    a[8:56, 8:60] = 1
    a[20:44, 36:50] = 2  # the hole: all east of 180° (columns from 32 on)
    tr = rasterio.Affine(1000, 0, 20037508.342789244 - 32000, 0, -1000, 8399737.89)  # about 60° N
    path = write_mask(tmp_path / "am.tif", a, crs="EPSG:3857", nodata=0, transform=tr, tags=False, colormap=False)
    vec.vectorize_mask(path, tmp_path / "am.gpkg", simplify=0)
    _, _, _, (ids, _, area, _, _) = pyogrio.raw.read(tmp_path / "am.gpkg", layer="landcover")
    ref = _pixel_ground_areas("EPSG:3857", tr, a.shape)
    for c in (1, 2):
        assert area[ids == c].sum() == pytest.approx(ref[a == c].sum(), rel=1e-6), c


@pytest.mark.parametrize("offset", [0.0, 0.5, 0.3])
def test_ground_areas_next_to_a_pole_are_its_pixels_polygons(offset: float) -> None:
    """Around a pole the longitude/latitude differences of a pixel break down: the pixels on a polar
    stereographic's pole were 3 % off (with the pole on a corner), 7 % next to it (on a centre), 53 % for the
    pixel holding it (elsewhere); 1e-4 at 28 pixels. Within POLE_PIXELS they are their corners' polygon."""
    from geoseg.io import ProjectedAreas

    crs = rasterio.crs.CRS.from_epsg(3413)
    px = 5000.0
    tr = rasterio.Affine(px, 0, -20 * px - offset * px, 0, -px, 20 * px + offset * px)  # the pole at (20 + offset)
    got = ProjectedAreas(crs, tr).block(0, 40, 0, 40)
    np.testing.assert_allclose(got, _pixel_ground_areas("EPSG:3413", tr, (40, 40)), rtol=1e-6)


def test_a_full_disk_grid_is_measured_on_the_ground_and_space_has_no_area() -> None:
    """A full-disk geostationary grid's corners are off the Earth: it was taken for a grid that does not distort
    (a class in the disk's middle 12 % too small, in map units) with numpy warnings on stderr."""
    import warnings

    from geoseg.io import ProjectedAreas, distorts_areas

    crs = rasterio.crs.CRS.from_proj4("+proj=geos +h=35786023 +lon_0=-75 +sweep=x +ellps=WGS84 +units=m")
    half = 5434894.885
    tr = rasterio.Affine(2 * half / 64, 0, -half, 0, -2 * half / 64, half)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distorts_areas(crs, tr, 64, 64)
        got = ProjectedAreas(crs, tr).block(0, 64, 0, 64)
    assert got[0, 0] == 0 and got[32, 32] > 0  # a corner in space; the sub-satellite point
    mid = _pixel_ground_areas(crs.to_wkt(), tr * rasterio.Affine.translation(16, 16), (32, 32))
    np.testing.assert_allclose(got[16:48, 16:48], mid, rtol=5e-5)  # (pixels of 170 km, half of them near the limb)


def test_every_grid_of_a_projection_that_distorts_somewhere_is_measured_alike() -> None:
    """Tiles of one Web Mercator archive switched from map units to m² at 11.8° N (a 5 % jump at the seam):
    a CRS whose areas are off somewhere in its area of use is measured on the ellipsoid everywhere."""
    from geoseg.io import distorts_areas

    merc = rasterio.crs.CRS.from_epsg(3857)
    assert distorts_areas(merc, rasterio.Affine(30, 0, 0, 0, -30, 15360), 512, 512)  # at the equator
    assert not distorts_areas(rasterio.crs.CRS.from_epsg(32633), rasterio.Affine(30, 0, 5e5, 0, -30, 6e6), 512, 512)
    assert not distorts_areas(rasterio.crs.CRS.from_epsg(3035), rasterio.Affine(30, 0, 4e6, 0, -30, 3e6), 512, 512)
    # a custom Mercator (no EPSG code, no area of use): tried within 10° of the grid, where neighbouring tiles reach;
    # the switch is where map units are 0.2 % off (it was at 5 %, a 5 % seam between the tiles on either side)
    custom = rasterio.crs.CRS.from_proj4("+proj=merc +lon_0=110 +datum=WGS84")
    for y0 in (1404800, 1430400, 400_000):
        assert distorts_areas(custom, rasterio.Affine(10, 0, 0, 0, -10, y0), 2560, 2560), y0
    assert not distorts_areas(custom, rasterio.Affine(10, 0, 0, 0, -10, 25600), 2560, 2560)  # at the equator


def test_geographic_perimeter_counts_the_holes(tmp_path: Path) -> None:
    """On a degree grid the perimeter was the exterior's only (pyproj's polygon perimeter): a block
    with a hole had 60 % of its projected perimeter. It is the geodesic length of every ring, as a
    local metric projection (UTM) measures it."""
    pyproj = pytest.importorskip("pyproj")
    a = np.ones((30, 30), dtype=np.uint16)
    a[10:20, 10:20] = 2  # a hole in class 1
    tr = rasterio.transform.from_origin(9.0, 0.3, 0.001, 0.001)  # near the equator, in UTM zone 32
    path = write_mask(tmp_path / "hole.tif", a, crs="EPSG:4326", nodata=0, transform=tr, tags=False, colormap=False)
    vec.vectorize_mask(path, tmp_path / "hole.gpkg", simplify=0)
    _, _, geoms, (ids, _, _, perimeter, _) = pyogrio.raw.read(tmp_path / "hole.gpkg", layer="landcover")
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    utm = shapely.transform(shapely.from_wkb(geoms), lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1])))
    np.testing.assert_allclose(perimeter, shapely.length(utm), rtol=2e-3)
    assert perimeter[ids == 1][0] == pytest.approx(perimeter[ids == 2][0] * 4, rel=2e-3)  # 120 + 40 px edges vs 40


def test_geographic_min_area_and_simplify_are_metric(tmp_path: Path) -> None:
    """On a degree grid --min-area is m² and --simplify m (degrees² are no area): converted with the
    geodesic pixel of the middle row, so an analyst's minimum mapping unit means the same everywhere."""
    pyproj = pytest.importorskip("pyproj")
    a = np.ones((40, 40), dtype=np.uint16)
    a[10, 10:13] = 2  # a 3-pixel speck
    tr = rasterio.transform.from_origin(10.0, 60.02, 0.001, 0.001)  # 60 °N: pixels of about 55 m x 111 m
    path = write_mask(tmp_path / "geo.tif", a, crs="EPSG:4326", nodata=0, transform=tr, tags=False, colormap=False)
    lon, lat = [10.0, 10.001, 10.001, 10.0], [60.0, 60.0, 59.999, 59.999]  # a pixel of the middle row (20)
    px = abs(pyproj.Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)[0])
    assert 6100 < px < 6300
    kept = vec.vectorize_mask(path, tmp_path / "kept.gpkg", min_area=2.5 * px)
    merged = vec.vectorize_mask(path, tmp_path / "merged.gpkg", min_area=3.5 * px)
    assert (kept.min_pixels, kept.class_counts) == (3, {1: 1, 2: 1})
    assert (merged.min_pixels, merged.class_counts) == (4, {1: 1})
    assert kept.simplify == pytest.approx(px**0.5)  # the default: one pixel, in metres
    # a tolerance in metres: 200 m is a few pixels (in degrees it would swallow the whole mask)
    coarse = vec.vectorize_mask(path, tmp_path / "coarse.gpkg", simplify=200.0)
    assert coarse.polygons == kept.polygons


def test_odd_outputs_and_units_are_named_plainly(mask_path: Path, tmp_path: Path) -> None:
    """A folder as --out was "output tmp: name it .gpkg ...", a 1e300 unit printed a 300-digit count, a
    card that is a device "did not exist" (CLI review)."""
    from geoseg.engine import resolve_model
    from geoseg.errors import ModelError
    from geoseg.evaluate import draw_sample

    with pytest.raises(ParameterError, match=f"output {tmp_path} is a folder: give a file name"):
        vec.vectorize_mask(mask_path, tmp_path)
    with pytest.raises(ParameterError, match=f"sample output {tmp_path} is a folder"):
        draw_sample(mask_path, tmp_path)
    with pytest.raises(ParameterError, match=r"--min-area 1e\+300 \(1e\+298 pixels of 100\)"):
        vec.vectorize_mask(mask_path, tmp_path / "x.gpkg", min_area=1e300)
    with pytest.raises(ModelError, match="--card /dev/null is not a file"):
        resolve_model("unet", card="/dev/null")


def test_min_area_larger_than_the_mask_is_refused(mask_path: Path, tmp_path: Path) -> None:
    info = vec.open_mask(mask_path)
    with pytest.raises(ParameterError, match="not smaller than the whole mask"):
        vec.vectorize_mask(mask_path, tmp_path / "o.gpkg", min_area=info.width * info.height * info.pixel_area)
    with pytest.raises(ParameterError, match="not smaller than the whole mask"):
        vec.sieve_array(class_array(), class_array().size)
    assert not (tmp_path / "o.gpkg").exists()


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: p / "missing.tif", SceneReadError, "does not exist"),
        (lambda p: (p / "junk.tif").write_text("not a raster") and p / "junk.tif", SceneReadError, "not a readable raster"),
        (lambda p: write_mask(p / "f.tif", np.zeros((8, 8), dtype=np.float32), tags=False), SceneError, "float32"),
        (lambda p: write_mask(p / "nocrs.tif", class_array(), crs=None), SceneError, "no CRS"),
        # the image instead of its mask: refused, not turned into one polygon per pixel value
        (lambda p: write_raster(p / "scene.tif", np.random.default_rng(0).integers(0, 255, (3, 8, 8), dtype=np.uint8)),
         SceneError, "has 3 bands, a class raster has one.*scene_landcover.tif"),
        (lambda p: write_raster(p / "pan.tif", np.arange(40 * 40, dtype=np.uint16).reshape(40, 40)),
         SceneError, "1600 distinct values in a sample and no class names.*CLASSES tag"),
    ],
)
def test_bad_inputs(tmp_path: Path, make, error, words) -> None:  # type: ignore[no-untyped-def]
    src = make(tmp_path)
    out = tmp_path / "out.gpkg"
    with pytest.raises(error, match=words) as exc:
        vec.vectorize_mask(src, out)
    assert "\n" not in str(exc.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".geoseg")]


@pytest.mark.parametrize("name, fmt, words", [
    ("lc.shp", None, r"lc.shp: name it .gpkg, .geojson or .fgb"),
    ("lc", None, r"lc: name it .gpkg"),
    ("lc.gpkg", "geojson", r"named as gpkg but the format asked for is geojson: name it lc.geojson"),
    ("lc.fgb", "gpkg", r"named as fgb .* name it lc.gpkg"),
])
def test_an_output_name_that_is_not_its_format_is_refused(mask_path: Path, tmp_path: Path, name: str,
                                                          fmt: str | None, words: str) -> None:
    # GDAL writes whatever format it is asked for under any name: a GeoPackage named .shp
    with pytest.raises(ParameterError, match=words):
        vec.vectorize_mask(mask_path, tmp_path / name, fmt=fmt)  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == [mask_path.name]
    assert vec.vectorize_mask(mask_path, tmp_path / "lc.json", fmt="geojson").path.read_text().startswith("{")


def test_existing_output_and_bad_params(mask_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lc.gpkg"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError):
        vec.vectorize_mask(mask_path, out)
    assert out.read_text() == "keep me"
    with pytest.raises(ParameterError):
        vec.vectorize_mask(mask_path, out, overwrite=True, connectivity=6)
    with pytest.raises(ParameterError):
        vec.vectorize_mask(mask_path, out, overwrite=True, simplify=-1)
    assert vec.vectorize_mask(mask_path, out, overwrite=True).polygons > 0


# --- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def cli() -> click.Group:
    """The root ``geoseg`` group."""
    from geoseg_cli.main import cli as root

    return root


def test_cli_vectorize(cli: click.Group, mask_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "poly.geojson"
    res = runner.invoke(cli, ["vectorize", str(mask_path), "--out", str(out), "--min-area", "300", "--connectivity", "8"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    assert pyogrio.read_info(out, layer="landcover")["crs"] == "EPSG:4326"
    res = runner.invoke(cli, ["vectorize", str(mask_path), "--simplify", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "scene_mask.gpkg").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["{tmp}/missing.tif"], "does not exist"),
        (["{float}"], "float32"),
    ],
)
def test_cli_errors(cli: click.Group, mask_path: Path, tmp_path: Path, args: list[str], words: str) -> None:
    fl = write_mask(tmp_path / "f.tif", np.zeros((4, 4), dtype=np.float32), tags=False)
    args = [a.format(tmp=tmp_path, float=fl, mask=mask_path) for a in args]
    res = CliRunner().invoke(cli, ["vectorize", *args, "-o", str(tmp_path / "o.gpkg")])
    assert res.exit_code == 1, res.output
    assert words in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.gpkg").exists()


def test_cli_usage_error(cli: click.Group, mask_path: Path) -> None:
    res = CliRunner().invoke(cli, ["vectorize", str(mask_path), "--connectivity", "6"])
    assert res.exit_code == 2
    for option, value in (("--min-area", "-5"), ("--min-pixels", "-3"), ("--simplify", "nan")):
        res = CliRunner().invoke(cli, ["vectorize", str(mask_path), option, value])  # (exit 1, a failed run)
        assert res.exit_code == 2 and f"Invalid value for '{option}': {value} is not allowed" in res.output
    # a file name ending as a folder does: it wrote the file x.gpkg
    for cmd in ("vectorize", "sample"):
        res = CliRunner().invoke(cli, [cmd, str(mask_path), "--out", str(mask_path.parent / "x.gpkg") + "/"])
        assert res.exit_code == 2 and "ends with a path separator, as a folder does" in res.output, res.output
        assert not (mask_path.parent / "x.gpkg").exists()
    res = CliRunner().invoke(cli, ["vectorize", str(mask_path), "--out", "./"])  # (it said "e.g. .")
    assert res.exit_code == 2 and "give its name (.gpkg, .geojson or .fgb)" in res.output, res.output


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_random_rasters(connectivity: int, seed: int) -> None:
    """Seams anywhere: block-wise pieces stay edge-matched, exact output equals the whole-array one."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 4, size=(23, 19)).astype(np.uint8)
    a[rng.random(a.shape) < 0.15] = NODATA
    a[5:15, 3:12] = 2  # a larger region crossing several seams, with holes
    a[6:14, 4:11][rng.random((8, 7)) < 0.25] = 1
    whole, wid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0)
    np.testing.assert_array_equal(burn(whole, wid, a.shape), a)
    for block in (1, 2, 5):
        exact, eid = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=0, block_size=block)
        assert len(exact) == len(whole)
        assert shapely.union_all(exact).equals(shapely.union_all(whole))
        np.testing.assert_array_equal(burn(exact, eid, a.shape), a)
        simp, _ = vec.polygonize_array(a, TRANSFORM, nodata=NODATA, connectivity=connectivity, simplify=PIXEL, block_size=block)
        assert len(simp) == len(whole) and shapely.is_valid(simp).all()
        assert shapely.coverage_is_valid(simp)  # pixel noise: areas move by up to a pixel per region


def test_strip_pieces_are_edge_matched() -> None:
    """Junction vertices make GDAL's polygons a valid coverage, seams included."""
    a = class_array()
    geoms, _ = vec._shapes_px(a[8:20], 8, 4, a[7], a[20])
    assert shapely.coverage_is_valid(geoms)
    xy = shapely.get_coordinates(geoms)
    for row, line in ((8, a[7]), (20, a[20])):
        change = set((np.flatnonzero(line[1:] != line[:-1]) + 1).tolist())
        assert change and change <= set(xy[xy[:, 1] == -row, 0].astype(int).tolist())


def test_malformed_class_tag_falls_back_to_the_colour_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_mask(tmp_path / "bad_tag.tif", class_array(), tags=False)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(GEOSEG_CLASSES='[{"id": 1}]')  # no name, no colour
    info = vec.open_mask(path)
    assert "malformed GEOSEG_CLASSES" in caplog.text
    by_id = {c["id"]: tuple(c["color"]) for c in CLASSES}
    assert {k: (info.classes[k].name, info.classes[k].color) for k in by_id} == {k: (f"class_{k}", rgb) for k, rgb in by_id.items()}


def test_predict_whose_polygons_fail_keeps_its_whole_mask_and_says_how_to_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing the polygons: the mask (written before them) is whole and stays,
    and the error says so and how to get the polygons, instead of only 'nothing half-written'."""
    from geoseg import engine
    from geoseg.atomic import write_error
    from geoseg.errors import OutputError
    from tests.test_engine import identity_card, one_hot_predictor

    src = write_raster(tmp_path / "s.tif", class_image(80, 80, 2)[None].astype(np.uint8))

    def full(mask_path, out_path, **kw):  # type: ignore[no-untyped-def]
        raise write_error(out_path, OSError(28, "No space left on device"))

    monkeypatch.setattr(vec, "vectorize_mask", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"s_landcover.gpkg: no space left .*; the mask s_landcover.tif is complete: "
                                          r"write its polygons with geoseg vectorize .*s_landcover.tif, or run predict "
                                          r"again with --overwrite") as exc:
        engine.segment_scene(src, out, source=engine.ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                             options=engine.PredictOptions(vector="gpkg"))
    assert "\n" not in str(exc.value)
    with rasterio.open(out / "s_landcover.tif") as ds:  # whole: every pixel classified
        assert (ds.read(1) == class_image(80, 80, 2) + 1).all()
    assert sorted(p.suffix for p in out.iterdir()) == [".qml", ".tif", ".xml"]


def test_geoseg_s_own_geopackage_reads_back_without_a_layer_warning(tmp_path: Path) -> None:
    """geoseg's GeoPackages hold a layer_styles table beside the polygons: reading one back (evaluate
    --reference, --aoi, polygon labels) printed pyogrio's "More than one layer found" each time."""
    import warnings

    from geoseg.io import read_vector

    path = write_mask(tmp_path / "m.tif", class_array())
    res = vec.vectorize_mask(path, tmp_path / "m.gpkg")
    assert [str(n) for n, _ in pyogrio.list_layers(res.path)] == ["landcover", "layer_styles"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = read_vector(res.path, None, missing="missing", unreadable="unreadable")
    assert len(data.geoms) == res.polygons > 0


def test_a_busy_strip_is_cut_shorter_and_the_polygons_are_the_same(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1,024-px-wide strip of salt-and-pepper noise held 700,000 polygons at once (1.5-2.5 GB): a
    strip with more than STRIP_EDGES value changes is cut shorter. The exact polygons do not depend
    on it; simplified ones only in vertex choices near seams (as for any block_size, see the module)."""
    rng = np.random.default_rng(7)
    a = rng.integers(1, 4, (120, 90)).astype(np.uint8)
    a[60:, :] = 2  # a quiet lower half: full strips there
    path = write_mask(tmp_path / "noise.tif", a)
    runs = {}
    heights: list[int] = []
    shapes_px = vec._shapes_px

    def record(strip, r0, *args, **kwargs):  # type: ignore[no-untyped-def]
        heights.append(strip.shape[0])
        return shapes_px(strip, r0, *args, **kwargs)

    monkeypatch.setattr(vec, "_shapes_px", record)
    for edges in (1 << 30, 700):
        monkeypatch.setattr(vec, "STRIP_EDGES", edges)
        heights.clear()
        for simplify in (0.0, 15.0):
            out = tmp_path / f"v{edges}_{simplify}.gpkg"
            vec.vectorize_mask(path, out, simplify=simplify, block_size=64)
            _, _, geoms, (ids, *_) = pyogrio.raw.read(out, layer="landcover")
            g = shapely.normalize(shapely.from_wkb(geoms))
            assert shapely.is_valid(g).all() and shapely.coverage_is_valid(g)
            runs[(edges, simplify)] = (sorted(zip(ids.tolist(), shapely.to_wkb(g).tolist())) if simplify == 0
                                       else (sorted(ids.tolist()), round(float(shapely.area(g).sum()), 3)))
        runs[(edges, "heights")] = list(heights)
    assert runs[(1 << 30, "heights")] == [64, 56] * 2
    busy = runs[(700, "heights")]
    assert len(busy) > 4 and max(busy[: len(busy) // 2]) < 64 and sum(busy) == 2 * 120
    assert runs[(700, 0.0)] == runs[(1 << 30, 0.0)]
    assert runs[(700, 15.0)] == runs[(1 << 30, 15.0)]  # the same polygons (classes, total area)


def test_class_names_where_class_infos_are_due_are_one_line(mask_path: Path, tmp_path: Path) -> None:
    """vectorize_mask(..., classes=["forest"]) (meaning the polygons of forest only) ended in
    "AttributeError: 'str' object has no attribute 'id'"."""
    with pytest.raises(ParameterError, match="keep_classes"):
        vec.vectorize_mask(mask_path, tmp_path / "x.gpkg", classes=["forest"])  # type: ignore[list-item]
    assert not (tmp_path / "x.gpkg").exists()


def test_uint8_255_without_nodata_is_no_data_as_to_evaluate_and_sample(tmp_path: Path) -> None:
    """It was a class here, and no data to evaluate and sample, without a word."""
    a = class_array()
    a[:4] = 255
    unmarked = write_mask(tmp_path / "u.tif", a, nodata=None, tags=False, colormap=False)
    with pytest.warns(UserWarning, match="no nodata value: its pixels of value 255 are taken as no data"):
        res = vec.vectorize_mask(unmarked, tmp_path / "u.gpkg", simplify=0)
    assert 255 not in res.class_counts and set(res.class_counts) == set(np.unique(a)) - {255, NODATA}
    info, _, _, fields = pyogrio.raw.read(tmp_path / "u.gpkg", layer="landcover")
    area = fields[list(info["fields"]).index("area")].sum()
    assert area == pytest.approx(((a != 255) & (a != NODATA)).sum() * PIXEL**2)
    # with a nodata value of its own, 255 is a class; a mask without 255 says nothing
    res = vec.vectorize_mask(write_mask(tmp_path / "n.tif", a, nodata=0, tags=False, colormap=False),
                             tmp_path / "n.gpkg", simplify=0)
    assert res.class_counts[255] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = np.where(a == 255, 1, a).astype(np.uint8)
        vec.vectorize_mask(write_mask(tmp_path / "b.tif", b, nodata=None, tags=False, colormap=False),
                           tmp_path / "b.gpkg", min_pixels=3)


@pytest.mark.parametrize("dtype,wider", [("int8", "Int16"), ("uint32", "Int32"), ("int64", "Int32")])
def test_integer_types_polygonize_cannot_take_are_told_how_to_convert(tmp_path: Path, dtype: str, wider: str) -> None:
    path = write_raster(tmp_path / "m.tif", class_array().astype(dtype))
    with pytest.raises(SceneError, match=f"{dtype} class ids, which GDAL's polygonize does not take: convert it "
                                         rf"first \(gdal_translate -ot {wider} m.tif m_{wider.lower()}.tif"):
        vec.vectorize_mask(path, tmp_path / "m.gpkg")


def test_many_classes_named_or_chosen_are_no_image_and_an_absent_class_is_said(tmp_path: Path) -> None:
    a = (np.arange(60 * 60).reshape(60, 60) // 3 % 600).astype(np.uint16)  # 600 classes of 3 pixels a row
    path = write_raster(tmp_path / "many.tif", a)
    with pytest.raises(SceneError, match="600 distinct values"):
        vec.vectorize_mask(path, tmp_path / "m.gpkg")
    res = vec.vectorize_mask(path, tmp_path / "m.gpkg", keep_classes=[5, 7])
    assert set(res.class_counts) == {5, 7}
    with pytest.warns(UserWarning, match=r"classes \[9999\] have no pixel in mask many.tif"):
        res = vec.vectorize_mask(path, tmp_path / "m.gpkg", keep_classes=[5, 9999], overwrite=True)
    assert set(res.class_counts) == {5}
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(1, CLASSES=",".join(f"{v}=c{v}" for v in range(600)))
    assert len(vec.vectorize_mask(path, tmp_path / "all.gpkg").class_counts) == 600
