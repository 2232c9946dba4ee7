"""segment_scene end to end with numpy predictors (no paddle needed) and the output contract."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.atomic import TMP_PREFIX
from geoseg.card import ClassInfo, ModelCard, Normalization
from geoseg.engine import INPUT_RANGE_Z, ModelSource, PredictOptions, check_input_range, companion_path, segment_scene
from geoseg.io import MASK_NODATA, open_scene
from geoseg.tiling import make_grid
from geoseg.errors import InputRangeWarning, NoCRSWarning, ParameterError, SceneError
from tests.conftest import NC_LCC, class_image, write_raster


def identity_card(n_bands: int, n_classes: int, ids: list[int] | None = None, tile: int = 64, overlap: int = 16) -> ModelCard:
    """A card whose normalisation leaves raw values unchanged."""
    ids = ids or list(range(1, n_classes + 1))
    return ModelCard(
        name="identity",
        architecture="unet",
        bands=tuple(f"b{i}" for i in range(n_bands)),
        classes=tuple(ClassInfo(i, f"name {i}", (10 * i, 20, 30)) for i in ids),
        normalization=Normalization(mean=(0.0,) * n_bands, std=(1.0,) * n_bands, scale={"default": 1.0}),
        tile_size=tile,
        overlap=overlap,
    )


def one_hot_predictor(n_classes: int, offset: int = 0):
    """Predict class = rounded value of band 1 minus ``offset`` (clipped), as one-hot probabilities."""

    def predict(x: np.ndarray) -> np.ndarray:
        cls = np.clip(np.rint(np.nan_to_num(x[:, 0])) - offset, 0, n_classes - 1).astype(int)
        return (np.arange(n_classes)[None, :, None, None] == cls[:, None]).astype(np.float32)

    return predict


def no_tmp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX) or ".staging" in p.name]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_predictor_is_stitched_back_exactly(tmp_path: Path, batch_size: int) -> None:
    cls = class_image(203, 317, 4, seed=3).astype(np.uint8)
    data = np.stack([cls + 1, (cls * 7) % 5]).astype(np.uint8)
    data[:, :, :70] = 0  # nodata collar on the left, wider than a window
    src = write_raster(tmp_path / "scene.tif", data, nodata=0)
    card = identity_card(2, 4, ids=[3, 5, 7, 9])
    res = segment_scene(
        src, tmp_path / "out", source=ModelSource(card), predictor=one_hot_predictor(4, offset=1),
        options=PredictOptions(batch_size=batch_size),
    )
    assert res.mask == tmp_path / "out" / "scene_landcover.tif"
    with rasterio.open(res.mask) as ds:
        mask = ds.read(1)
    expected = np.array([3, 5, 7, 9], np.uint8)[cls]
    expected[:, :70] = 255
    np.testing.assert_array_equal(mask, expected)
    assert res.windows + res.windows_skipped == len(make_grid(203, 317, 64, 16))
    assert res.windows_skipped >= 1  # the all-nodata windows of the collar never reached the model
    assert sorted(p.name for p in res.outputs) == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert no_tmp_files(tmp_path)


def test_cpu_batches_small_windows_by_default(tmp_path: Path) -> None:
    """Without --batch-size, CPU calls take about 256² pixels: 4 windows of 128 px, 1 of 256 px or more."""
    from geoseg.engine import default_batch_size

    assert [default_batch_size("cpu/inference/fp32", t) for t in (64, 128, 192, 256, 512)] == [8, 4, 2, 1, 1]
    # on a GPU the pixels of 8 windows of 512 px: 8 windows of 2,048 px held 16 times the activations
    assert [default_batch_size("gpu/dygraph/fp16", t) for t in (128, 512, 724, 1024, 2048)] == [8, 8, 4, 2, 1]
    src = write_raster(tmp_path / "scene.tif", (class_image(200, 600, 3) + 1).astype(np.uint8), nodata=0)
    sizes: list[int] = []
    inner = one_hot_predictor(3, offset=1)

    def predictor(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return inner(x)

    masks = []
    for tile, batch in ((128, None), (128, 1)):
        sizes.clear()
        res = segment_scene(src, tmp_path / f"out{batch}", source=ModelSource(identity_card(1, 3, tile=tile, overlap=32)),
                            predictor=predictor, options=PredictOptions(batch_size=batch))
        assert max(sizes) == (4 if batch is None else 1) and sum(sizes) == res.windows
        with rasterio.open(res.mask) as ds:
            masks.append(ds.read(1))
    np.testing.assert_array_equal(masks[0], masks[1])


CASES = [
    ("uint8", 1, 0),
    ("uint8", 3, 0),
    ("uint8", 4, None),
    ("uint16", 8, 0),
    ("int16", 10, -9999),
    ("float32", 3, float("nan")),
    ("float32", 1, -1.0),
]


@pytest.mark.parametrize(("dtype", "bands", "nodata"), CASES)
def test_output_grid_and_nodata_match_the_input(tmp_path: Path, dtype: str, bands: int, nodata: float | None) -> None:
    h, w = 97, 130
    rng = np.random.default_rng(bands)
    data = (rng.random((bands, h, w)) * 3).astype(dtype)
    if np.dtype(dtype).kind == "f":
        data = data + 0.1
    else:
        data = data + 1
    transform = from_origin(612345.5, 3456789.25, 2.5, 2.5)
    collar = np.zeros((h, w), bool)
    collar[:7] = True
    collar[:, -5:] = True
    collar[40:45, 60:70] = True
    masks = None
    if nodata is None:
        masks = ~collar  # internal mask instead of a nodata value
    else:
        data[:, collar] = nodata
    src = write_raster(tmp_path / f"s_{dtype}.tif", data, crs=NC_LCC, transform=transform, nodata=nodata, masks=masks)
    card = identity_card(bands, 3)
    res = segment_scene(src, tmp_path, source=ModelSource(card), predictor=one_hot_predictor(3),
                        options=PredictOptions(confidence="uint8"))
    with rasterio.open(src) as a, rasterio.open(res.mask) as b:
        assert b.crs == a.crs
        assert b.transform == a.transform
        assert (b.width, b.height, b.count, b.dtypes[0]) == (w, h, 1, "uint8")
        assert b.nodata == 255
        mask = b.read(1)
    np.testing.assert_array_equal(mask == 255, collar)
    assert set(np.unique(mask[~collar])) <= {1, 2, 3}
    with rasterio.open(res.confidence) as c:
        conf = c.read(1)
        assert c.transform == transform
    assert (conf[collar] == 255).all() and (conf[~collar] == 100).all()


@pytest.mark.parametrize("step", ["write_aux_xml", "write_qml", "write_ramp_qml"])
def test_no_raster_lands_before_its_sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """The mask's .aux.xml (class names; the CRS where GeoTIFF keys cannot hold it) and .qml, and the
    confidence's .qml, were written after the raster landed: a stop between them left a mask that
    opened in QGIS unstyled, and that a rerun refused to replace without --overwrite. Each raster now
    lands just after its sidecars."""
    import geoseg.engine

    src = write_raster(tmp_path / "s.tif", class_image(48, 40, 2, seed=1)[None].astype(np.uint8), crs="EPSG:32633")
    out = tmp_path / "out"

    def stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(geoseg.engine, step, stop)
    with pytest.raises(KeyboardInterrupt):
        segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                      options=PredictOptions(confidence="uint8", vector="gpkg"))
    left = {p.name for p in out.iterdir()} if out.exists() else set()  # (a folder it made and left empty goes)
    if step == "write_ramp_qml":  # the mask landed with its sidecars, not the confidence
        assert left == {"s_landcover.tif", "s_landcover.qml", "s_landcover.tif.aux.xml"}, left
    else:  # nothing: a sidecar written before the stop goes with its raster (a rerun refused it)
        assert left == set(), left


def test_a_stop_while_a_raster_lands_takes_its_sidecars_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop after the sidecars were written but before the raster's rename (its fsync takes seconds on a
    large COG) left the .qml and .aux.xml alone, and a rerun was refused: 's_landcover.qml already exists'."""
    import geoseg.atomic

    src = write_raster(tmp_path / "s.tif", class_image(48, 40, 2, seed=1)[None].astype(np.uint8), crs="EPSG:32633")
    out = tmp_path / "out"
    out.mkdir()
    real = geoseg.atomic.os.replace

    def stop_at_the_mask(a, b):  # type: ignore[no-untyped-def]
        if Path(b).name == "s_landcover.tif":
            raise KeyboardInterrupt
        return real(a, b)

    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
              options=PredictOptions(confidence="uint8", vector="gpkg"))
    monkeypatch.setattr(geoseg.atomic.os, "replace", stop_at_the_mask)
    with pytest.raises(KeyboardInterrupt):
        segment_scene(src, out, **kw)
    assert sorted(p.name for p in out.iterdir()) == [], sorted(p.name for p in out.iterdir())
    monkeypatch.undo()
    assert segment_scene(src, out, **kw).mask.exists()  # (no --overwrite needed)


def test_a_crs_geotiff_keys_cannot_hold_is_kept(tmp_path: Path) -> None:
    """A rotated-pole CRS lives in GDAL's .aux.xml beside a GeoTIFF: the mask, confidence and
    probabilities came out without a CRS (the temp file's sidecar was lost with the rename), and
    the polygons then failed on 'mask has no CRS'."""
    from rasterio.crs import CRS

    rotated = CRS.from_proj4("+proj=ob_tran +o_proj=longlat +o_lon_p=0 +o_lat_p=37.5 +lon_0=357.5 "
                             "+datum=WGS84 +no_defs")
    data = np.random.default_rng(0).integers(1, 3, (3, 40, 50)).astype(np.uint8)
    src = write_raster(tmp_path / "rotpole.tif", data, crs=rotated, transform=from_origin(-5.0, 4.0, 0.01, 0.01))
    with rasterio.open(src) as ds:
        assert ds.crs == rotated  # (from the input's own .aux.xml)
    res = segment_scene(src, tmp_path / "out", source=ModelSource(identity_card(3, 3)), predictor=one_hot_predictor(3),
                        options=PredictOptions(confidence="uint8", probabilities="uint8", vector="gpkg"))
    for raster in (res.mask, res.confidence, res.probabilities):
        with rasterio.open(raster) as ds:
            assert ds.crs == rotated, raster.name
    assert Path(f"{res.confidence}.aux.xml") in res.outputs
    assert "<CategoryNames>" in Path(f"{res.mask}.aux.xml").read_text()  # the class names are still there
    import pyogrio

    assert rasterio.crs.CRS.from_user_input(pyogrio.read_info(res.extra_outputs[0], layer="landcover")["crs"]) == rotated
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_class_areas_on_a_rotated_degree_grid_match_the_polygons(tmp_path: Path) -> None:
    """A rotated degree grid's row crosses latitudes: its class areas were computed row by row as if it
    did not (+1.8 % against the polygons' geodesic areas at 61 degrees north, rotated 40 degrees)."""
    import pyogrio
    from affine import Affine

    a = class_image(60, 80, 3, seed=2)[None].astype(np.uint8)
    rotated = Affine.translation(10.0, 61.0) * Affine.rotation(40) * Affine.scale(0.003, -0.003)
    src = write_raster(tmp_path / "rot.tif", a, crs="EPSG:4326", transform=rotated)
    res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3),
                        options=PredictOptions(vector="gpkg", simplify=0))
    _, _, _, (ids, _, area, *_) = pyogrio.raw.read(res.extra_outputs[0], layer="landcover")
    for c in identity_card(1, 3).classes:
        assert res.class_area[c.name] == pytest.approx(area[ids == c.id].sum(), rel=1e-5), c.name


def test_a_scene_without_data_is_warned_about(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "empty.tif", np.zeros((3, 30, 40), np.uint8), nodata=0)
    with pytest.warns(InputRangeWarning, match="empty.tif: no pixel in the scene has data"):
        res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(3, 3)), predictor=one_hot_predictor(3))
    with rasterio.open(res.mask) as ds:
        assert (ds.read(1) == MASK_NODATA).all()


def test_alpha_band_marks_nodata(tmp_path: Path) -> None:
    h, w = 50, 70
    rgb = np.full((3, h, w), 1, np.uint8)
    alpha = np.full((1, h, w), 255, np.uint8)
    alpha[0, 20:30] = 0
    src = write_raster(tmp_path / "rgba.tif", np.concatenate([rgb, alpha]), photometric="RGB", alpha="YES")
    with rasterio.open(src) as ds:
        assert ds.colorinterp[3].name == "alpha"
    res = segment_scene(src, tmp_path, source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as b:
        mask = b.read(1)
    assert (mask[20:30] == 255).all() and (mask[:20] == 2).all()


def test_a_band_tagged_alpha_read_as_data_marks_no_nodata(tmp_path: Path) -> None:
    """GDAL tags the 4th band of an RGB file alpha (NAIP's RGBN written with PHOTOMETRIC=RGB): read as
    NIR, its zeros made their pixels nodata without a word, and info named another nodata source."""
    from geoseg.engine import describe_scene

    h, w = 40, 60
    data = np.full((4, h, w), 1, np.uint8)
    data[3, 10:20] = 0  # "NIR" 0 in a strip: data, not transparency
    src = write_raster(tmp_path / "rgbn.tif", data, photometric="RGB", alpha="YES")
    card = identity_card(4, 2)
    with pytest.warns(InputRangeWarning, match="band 4 is tagged alpha .* but is read as data .b3.: it marks no "
                                               "pixel as nodata"):
        res = segment_scene(src, tmp_path / "o", source=ModelSource(card), predictor=one_hot_predictor(2),
                            options=PredictOptions(bands=(1, 2, 3, 4)))
    with rasterio.open(res.mask) as ds:
        assert (ds.read(1) == 2).all()
    with pytest.warns(InputRangeWarning, match="tagged alpha"):
        info = describe_scene(src, source=ModelSource(card), bands=(1, 2, 3, 4))
    assert info["nodata"] == "none (band 4, tagged alpha, is read as data)"
    # its nodata value still marks nodata (every band 0); the three other bands alone: band 4 is the alpha mask
    data[:, 30:35] = 0
    nd = write_raster(tmp_path / "nd.tif", data, photometric="RGB", alpha="YES", nodata=0)
    with pytest.warns(InputRangeWarning, match="its nodata value 0 still does"):
        res = segment_scene(nd, tmp_path / "o2", source=ModelSource(card), predictor=one_hot_predictor(2),
                            options=PredictOptions(bands=(1, 2, 3, 4)))
    with rasterio.open(res.mask) as ds:
        mask = ds.read(1)
    assert (mask[30:35] == 255).all() and (mask[10:20] == 2).all()
    res = segment_scene(src, tmp_path / "o3", source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as ds:
        assert (ds.read(1)[10:20] == 255).all()


def test_info_gives_the_pixel_size_of_a_geotransform_without_a_crs(tmp_path: Path) -> None:
    from geoseg.engine import describe_scene

    src = write_raster(tmp_path / "nocrs.tif", np.ones((1, 10, 12), np.uint8), crs=None,
                       transform=from_origin(630534.0, 228114.0, 28.5, 28.5))
    assert describe_scene(src)["pixel_size"] == [28.5, 28.5]


def test_mask_is_a_valid_cog_with_palette_names_and_style(tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    cls = class_image(1100, 700, 3, seed=5).astype(np.uint8)
    src = write_raster(tmp_path / "big.tif", cls[None])
    card = identity_card(1, 3, ids=[1, 4, 6], tile=256, overlap=64)
    res = segment_scene(src, tmp_path, source=ModelSource(card), predictor=one_hot_predictor(3))
    valid, errors, _ = cog_validate(str(res.mask), strict=True)
    assert valid, errors
    with rasterio.open(res.mask) as ds:
        assert ds.overviews(1), "internal overviews expected"
        assert ds.compression is not None
        cmap = ds.colormap(1)
        assert cmap[4] == (40, 20, 30, 255)
        assert "GEOSEG_CLASSES" in ds.tags()
        # overviews of a class mask hold only class ids (mode/nearest resampling)
        ov = ds.read(1, out_shape=(1, 275, 175))
        assert set(np.unique(ov)) <= {1, 4, 6}
    aux = Path(str(res.mask) + ".aux.xml").read_text()
    assert "<Category>name 4</Category>" in aux
    qml = res.style.read_text()
    assert qml.count("<paletteEntry") == 3 and 'label="name 6"' in qml and "#3c141e" in qml
    # a scene one pixel wide (or high): no overviews (GDAL made them as wide as the raster, decimation
    # 1, an error to COG validators; it halves both axes or none), so mask, confidence and probabilities
    # are valid COGs
    for shape in ((1, 5000), (5000, 1), (2, 3000)):
        thin = write_raster(tmp_path / f"thin{shape}.tif", np.ones((1, *shape), np.uint8))
        res = segment_scene(thin, tmp_path, source=ModelSource(card), predictor=one_hot_predictor(3),
                            options=PredictOptions(confidence="uint8", probabilities="float32", vector="none"))
        for path in (res.mask, res.confidence, res.probabilities):
            valid, errors, _ = cog_validate(str(path))  # (a warning remains: no overviews for its length)
            assert valid and not errors, (shape, path.name, errors)


def test_no_crs_warns_and_keeps_the_grid(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "nocrs.tif", np.ones((1, 40, 40), np.uint8), crs=None,
                       transform=from_origin(10, 100, 1, 1))
    with pytest.warns(NoCRSWarning, match="no CRS"):
        res = segment_scene(src, tmp_path, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as ds:
        assert ds.crs is None and ds.transform == from_origin(10, 100, 1, 1)


def test_failure_mid_run_leaves_no_output(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "s.tif", class_image(300, 300, 2)[None].astype(np.uint8))
    calls = {"n": 0}

    def flaky(x: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return one_hot_predictor(2)(x)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=flaky,
                      options=PredictOptions(confidence="float32"))
    assert not out.exists()  # the folder it created, empty again, is removed too
    out.mkdir()
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=flaky,
                      options=PredictOptions(confidence="float32"))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("stop_at", ["first window", "publishing"])
def test_a_stopped_scene_publishes_nothing(tmp_path: Path, stop_at: str) -> None:
    """A batch's scene on a Dask worker cannot be interrupted: when its run was stopped it went on and
    published its mask although the run reported it not finished. ``stopped`` ends it unpublished,
    also when the stop comes after the last window, while the COG is converted."""
    from geoseg.errors import RunStoppedError

    src = write_raster(tmp_path / "s.tif", class_image(200, 200, 2, seed=4)[None].astype(np.uint8), crs="EPSG:32633")
    out = tmp_path / "out"
    out.mkdir()
    windows = []
    predict = one_hot_predictor(2)

    def counting(x: np.ndarray) -> np.ndarray:
        windows.append(len(x))
        return predict(x)

    asked = []
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=counting)
    # never stopped: it is asked before each batch, once before the mask lands and once before its
    # polygons, and publishes
    res = segment_scene(src, tmp_path / "ref", **kw, options=PredictOptions(batch_size=1, vector="gpkg"),
                        stopped=lambda: asked.append(1) is None and False)
    assert res.mask.exists() and len(asked) == len(windows) + 2 and len(windows) > 1
    # stopped once the mask has landed: its polygons are not written (a cancelled Dask task wrote them on,
    # beside a rerun already writing the same outputs)
    n, total = len(asked), len(windows)
    asked.clear()
    with pytest.raises(RunStoppedError, match="its polygons were not"):
        segment_scene(src, tmp_path / "late", **kw, options=PredictOptions(batch_size=1, vector="gpkg"),
                      stopped=lambda: asked.append(1) is None and len(asked) == n)
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["s_landcover.qml", "s_landcover.tif",
                                                                     "s_landcover.tif.aux.xml"]
    windows.clear()

    def stopped() -> bool:  # says stop at once, or only once every window has run
        return stop_at == "first window" or len(windows) == total

    with pytest.raises(RunStoppedError, match="stopped"):
        segment_scene(src, out, **kw, options=PredictOptions(batch_size=1, confidence="uint8", vector="gpkg"),
                      stopped=stopped)
    assert list(out.iterdir()) == []  # no mask, confidence, polygons or temp file
    assert len(windows) == (0 if stop_at == "first window" else total)


@pytest.mark.parametrize("device, tile, expected", [("gpu", 256, 8), ("cpu", 256, 1), ("cpu", 128, 4)])
def test_a_ready_made_predictor_gets_the_default_batch_of_its_device(tmp_path: Path, device: str, tile: int,
                                                                    expected: int) -> None:
    """batch's workers hand segment_scene a predictor they built (on the GPU where there is one): its
    default batch was the CPU's (1 window per call at 256 px) instead of the GPU's 8."""
    src = write_raster(tmp_path / "s.tif", class_image(300, 2400, 2, seed=5)[None].astype(np.uint8), crs="EPSG:32633")
    sizes = []
    predict = one_hot_predictor(2)

    def recording(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return predict(x)

    segment_scene(src, tmp_path / device, source=ModelSource(identity_card(1, 2, tile=tile, overlap=32)),
                  predictor=recording, options=PredictOptions(device=device))  # type: ignore[arg-type]
    assert max(sizes) == expected, sizes


def test_an_overwrite_stopped_among_its_outputs_leaves_no_mixed_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite publishes the outputs one by one: a run stopped right after its mask landed left it
    beside the old run's confidence, polygons and .aux.xml (a set that did not belong together). The
    old files it rewrites go just before its mask lands: a stop leaves part of the new set only. The
    old mask stays until the new one replaces it: a batch's mosaic lists it (a stop between the two
    left a mosaic that could not be read)."""
    from geoseg.io import COGWriter

    src = write_raster(tmp_path / "s.tif", class_image(64, 64, 2, seed=3)[None].astype(np.uint8),
                       crs="EPSG:32633")
    out = tmp_path / "out"
    out.mkdir()
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    first = segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg"))
    old = {p.name for p in first.outputs}
    assert {"s_confidence.tif", "s_landcover.gpkg", "s_landcover.tif.aux.xml"} <= old
    mask_mtime = first.mask.stat().st_mtime_ns
    close = COGWriter.close

    def stop_after_the_mask(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.path.name == "s_confidence.tif":
            raise KeyboardInterrupt  # (SIGTERM arrives as one)
        return close(self, *args, **kwargs)

    monkeypatch.setattr(COGWriter, "close", stop_after_the_mask)
    with pytest.raises(KeyboardInterrupt):
        segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg", overwrite=True))
    left = sorted(p.name for p in out.iterdir())
    assert left == ["s_landcover.qml", "s_landcover.tif", "s_landcover.tif.aux.xml"], left  # the new mask alone
    assert first.mask.stat().st_mtime_ns != mask_mtime
    # stopped while its mask's sidecars were written: the old mask is still there to be read
    monkeypatch.setattr(COGWriter, "close", close)
    segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg", overwrite=True))
    mask_mtime = first.mask.stat().st_mtime_ns

    def stop(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr("geoseg.engine.write_qml", stop)
    with pytest.raises(KeyboardInterrupt):
        segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg", overwrite=True))
    assert first.mask.stat().st_mtime_ns == mask_mtime
    with rasterio.open(first.mask) as ds:
        ds.read()
    monkeypatch.undo()
    # stopped before its first output: the old set stays whole
    monkeypatch.setattr(COGWriter, "close", close)
    segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg", overwrite=True))

    def stop_before(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(COGWriter, "close", stop_before)
    with pytest.raises(KeyboardInterrupt):
        segment_scene(src, out, **kw, options=PredictOptions(confidence="uint8", vector="gpkg", overwrite=True))
    assert {p.name for p in out.iterdir()} == old
    # a run that writes fewer outputs replaces the old set too: an old model's confidence and polygons
    # stayed beside a new mask made without them
    monkeypatch.setattr(COGWriter, "close", close)
    (out / "notes.txt").write_text("mine")
    segment_scene(src, out, **kw, options=PredictOptions(vector="none", overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s_landcover.qml", "s_landcover.tif",
                                                     "s_landcover.tif.aux.xml"]


def test_a_full_disk_is_said_in_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL reports a full disk as "Write failed" (or later as a read error of its own unfinished
    file): the error says the disk is full when the output's file system is nearly out of space."""
    import collections
    import errno

    import geoseg.atomic as A
    from geoseg.errors import NoRoomError, OutputError

    src = write_raster(tmp_path / "s.tif", class_image(300, 300, 2)[None].astype(np.uint8))
    usage = collections.namedtuple("usage", "total used free")

    def failing_write(self, *a, **k):  # type: ignore[no-untyped-def]
        raise rasterio.errors.RasterioIOError("Write failed. See previous exception for details.")

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", failing_write)
    out = tmp_path / "out"
    out.mkdir()  # (a folder predict creates is removed again: see test_failure_mid_run_leaves_no_output)
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
              options=PredictOptions(confidence="uint8"))
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(NoRoomError, match=r"cannot write .*s_landcover.tif: no space left on the device: free some "
                                          r"space or choose another --out \(nothing half-written was left\)"):
        segment_scene(src, out, **kw)
    assert list(out.iterdir()) == []
    # plenty of space: the error is GDAL's, still one line, still nothing left, and not a lack of room
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    monkeypatch.setattr(A, "file_size_limit", lambda: None)
    with pytest.raises(OutputError, match=r"cannot write .*s_landcover.tif: Write failed") as info:
        segment_scene(src, out, **kw)
    assert not isinstance(info.value, NoRoomError)
    assert list(out.iterdir()) == []
    # an errno or a message anywhere in the chain says so whatever the free space
    try:
        try:
            raise RuntimeError("_tiffWriteProc: No space left on device.")  # as GDAL words it
        except Exception as inner:
            raise rasterio.errors.RasterioIOError("Write failed.") from inner
    except Exception as exc:
        assert A.disk_full(exc, tmp_path)
    assert A.disk_full(OSError(errno.ENOSPC, "No space left on device")) and not A.disk_full(OSError(errno.EACCES, "x"))
    # on a nearly full disk an error with another errno is that error (a missing folder, a refused write
    # were "no space left on the device"); one without any errno still counts the free space
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert not A.disk_full(FileNotFoundError(errno.ENOENT, "No such file or directory"), tmp_path)
    assert not A.disk_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert A.disk_full(rasterio.errors.RasterioIOError("Write failed."), tmp_path)
    # GDAL's own errors carry GDAL's error class (1, 3) as their errno: no OS errno to believe
    from rasterio._err import CPLE_AppDefinedError

    try:
        try:
            raise CPLE_AppDefinedError(3, 1, "TIFFAppendToStrip:Write error at scanline 0")
        except Exception as inner:
            raise rasterio.errors.RasterioIOError("Write failed. See previous exception for details.") from inner
    except Exception as exc:
        assert A.disk_full(exc, tmp_path)


def test_polygons_that_find_no_room_keep_saying_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under the polygons: predict adds its advice to the error and keeps its class
    (:class:`NoRoomError`, which batch reads to stop a run that would fail every later scene alike;
    the advice once made it a plain OutputError, and only the wording told)."""
    import errno

    import geoseg.vectorize as V
    from geoseg.atomic import write_error
    from geoseg.errors import NoRoomError

    src = write_raster(tmp_path / "s.tif", class_image(64, 64, 2)[None].astype(np.uint8))

    def full(mask, path, **kw):  # type: ignore[no-untyped-def]
        raise write_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(V, "vectorize_mask", full)
    with pytest.raises(NoRoomError, match=r"no space left on the device.*the mask s_landcover.tif is complete"):
        segment_scene(src, tmp_path / "out", source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                      options=PredictOptions(vector="gpkg"))


def _corrupt_tile(path: Path, col: int, row: int) -> Path:
    """Overwrite the compressed bytes of tile (col, row) of band 1 with garbage."""
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x55" * size)
    return path


def test_a_corrupt_block_is_one_line_naming_the_file_and_place(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    """A scene whose header reads but one compressed tile does not: predict stops with a line naming
    the file, where and GDAL's reason (it said "unexpected error: RasterioIOError: Read failed"),
    leaves nothing; the other commands reading rasters say the same through the CLI."""
    from geoseg.errors import SceneReadError
    from geoseg_cli.main import cli

    src = write_raster(tmp_path / "s.tif", class_image(128, 128, 2)[None].astype(np.uint8) * 50 + 10,
                       tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    _corrupt_tile(src, 1, 0)  # the top-right tile: opening the scene decodes the first and the last tile only
    out = tmp_path / "out"
    with pytest.raises(SceneReadError, match=r"input s.tif cannot be read at column \d+, row \d+ \(.*s.tif, band 1: "
                                             r".*\): the file may be corrupt or truncated; check it with gdalinfo"):
        segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    assert not out.exists() or list(out.iterdir()) == []
    good = write_raster(tmp_path / "m.tif", np.ones((128, 128), np.uint8))
    r = runner.invoke(cli, ["evaluate", str(good), "--reference", str(src), "--ignore", "none"])
    assert r.exit_code == 1 and "a raster cannot be read: s.tif, band 1" in r.output and "Traceback" not in r.output, r.output
    assert "unexpected error" not in r.output
    # the last tile: opening the scene finds it, with GDAL's reason rather than "Read failed"
    _corrupt_tile(src, 1, 1)
    with pytest.raises(SceneReadError, match=r"s.tif cannot be read \(.*s.tif, band 1: .*\): the file may be corrupt"):
        segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))


def test_rows_of_nodata_are_nodata_in_every_output(tmp_path: Path) -> None:
    """A scene whose top 200 rows are nodata (whole window rows skipped, their strips written without
    blending): nodata in the mask, the confidence and the probabilities, not counted as a class."""
    data = (class_image(300, 70, 2) + 1)[None].astype(np.uint8)
    data[:, :200] = 0
    src = write_raster(tmp_path / "s.tif", data, nodata=0)
    res = segment_scene(src, tmp_path / "out", source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3),
                        options=PredictOptions(confidence="uint8", probabilities="float32", tile_size=64, overlap=16))
    assert res.windows_skipped == 6  # window rows 0, 48 and 96
    with rasterio.open(res.mask) as m, rasterio.open(res.confidence) as c, \
            rasterio.open(companion_path(res.mask, "probabilities")) as p:
        mask, conf, probs = m.read(1), c.read(1), p.read()
        pixels = json.loads(m.tags()["GEOSEG_CLASS_PIXELS"])
    assert (mask[:200] == MASK_NODATA).all() and (conf[:200] == 255).all() and np.isnan(probs[:, :200]).all()
    np.testing.assert_array_equal(mask[200:], data[0, 200:] + 1)  # class index = value, ids 1..3
    assert (conf[200:] == 100).all() and sum(pixels.values()) == 100 * 70


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    first = segment_scene(src, tmp_path, **kw)
    before = first.mask.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        segment_scene(src, tmp_path, **kw)
    assert first.mask.stat().st_mtime_ns == before
    segment_scene(src, tmp_path, options=PredictOptions(overwrite=True), **kw)


def test_band_checks(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "s.tif", np.ones((4, 20, 20), np.uint8))
    kw = dict(source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with pytest.raises(SceneError, match="gives 4 bands but model 'identity' expects 3"):
        segment_scene(src, tmp_path, **kw)
    with pytest.raises(SceneError, match="has bands 1..4 only"):
        segment_scene(src, tmp_path, options=PredictOptions(bands=(5, 1, 2)), **kw)
    res = segment_scene(src, tmp_path, options=PredictOptions(bands=(4, 3, 2)), **kw)
    assert res.mask.exists()
    # Too few bands: --bands cannot help, so the error does not suggest it.
    few = ModelSource(identity_card(6, 2))
    with pytest.raises(SceneError, match="gives 4 bands but model 'identity' expects 6") as err:
        segment_scene(src, tmp_path, source=few, predictor=one_hot_predictor(2))
    assert "--bands" not in str(err.value) and "model trained on the bands it has" in str(err.value)


def test_bad_tiling_is_refused_before_any_output(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    with pytest.raises(ParameterError, match="overlap 64 must be smaller"):
        segment_scene(src, tmp_path / "o.tif", source=ModelSource(identity_card(1, 2)),
                      predictor=one_hot_predictor(2), options=PredictOptions(tile_size=64, overlap=64))
    assert not (tmp_path / "o.tif").exists()


def test_reader_handles_are_closed_after_a_scene(tmp_path: Path) -> None:
    import geoseg.io

    src = write_raster(tmp_path / "s.tif", class_image(300, 300, 2)[None].astype(np.uint8))
    segment_scene(src, tmp_path, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                  options=PredictOptions(read_workers=2))
    assert not [k for k in geoseg.io._handles if k[2] == str(src)]


def test_one_thread_keeps_a_bounded_number_of_files_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Training from disk on many scenes reads windows of many files from one thread: the least
    # recently used handles close, the reads stay right; a forked worker (another process id)
    # opens its own handle instead of sharing its parent's.
    import os

    from rasterio.windows import Window

    import geoseg.io
    from geoseg.io import _handle, read_window_gaps

    monkeypatch.setattr(geoseg.io, "MAX_THREAD_HANDLES", 4)
    paths = [write_raster(tmp_path / f"s{k}.tif", np.full((1, 8, 8), k + 1, np.uint8)) for k in range(10)]
    for _ in range(2):
        for k, p in enumerate(paths):
            data, _, _ = read_window_gaps(p, Window(0, 0, 4, 4), (1,))
            assert (data == k + 1).all()
    mine = [h for key, h in geoseg.io._handles.items() if key[:2] == (os.getpid(), threading.get_ident())]
    assert len(mine) == 4 and not any(h.closed for h in mine)
    with _handle(paths[-1]) as first, _handle(paths[-1]) as again:
        assert again is first
    monkeypatch.setattr(os, "getpid", lambda: -1)
    with _handle(paths[-1]) as forked:
        assert forked is not first
    for p in paths:
        geoseg.io.close_handles(p)


@pytest.mark.parametrize("bad, words", [
    ({"runtime": "onnx"}, "runtime 'onnx': choose one of 'auto', 'inference', 'dygraph'"),
    ({"blend": "linear"}, "blend 'linear': choose one of 'constant', 'gaussian'"),
    ({"tile_size": 0}, "tile_size 0: give a whole number >= 1"),
    ({"batch_size": 0}, "batch_size 0: give a whole number >= 1"),
    ({"prior_windows": 0}, "prior_windows 0: give a whole number >= 1"),
    ({"bands": "1,2,3"}, "bands '1,2,3': give band numbers from 1"),
    ({"confidence": "bogus"}, "confidence 'bogus': choose one of 'none', 'uint8', 'float32'"),
    ({"probabilities": True}, "probabilities True: choose one of"),
    ({"device": "tpu"}, "device 'tpu': choose one of 'auto', 'cpu', 'gpu'"),
    ({"prior_max_ratio": 0.5}, "prior_max_ratio 0.5: give a number >= 1"),
    # an instance built in code was taken as given: "no" replaced a mask, 32.0 was an IndexError mid-run,
    # "2" a TypeError, a list of --co texts an AttributeError
    ({"overwrite": "no"}, "overwrite='no': give True or False"),
    ({"adapt_prior": "false"}, "adapt_prior='false': give True or False or None"),
    ({"overlap": 32.0}, "overlap=32.0: give a whole number or None"),
    ({"prior_max_ratio": "2"}, "prior_max_ratio '2': give a number >= 1"),
    ({"creation_options": ["COMPRESS=LZW"]}, "creation_options=['COMPRESS=LZW']: give a dict"),
    ({"vector": "gpkg", "min_area": "100"}, "min_area='100': give a number or None"),
])
def test_predict_options_refuse_values_no_run_can_take(bad: dict, words: str) -> None:
    """From Python, runtime="onnx" ran dygraph and reported "cpu/onnx"; tile_size=0 meant the default;
    blend="linear" was a bare ValueError and bands="1,2,3" a TypeError."""
    with pytest.raises(ParameterError) as err:
        PredictOptions(**bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_predict_options_take_plain_values() -> None:
    from geoseg.blending import BlendMode

    o = PredictOptions(blend="constant", bands=[4, 3, 2])  # type: ignore[arg-type]
    assert o.blend is BlendMode.CONSTANT and o.bands == (4, 3, 2)
    o = PredictOptions(aoi=Path("a.gpkg"), vector="gpkg", vector_classes=["forest", 2])  # type: ignore[arg-type]
    assert o.aoi == "a.gpkg" and o.vector_classes == ("forest", 2)
    from geoseg.batch import BatchOptions

    with pytest.raises(ParameterError, match=r"BatchOptions: force='no': give True or False"):
        BatchOptions(force="no")  # type: ignore[arg-type]
    assert BatchOptions(patterns=["*.vrt"]).patterns == ("*.vrt",)  # type: ignore[arg-type]
    # a generator was used up by the first check (bands=(): the card's bands, silently); a set's order
    # changed between processes (the batch parameters too: every scene reran); a Fraction or numpy's
    # float32 reached JSON as such (batch's parameters failed to serialise)
    from fractions import Fraction

    o = PredictOptions(bands=(b for b in (4, 3, 2)), vector="gpkg", vector_classes={"water", "forest", "crop"},  # type: ignore[arg-type]
                       min_area=Fraction(1, 2), simplify=np.float32(0.5), tile_size=np.int64(256))  # type: ignore[arg-type]
    assert o.bands == (4, 3, 2) and o.vector_classes == ("crop", "forest", "water")
    assert (o.min_area, o.simplify, o.tile_size) == (0.5, 0.5, 256) and type(o.min_area) is float
    assert type(o.simplify) is float and type(o.tile_size) is int


def test_a_ready_predictor_reports_where_it_runs(tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """A predictor of build_predictor handed to segment_scene (batch's workers, API users reusing one)
    was reported as "custom": device, runtime and precision were lost."""
    from geoseg.engine import build_predictor, resolve_model

    source = resolve_model(None, tiny_unet[0])
    predictor, desc = build_predictor(source, "cpu")
    src = write_raster(tmp_path / "s.tif", np.ones((3, 40, 40), np.uint8))
    res = segment_scene(src, tmp_path / "o", source=source, predictor=predictor)
    assert res.device == desc == "cpu/inference/fp32"


def test_a_ready_predictor_needs_its_source(tmp_path: Path) -> None:
    """segment_scene(predictor=p) ran p under the default model's card (classes, normalisation, windows
    and the mask's GEOSEG_MODEL tag all wrong); source= with model= ignored model=."""
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    with pytest.raises(ParameterError, match="a ready predictor needs source="):
        segment_scene(src, tmp_path / "o", predictor=one_hot_predictor(2))
    with pytest.raises(ParameterError, match="give source= or model=/weights=/card=, not both"):
        segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 2)), model="unet",
                      predictor=one_hot_predictor(2))
    assert not (tmp_path / "o").exists()


def test_a_handle_in_use_is_not_closed_under_its_reader(tmp_path: Path) -> None:
    """Two threads segmenting one scene: the first to finish closed every thread's handle of the file,
    also one the other was reading through (segfaults, "Dataset is closed" as a corrupt file, hangs)."""
    import geoseg.io
    from geoseg.io import _handle

    src = write_raster(tmp_path / "s.tif", np.ones((1, 8, 8), np.uint8))
    with _handle(src) as ds:
        geoseg.io.close_handles(src)  # (the other run finishing)
        assert not ds.closed and ds.read(1).sum() == 64
    geoseg.io.close_handles(src)
    assert ds.closed and not [k for k in geoseg.io._handles if k[2] == str(src)]


def test_two_threads_segment_one_scene_at_once(tmp_path: Path) -> None:
    """Each with its own predictor and output folder: the masks equal a run alone."""
    src = write_raster(tmp_path / "s.tif", class_image(400, 400, 2, seed=6)[None].astype(np.uint8))
    alone = segment_scene(src, tmp_path / "alone", source=ModelSource(identity_card(1, 2)),
                          predictor=one_hot_predictor(2))
    with rasterio.open(alone.mask) as ds:
        want = ds.read(1)
    errors: list[BaseException] = []

    def slow(x: np.ndarray) -> np.ndarray:  # (a model takes its time: the other run's reads go on meanwhile)
        time.sleep(0.002)
        return one_hot_predictor(2)(x)

    def run(k: int) -> None:
        try:
            for i in range(4):
                res = segment_scene(src, tmp_path / f"t{k}_{i}", source=ModelSource(identity_card(1, 2, tile=32,
                                    overlap=8)) if k else ModelSource(identity_card(1, 2)),
                                    predictor=slow, options=PredictOptions(read_workers=2, batch_size=1))
                with rasterio.open(res.mask) as ds:
                    assert k or (ds.read(1) == want).all()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors


def test_weights_digest_follows_the_weights(tmp_path: Path) -> None:
    from geoseg.engine import weights_digest

    d = tmp_path / "exported"
    d.mkdir()
    (d / "model.json").write_text("{}")
    (d / "model.pdiparams").write_bytes(b"one")
    card = identity_card(1, 2)
    first = weights_digest(ModelSource(card, export_dir=d))
    (d / "model.pdiparams").write_bytes(b"two")
    assert weights_digest(ModelSource(card, export_dir=d)) != first
    w = tmp_path / "w.pdparams"
    w.write_bytes(b"two")
    assert weights_digest(ModelSource(card, weights=w)) == weights_digest(ModelSource(card, export_dir=d))


@pytest.mark.parametrize(("dtype", "nodata"), [("uint8", 0), ("float32", float("nan"))])
def test_a_band_without_data_is_filled_with_its_mean_not_its_nodata_value(
        tmp_path: Path, dtype: str, nodata: float) -> None:
    # Landsat-7's SWIR2 has a wider nodata frame than its other bands: there the pixel still
    # has data (it gets a class), but the missing band must reach the model as its mean
    # (normalised 0), not as the nodata value read as the darkest possible measurement.
    h, w = 60, 90
    data = np.zeros((2, h, w), dtype)
    data[0] = 3
    data[1] = 6
    data[1, :, 60:] = nodata  # band 2 has no data in the right third; band 1 has data everywhere
    data[:, :10, :10] = nodata  # and a corner without any data
    src = write_raster(tmp_path / "gaps.tif", data, nodata=nodata)
    card = identity_card(2, 4).replace(
        normalization=Normalization(mean=(0.0, 5.0), std=(1.0, 1.0), scale={"default": 1.0}))

    def by_band2(x: np.ndarray) -> np.ndarray:  # class index = normalised band 2 + 2
        cls = np.clip(np.rint(x[:, 1]) + 2, 0, 3).astype(int)
        return (np.arange(4)[None, :, None, None] == cls[:, None]).astype(np.float32)

    res = segment_scene(src, tmp_path / "out", source=ModelSource(card), predictor=by_band2)
    with rasterio.open(res.mask) as ds:
        mask = ds.read(1)
    assert (mask[10:, :60] == 4).all()  # band 2 = 6 -> normalised 1 -> index 3 -> id 4
    assert (mask[:, 60:] == 3).all()  # band 2 missing -> normalised 0 -> index 2 -> id 3 (not 0 - 5 -> id 1)
    assert (mask[:10, :10] == 255).all()


def test_a_gap_channels_model_gets_nan_where_a_band_has_no_data(tmp_path: Path) -> None:
    # A card whose model reads gaps itself (params.gap_channels) gets NaN exactly where a band
    # lacks data (a per-band frame, and every band of a pixel without any data), the normalised
    # values everywhere else.
    h, w = 60, 90
    data = np.zeros((2, h, w), np.uint8)
    data[0] = 3
    data[1] = 6
    data[1, :, 60:] = 0  # band 2's frame
    data[:, :10, :10] = 0  # no data at all
    src = write_raster(tmp_path / "gaps.tif", data, nodata=0)
    card = identity_card(2, 4).replace(
        params={"gap_channels": True},
        normalization=Normalization(mean=(0.0, 5.0), std=(1.0, 1.0), scale={"default": 1.0}))
    assert np.isnan(card.gap_fill) and identity_card(2, 4).gap_fill == 0.0
    seen: list[np.ndarray] = []

    def by_gap(x: np.ndarray) -> np.ndarray:  # index 3 where band 2 is NaN, else normalised band 2 + 2
        seen.append(x.copy())
        cls = np.where(np.isnan(x[:, 1]), 3, np.clip(np.rint(np.nan_to_num(x[:, 1])) + 2, 0, 3)).astype(int)
        return (np.arange(4)[None, :, None, None] == cls[:, None]).astype(np.float32)

    res = segment_scene(src, tmp_path / "out", source=ModelSource(card), predictor=by_gap)
    with rasterio.open(res.mask) as ds:
        mask = ds.read(1)
    assert (mask[10:, :60] == 4).all()  # band 2 = 6 -> normalised 1 -> index 3 -> id 4 ... as its data says
    assert (mask[:, 60:] == 4).all()  # NaN -> index 3 -> id 4 (a 0-filled gap would read index 2 -> id 3)
    assert (mask[:10, :10] == 255).all()
    x = np.concatenate(seen)
    assert np.isnan(x[:, 1]).any() and not np.isnan(x[:, 0]).all()
    assert set(np.unique(x[:, 0][~np.isnan(x[:, 0])])) == {3.0}  # band 1's data untouched


def test_read_window_gaps_per_band(tmp_path: Path) -> None:
    from rasterio.windows import Window

    from geoseg.io import read_window_gaps

    data = np.ones((3, 20, 30), np.uint16)
    data[2, :, :5] = 0
    src = write_raster(tmp_path / "a.tif", data, nodata=0)
    d, valid, missing = read_window_gaps(src, Window(0, 0, 30, 20), (1, 2, 3))
    assert valid.all() and missing is not None
    assert missing[2, :, :5].all() and missing.sum() == 20 * 5
    d, valid, missing = read_window_gaps(src, Window(10, 0, 20, 20), (1, 3))
    assert valid.all() and missing is None  # no gap in this window
    full = write_raster(tmp_path / "b.tif", np.ones((2, 8, 8), np.uint8))
    assert read_window_gaps(full, Window(0, 0, 8, 8), (1, 2))[2] is None



def test_a_nodata_value_counts_beside_a_mask_band(tmp_path: Path) -> None:
    """A scene with a nodata value and an internal mask (gdalwarp -dstnodata under GDAL_TIFF_INTERNAL_MASK,
    a .msk file): GDAL's mask is the mask band alone then, and a collar of nodata values got classes in
    predict (shifting its neighbours' classes) and counted in train's band statistics."""
    from rasterio.windows import Window

    from geoseg.io import read_window_gaps

    data = np.full((3, 20, 30), 40, np.uint16)
    data[:, :, :4] = 0  # the collar: every band's nodata value
    data[1, 10:, 20:] = 0  # one band's gap
    hidden = np.zeros((20, 30), bool)
    hidden[:3, 10:] = True  # what the mask band hides
    src = write_raster(tmp_path / "nm.tif", data, nodata=0, masks=~hidden)
    with rasterio.open(src) as ds:
        assert ds.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
    _, valid, missing = read_window_gaps(src, Window(0, 0, 30, 20), (1, 2, 3))
    np.testing.assert_array_equal(valid, ~hidden & (data != 0).any(axis=0))
    assert missing is not None and missing[1, 10:, 20:].all() and not missing[0, 10:, 20:].any()
    card = identity_card(3, 2)
    res = segment_scene(src, tmp_path / "o", source=ModelSource(card), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as ds:
        np.testing.assert_array_equal(ds.read(1) == 255, ~valid)
    from geoseg.engine import describe_scene

    assert describe_scene(src)["nodata"] == "value 0.0, internal mask"


def test_a_band_gap_counts_beside_an_alpha_band(tmp_path: Path) -> None:
    """gdalwarp -dstalpha writes an alpha band beside the bands' nodata value: the alpha band alone
    was read, so a gap of one band (its nodata value) reached the model as a measurement."""
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window

    from geoseg.io import open_scene, read_window_gaps

    data = np.full((3, 10, 12), 40, np.uint8)
    data[2, 4:7] = 0  # band 3's gap: its nodata value
    alpha = np.full((10, 12), 255, np.uint8)
    alpha[:, :2] = 0  # outside the footprint
    path = tmp_path / "alpha.tif"
    with rasterio.open(path, "w", driver="GTiff", width=12, height=10, count=4, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 4800000, 10, 10)) as ds:
        ds.write(data, [1, 2, 3])
        ds.write(alpha, 4)
        ds.colorinterp = [ColorInterp.gray] * 3 + [ColorInterp.alpha]
    meta = open_scene(path)
    assert meta.alpha_band == 4
    _, valid, missing = read_window_gaps(path, Window(0, 0, 12, 10), (1, 2, 3), meta.alpha_band)
    assert not valid[:, :2].any() and valid[:, 2:].all()
    assert missing is not None and missing[2, 4:7, 2:].all() and not missing[:2, :, 2:].any()
    assert missing[:, :, :2].all() and missing.sum() == 3 * 10 * 2 + 3 * 10


def test_each_band_has_its_own_nodata_value(tmp_path: Path) -> None:
    """A VRT stacking single-band files gives each band its own nodata value; band 1's is not
    every band's."""
    from rasterio.windows import Window

    from geoseg.engine import describe_scene
    from geoseg.io import read_window_gaps

    bands = []
    for k in range(3):
        band = np.full((1, 12, 16), 50 + k, np.uint8)
        band[0, :, :4] = 200 + k  # every band's nodata: the left 4 columns have no data at all
        if k == 2:
            band[0, :6, 4:] = 202  # band 3 alone misses the top 6 rows
        f = write_raster(tmp_path / f"b{k}.tif", band)
        bands.append(f'<VRTRasterBand dataType="Byte" band="{k + 1}"><NoDataValue>{200 + k}</NoDataValue>'
                     f'<SimpleSource><SourceFilename relativeToVRT="1">{f.name}</SourceFilename>'
                     '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>')
    with rasterio.open(tmp_path / "b0.tif") as ds:
        t, crs = ds.transform, ds.crs.to_wkt()
    vrt = tmp_path / "stack.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="16" rasterYSize="12"><SRS>{crs}</SRS>'
                   f'<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>{"".join(bands)}</VRTDataset>')
    data, valid, missing = read_window_gaps(vrt, Window(0, 0, 16, 12), (1, 2, 3))
    assert not valid[:, :4].any() and valid[:, 4:].all()
    assert missing is not None and missing[2, :6, 4:].all() and not missing[:2, :, 4:].any()
    assert missing.sum() == 3 * 12 * 4 + 6 * 12
    meta = open_scene(vrt)
    assert meta.nodatavals == (200.0, 201.0, 202.0) and meta.has_nodata
    assert describe_scene(vrt)["nodata"] == "values 200.0, 201.0, 202.0"
@pytest.mark.filterwarnings("ignore::geoseg.errors.InputRangeWarning")  # raw class indexes, not image data
def test_bands_are_picked_by_name_when_the_scene_has_more(tmp_path: Path) -> None:
    data = np.stack([np.full((20, 20), v, np.uint8) for v in (9, 1, 7, 8)])  # b2 holds class index 1
    src = write_raster(tmp_path / "named.tif", data)
    with rasterio.open(src, "r+") as ds:
        for i, name in enumerate(("b1", "b0", "extra", "b2"), start=1):
            ds.set_band_description(i, name)
    res = segment_scene(src, tmp_path, source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as ds:
        assert (ds.read(1) == 2).all()  # card band b0 = scene band 2 (value 1) -> index 1 -> id 2
    with rasterio.open(src, "r+") as ds:
        ds.set_band_description(4, "b0")  # a name twice: no guessing
    with pytest.raises(SceneError, match="gives 4 bands but model 'identity' expects 3"):
        segment_scene(src, tmp_path / "o2", source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))


@pytest.mark.filterwarnings("ignore::geoseg.errors.InputRangeWarning")  # raw class indexes, not image data
def test_bands_of_the_model_in_another_order_are_picked_by_name(tmp_path: Path) -> None:
    """As many bands as the card's, described with its names in another order: read by name, not
    as they lie (a reversed band stack was read as is, without a word)."""
    data = np.stack([np.full((20, 20), v, np.uint8) for v in (9, 1, 7)])  # b0 holds class index 1
    src = write_raster(tmp_path / "named.tif", data)
    with rasterio.open(src, "r+") as ds:
        for i, name in enumerate(("b2", "b0", "b1"), start=1):
            ds.set_band_description(i, name)
    res = segment_scene(src, tmp_path / "o1", source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with rasterio.open(res.mask) as ds:
        assert (ds.read(1) == 2).all()  # card band b0 = scene band 2 (value 1) -> index 1 -> id 2
    with rasterio.open(src, "r+") as ds:
        ds.set_band_description(3, "other")  # b1 missing: read as they lie, with a warning
    with pytest.warns(InputRangeWarning, match="band 1 is described 'b2' but feeds the model as 'b0'; "
                                               "band 2 is described 'b0' but feeds the model as 'b1'"):
        segment_scene(src, tmp_path / "o2", source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))


def _described(path: Path, values: tuple[int, ...], names: tuple[str, ...]) -> Path:
    """A 20x20 scene of one value per band, its bands described by ``names``."""
    src = write_raster(path, np.stack([np.full((20, 20), v, np.uint8) for v in values]))
    with rasterio.open(src, "r+") as ds:
        for i, name in enumerate(names, start=1):
            ds.set_band_description(i, name)
    return src


def _mask_values(src: Path, out: Path, bands: tuple[str, ...], **kw: object) -> set[int]:
    """The classes an identity model of 2 classes whose card names ``bands`` maps ``src`` to."""
    card = dataclasses.replace(identity_card(len(bands), 2), bands=bands)
    res = segment_scene(src, out, source=ModelSource(card), predictor=one_hot_predictor(2), **kw)
    with rasterio.open(res.mask) as ds:
        return set(np.unique(ds.read(1)).tolist())


@pytest.mark.filterwarnings("ignore::geoseg.errors.InputRangeWarning")  # raw class indexes, not image data
def test_band_names_are_matched_without_case_or_spaces(tmp_path: Path) -> None:
    """A scene of the card's band names in lower case, in another order, was read as it lies, without a word
    (a wrong map: the range check cannot tell Landsat bands apart)."""
    src = _described(tmp_path / "named.tif", (9, 1, 7), ("b2_swir", " B0_BLUE ", "b1_green"))  # B0 holds index 1
    bands = ("B0_blue", "B1_green", "B2_swir")
    assert _mask_values(src, tmp_path / "o1", bands) == {2}  # card band B0_blue = scene band 2 (index 1 -> id 2)
    with pytest.warns(InputRangeWarning, match="band 1 is described 'b2_swir' but feeds the model as 'B0_blue'"):
        _mask_values(src, tmp_path / "o2", bands, options=PredictOptions(bands=(1, 2, 3)))


@pytest.mark.filterwarnings("ignore::geoseg.errors.InputRangeWarning")  # raw class indexes, not image data
def test_a_scene_s_landsat_band_names_are_not_train_s_band_positions(tmp_path: Path) -> None:
    """geoseg train names undescribed bands b<k> after their positions: matched without case, a scene's
    Landsat names B3, B2, B1 picked its bands 3, 2, 1 for the card's b1, b2, b3 (blue read as red)."""
    src = _described(tmp_path / "landsat.tif", (1, 0, 0), ("B3", "B2", "B1"))  # only band 1 holds class index 1
    assert _mask_values(src, tmp_path / "o1", ("b1", "b2", "b3")) == {2}  # read as they lie: band 1 -> id 2
    # a card of the sensor's own names still matches them without case (B2 is b2)
    src = _described(tmp_path / "lower.tif", (1, 0, 0), ("b3", "b2", "b1"))
    assert _mask_values(src, tmp_path / "o2", ("B1", "B2", "B3")) == {1}  # card B1 = scene band 3 (index 0 -> id 1)


@pytest.mark.filterwarnings("ignore::geoseg.errors.InputRangeWarning")  # raw class indexes, not image data
def test_a_card_of_geoseg_s_band_numbers_reads_those_bands(tmp_path: Path) -> None:
    """geoseg train names the undescribed bands of its scene b<k>: a model trained with bands
    [3, 2, 1] (card b3, b2, b1) was fed the scene's bands 1, 2, 3, its training scene too, without a word."""
    data = np.stack([np.full((20, 20), v, np.uint8) for v in (0, 0, 1)])  # only band 3 holds class index 1

    def classes(src: Path, card: ModelCard, out: str) -> set[int]:
        res = segment_scene(src, tmp_path / out, source=ModelSource(card), predictor=one_hot_predictor(2))
        with rasterio.open(res.mask) as ds:
            return set(np.unique(ds.read(1)).tolist())

    src = write_raster(tmp_path / "plain.tif", data)
    card = dataclasses.replace(identity_card(3, 2), bands=("b3", "b2", "b1"))
    assert classes(src, card, "o1") == {2}  # card band b3 first = scene band 3 (value 1) -> index 1 -> id 2
    assert classes(src, identity_card(3, 2), "o2") == {1}  # b0, b1, b2: no band numbers, read as they lie
    # more bands than the card's (another sensor's?): refused as before, the error giving the numbers
    with pytest.raises(SceneError, match="gives 4 bands .*: pass --bands 3,2,1 to read the bands b3, b2, b1"):
        classes(write_raster(tmp_path / "four.tif", np.concatenate([data, data[:1]])), card, "o3")
    # a number that is no band of the scene: read as they lie
    assert classes(src, dataclasses.replace(card, bands=("b3", "b2", "b7")), "o4") == {1}
    # the scene describes a band as another of the card's: its descriptions decide, not the numbers
    with rasterio.open(src, "r+") as ds:
        ds.set_band_description(3, "b1")
    assert classes(src, card, "o5") == {1}


def test_bands_given_against_their_descriptions_are_warned_about(tmp_path: Path) -> None:
    """--bands in an order the scene's band descriptions contradict: the same warning as without
    --bands (the check ran only then), with the --bands that reads them by name."""
    data = np.stack([np.full((20, 20), v, np.uint8) for v in (9, 1, 7)])
    src = write_raster(tmp_path / "named.tif", data)
    with rasterio.open(src, "r+") as ds:
        for i, name in enumerate(("b2", "b0", "b1"), start=1):
            ds.set_band_description(i, name)
    kw = dict(source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2))
    with pytest.warns(InputRangeWarning, match=r"band 1 is described 'b2' but feeds the model as 'b0'.*: "
                                               r"--bands 2,3,1 reads them by their names$"):
        segment_scene(src, tmp_path / "o1", **kw, options=PredictOptions(bands=(1, 2, 3)))
    with warnings.catch_warnings():  # by name: not a word
        warnings.simplefilter("error", InputRangeWarning)
        warnings.filterwarnings("ignore", "all 3 bands", InputRangeWarning)  # (raw class indexes, not image data)
        warnings.filterwarnings("ignore", ".*standard deviations", InputRangeWarning)
        segment_scene(src, tmp_path / "o2", **kw, options=PredictOptions(bands=(2, 3, 1)))
    with rasterio.open(src, "r+") as ds:
        ds.set_band_description(3, "other")
    with pytest.warns(InputRangeWarning, match=r"band 1 is described 'b2' but feeds the model as 'b0'.*: "
                                               r"check --bands \(the model's bands, in order: b0, b1, b2\)$"):
        segment_scene(src, tmp_path / "o3", **kw, options=PredictOptions(bands=(1, 2, 3)))



def test_normalisation_fills_missing_values_with_the_band_mean() -> None:
    norm = Normalization(mean=(0.2, 0.4), std=(0.1, 0.2), scale={"default": 1.0})
    x = np.array([[[1.0, 9.0, 65535.0]], [[1.0, 1.0, 65535.0]]], np.float32)
    missing = np.array([[[False, True, True]], [[False, False, True]]])
    out = norm.apply(x, "float32", missing)
    np.testing.assert_allclose(out[:, 0, 0], [8.0, 3.0])  # data
    np.testing.assert_allclose(out[:, 0, 1], [0.0, 3.0])  # band 1 missing: its mean
    np.testing.assert_allclose(out[:, 0, 2], [0.0, 0.0])  # no data at all: the means, not 65535
    batch = norm.apply(np.stack([x, x]), "float32", np.stack([missing, missing]))
    np.testing.assert_allclose(batch[1], out)
    # float32's lowest value as the nodata fill (a common GIS default) overflows when scaled: no
    # numpy warning reaches the user ("warning: overflow encountered in multiply", twice a run)
    x[:, 0, 2] = np.finfo(np.float32).min
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(norm.apply(x, "float32", missing), out)


def test_tta_maps_every_view_back() -> None:
    from geoseg.engine import dihedral_average

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)

    def pointwise(v: np.ndarray) -> np.ndarray:  # equivariant: TTA must give exactly the same
        p1 = 1.0 / (1.0 + np.exp(-v[:, :1]))
        return np.concatenate([1.0 - p1, p1], axis=1)

    np.testing.assert_allclose(dihedral_average(pointwise)(x), pointwise(x), atol=1e-6)

    calls = []
    pattern = rng.random((16, 16)).astype(np.float32)

    def fixed(v: np.ndarray) -> np.ndarray:  # ignores its input: TTA averages the pattern's 8 views
        calls.append(v.shape)
        return np.broadcast_to(np.stack([pattern, 1 - pattern]), (v.shape[0], 2, 16, 16)).copy()

    views = [np.rot90(pattern, k) for k in range(4)] + [np.rot90(pattern[:, ::-1], k) for k in range(4)]
    out = dihedral_average(fixed)(x)
    assert len(calls) == 8
    np.testing.assert_allclose(out[1, 0], np.mean(views, axis=0), atol=1e-6)
    rect = rng.normal(size=(1, 3, 8, 12)).astype(np.float32)  # not square: flips only
    np.testing.assert_allclose(dihedral_average(pointwise)(rect), pointwise(rect), atol=1e-6)


def test_predict_with_tta_keeps_an_equivariant_model_s_mask(tmp_path: Path) -> None:
    cls = class_image(90, 130, 3, seed=5).astype(np.uint8)
    src = write_raster(tmp_path / "scene.tif", cls[None] + 1)
    kw = dict(source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3, offset=1))
    plain = segment_scene(src, tmp_path / "a", **kw)
    tta = segment_scene(src, tmp_path / "b", options=PredictOptions(tta=True), **kw)
    with rasterio.open(plain.mask) as a, rasterio.open(tta.mask) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert tta.device.endswith("+tta")


def test_scenes_at_another_resolution_than_the_model_s_warn(tmp_path: Path) -> None:
    """A model learns object sizes in pixels: a scene whose pixels are more than 1.5 times larger or smaller
    on the ground than its training pixels (the card's pixel_size, in metres) is warned about, in any CRS."""
    from dataclasses import replace

    from geoseg.card import ModelCard
    from geoseg.errors import ResolutionWarning
    from geoseg.io import ground_pixel_size_m

    card = replace(identity_card(1, 2), pixel_size=28.5)
    assert ModelCard.from_dict(card.to_dict()) == card
    with pytest.raises(Exception, match="pixel_size"):
        replace(card, pixel_size=-1.0)
    data = np.ones((1, 64, 64), np.uint8)
    kw = dict(source=ModelSource(card), predictor=one_hot_predictor(2))
    cases = {  # pixel size in metres → warned?
        "s2.tif": (from_origin(500000, 4800000, 10, 10), "EPSG:32633", True),  # 10 m: 2.9 times as many pixels
        "l8.tif": (from_origin(500000, 4800000, 30, 30), "EPSG:32633", False),
        "ft.tif": (from_origin(2000000, 700000, 100, 100), "EPSG:2264", False),  # 100 US ft = 30.5 m
        "modis.tif": (from_origin(500000, 4800000, 250, 250), "EPSG:32633", True),
        "deg.tif": (from_origin(10.0, 46.0, 0.0003, 0.0003), "EPSG:4326", False),  # about 23 x 33 m at 46 °N
    }
    for name, (tr, crs, warned) in cases.items():
        src = write_raster(tmp_path / name, data, transform=tr, crs=crs)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            res = segment_scene(src, tmp_path / "out", **kw)
        hits = [str(w.message) for w in seen if issubclass(w.category, ResolutionWarning)]
        assert len(hits) == int(warned) and res.mask.exists(), (name, hits)
        if name == "s2.tif":
            assert "its pixels are 10 m on the ground" in hits[0] and "learned from 28.5 m" in hits[0]
            assert "2.9 times as many pixels as in its training data" in hits[0] and "resample the scene to about 28.5 m" in hits[0]
        if name == "modis.tif":
            assert "8.8 times fewer pixels than in its training data" in hits[0]
    assert ground_pixel_size_m(open_scene(tmp_path / "ft.tif").crs, from_origin(0, 0, 100, 100), 1) == pytest.approx(30.48, abs=0.01)
    # no CRS, or a card without pixel_size: nothing to compare
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        segment_scene(write_raster(tmp_path / "nocrs.tif", data, crs=None), tmp_path / "out", **kw)
        segment_scene(tmp_path / "s2.tif", tmp_path / "out", source=ModelSource(identity_card(1, 2)),
                      predictor=one_hot_predictor(2), options=PredictOptions(overwrite=True))
    assert not [w for w in seen if issubclass(w.category, ResolutionWarning)]


def test_values_far_from_the_training_data_warn_once_and_the_map_is_still_written(tmp_path: Path) -> None:
    """A scene on another scale (e.g. 16-bit numbers for a model trained on reflectance) gets a
    warning naming the band; data on the training scale does not, and nodata never counts."""
    card = identity_card(2, 2)  # normalised value = raw value: mean 0, std 1
    rng = np.random.default_rng(0)
    ok = rng.normal(0, 1, (2, 300, 200)).astype(np.float32)
    far = ok.copy()
    far[1] += 3 * INPUT_RANGE_Z  # band 2 only
    kw = dict(source=ModelSource(card), predictor=one_hot_predictor(2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        segment_scene(write_raster(tmp_path / "ok.tif", ok), tmp_path, **kw)
    assert not [w for w in seen if issubclass(w.category, InputRangeWarning)]
    with pytest.warns(InputRangeWarning, match=rf"band 2 averages \+({3 * INPUT_RANGE_Z - 1:.0f}|{3 * INPUT_RANGE_Z:.0f}) "
                                               r"standard deviations.*as b1") as rec:
        res = segment_scene(write_raster(tmp_path / "far.tif", far), tmp_path, **kw)
    assert len([w for w in rec if issubclass(w.category, InputRangeWarning)]) == 1 and res.mask.exists()
    assert not [w for w in rec if issubclass(w.category, InputRangeWarning) and "tags" in str(w.message)]
    # values stored x10 (+50) with a 0.1 scale tag: geoseg feeds what is stored, and the warning names the tag
    with rasterio.open(write_raster(tmp_path / "scaled.tif", (ok * 10 + 50).astype(np.float32)), "r+") as ds:
        ds.scales = (0.1, 0.1)
    with pytest.warns(InputRangeWarning, match=r"all 2 bands .* average .*band 1 carries scale 0.1 and offset 0 tags, which "
                                               r"geoseg does not apply: the model gets the stored float32 values x 1,"):
        check_input_range(open_scene(tmp_path / "scaled.tif"), (1, 2), card)
    with pytest.warns(InputRangeWarning):
        means = check_input_range(open_scene(tmp_path / "far.tif"), (1, 2), card)
    # every band far off: all are named, and the cause is scaling, not the band order (one band
    # was named, the one farthest off, which read as a band-order problem)
    both = ok + np.array([2 * INPUT_RANGE_Z, 4 * INPUT_RANGE_Z], np.float32)[:, None, None]
    with pytest.warns(InputRangeWarning, match=r"all 2 bands \(1 as b0, 2 as b1\) average \+\d+ to \+\d+ standard "
                                               r"deviations .*\(units or scaling\?\)") as rec:
        check_input_range(open_scene(write_raster(tmp_path / "both.tif", both)), (1, 2), card)
    assert len([w for w in rec if issubclass(w.category, InputRangeWarning)]) == 1
    assert means is not None and abs(means["b0"]) < 0.5 and 3 * INPUT_RANGE_Z - 0.5 < means["b1"] < 3 * INPUT_RANGE_Z + 0.5

    # Nodata pixels (here a huge fill value over two thirds of the scene) are not measurements.
    nod = ok.copy()
    nod[:, :200] = 30000
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        segment_scene(write_raster(tmp_path / "nod.tif", nod, nodata=30000), tmp_path, **kw)
    assert not [w for w in seen if issubclass(w.category, InputRangeWarning)]
    # A scene without any valid pixel in the sampled windows: nothing to judge, no warning.
    empty = np.full((2, 40, 40), 30000, np.float32)
    assert check_input_range(open_scene(write_raster(tmp_path / "e.tif", empty, nodata=30000)), (1, 2), card) is None


def _recording(inner):  # type: ignore[no-untyped-def]
    """``inner`` that also records the shape of every batch it is given (in ``.shapes``)."""

    def predict(x: np.ndarray) -> np.ndarray:
        predict.shapes.append(x.shape)  # type: ignore[attr-defined]
        return inner(x)

    predict.shapes = []  # type: ignore[attr-defined]
    return predict


def test_progress_to_a_log_file_is_a_line_now_and_then(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Where stderr is not a terminal (cron, a batch queue) the tqdm bar printed nothing until the run
    ended: progress="log" says how far the run is and how long it may take, every PROGRESS_LOG_S."""
    import dataclasses
    import logging

    import geoseg.engine as engine

    src = write_raster(tmp_path / "s.tif", class_image(96, 96, 3, seed=1).astype(np.uint8) + 1, nodata=0)
    opts = PredictOptions(tile_size=32, overlap=0, batch_size=1, vector="none", progress="log")
    monkeypatch.setattr(engine, "PROGRESS_LOG_S", 0.0)
    with caplog.at_level(logging.INFO, logger="geoseg"):
        segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3, 1),
                      options=opts)
    lines = [r.getMessage() for r in caplog.records if "windows (" in r.getMessage() and "left" in r.getMessage()]
    assert lines[0].startswith("s.tif: 1 of 9 windows (11%) in ") and lines[-1].startswith("s.tif: 8 of 9 windows (88%)")
    assert len(lines) == 8  # not for the last window (the run's own closing line follows)
    caplog.clear()
    monkeypatch.setattr(engine, "PROGRESS_LOG_S", 3600.0)  # a run shorter than the interval: no line
    with caplog.at_level(logging.INFO, logger="geoseg"):
        segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3, 1),
                      options=dataclasses.replace(opts, overwrite=True))
    assert not [r for r in caplog.records if "left" in r.getMessage()]


def test_a_strip_is_padded_only_along_its_short_axis(tmp_path: Path) -> None:
    """A 600 x 3,000 strip in 4,096-px windows ran 3,008² model inputs (10 GB, 5x the pixels): an
    axis shorter than the window pads only to its own length (not below the card's window), also
    where the long axis needs several windows; the mask is what full padding gives (the blending
    weights along a one-window axis cancel)."""
    from geoseg.engine import describe_scene

    cls = class_image(40, 300, 3, seed=2).astype(np.uint8)
    src = write_raster(tmp_path / "strip.tif", cls + 1, nodata=0)
    card = identity_card(1, 3)  # 64-px window
    masks = {}
    for tile, overlap, shapes in ((4096, 0, [(1, 1, 64, 304)]), (128, 32, [(1, 1, 64, 128)] * 3),
                                  (256, 64, [(1, 1, 64, 256)] * 2)):
        predictor = _recording(one_hot_predictor(3, offset=1))
        res = segment_scene(src, tmp_path / f"o{tile}", source=ModelSource(card), predictor=predictor,
                            options=PredictOptions(tile_size=tile, overlap=overlap, vector="none", batch_size=1))
        assert predictor.shapes == shapes, tile
        with rasterio.open(res.mask) as ds:
            masks[tile] = ds.read(1)
        assert describe_scene(src, tile, overlap, source=ModelSource(card))["model_input"] == list(shapes[0][2:])
    for m in masks.values():
        np.testing.assert_array_equal(m, cls + 1)
    # a raster longer than the window along both axes: full windows, as before
    square = write_raster(tmp_path / "sq.tif", class_image(300, 300, 3, seed=3).astype(np.uint8) + 1, nodata=0)
    predictor = _recording(one_hot_predictor(3, offset=1))
    segment_scene(square, tmp_path / "sq", source=ModelSource(card), predictor=predictor,
                  options=PredictOptions(tile_size=128, overlap=32, vector="none"))
    assert {x[2:] for x in predictor.shapes} == {(128, 128)}


def test_a_window_larger_than_the_scene_runs_one_window_of_the_scene_s_size(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An 8,000-px window on a 489 x 443 scene ran out of 23 GB padding it: a window larger than the
    whole scene shrinks to the scene's longer side (a multiple of 16) and writes what that size writes;
    a scene smaller than the model's own window keeps the window it gets by default."""
    import logging

    from geoseg.engine import describe_scene

    cls = class_image(50, 70, 3, seed=1).astype(np.uint8)
    src = write_raster(tmp_path / "s.tif", cls + 1, nodata=0)
    masks = []
    for tile in (4096, 80):
        predictor = _recording(one_hot_predictor(3, offset=1))
        with caplog.at_level(logging.INFO, logger="geoseg"):
            res = segment_scene(src, tmp_path / f"o{tile}", source=ModelSource(identity_card(1, 3)), predictor=predictor,
                                options=PredictOptions(tile_size=tile))
        # the window shrinks to the longer side (70 -> 80); the 50 rows pad to the card's 64-px window
        assert predictor.shapes == [(1, 1, 64, 80)] and res.windows == 1
        with rasterio.open(res.mask) as ds:
            masks.append(ds.read(1))
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks[0], cls + 1)
    assert "s.tif: one window of 80 px instead of 4096" in caplog.text
    d = describe_scene(src, 4096, source=ModelSource(identity_card(1, 3)))
    assert (d["tile_size"], d["tile_size_asked"], d["windows"], d["model_input"]) == (80, 4096, 1, [64, 80])
    assert describe_scene(src, source=ModelSource(identity_card(1, 3)))["tile_size_asked"] is None
    # smaller than the card's 64-px window: that window, as without --tile-size
    tiny = write_raster(tmp_path / "t.tif", np.ones((1, 20, 20), np.uint8))
    for tile in (4096, None):
        predictor = _recording(one_hot_predictor(2))
        segment_scene(tiny, tmp_path / f"t{tile}", source=ModelSource(identity_card(1, 2)), predictor=predictor,
                      options=PredictOptions(tile_size=tile))
        assert predictor.shapes == [(1, 1, 64, 64)]


#: Peak RSS (MB) of `geoseg -q predict --vector none` over a 2,048² mirror-tiling of the NC sample
#: (2 cores, export cache warm), by window size at batch 1 (128: also at its default batch, 4); see
#: the table in geoseg/engine.py.
MEASURED_PEAK_MB = {
    "deeplabv3p": {(128, 4): 753, (128, 1): 634, (512, 1): 1069, (1024, 1): 2172, (2048, 1): 5217},
    "unet": {(128, 4): 780, (128, 1): 639, (512, 1): 1222, (1024, 1): 2565, (2048, 1): 7523},
}


@pytest.mark.parametrize("model", sorted(MEASURED_PEAK_MB))
def test_memory_estimate_grows_with_the_window_as_measured(tmp_path: Path, model: str) -> None:
    """info's estimate (the one predict checks) grows with the window at batch 1 and lies within 25 % of
    the shipped models' measured peaks (it said 1.1 GB where a 2,048-px window took 5.3 GB)."""
    from geoseg.engine import describe_scene, resolve_model

    src = write_raster(tmp_path / "s.tif", np.full((5, 2048, 2048), 80, np.uint8), crs=NC_LCC,
                       transform=from_origin(600000.0, 250000.0, 28.5, 28.5), compress="deflate", tiled=True)
    source = resolve_model(model)
    est = {(t, b): describe_scene(src, t, batch_size=b, source=source)["memory_estimate_mb"]
           for t, b in MEASURED_PEAK_MB[model]}
    assert describe_scene(src, source=source)["memory_estimate_mb"] == est[128, 4]  # the default batch
    at_batch_1 = [est[t, 1] for t in (128, 512, 1024, 2048)]
    assert at_batch_1 == sorted(at_batch_1) and at_batch_1[-1] > 5 * at_batch_1[0]
    for key, peak in MEASURED_PEAK_MB[model].items():
        assert est[key] == pytest.approx(peak, rel=0.25), (key, est[key], peak)


def test_predict_refuses_an_estimate_beyond_the_machine_s_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run the machine cannot hold is refused in one line before any output or model call (it was
    killed by the kernel after minutes, without a word)."""
    import geoseg.engine

    monkeypatch.setattr(geoseg.engine, "physical_memory_mb", lambda: 300.0)
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    predictor = _recording(one_hot_predictor(2))
    for dest in (out, tmp_path / "new", tmp_path / "m.tif"):
        with pytest.raises(ParameterError) as err:
            segment_scene(src, dest, source=ModelSource(identity_card(1, 2)), predictor=predictor,
                          options=PredictOptions(device="cpu"))
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith("predict would need about ") and msg.endswith(
            "MB of memory with 64-px windows at batch 8, more than this machine's 300 MB: lower --tile-size or "
            "--batch-size (geoseg info --tile-size N shows the estimate)")
    assert list(out.iterdir()) == [] and not (tmp_path / "new").exists() and not (tmp_path / "m.tif").exists()
    assert predictor.shapes == []


def test_a_gpu_run_checks_this_machine_s_memory_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the model lives there, but the blending strip and 8 prefetched windows per call take the
    host's memory: GPU runs were not checked at all. Their estimate counts no model activations."""
    import geoseg.engine
    from geoseg.engine import memory_estimate_mb

    kw = dict(height=20_000, width=20_000, bands=13, itemsize=2, num_classes=10)
    cpu, gpu = memory_estimate_mb(1024, 2, **kw), memory_estimate_mb(1024, 2, **kw, gpu=True)  # type: ignore[arg-type]
    assert gpu < cpu and gpu > memory_estimate_mb(1024, 2, **kw, gpu=True, window=(256, 256)) > 0  # type: ignore[arg-type]
    monkeypatch.setattr(geoseg.engine, "physical_memory_mb", lambda: 300.0)
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    predictor = _recording(one_hot_predictor(2))
    with pytest.raises(ParameterError, match="more than this machine's 300 MB"):
        segment_scene(src, tmp_path / "out", source=ModelSource(identity_card(1, 2)), predictor=predictor,
                      options=PredictOptions(device="gpu"))
    assert predictor.shapes == [] and not (tmp_path / "out").exists()


def test_predict_warns_when_its_estimate_exceeds_the_memory_available_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.engine
    from geoseg.errors import PerformanceWarning

    monkeypatch.setattr(geoseg.engine, "physical_memory_mb", lambda: 1e6)
    monkeypatch.setattr(geoseg.engine, "available_memory_mb", lambda: 300.0)
    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    with pytest.warns(PerformanceWarning, match=r"predict may need about [\d,]+ MB of memory with 64-px windows at "
                                                r"batch 8, more than the 300 MB available now"):
        res = segment_scene(src, tmp_path, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                            options=PredictOptions(device="cpu"))
    assert res.mask.exists()


def test_memory_refusal_is_one_line_in_the_cli_and_one_failed_scene_in_a_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner, tiny_unet: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    import geoseg.engine
    from geoseg.batch import Scene, run_scene
    from geoseg_cli.main import cli

    monkeypatch.setattr(geoseg.engine, "physical_memory_mb", lambda: 300.0)
    src = write_raster(tmp_path / "s.tif", np.ones((3, 20, 20), np.uint8))
    out = tmp_path / "out"
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "more than this machine's 300 MB: lower --tile-size or --batch-size" in lines[0], lines
    assert not out.exists()
    outcome = run_scene(Scene(src, "s.tif", "s"), out, PredictOptions(device="cpu"), one_hot_predictor(2),
                        ModelSource(identity_card(3, 2)))
    assert (outcome.status, outcome.fatal) == ("failed", False)
    assert "more than this machine's 300 MB" in outcome.error and "\n" not in outcome.error


def test_a_predict_result_is_plain_json_data(tmp_path: Path) -> None:
    """PredictResult holds paths (and numbers numpy computed): ``to_dict()`` is what ``json.dumps`` takes."""
    import dataclasses

    src = write_raster(tmp_path / "s.tif", (class_image(40, 50, 3) + 1).astype(np.uint8)[None])  # UTM: class areas
    res = segment_scene(src, tmp_path / "out", source=ModelSource(identity_card(1, 3)), predictor=one_hot_predictor(3, offset=1),
                        options=PredictOptions(confidence="uint8", probabilities="uint8", vector="gpkg"))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert list(d) == [f.name for f in dataclasses.fields(res)]  # the fields' own names, in order
    assert d["mask"] == str(res.mask) and Path(d["mask"]).exists()
    for key in ("confidence", "probabilities", "style", "aux", "confidence_style", "probabilities_style"):
        assert d[key] == str(getattr(res, key)), key
    assert d["extra_outputs"] == [str(p) for p in res.extra_outputs] and d["extra_outputs"][0].endswith(".gpkg")
    assert (d["windows"], d["windows_skipped"], d["device"]) == (res.windows, res.windows_skipped, res.device)
    assert d["megapixels"] == res.megapixels and d["seconds"] == res.seconds
    assert d["class_pixels"] == res.class_pixels and sum(d["class_pixels"].values()) == 40 * 50
    assert d["class_area"] == pytest.approx(res.class_area) and d["scene_prior"] is None


@pytest.mark.parametrize("transform", [
    rasterio.Affine(10.0, 0.0, 500000.0, 0.0, 0.0, 4800000.0),  # pixel height 0 (a broken writer's)
    rasterio.Affine(10.0, 10.0, 500000.0, 10.0, 10.0, 4800000.0),  # parallel axes: no area either
])
def test_a_geotransform_without_area_is_refused_when_opened(tmp_path: Path, transform: rasterio.Affine) -> None:
    """A scene whose pixels have no area on the ground failed deep in predict and info ("unexpected
    error: ZeroDivisionError") and in batch's AOI check; it is now a one-line SceneError when opened,
    and a class mask with one is refused by vectorize."""
    from geoseg.io import check_transform
    from geoseg.vectorize import vectorize_mask

    src = write_raster(tmp_path / "flat.tif", class_image(32, 32, 2)[None].astype(np.uint8), transform=transform)
    with pytest.raises(SceneError, match=r"^input .*flat.tif has a geotransform that gives its pixels no area "
                                         r".*\(e.g. gdal_edit.py -a_ullr ULX ULY LRX LRY flat.tif\)$"):
        open_scene(src)
    with pytest.raises(SceneError, match=r"^mask .*flat.tif has a geotransform that gives its pixels no area"):
        vectorize_mask(src, tmp_path / "flat.gpkg")
    assert not (tmp_path / "flat.gpkg").exists()
    with pytest.raises(SceneError, match="not finite"):
        check_transform("input x.tif", "x.tif", rasterio.Affine(10.0, 0.0, float("nan"), 0.0, -10.0, 0.0))
    check_transform("input x.tif", "x.tif", rasterio.Affine(10.0, 1.0, 5.0, 1.0, -10.0, 0.0))  # rotated: fine


def test_scene_after_scene_in_one_process_leaves_no_thread_pools_behind(tmp_path: Path) -> None:
    """A service segmenting scene after scene with one predictor: each call's reader thread got a Dask
    thread pool of its own that Dask keeps for ever (through atexit), two per call with prior adaptation;
    the readers now use a pool of the scene's own, shut down with it."""
    import atexit
    import gc

    if not hasattr(atexit, "_ncallbacks"):
        pytest.skip("CPython's atexit._ncallbacks is needed to count them")
    src = write_raster(tmp_path / "s.tif", class_image(200, 200, 2)[None].astype(np.uint8))
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))

    def call() -> None:
        segment_scene(src, tmp_path / "out", **kw, options=PredictOptions(overwrite=True, read_workers=2))

    call()
    before = atexit._ncallbacks()
    for _ in range(3):
        call()
    gc.collect()
    assert atexit._ncallbacks() == before
    assert not [t for t in threading.enumerate() if t.name.startswith(("geoseg-read", "geoseg-reader"))]


def test_library_options_may_be_mappings_and_bad_arguments_are_parameter_errors(tmp_path: Path) -> None:
    """A library caller's ``options={"vector": "none"}`` raised AttributeError, ``block_rows=0`` a bare
    ValueError, run_batch with a model name AttributeError: mappings of the options' fields are taken,
    anything else is a one-line ParameterError naming the argument."""
    from geoseg.batch import run_batch
    from geoseg.evaluate import evaluate_rasters

    src = write_raster(tmp_path / "s.tif", class_image(40, 40, 2)[None].astype(np.uint8))
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    res = segment_scene(src, tmp_path / "o", **kw, options={"confidence": "uint8"})
    assert res.confidence is not None and res.confidence.exists()
    with pytest.raises(ParameterError, match=r"^options: PredictOptions has no 'vectr' \(its fields: tile_size, "):
        segment_scene(src, tmp_path / "o2", **kw, options={"vectr": "gpkg"})
    with pytest.raises(ParameterError, match=r"^options must be a geoseg.engine.PredictOptions .*got int$"):
        segment_scene(src, tmp_path / "o2", **kw, options=3)  # type: ignore[arg-type]
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ParameterError, match=r"^block_rows 0: give a whole number of rows >= 1$"):
        evaluate_rasters(res.mask, res.mask, block_rows=0)
    with pytest.raises(ParameterError, match=r"^model must be a model name, .*got float$"):
        run_batch([src], tmp_path / "b", 3.5)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"^batch: BatchOptions has no 'dryrun'"):
        run_batch([src], tmp_path / "b", "unet", None, {"dryrun": True})
    # values are checked as the fields take them ("no" was taken as True and overwrote; "*.tif" became the
    # patterns "*", ".", "t", ... and matched every file; "2" a TypeError traceback)
    for bad, said in (({"overwrite": "no"}, "overwrite='no': give True or False"),
                      ({"tile_size": 256.0}, "tile_size=256.0: give a whole number or None"),
                      ({"blend": "nope"}, "blend='nope': give one of 'constant', 'gaussian'")):
        with pytest.raises(ParameterError, match=f"^options: {re.escape(said)}$"):
            segment_scene(src, tmp_path / "o3", **kw, options=bad)
    for bad, said in (({"patterns": "*.tif"}, "patterns='*.tif': give a list (a string each)"),
                      ({"workers": "2"}, "workers='2': give a whole number")):
        with pytest.raises(ParameterError, match=f"^batch: {re.escape(said)}$"):
            run_batch([src], tmp_path / "b", "unet", None, bad)
    from geoseg.batch import BatchOptions
    from geoseg.config import options_of

    b = options_of({"patterns": ["*.TIF"], "report": "r.json", "workers": np.int64(2)}, BatchOptions, "batch")
    assert b.patterns == ("*.TIF",) and b.report == Path("r.json") and b.workers == 2
    assert evaluate_rasters(res.mask, res.mask, block_rows=np.int64(7)).metrics.overall_accuracy == 1.0


def test_a_pixel_without_data_in_every_band_by_mixed_means_is_nodata(tmp_path: Path) -> None:
    """A float pixel whose bands have no data each in its own way (band 1 the nodata value, the others
    NaN) got a class: only "some band is finite" was checked after the NaNs were added."""
    data = np.full((3, 8, 8), 0.5, np.float32)
    data[0, 0, 0], data[1:, 0, 0] = -9999, np.nan  # nodata value + NaNs: no data at all
    data[:, 0, 1] = -9999  # all the nodata value
    data[:, 0, 2] = np.nan  # all NaN
    data[0, 0, 3], data[1, 0, 3] = -9999, np.nan  # band 3 holds data: a pixel with a gap, classified
    src = write_raster(tmp_path / "s.tif", data, nodata=-9999)
    res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(3, 2)), predictor=one_hot_predictor(2),
                        options=PredictOptions(vector="none"))
    with rasterio.open(res.mask) as ds:
        row = ds.read(1)[0]
    assert row[:3].tolist() == [MASK_NODATA] * 3 and row[3] != MASK_NODATA and (row[4:] != MASK_NODATA).all()


def test_a_float64_nodata_past_float32_s_range_says_nothing(tmp_path: Path) -> None:
    """float64 scenes fill their gaps with -1.797e308 (the type's minimum): its cast to float32 printed
    numpy's "overflow encountered in cast" (52 times with --aoi); it is nodata, replaced anyway."""
    data = np.full((3, 16, 16), 0.5, np.float64)
    data[:, :4] = np.finfo(np.float64).min
    src = write_raster(tmp_path / "s.tif", data, nodata=float(np.finfo(np.float64).min))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(3, 2)),
                            predictor=one_hot_predictor(2), options=PredictOptions(vector="none"))
    with rasterio.open(res.mask) as ds:
        m = ds.read(1)
    assert (m[:4] == MASK_NODATA).all() and (m[4:] != MASK_NODATA).all()


def test_an_unsupported_pixel_type_says_how_to_convert_it(tmp_path: Path) -> None:
    """int8, int64, complex scenes were refused without a word on what to do."""
    src = write_raster(tmp_path / "wide.tif", np.ones((1, 8, 8), np.int64))
    with pytest.raises(SceneError, match=r"has pixel type int64: geoseg reads uint8, .*; convert it first "
                                         r"\(e.g. gdal_translate -ot Float64 wide.tif converted.tif\)$"):
        open_scene(src)
    src = write_raster(tmp_path / "c.tif", np.ones((1, 8, 8), np.complex64))
    with pytest.raises(SceneError, match=r"has pixel type complex64: .*; take its amplitude first"):
        open_scene(src)


def test_areas_on_a_web_mercator_grid_are_ground_areas(tmp_path: Path) -> None:
    """A Web Mercator scene's class areas and polygon areas were m² in name only: 2.6 times the ground
    area at 52° N (sessions 25-27 warned, AreaWarning). They are ellipsoidal m² now, pixel by pixel, as on a
    degree grid, and so are --min-area and the pixel size of the resolution check; UTM keeps map units."""
    import pyogrio
    import pyproj

    from geoseg.errors import AreaWarning
    from geoseg.io import ProjectedAreas, ground_pixel_size_m, pixel_areas
    from geoseg.vectorize import vectorize_mask

    data = class_image(40, 40, 2)[None].astype(np.uint8)
    tr = from_origin(1e6, 6.8e6, 10, 10)  # 52° N
    merc = write_raster(tmp_path / "merc.tif", data, crs="EPSG:3857", transform=tr)
    kw = dict(source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AreaWarning)
        res = segment_scene(merc, tmp_path / "o", **kw, options=PredictOptions(vector="gpkg", simplify=0))
    # each row's pixel from its corners in longitudes/latitudes (a Mercator row is a band of latitude)
    to_geo = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    geod = pyproj.Geod(ellps="WGS84")
    row = []
    for r in range(40):
        lon, lat = to_geo.transform([1e6, 1e6 + 10, 1e6 + 10, 1e6], [6.8e6 - 10 * r] * 2 + [6.8e6 - 10 * (r + 1)] * 2)
        row.append(abs(geod.polygon_area_perimeter(lon, lat)[0]))
    row = np.array(row)
    assert 2.6 < 100 / row.mean() < 2.7  # map units against the ground
    with rasterio.open(res.mask) as ds:
        mask = ds.read(1)
    _, _, _, (ids, _, area, *_) = pyogrio.raw.read(res.extra_outputs[0], layer="landcover")
    for c in identity_card(1, 2).classes:
        want = ((mask == c.id) * row[:, None]).sum()
        assert res.class_area[c.name] == pytest.approx(want, rel=1e-6), c.name
        assert area[ids == c.id].sum() == pytest.approx(want, rel=1e-6), c.name
    # --min-area in ground m²: 3.5 ground pixels are 4 pixels (in map m², 1.3 pixels: 2)
    assert res.area_units == "m2"
    got = vectorize_mask(res.mask, tmp_path / "m.gpkg", min_area=3.5 * row[20])
    assert got.min_pixels == 4 and got.area_units == "m2"
    assert ground_pixel_size_m(rasterio.crs.CRS.from_epsg(3857), tr, 40, 40) == pytest.approx(row[20] ** 0.5, rel=1e-3)
    assert isinstance(pixel_areas(rasterio.crs.CRS.from_epsg(3857), tr, 40, 40), ProjectedAreas)
    # UTM (within 0.1 % of the ground): areas in its units, as before
    utm = write_raster(tmp_path / "utm.tif", data)
    with rasterio.open(utm) as ds:
        assert pixel_areas(ds.crs, ds.transform, ds.height, ds.width) == abs(ds.transform.determinant)
    res = segment_scene(utm, tmp_path / "o2", **kw, options=PredictOptions(vector="none"))
    assert sum(res.class_area.values()) == pytest.approx(40 * 40 * abs(ds.transform.determinant))


def test_ground_areas_of_a_projection_are_interpolated_within_a_part_per_million() -> None:
    """ProjectedAreas computes ground areas every 16 pixels: between them, per pixel, they stay within 1e-6 of
    the projection's own scale factor (a polar stereographic grid on the ellipsoid, whose scale changes along
    rows and columns)."""
    import pyproj
    from affine import Affine

    from geoseg.io import ProjectedAreas, distorts_areas

    crs = rasterio.crs.CRS.from_epsg(3413)  # NSIDC polar stereographic north, true scale at 70° N
    tr = Affine(250.0, 0.0, -3.75e5, 0.0, -250.0, 3.75e5)  # 250 m pixels around the pole, far from 70° N
    assert distorts_areas(crs, tr, 3000, 3000)
    got = ProjectedAreas(crs, tr).block(1003, 37, 2005, 41)
    proj = pyproj.Proj(pyproj.CRS.from_epsg(3413))
    to_geo = pyproj.Transformer.from_crs("EPSG:3413", "EPSG:4326", always_xy=True)
    c, r = np.meshgrid(np.arange(2005, 2046) + 0.5, np.arange(1003, 1040) + 0.5)
    lon, lat = to_geo.transform(tr.c + 250.0 * c, tr.f - 250.0 * r)
    want = 250.0**2 / np.asarray(proj.get_factors(lon, lat).areal_scale)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not distorts_areas(rasterio.crs.CRS.from_epsg(32633), from_origin(5e5, 6e6, 10, 10), 1000, 1000)


def _gdal_cache_max() -> int | None:
    """GDAL's block cache size in bytes (GDALGetCacheMax64 of the libgdal rasterio runs on), or None
    where that library cannot be found by name (a rasterio built against a system GDAL)."""
    import ctypes
    import glob
    import os

    found = glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*"))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return int(lib.GDALGetCacheMax64())


def test_predict_and_vectorize_read_through_a_gdal_block_cache_of_megabytes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """rasterio.Env(GDAL_CACHEMAX=64) sets 64 *bytes* (an int goes to GDALSetCacheMax64): predict ran
    without a block cache, and each window decoded the tiles it shares with its neighbours again
    (a 4096² scene 7-10 % slower end to end), vectorize with 128 bytes."""
    import geoseg.vectorize as vectorize
    from geoseg.engine import _GDAL_CACHE_MB

    if _gdal_cache_max() is None:
        pytest.skip("rasterio's libgdal is not in rasterio.libs")
    seen: list[int | None] = []
    inner = one_hot_predictor(3)

    def predictor(x: np.ndarray) -> np.ndarray:
        seen.append(_gdal_cache_max())
        return inner(x)

    src = write_raster(tmp_path / "s.tif", class_image(40, 40, 3)[None].astype(np.uint8))
    res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 3)), predictor=predictor,
                        options=PredictOptions(tile_size=16, overlap=4, vector="none"))
    assert seen and set(seen) == {_GDAL_CACHE_MB * 2**20}
    busy = vectorize._busy_rows
    strips: list[int | None] = []

    def counted(strip: np.ndarray) -> np.ndarray:
        strips.append(_gdal_cache_max())
        return busy(strip)

    monkeypatch.setattr(vectorize, "_busy_rows", counted)
    vectorize.vectorize_mask(res.mask, tmp_path / "p.gpkg")
    assert strips and set(strips) == {vectorize.GDAL_CACHE_MB * 2**20}


def test_an_os_pathlike_scene_is_read_as_its_path(tmp_path: Path) -> None:
    """str() of an os.PathLike that is no pathlib.Path names the object: "input <Where ...> does not exist"."""

    class Where:
        def __init__(self, p: Path) -> None:
            self.p = p

        def __fspath__(self) -> str:
            return str(self.p)

    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8))
    res = segment_scene(Where(src), tmp_path / "o", source=ModelSource(identity_card(1, 2)),  # type: ignore[arg-type]
                        predictor=one_hot_predictor(2))
    assert res.mask == tmp_path / "o" / "s_landcover.tif" and res.mask.exists()


def test_warnings_name_the_caller_s_line_and_arguments_of_the_wrong_type_are_parameter_errors(tmp_path: Path) -> None:
    """Warnings said with a fixed stacklevel named geoseg's own lines (a caller's filter by module never
    matched); an argument of the wrong type was a bare TypeError or ValueError deep in the call."""
    from geoseg.engine import describe_scene
    from geoseg.errors import NoCRSWarning
    from geoseg.evaluate import evaluate_rasters
    from geoseg.vectorize import vectorize_mask

    src = write_raster(tmp_path / "s.tif", np.ones((1, 20, 20), np.uint8), crs=None)
    with pytest.warns(NoCRSWarning) as said:
        res = segment_scene(src, tmp_path / "o", source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2))
    assert {Path(w.filename) for w in said if w.category is NoCRSWarning} == {Path(__file__)}
    for call, words in ((lambda: vectorize_mask(res.mask, tmp_path / "v.gpkg", min_pixels="3"),  # type: ignore[arg-type]
                         "vectorize_mask: min_pixels='3': give a whole number or None"),
                        (lambda: evaluate_rasters(res.mask, res.mask, classes=["x"]),  # type: ignore[list-item]
                         "evaluate_rasters: classes=['x']: give a list (a whole number each) or None"),
                        (lambda: describe_scene(src, tile="x"), "describe_scene: tile='x': give a whole number")):
        with pytest.raises(ParameterError) as err:
            call()
        assert str(err.value).startswith(words)


def test_a_container_s_memory_limit_and_ulimit_v_are_the_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil sees the machine's memory, not a container's --memory or a pod's limit (a run past it is killed
    without a word); under `ulimit -v` below what Paddle maps, predict hung for good in Paddle's thread pool
    (SIGTERM could not stop it) or died of a segmentation fault."""
    import subprocess
    import sys

    import geoseg.engine as ge

    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "kubepods" / "memory.max").write_text(f"{8 * 2**30}\n")
    (v2 / "kubepods" / "memory.current").write_text(f"{2**30}\n")
    (v2 / "kubepods" / "pod1" / "memory.max").write_text(f"{3 * 2**30}\n")
    (v2 / "kubepods" / "pod1" / "memory.current").write_text(f"{2**30 + 2**28}\n")
    (v2 / "kubepods" / "pod1" / "memory.stat").write_text(f"anon 1000\ninactive_file {2**28}\nactive_file 5\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert ge._cgroup_memory(proc, v2) == (3 * 2**30, 2**30)  # the tightest on the way up, less its page cache
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    (v1 / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # (unlimited)
    proc.write_text("4:memory:/docker/abc\n3:cpu:/docker/abc\n")
    assert ge._cgroup_memory(proc, v1) == (2**31, 2**29)
    proc.write_text("0::/\n")
    assert ge._cgroup_memory(proc, v2) is None  # the root's "max": no limit
    monkeypatch.setattr(ge, "_cgroup_memory", lambda: (2**30, 2**29))
    assert ge.physical_memory_mb() == 1024 and ge.available_memory_mb() == 512
    with pytest.raises(ParameterError, match=r"more than the memory limit of this process's container \(control "
                                             r"group\): 1,024 MB"):
        ge.check_memory(2000, (512, 512), 1)
    # ulimit -v below what Paddle maps: one line, at once (not a hang)
    from tests.conftest import SAMPLE_DATA

    limited = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (1400 * 2**20, resource.RLIM_INFINITY)); "
               "from geoseg_cli import main; main()")
    r = subprocess.run([sys.executable, "-c", limited, "predict", str(SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "Error: this process may map only 1,400 MB of address space (ulimit -v)"), r.stderr


def test_an_absurd_omp_num_threads_is_refused_before_paddle_loads(tmp_path: Path) -> None:
    """`OMP_NUM_THREADS=99999999999` crashed the predictor's creation (SIGSEGV and a C++ dump, exit 139);
    10,000,000 was killed for memory. One line, before paddle loads; ordinary values pass."""
    import os
    import subprocess
    import sys

    from tests.conftest import SAMPLE_DATA

    from geoseg.errors import OMP_THREADS_MAX, check_omp_threads

    env = {**os.environ, "OMP_NUM_THREADS": "99999999999"}
    r = subprocess.run([sys.executable, "-c", "from geoseg_cli import main; main()", "predict",
                        str(SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: OMP_NUM_THREADS=99999999999 asks for more threads than this machine can run ({os.cpu_count()} CPU "
        f"cores; past {max(OMP_THREADS_MAX, 64 * (os.cpu_count() or 1)):,} PaddlePaddle runs out of memory or "
        f"crashes): set it to {os.cpu_count()} or fewer, or unset it"), r.stderr
    assert not (tmp_path / "o").exists()
    for fine in ("1", "64", "4,2", "abc", ""):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", fine)
            check_omp_threads()


def test_one_band_fed_as_several_is_one_band_in_the_range_warning(tmp_path: Path) -> None:
    """It was "4 bands (1 as b0, 1 as b1, ...) average ..." of a scene of one band."""
    data = np.full((2, 30, 30), 250, np.uint8)
    data[1] = 0
    src = write_raster(tmp_path / "one.tif", data)
    with pytest.warns(InputRangeWarning, match=r"one.tif: band 1 \(as b0, b1, b3\) averages \+250 standard"):
        check_input_range(open_scene(src), (1, 1, 2, 1), identity_card(4, 2))
    both = write_raster(tmp_path / "both.tif", np.full((2, 30, 30), 250, np.uint8))
    with pytest.warns(InputRangeWarning, match=r"all 2 bands \(1 as b0 and b2, 2 as b1\) average \+250"):
        check_input_range(open_scene(both), (1, 2, 1), identity_card(3, 2))
