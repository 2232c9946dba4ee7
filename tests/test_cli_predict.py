"""``geoseg info`` and ``geoseg predict`` through Click's CliRunner, including every bad input."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from rasterio import features
from rasterio.transform import from_origin

from geoseg.errors import ParameterError
from geoseg.io import read_classes
from geoseg_cli.main import cli
from tests.conftest import write_band_vrt, write_raster


def rgb(tmp_path: Path, name: str = "scene.tif", h: int = 90, w: int = 150, **kw) -> Path:
    data = (np.random.default_rng(0).random((3, h, w)) * 200 + 20).astype(np.uint8)
    return write_raster(tmp_path / name, data, nodata=0, **kw)


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_info_prints_what_predict_sees(runner: CliRunner, tmp_path: Path) -> None:
    src = rgb(tmp_path, h=1100, w=1500)
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--tile-size", "512", "--overlap", "128"])
    assert res.exit_code == 0, res.output
    assert "1500 x 1100" in res.output and "uint8" in res.output and "EPSG:32633" in res.output
    assert "value 0.0" in res.output and "model:" not in res.output
    assert "10 x 10 (about 10 m on the ground)" in res.output
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--json"])
    d = json.loads(res.stdout)
    assert (d["tile_size"], d["overlap"]) == (512, 128) and d["model"] is None
    assert d["windows"] == 4 * 3 and d["window_grid"] == [3, 4] and d["ground_pixel_m"] == 10.0
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--model", "unet", "--bands", "3,2,1"])  # (ignored)
    assert res.exit_code == 2 and "--no-model describes the scene alone: drop --model, --bands" in res.output
    res = runner.invoke(cli, ["info", str(src), "--model", "unet"])  # the shipped UNet learned from 28.5 m pixels
    assert res.exit_code == 0, res.output
    assert "resolution: the model learned from 28.5 m pixels: resample the scene" in res.output
    assert d["memory_estimate_mb"] > 500
    # a rotated grid's pixel size is the length of a pixel's sides (it was the transform's a and e)
    import math

    from rasterio.transform import Affine

    turned = rgb(tmp_path, "turned.tif", transform=Affine(24.68, -14.25, 500000, -14.25, -24.68, 4000000))
    d = json.loads(runner.invoke(cli, ["info", str(turned), "--no-model", "--json"]).stdout)
    assert d["pixel_size"] == pytest.approx([math.hypot(24.68, 14.25)] * 2) and d["ground_pixel_m"] == pytest.approx(28.5, abs=0.01)


def test_info_time_runs_the_model_on_a_few_windows(runner: CliRunner, tmp_path: Path,
                                                   tiny_unet: tuple[Path, Path]) -> None:
    """info --time: the model predict would run, timed on a few of the scene's windows that hold data,
    and its time for all the windows predict runs (the AOI's only with --aoi)."""
    from geoseg.engine import TIME_WINDOWS

    weights, _ = tiny_unet
    src = rgb(tmp_path, h=300, w=400)  # 64-px windows, overlap 16: 6 x 8 = 48
    res = runner.invoke(cli, ["info", str(src), "--weights", str(weights), "--time", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    t = d["time"]
    assert t["windows"] == d["windows"] == 48 and t["windows_timed"] == TIME_WINDOWS and t["device"].startswith("cpu/")
    assert t["seconds_per_window"] > 0 and t["model_seconds"] == pytest.approx(t["seconds_per_window"] * 48, abs=0.06)
    res = runner.invoke(cli, ["info", str(src), "--weights", str(weights), "--time"])
    assert re.search(r"time: about [\d.]+ s of model time for its 48 windows \([\d.e-]+ s a window on cpu/", res.output)
    box = "500000,4799000,500300,4800000"  # 30 columns of the scene: one column of windows
    d = json.loads(runner.invoke(cli, ["info", str(src), "--weights", str(weights), "--time", "--json",
                                       "--aoi", box]).stdout)
    assert d["time"]["windows"] == d["aoi"]["windows"] < 48
    d = json.loads(runner.invoke(cli, ["info", str(src), "--weights", str(weights), "--time", "--json",
                                       "--batch-size", "1"]).stdout)
    assert d["time"]["batch_size"] == 1  # (it timed predict's default whatever --batch-size said)
    # data only in the left columns, an AOI over them: timed there (the scene's centre has none)
    left = np.zeros((3, 300, 400), np.uint8)
    left[:, :, :60] = 100
    side = write_raster(tmp_path / "left.tif", left, nodata=0)
    d = json.loads(runner.invoke(cli, ["info", str(side), "--weights", str(weights), "--time", "--json",
                                       "--aoi", "500000,4797000,500600,4800000"]).stdout)
    assert d["time"] is not None and d["time"]["windows_timed"] > 0 and d["time"]["windows"] == d["aoi"]["windows"]
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 90, 150), np.uint8), nodata=0)
    res = runner.invoke(cli, ["info", str(empty), "--weights", str(weights), "--time"])
    assert res.exit_code == 0 and "time: not measured: no window near the scene's centre holds data" in res.output
    assert json.loads(runner.invoke(cli, ["info", str(src), "--weights", str(weights), "--json"]).stdout)["time"] is None
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--time"])
    assert res.exit_code == 2 and "drop --time or --no-model" in res.output


def test_info_memory_estimate_counts_ensemble_members(tmp_path: Path) -> None:
    """A seed ensemble holds one network per member: the shipped 3-member UNet's estimate is two members
    above the same windows without a model."""
    from geoseg.engine import (
        PRIOR_KEEP_MB,
        RUNTIME_PER_MEMBER_MB,
        RUNTIME_PER_MEMBER_WINDOW_MB,
        describe_scene,
        resolve_model,
    )
    from geoseg.errors import ResolutionWarning

    src = rgb(tmp_path, h=300, w=400)
    unet = resolve_model("unet")
    assert unet.card.params["members"] == 3
    with pytest.warns(ResolutionWarning):  # 10 m pixels for a 28.5 m model
        with_model = describe_scene(src, source=unet)
    plain = describe_scene(src, unet.card.tile_size, unet.card.overlap, unet.card.num_classes, with_model["batch_size"])
    windows = with_model["batch_size"] * (unet.card.tile_size / 512) ** 2  # each member's working set grows with them
    # and the card adapts to the scene's priors: the prior pass keeps its windows' probabilities for the main pass
    kept = min(PRIOR_KEEP_MB, min(64, with_model["windows"]) * 7 * unet.card.tile_size ** 2 * 4 / 2**20)
    assert unet.card.adapt_prior and kept > 0
    assert with_model["memory_estimate_mb"] - plain["memory_estimate_mb"] == pytest.approx(
        2 * (RUNTIME_PER_MEMBER_MB + RUNTIME_PER_MEMBER_WINDOW_MB * windows) + kept, abs=1)


def test_info_names_a_mask_file_as_such(runner: CliRunner, tmp_path: Path) -> None:
    """A scene's nodata in a .msk file beside it was called an 'internal mask' (the user looks inside the TIFF)."""
    data = np.full((3, 20, 30), 50, np.uint8)
    keep = np.ones((20, 30), bool)
    keep[:3] = False
    inner = write_raster(tmp_path / "inner.tif", data, masks=keep)
    outer = tmp_path / "outer.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(
            outer, "w", driver="GTiff", width=30, height=20, count=3, dtype="uint8", crs="EPSG:32633",
            transform=from_origin(500000.0, 4800000.0, 10.0, 10.0)) as ds:
        ds.write(data)
        ds.write_mask(keep.astype(np.uint8) * 255)
    assert (tmp_path / "outer.tif.msk").exists()
    for path, said in ((inner, "internal mask"), (outer, "mask file outer.tif.msk")):
        d = json.loads(runner.invoke(cli, ["info", str(path), "--no-model", "--json"]).stdout)
        assert d["nodata"] == said, d["nodata"]


def test_info_uses_the_model_predict_would_run(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg.card import ModelCard
    from geoseg.engine import shipped_models
    from geoseg.tiling import make_grid

    monkeypatch.setitem(sys.modules, "paddle", None)  # info needs no paddle, with a model too
    src = rgb(tmp_path, h=300, w=500)
    # the default: the shipped deeplabv3p, its windows, and why it cannot read a 3-band scene
    shipped = ModelCard.load(shipped_models()["deeplabv3p"])
    res = runner.invoke(cli, ["info", str(src), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["tile_size"], d["overlap"]) == (shipped.tile_size, shipped.overlap)
    assert d["windows"] == len(make_grid(300, 500, shipped.tile_size, shipped.overlap))
    assert d["model"]["name"] == shipped.name and d["model"]["scene_bands"] is None
    assert f"expects {shipped.in_channels}" in d["model"]["problem"]
    res = runner.invoke(cli, ["info", str(src)])
    assert "cannot run on it" in res.stdout and "expects" in res.stdout
    # a model that fits: the bands it reads, in order, and how far the values lie from its training data
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--bands", "3,2,1", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    card = ModelCard.load(tiny_unet[1])
    assert (d["tile_size"], d["overlap"]) == (card.tile_size, card.overlap) != (shipped.tile_size, shipped.overlap)
    assert d["model"]["scene_bands"] == [3, 2, 1] and d["model"]["problem"] is None
    assert list(d["model"]["input_z"]) == list(card.bands)
    # card normalisation mean 0.5, std 0.25 of values scaled to 0..1: the scene's 20..220 average ~0.47
    assert all(abs(z) < 1 for z in d["model"]["input_z"].values())
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--tile-size", "32", "--overlap", "0"])
    assert "reads bands 1->" in res.stdout and "of 32 px, overlap 0" in res.stdout
    res = runner.invoke(cli, ["info", str(src), "--model", "segformer"])
    assert_one_line_error(res, "unknown model", "segformer")
    # a band given twice is allowed but said; too few bands: one band, not "1 bands"
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--bands", "3,3,1"])
    assert res.exit_code == 0 and "feeds the model band 3 twice (as " in res.stderr, res.output
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--bands", "3,3,3"])
    assert res.exit_code == 0 and "band 3 three times" in res.stderr, res.output  # (it said "twice")
    # a --bands list too short is told to the list, with the count to give (it blamed the scene)
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--bands", "2"])
    assert "--bands 2 gives 1 band but" in res.stdout and "give 3 band numbers of" in res.stdout, res.output
    # values far from the training data: the bands that are, each with its distance
    hot = write_raster(tmp_path / "hot.tif", np.ones((3, 40, 40), np.float32) * np.array([900, 900, 0.5], np.float32)[:, None, None])
    d = json.loads(runner.invoke(cli, ["info", str(hot), "--weights", str(tiny_unet[0]), "--json"]).stdout)
    res = runner.invoke(cli, ["info", str(hot), "--weights", str(tiny_unet[0])])
    off = [k for k, v in d["model"]["input_z"].items() if abs(v) > 3]
    assert off and f"{len(off)} of 3 bands average more than 3 standard deviations" in res.stdout, res.stdout


def test_predict_writes_mask_and_prints_its_path(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    weights, _ = tiny_unet
    src = rgb(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(weights), "--out", str(out), "--confidence", "float32"])
    assert res.exit_code == 0, res.output
    mask = out / "scene_landcover.tif"
    assert res.stdout.strip() == str(mask)
    assert outputs(out) == [
        "scene_confidence.qml", "scene_confidence.tif", "scene_landcover.gpkg", "scene_landcover.qml",
        "scene_landcover.tif", "scene_landcover.tif.aux.xml",
    ]
    with rasterio.open(mask) as m, rasterio.open(src) as s:
        assert (m.crs, m.transform, m.shape) == (s.crs, s.transform, s.shape)
        classes = set(np.unique(m.read(1)).tolist())
        assert classes <= {0, 1, 2, 3}
    # the polygons (written by default) carry the mask's classes and CRS, and cover the scene
    import pyogrio
    import shapely

    meta, _, geoms, fields = pyogrio.raw.read(out / "scene_landcover.gpkg", layer="landcover")
    assert rasterio.crs.CRS.from_user_input(meta["crs"]) == rasterio.crs.CRS.from_epsg(32633)
    ids = fields[meta["fields"].tolist().index("class_id")]
    assert set(ids.tolist()) == classes - {255}
    assert shapely.from_wkb(geoms).__len__() == len(ids)
    assert abs(shapely.area(shapely.from_wkb(geoms)).sum() - 90 * 150 * 100.0) < 1e-6 * 90 * 150 * 100
    # the end-of-run log line reports speed (not with -q)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(weights), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "windows/s" in res.stderr and "megapixels/s" in res.stderr


def test_predict_probabilities_one_band_per_class(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    from geoseg.card import ModelCard

    weights, card = tiny_unet
    classes = ModelCard.load(card).classes
    src = rgb(tmp_path)
    with rasterio.open(src, "r+") as ds:  # a nodata corner
        data = ds.read()
        data[:, :20, :30] = 0
        ds.write(data)
    out = tmp_path / "out"
    args = ["-q", "predict", str(src), "--weights", str(weights), "--out", str(out), "--vector", "none"]
    res = runner.invoke(cli, [*args, "--probabilities", "float32", "--confidence", "float32"])
    assert res.exit_code == 0, res.output
    assert outputs(out) == ["scene_confidence.qml", "scene_confidence.tif", "scene_landcover.qml", "scene_landcover.tif",
                            "scene_landcover.tif.aux.xml", "scene_probabilities.qml", "scene_probabilities.tif"]
    with rasterio.open(out / "scene_landcover.tif") as m, rasterio.open(out / "scene_probabilities.tif") as p, \
            rasterio.open(out / "scene_confidence.tif") as c:
        mask, probs, conf = m.read(1), p.read(), c.read(1)
        assert (p.crs, p.transform, p.shape, p.count) == (m.crs, m.transform, m.shape, len(classes))
        assert p.descriptions == tuple(f"probability of {c.name} (class {c.id})" for c in classes)
        assert json.loads(p.tags()["GEOSEG_CLASSES"]) == json.loads(m.tags()["GEOSEG_CLASSES"])
    valid = mask != 255
    assert 0 < valid.sum() < valid.size and not valid[:20, :30].any()
    assert np.isnan(probs[:, ~valid]).all() and np.isfinite(probs[:, valid]).all()
    np.testing.assert_allclose(probs[:, valid].sum(axis=0), 1.0, atol=1e-5)
    ids = np.array([c.id for c in classes])
    assert (ids[probs.argmax(axis=0)][valid] == mask[valid]).all()  # the mask is their argmax
    # the mask carries its class statistics
    with rasterio.open(out / "scene_landcover.tif") as m:
        stats = json.loads(m.tags()["GEOSEG_CLASS_PIXELS"])
    assert stats == {c.name: int((mask == c.id).sum()) for c in classes} and sum(stats.values()) == valid.sum()
    assert len(np.unique(mask[valid])) > 1
    np.testing.assert_array_equal(probs.max(axis=0)[valid], conf[valid])
    # uint8: percent, 255 where the mask is nodata; an existing file is refused without --overwrite
    for f in out.iterdir():
        if f.name != "scene_probabilities.tif":
            f.unlink()
    res = runner.invoke(cli, [*args, "--probabilities", "uint8"])
    assert_one_line_error(res, "scene_probabilities.tif", "--overwrite")
    assert outputs(out) == ["scene_probabilities.tif"]  # refused before anything was written
    res = runner.invoke(cli, [*args, "--probabilities", "uint8", "--overwrite"])
    assert res.exit_code == 0, res.output
    with rasterio.open(out / "scene_probabilities.tif") as p:
        p8 = p.read()
        assert (p.dtypes[0], p.nodata) == ("uint8", 255)
    assert (p8[:, ~valid] == 255).all()
    np.testing.assert_array_equal(p8[:, valid], np.rint(probs[:, valid] * 100).astype(np.uint8))


def ramp_style(qml: Path) -> tuple[str, str, list[float]]:
    """(renderer type, classificationMax, ramp item values) of a raster .qml style."""
    import xml.etree.ElementTree as ET

    r = ET.parse(qml).getroot().find("pipe/rasterrenderer")
    assert r is not None
    return r.get("type", ""), r.get("classificationMax", ""), [float(i.get("value", "nan")) for i in r.iter("item")]


def test_confidence_and_probabilities_open_on_a_fixed_ramp(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    weights, _ = tiny_unet
    src = rgb(tmp_path)
    args = ["-q", "predict", str(src), "--weights", str(weights), "--vector", "none", "--overwrite"]
    for kind, top in (("uint8", 100.0), ("float32", 1.0)):
        out = tmp_path / kind
        res = runner.invoke(cli, [*args, "--out", str(out), "--confidence", kind, "--probabilities", kind])
        assert res.exit_code == 0, res.output
        for name in ("scene_confidence.qml", "scene_probabilities.qml"):
            rtype, cmax, values = ramp_style(out / name)
            # the style's range is the raster's (percent or 0-1), not a stretch of this scene's values
            assert (rtype, float(cmax), values[0], values[-1]) == ("singlebandpseudocolor", top, 0.0, top), name
            assert values == sorted(values) and len(values) == 5
        assert (out / "scene_confidence.qml").read_text() != (out / "scene_probabilities.qml").read_text()
    # without them, no styles
    out = tmp_path / "none"
    res = runner.invoke(cli, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert outputs(out) == ["scene_landcover.qml", "scene_landcover.tif", "scene_landcover.tif.aux.xml"]


def test_predict_tta_flag_reaches_the_model(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    weights, _ = tiny_unet
    src = rgb(tmp_path)
    conf = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = tmp_path / name
        res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(weights), "--out", str(out),
                                  "--vector", "none", "--confidence", "float32", *extra])
        assert res.exit_code == 0, res.output
        with rasterio.open(out / "scene_confidence.tif") as ds:
            conf[name] = ds.read(1)
    # a random-init network is not flip/rotation invariant: averaging its 8 views changes its output
    assert not np.allclose(conf["plain"], conf["tta"])


def test_predict_adapt_prior_flag_and_card_default(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    import shutil

    from geoseg.card import ModelCard

    weights, card_path = tiny_unet
    src = rgb(tmp_path)
    # The tiny card has no class_prior: --adapt-prior is refused in one line, nothing written.
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(weights), "--out", str(tmp_path / "no"),
                              "--vector", "none", "--adapt-prior"])
    assert res.exit_code == 1 and "no class_prior" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())
    # A card whose class_prior is far from this scene's mix and that turns adaptation on.
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(weights, d / "w.pdparams")
    ModelCard.load(card_path).replace(class_prior=(0.97, 0.01, 0.01, 0.01), adapt_prior=True).save(d / "w.yaml")
    masks = {}
    for name, extra in (("card", []), ("off", ["--no-adapt-prior"])):
        res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(d / "w.pdparams"),
                                  "--out", str(tmp_path / name), "--vector", "none", *extra])
        assert res.exit_code == 0, res.output
        with rasterio.open(tmp_path / name / "scene_landcover.tif") as ds:
            masks[name] = ds.read(1)
            assert ("GEOSEG_SCENE_PRIOR" in ds.tags()) == (name == "card")
    assert (masks["card"] != masks["off"]).any()


def test_predict_vector_none_and_geojson(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "a"), "--vector", "none"])
    assert res.exit_code == 0, res.output
    assert outputs(tmp_path / "a") == ["scene_landcover.qml", "scene_landcover.tif", "scene_landcover.tif.aux.xml"]
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "b"), "--vector", "geojson"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "scene_landcover.geojson").exists()


def test_predict_vector_classes(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    import pyogrio

    src = rgb(tmp_path)
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    _, _, _, (ids_all, *_) = pyogrio.raw.read(tmp_path / "a" / "scene_landcover.gpkg", layer="landcover")
    keep = int(np.bincount(ids_all).argmax())
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "b"),
                              "--vector-classes", str(keep)])
    assert res.exit_code == 0, res.output
    _, _, _, (ids, *_) = pyogrio.raw.read(tmp_path / "b" / "scene_landcover.gpkg", layer="landcover")
    assert set(ids) == {keep} and len(ids) == int((ids_all == keep).sum()) and len(ids) < len(ids_all)
    # an unknown class is refused before any output
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "c"),
                              "--vector-classes", "roads"])
    assert res.exit_code == 1 and "class 'roads' is not one of" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c").exists() or outputs(tmp_path / "c") == []
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "d"),
                              "--vector-classes", str(keep), "--vector", "none"])
    assert res.exit_code == 1 and "--vector none writes none" in res.output and not (tmp_path / "d").exists()
    for opt, said in ((["--min-area", "500"], "--min-area sieves the polygons to write"),
                      (["--simplify", "0"], "--simplify simplifies the polygons to write")):  # (they were ignored)
        res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "e"), *opt,
                                  "--vector", "none"])
        assert res.exit_code == 1 and said in res.output and not (tmp_path / "e").exists(), res.output


def test_a_full_disk_is_one_line_at_the_cli() -> None:
    import errno

    from geoseg_cli.main import to_click_error

    e = to_click_error(OSError(errno.ENOSPC, "No space left on device", "runs/x/weights.pdparams"))
    assert e.message == ("no space left on the device (writing runs/x/weights.pdparams): free some space or write "
                         "it elsewhere") and e.exit_code == 1
    # a file no one named: no advice about --out (the report's or log's disk was full, not --out's)
    assert to_click_error(OSError(errno.ENOSPC, "No space left on device")).message == (
        "no space left on the device: free some space where the outputs go, or in the temporary folder "
        f"{tempfile.gettempdir()} (TMPDIR moves it)")
    # a full temporary folder is named as such (it was told like a full --out: "write it elsewhere")
    scratch = os.path.join(tempfile.gettempdir(), "geoseg-labels-x", "labels.tif")
    assert to_click_error(OSError(errno.ENOSPC, "No space left on device", scratch)).message == (
        f"no space left on the device of the temporary folder {tempfile.gettempdir()} (writing {scratch}): free some "
        "space there or point TMPDIR at a disk with room")
    # an output written in the temporary folder (--out /tmp/results): its own disk, as any output's
    out = os.path.join(tempfile.gettempdir(), "results", ".geoseg-tmp-scene_landcover.tif")
    assert to_click_error(OSError(errno.ENOSPC, "No space left on device", out)).message == (
        f"no space left on the device (writing {out}): free some space or write it elsewhere")
    assert to_click_error(OSError(errno.EACCES, "Permission denied")).message.startswith("unexpected error: ")


def test_one_v_shows_the_libraries_info_lines_and_two_their_debug_lines(runner: CliRunner, tmp_path: Path) -> None:
    import logging

    src = rgb(tmp_path)
    levels = {}
    for flags in ([], ["-v"], ["-vv"]):
        assert runner.invoke(cli, [*flags, "info", str(src), "--no-model"]).exit_code == 0
        levels[len(flags) and len(flags[0]) - 1] = logging.getLogger("rasterio").level
    # -v printed ~1,100 rasterio DEBUG lines for one small scene
    assert levels == {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def test_a_bad_value_from_the_environment_names_the_variable(runner: CliRunner, tmp_path: Path) -> None:
    src = rgb(tmp_path)
    r = runner.invoke(cli, ["predict", str(src)], env={"GEOSEG_PREDICT_DEVICE": "tpu"})
    assert r.exit_code == 2 and "'--device' (set by the environment variable GEOSEG_PREDICT_DEVICE)" in r.output, r.output
    r = runner.invoke(cli, ["predict", str(src), "--device", "tpu"])  # typed: no variable to name
    assert r.exit_code == 2 and "Invalid value for '--device': 'tpu'" in r.output, r.output


def test_creation_options_are_checked_apart_from_other_threads_gdal_messages(caplog: pytest.LogCaptureFixture) -> None:
    """The --co probe took another thread's GDAL warning (a GTiff written with an option GDAL ignores)
    for the COG driver's refusal of a valid option, cached the refusal for the process, and swallowed
    that thread's warning."""
    import logging
    import threading

    from rasterio.io import MemoryFile

    from geoseg.profiles import get_profile

    stop = threading.Event()

    def other_work() -> None:
        while not stop.is_set():
            with MemoryFile() as mf, mf.open(driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                                             foo_option="1") as ds:
                ds.write(np.zeros((1, 8, 8), np.uint8))

    caplog.set_level(logging.WARNING, logger="rasterio._env")
    other = threading.Thread(target=other_work)
    other.start()
    try:
        time.sleep(0.1)
        for blocksize in ("256", "1024", "128"):  # (each a new option set: no answer cached)
            assert get_profile("mask", {"BLOCKSIZE": blocksize})["BLOCKSIZE"] == blocksize
    finally:
        stop.set()
        other.join()
    assert any("FOO_OPTION" in r.getMessage() for r in caplog.records)  # the other thread's warnings still show


def test_a_bad_co_from_the_environment_names_the_variable(runner: CliRunner, tmp_path: Path,
                                                           tiny_unet: tuple[Path, Path]) -> None:
    """--co is parsed by the command and checked by the library: both errors named only --co, which the
    user never typed when GEOSEG_PREDICT_CO set it."""
    src, (weights, _) = rgb(tmp_path), tiny_unet
    args = ["predict", str(src), "--weights", str(weights), "--out", str(tmp_path / "o"), "--vector", "none"]
    r = runner.invoke(cli, args, env={"GEOSEG_PREDICT_CO": "COMPRESS"})
    assert r.exit_code == 2 and "--co (set by the environment variable GEOSEG_PREDICT_CO): 'COMPRESS'" in r.output, r.output
    r = runner.invoke(cli, args, env={"GEOSEG_PREDICT_CO": "FOO=BAR"})
    assert r.exit_code == 1 and "refuses it" in r.output, r.output
    assert r.output.rstrip().endswith("(--co was set by the environment variable GEOSEG_PREDICT_CO)"), r.output
    r = runner.invoke(cli, [*args, "--co", "FOO=BAR"])  # typed: no variable to name
    assert r.exit_code == 1 and "refuses it" in r.output and "environment" not in r.output, r.output
    # a key twice (the last won without a word) or no key (GDAL's "'X' is an unexpected value for  creation option")
    r = runner.invoke(cli, [*args, "--co", "compress=zstd", "--co", "COMPRESS=LZW"])
    assert r.exit_code == 2 and "COMPRESS is given twice (zstd and LZW): give it once" in r.output, r.output
    r = runner.invoke(cli, [*args, "--co", "=x"])
    assert r.exit_code == 2 and "the option has no name" in r.output, r.output
    assert not (tmp_path / "o").exists()
    # a library check that names its keyword ("min_pixels -3 is not allowed"), not the option
    mask = write_raster(tmp_path / "m.tif", np.ones((20, 20), np.uint8), nodata=0)
    r = runner.invoke(cli, ["vectorize", str(mask), "--out", str(tmp_path / "v.gpkg")],
                      env={"GEOSEG_VECTORIZE_MIN_PIXELS": "-3"})
    assert r.exit_code == 2 and ("Invalid value for '--min-pixels' (set by the environment variable "
                                 "GEOSEG_VECTORIZE_MIN_PIXELS): -3 is not allowed: use a number >= 0") in r.output, r.output


def test_model_weights_and_card_paths_are_named_for_what_they_are(runner: CliRunner, tmp_path: Path,
                                                                   tiny_unet: tuple[Path, Path]) -> None:
    """--model EXPORT --weights W ran the export and ignored --weights; a run folder as --weights said it
    "does not exist"; --model RUN_FOLDER told to call export_model; a missing --card said to put it beside."""
    import shutil

    src, (weights, card) = rgb(tmp_path), tiny_unet
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(weights, run / "weights.pdparams")
    shutil.copy(card, run / "weights.yaml")
    export = tmp_path / "export"
    export.mkdir()
    (export / "deploy.yaml").write_text("Deploy: {}\n")
    base = ["predict", str(src), "--out", str(tmp_path / "o"), "--vector", "none"]
    r = runner.invoke(cli, [*base, "--model", str(export), "--weights", str(weights)])
    assert_one_line_error(r, f"--model {export} is an exported model, which holds its own weights: drop --weights")
    r = runner.invoke(cli, [*base, "--model", str(run)])
    assert_one_line_error(r, f"--model {run} is a training run's folder, not an exported model: pass --weights "
                             f"{run / 'weights.pdparams'}")
    r = runner.invoke(cli, [*base, "--weights", str(weights), "--card", str(tmp_path / "nope.yaml")])
    assert_one_line_error(r, f"--card {tmp_path / 'nope.yaml'} does not exist")
    r = runner.invoke(cli, [*base, "--weights", str(tmp_path)])
    assert_one_line_error(r, f"--weights {tmp_path} is a folder without weights.pdparams")
    r = runner.invoke(cli, [*base, "--weights", str(run)])  # a finished run's folder: its weights
    assert r.exit_code == 0 and (tmp_path / "o" / "scene_landcover.tif").exists(), r.output


def test_the_library_keeps_paddle_s_c_plus_plus_log_to_errors(tmp_path: Path) -> None:
    """API users (not only the CLI) got glog's 'W1130 ... PIR not support input out tensor' line on each export."""
    import os
    import subprocess

    # glog reads its level once, as paddle is imported: set for the import, then put back (child
    # processes inherited it)
    code = ("import os, sys; from geoseg.engine import resolve_model, exported_for_inference; "
            "exported_for_inference(resolve_model('unet')); print(os.environ.get('GLOG_minloglevel'))")
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}
    env["GEOSEG_CACHE_DIR"] = str(tmp_path / "cache")
    env["GLOG_v"] = "3"  # (verbose info lines, which every paddle version writes on an export; 3.0 writes no W line)
    glog = re.compile(r"^[IWEF]\d{4} ", re.M)  # ("W1130 ... PIR not support ..." on 3.3, "I1130 ..." on 2.6)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None" and "ccache" not in out.stderr and not glog.search(out.stderr), out.stderr
    env["GLOG_minloglevel"] = "0"  # the user's own setting stays (and shows the lines)
    env["GEOSEG_CACHE_DIR"] = str(tmp_path / "cache2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0" and glog.search(out.stderr), out.stderr


def test_version_names_the_libraries_without_importing_paddle(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from geoseg import __version__

    monkeypatch.setitem(sys.modules, "paddle", None)  # 'import paddle' would raise: --version must not need it
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"geoseg {__version__}"
    import rasterio

    assert f"  GDAL {rasterio.__gdal_version__}" in lines and f"  rasterio {rasterio.__version__}" in lines
    assert any(line.startswith(("  paddlepaddle", "  PaddlePaddle not installed")) for line in lines)


def test_predict_help_shows_examples(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["predict", "--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output and "geoseg predict scene.tif --model deeplabv3p --out out/" in res.output


def test_missing_file(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    res = runner.invoke(cli, ["predict", str(tmp_path / "nope.tif"), "--weights", str(tiny_unet[0])])
    assert_one_line_error(res, "does not exist")


def test_not_a_raster(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not an image\n")
    res = runner.invoke(cli, ["predict", str(bad), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")])
    assert_one_line_error(res, "not a raster")
    assert not (tmp_path / "o").exists() or outputs(tmp_path / "o") == []


def test_corrupt_tiff(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    good = rgb(tmp_path, "good.tif", h=300, w=300)
    raw = good.read_bytes()
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(raw[: len(raw) // 3])
    out = tmp_path / "o"
    out.mkdir()
    res = runner.invoke(cli, ["predict", str(bad), "--weights", str(tiny_unet[0]), "--out", str(out)])
    assert_one_line_error(res, "corrupt")
    assert outputs(out) == []


def test_no_crs_warns_and_writes(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    src = rgb(tmp_path, "nocrs.tif", crs=None)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "no CRS" in res.stderr and "polygons are not written" in res.stderr
    with rasterio.open(tmp_path / "nocrs_landcover.tif") as ds:
        assert ds.crs is None
    # no geotransform either: geoseg's two warnings, not rasterio's "no geotransform" at each opening
    bare = tmp_path / "bare.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(bare, "w", driver="GTiff", width=60, height=50, count=3, dtype="uint8") as ds:
            ds.write(np.random.default_rng(1).integers(20, 220, (3, 50, 60), dtype=np.uint8))
    for args in (["predict", str(bare), "--weights", str(tiny_unet[0]), "--out", str(tmp_path)], ["info", str(bare)]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert "geotransform, gcps" not in res.stderr, res.stderr
    assert res.stderr.count("no CRS") == 0 and "unknown (no geotransform)" in res.stdout


@pytest.mark.parametrize("by", ["gcps", "rpcs"])
def test_gcp_or_rpc_scene_mask_carries_them(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path], by: str) -> None:
    """Unrectified imagery (georeferenced by GCPs or RPCs, no geotransform): the mask and confidence
    carry the same GCPs/RPCs so GIS tools place them as the scene; polygons are skipped, saying why."""
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC

    src = tmp_path / "l1.tif"
    data = np.random.default_rng(0).integers(0, 255, (3, 40, 48), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(src, "w", driver="GTiff", width=48, height=40, count=3, dtype="uint8") as ds:
            ds.write(data)
            if by == "gcps":
                ds.gcps = ([GroundControlPoint(r, c, 500000 + 30 * c, 4000000 - 30 * r, id=f"p{r}_{c}")
                            for r in (0, 40) for c in (0, 48)], rasterio.crs.CRS.from_epsg(32618))
            else:
                ds.rpcs = RPC(height_off=100, height_scale=500, lat_off=35.8, lat_scale=0.1, long_off=-78.6,
                              long_scale=0.1, line_off=20, line_scale=20, samp_off=24, samp_scale=24,
                              line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
                              samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19)
    res = runner.invoke(cli, ["info", str(src), "--no-model"])
    assert res.exit_code == 0, res.output
    assert ("4 ground control points" if by == "gcps" else "RPCs") in res.stdout
    # the pixel size of GCPs is fitted to them (it was the identity grid's "1 x 1"); RPCs: unknown
    assert ("pixel size: about 30 x 30 (fitted to the ground control points) (about 30 m on the ground)" if by == "gcps"
            else "pixel size: unknown (no geotransform)") in res.stdout
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path),
                              "--confidence", "uint8", "--probabilities", "uint8"])
    assert res.exit_code == 0, res.output
    assert "polygons are not written" in res.stderr and "gdalwarp" in res.stderr
    assert ("4 ground control points" if by == "gcps" else "RPCs") in res.stderr
    assert "identity" not in res.stderr.lower() and "no geotransform" not in res.stderr.lower()
    assert not (tmp_path / "l1_landcover.gpkg").exists()
    res = runner.invoke(cli, ["vectorize", str(tmp_path / "l1_landcover.tif")])
    assert_one_line_error(res, "not a map grid", "gdalwarp -r near")
    with rasterio.open(src) as s:
        want_gcps, want_rpcs = s.gcps, s.rpcs
    for name in ("l1_landcover.tif", "l1_confidence.tif", "l1_probabilities.tif"):
        with rasterio.open(tmp_path / name) as ds:
            assert ds.crs is None and ds.transform.is_identity
            if by == "gcps":
                assert ds.gcps[1] == want_gcps[1]
                assert [(g.row, g.col, g.x, g.y) for g in ds.gcps[0]] == [(g.row, g.col, g.x, g.y) for g in want_gcps[0]]
            else:
                got = ds.rpcs.to_dict() if ds.rpcs is not None else {}
                want = want_rpcs.to_dict()
                assert set(got) == set(want)
                for key, value in want.items():
                    assert np.allclose(got[key], value), key


def test_scene_inside_a_zip_archive(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A GDAL virtual path (/vsizip/) is read as the file itself; outputs default to the current folder."""
    import zipfile

    src = rgb(tmp_path, "inzip.tif")
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as z:
        z.write(src, "sub/inzip.tif")
    plain = tmp_path / "plain"
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(plain), "--vector", "none"])
    assert res.exit_code == 0, res.output
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    vsi = f"/vsizip/{tmp_path / 'scenes.zip'}/sub/inzip.tif"
    res = runner.invoke(cli, ["info", vsi, "--no-model"])
    assert res.exit_code == 0 and "150 x 90" in res.stdout, res.output
    res = runner.invoke(cli, ["predict", vsi, "--weights", str(tiny_unet[0]), "--vector", "none"])
    assert res.exit_code == 0, res.output
    with rasterio.open(work / "inzip_landcover.tif") as a, rasterio.open(plain / "inzip_landcover.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
        assert np.array_equal(a.read(1), b.read(1))
    res = runner.invoke(cli, ["predict", f"/vsizip/{tmp_path / 'scenes.zip'}/sub/other.tif", "--weights", str(tiny_unet[0])])
    assert_one_line_error(res, "other.tif does not exist", "inside the archive")
    res = runner.invoke(cli, ["predict", f"zip://{tmp_path / 'scenes.zip'}!sub/inzip.tif", "--weights", str(tiny_unet[0])])
    assert_one_line_error(res, "/vsizip/")


def test_scene_of_one_file_per_band_through_a_vrt(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """Per-band deliveries (Landsat, Sentinel-2) stacked by a VRT (as gdalbuildvrt -separate writes it)
    predict exactly as the same bands in one GeoTIFF."""
    src = rgb(tmp_path, "stack.tif")
    write_band_vrt(src, tmp_path / "bands.vrt")
    for name in ("stack.tif", "bands.vrt"):
        res = runner.invoke(cli, ["predict", str(tmp_path / name), "--weights", str(tiny_unet[0]), "--out",
                                  str(tmp_path / "out"), "--vector", "none"])
        assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "out" / "stack_landcover.tif") as a, rasterio.open(tmp_path / "out" / "bands_landcover.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
        assert np.array_equal(a.read(1), b.read(1)) and (a.read(1) != 255).any()


def test_a_vrt_of_bands_of_two_data_types_is_one_line_error(runner: CliRunner, tmp_path: Path,
                                                          tiny_unet: tuple[Path, Path]) -> None:
    """A per-band VRT whose band files differ in type (Landsat's float bands beside an int16 one) failed
    as "unexpected error: ValueError: more than one 'dtype' found", in predict and in train."""
    write_band_vrt(rgb(tmp_path, "stack.tif"), tmp_path / "bands.vrt")
    vrt = tmp_path / "bands.vrt"
    vrt.write_text(vrt.read_text().replace('dataType="Byte" band="3"', 'dataType="UInt16" band="3"'))
    res = runner.invoke(cli, ["predict", str(vrt), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o"),
                              "--vector", "none"])
    # (the type that holds every band's values, by its GDAL name: '-ot uint8' was no GDAL type, and clipped)
    assert_one_line_error(res, "bands of more than one data type: uint8 (bands 1,2), uint16 (band 3)",
                          "-ot UInt16")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    # bands of one type, band 1 (not read) of another: read, and normalised as their type
    data = (np.random.default_rng(1).random((4, 90, 150)) * 200 + 20).astype(np.uint8)
    four = tmp_path / "four"
    four.mkdir()
    write_band_vrt(write_raster(four / "stack.tif", data, nodata=0), four / "bands.vrt")
    (four / "bands.vrt").write_text((four / "bands.vrt").read_text().replace('dataType="Byte" band="1"',
                                                                             'dataType="UInt16" band="1"'))
    write_raster(four / "three.tif", data[1:], nodata=0)
    for name, extra in (("bands.vrt", ["--bands", "2,3,4"]), ("three.tif", [])):
        res = runner.invoke(cli, ["predict", str(four / name), "--weights", str(tiny_unet[0]), "--out", str(four / "o"),
                                  "--vector", "none", *extra])
        assert res.exit_code == 0, res.output
    with rasterio.open(four / "o" / "bands_landcover.tif") as a, rasterio.open(four / "o" / "three_landcover.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
    labels = write_raster(tmp_path / "labels.tif", np.ones((1, 90, 150), np.uint8))
    (tmp_path / "c.yaml").write_text(f"image: {vrt}\nlabels: {labels}\nout: {tmp_path / 'run'}\niterations: 1\nwarmup: 0\n")
    res = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml")])
    assert_one_line_error(res, "bands of more than one data type")


def test_creation_options_reach_the_cog_and_bad_ones_are_refused_first(runner: CliRunner, tmp_path: Path,
                                                                         tiny_unet: tuple[Path, Path]) -> None:
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "ok"),
                              "--vector", "none", "--co", "COMPRESS=LZW", "--co", "blocksize=256"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "ok" / "scene_landcover.tif") as ds:
        assert ds.compression.name.upper() == "LZW" and ds.block_shapes[0] == (256, 256)  # default: DEFLATE, 512
    # GDAL only warns about these (or fails after the whole scene was segmented): refused up front
    for co, words in [("COMPRESS=FOO", "'FOO' is an unexpected value for COMPRESS"),
                      ("NOTANOPTION=1", "does not support creation option NOTANOPTION"),
                      ("BLOCKSIZE=100", "BLOCKSIZE"), ("NODATA=0", "fixed by geoseg"),
                      # exit 0 with the mask warped onto Web Mercator tiles, off the scene's grid
                      ("TILING_SCHEME=GoogleMapsCompatible", "warp the raster onto another grid"),
                      ("TARGET_SRS=EPSG:4326", "TARGET_SRS makes GDAL warp"),
                      # exit 0 with an all-nodata mask (GDAL's error in a worker thread went unseen)
                      ("COMPRESS=WEBP", "COMPRESS=WEBP is lossy"),
                      # JPEG: refused only after the whole scene was segmented; LERC's error moved class ids
                      ("COMPRESS=JPEG", "lossy"), ("MAX_Z_ERROR=3", "COMPRESS=LERC is lossy"),
                      # exit 0 with ids between two classes' (and 0) in the overviews QGIS shows zoomed out
                      ("OVERVIEW_RESAMPLING=CUBIC", "OVERVIEW_RESAMPLING=CUBIC would put values that are no class")]:
        if co.startswith("MAX_Z"):
            co = f"COMPRESS=LERC --co {co}"
        out = tmp_path / re.sub(r"\W", "_", co.split("=")[1].lower())
        cos = [s for one in co.split(" --co ") for s in ("--co", one)]
        res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out), *cos])
        assert_one_line_error(res, words)
        assert not list(out.glob("*.tif"))
    from geoseg.profiles import get_profile

    # a warp's own options change nothing without a warp, and LERC below 0.5 keeps whole class ids
    for co in ({"ADD_ALPHA": "NO"}, {"WARP_RESAMPLING": "NEAREST"}, {"COMPRESS": "LERC_ZSTD", "MAX_Z_ERROR": "0.4"},
               {"OVERVIEW_RESAMPLING": "nearest"}):
        assert get_profile("mask", co)
    assert get_profile("confidence_uint8", {"OVERVIEW_RESAMPLING": "CUBIC"})  # (not class ids)
    batch_out = tmp_path / "batch"
    res = runner.invoke(cli, ["batch", str(src), "--weights", str(tiny_unet[0]), "--out", str(batch_out),
                              "--co", "COMPRESS=FOO"])
    assert_one_line_error(res, "COMPRESS=FOO")
    assert not batch_out.exists()


def test_band_mismatch_names_both_numbers(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    src = write_raster(tmp_path / "five.tif", np.ones((5, 40, 40), np.uint8))
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o.tif")])
    assert_one_line_error(res, "gives 5 bands", "expects 3", "--bands")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o.tif"), "--bands", "5,3,1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--bands", "4,x"])
    assert res.exit_code == 2 and "band numbers" in res.output


def test_unknown_model_lists_choices(runner: CliRunner, tmp_path: Path) -> None:
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["predict", str(src), "--model", "segformer"])
    assert_one_line_error(res, "unknown model 'segformer'", "deeplabv3p", "unet")


def test_no_weights_says_so(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.engine

    monkeypatch.setattr(geoseg.engine, "WEIGHTS_DIR", tmp_path / "none")
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["predict", str(src), "--model", "unet"])
    assert_one_line_error(res, "no trained weights", "--weights")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--overlap", "64"], ["overlap 64 must be smaller than the tile size 64"]),  # the card's window (64)
    ],
)
def test_tile_and_overlap_out_of_range(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path], args: list[str], words: list[str]) -> None:
    src = rgb(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out), *args])
    assert_one_line_error(res, *words)
    assert outputs(out) == []


@pytest.mark.parametrize(("size", "said"), [("0", "0 is too small: use at least 16"), ("8", "8 is too small"),
                                            ("100", "100 is not a multiple of 16: the models downsample 16x (try 96)")])
def test_a_tile_size_the_models_cannot_take_is_a_usage_error(runner: CliRunner, tmp_path: Path,
                                                             tiny_unet: tuple[Path, Path], size: str, said: str) -> None:
    """0 was a usage error ("use a number >= 1"), 1 and 100 failures of the run ("use at least 16"): exit 2 or 1."""
    for cmd in (["predict", str(rgb(tmp_path)), "--weights", str(tiny_unet[0])],
                ["info", str(rgb(tmp_path)), "--weights", str(tiny_unet[0])]):
        res = runner.invoke(cli, [*cmd, "--tile-size", size])
        assert res.exit_code == 2 and f"Invalid value for '--tile-size': {said}" in res.output, res.output
    res = runner.invoke(cli, ["info", str(rgb(tmp_path)), "--weights", str(tiny_unet[0]), "--overlap", "-5"])
    assert res.exit_code == 2 and "'--overlap': -5 is not in the range x>=0" in res.output, res.output
    for cmd in ("predict", "info"):  # an overlap as large as the window given: a usage error too (it was exit 1)
        res = runner.invoke(cli, [cmd, str(rgb(tmp_path)), "--weights", str(tiny_unet[0]), "--tile-size", "32",
                                  "--overlap", "32"])
        assert res.exit_code == 2 and "'--overlap': 32 must be smaller than --tile-size 32: try 8" in res.output


def test_a_negative_overlap_is_a_usage_error(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    res = runner.invoke(cli, ["predict", str(rgb(tmp_path)), "--weights", str(tiny_unet[0]), "--overlap", "-4"])
    assert res.exit_code == 2 and "'--overlap': -4 is not in the range x>=0" in res.output, res.output
    with pytest.raises(ParameterError, match="overlap -4 is negative"):  # the library's own check
        from geoseg.tiling import check_tile_params

        check_tile_params(64, -4)


def test_unwritable_output(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "no" / "such" / "x.tif")])
    assert_one_line_error(res, "does not exist", "create it")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "no" / "such" / "dir")])
    assert_one_line_error(res, "does not exist")
    # an existing file as the folder, or as the folder of a .tif name: said as such (was "does not exist")
    (tmp_path / "afile").write_text("keep")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "afile")])
    assert_one_line_error(res, "afile is a file, not a folder: give a folder or the mask's .tif name")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "afile" / "m.tif")])
    assert_one_line_error(res, "afile is a file, not a folder")
    # a polygons file name is not taken for a folder to create
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "x.geojson")])
    assert_one_line_error(res, "x.geojson: give a folder or the mask's .tif name", "--vector geojson")
    assert (tmp_path / "afile").read_text() == "keep" and not (tmp_path / "x.geojson").exists()
    # nor another image format's name (mask.png became a folder holding the mask)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "mask.png")])
    assert_one_line_error(res, "mask.png: the mask is a GeoTIFF: give its .tif name or a folder")
    assert not (tmp_path / "mask.png").exists()


def test_a_failed_run_leaves_no_output_folder_it_created(runner: CliRunner, tmp_path: Path,
                                                         tiny_unet: tuple[Path, Path]) -> None:
    """--out names a folder predict creates; a run refused after that (a bad --co, a scene unreadable
    halfway) removed its outputs but left the empty folder."""
    src = rgb(tmp_path, h=300, w=300)
    for name, args in (("co", ["--co", "FOO=BAR"]), ("tile", ["--overlap", "64"])):  # (the card's window: 64)
        out = tmp_path / name
        res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out), *args])
        assert res.exit_code == 1 and not out.exists(), (name, res.output)
    with rasterio.open(src) as s:  # compressed blocks, the second half garbled: the read fails halfway
        profile = {**s.profile, "compress": "deflate", "tiled": True, "blockxsize": 64, "blockysize": 64}
        data = s.read()
    bad = tmp_path / "bad.tif"
    with rasterio.open(bad, "w", **profile) as d:
        d.write(data)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2:] = b"\x17" * (len(raw) - len(raw) // 2)
    bad.write_bytes(bytes(raw))
    out = tmp_path / "halfway"
    res = runner.invoke(cli, ["predict", str(bad), "--weights", str(tiny_unet[0]), "--out", str(out)])
    assert res.exit_code == 1 and not out.exists(), res.output
    # a folder that existed stays, and so does one holding anything
    out.mkdir()
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out), "--co", "FOO=BAR"])
    assert res.exit_code == 1 and out.is_dir()


def test_existing_output_without_overwrite(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    src = rgb(tmp_path)
    target = tmp_path / "scene_landcover.tif"
    target.write_bytes(b"precious")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0])])
    assert_one_line_error(res, "already exists", "--overwrite")
    assert target.read_bytes() == b"precious"
    # a style or .aux.xml of its own beside where the mask goes is not replaced silently either
    target.unlink()
    for name in ("scene_landcover.qml", "scene_landcover.tif.aux.xml", "scene_confidence.qml"):
        side = tmp_path / name
        side.write_text("<qgis>my style</qgis>")
        res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--confidence", "uint8"])
        assert_one_line_error(res, f"output {side} already exists", "--overwrite")
        assert side.read_text() == "<qgis>my style</qgis>" and not target.exists()
        side.unlink()


def test_weights_without_card(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    lonely = tmp_path / "lonely.pdparams"
    lonely.write_bytes(tiny_unet[0].read_bytes())
    res = runner.invoke(cli, ["predict", str(rgb(tmp_path)), "--weights", str(lonely)])
    assert_one_line_error(res, "no model card", "--card")
    res = runner.invoke(cli, ["predict", str(rgb(tmp_path)), "--weights", str(lonely), "--card", str(tiny_unet[1]), "--model", "deeplabv3p"])
    assert_one_line_error(res, "does not match")


def test_missing_paddle_names_the_extra(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paddle", None)  # makes 'import paddle' raise ImportError
    res = runner.invoke(cli, ["predict", str(rgb(tmp_path)), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o.tif")])
    assert_one_line_error(res, "PaddlePaddle is not installed", "pip install 'paddlepaddle>=3'")
    assert not (tmp_path / "o.tif").exists()


def test_aoi_box_and_polygons_give_the_whole_scene_classes_there(runner: CliRunner, tmp_path: Path,
                                                                   tiny_unet: tuple[Path, Path]) -> None:
    import shapely
    from rasterio.warp import transform as warp_xy

    weights, _ = tiny_unet
    src = rgb(tmp_path, h=150, w=230)  # UTM 33N, origin 500000/4800000, 10 m
    base = ["predict", str(src), "--weights", str(weights), "--vector", "none", "--probabilities", "float32"]
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "full")])
    assert res.exit_code == 0, res.output
    full_windows = int(re.search(r": (\d+) windows", res.stderr).group(1))
    with rasterio.open(tmp_path / "full" / "scene_landcover.tif") as ds:
        full, full_t = ds.read(1), ds.transform
    with rasterio.open(tmp_path / "full" / "scene_probabilities.tif") as ds:
        full_p = ds.read()
    # a box in the scene's CRS: the pixels whose centres it holds (cols 20-89, rows 20-69), same classes
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "box"), "--aoi", "500201,4799301,500899,4799799"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "box" / "scene_landcover.tif") as ds:
        assert ds.shape == (50, 70) and ds.transform == full_t * full_t.translation(20, 20)
        np.testing.assert_array_equal(ds.read(1), full[20:70, 20:90])
    with rasterio.open(tmp_path / "box" / "scene_probabilities.tif") as ds:
        np.testing.assert_array_equal(ds.read(), full_p[:, 20:70, 20:90])
    # a triangle in lon/lat: its bounding box, nodata outside it, the whole-scene classes inside it
    corners = [(500100.0, 4799100.0), (501900.0, 4799300.0), (500700.0, 4799900.0)]
    lon, lat = warp_xy("EPSG:32633", "EPSG:4326", *zip(*corners))
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                   "geometry": {"type": "Polygon", "coordinates": [[*map(list, zip(lon, lat)), [lon[0], lat[0]]]]}}]}))
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(weights), "--vector", "none",
                              "--out", str(tmp_path / "tri"), "--aoi", str(aoi)])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "tri" / "scene_landcover.tif") as ds:
        mask, t = ds.read(1), ds.transform
    c0, r0 = (round(v) for v in ~full_t * (t.c, t.f))
    rows, cols = np.indices(mask.shape)
    xs, ys = t * (cols + 0.5, rows + 0.5)
    # (its edges are straight in lon/lat, the file's CRS: on the scene's grid they bend a little)
    plon, plat = warp_xy("EPSG:32633", "EPSG:4326", xs.ravel(), ys.ravel())
    inside = shapely.contains_xy(shapely.Polygon(zip(lon, lat)), plon, plat).reshape(xs.shape)
    # the bounding box of the pixels whose centres it holds (its bounds' box held a last column of none)
    assert mask.shape == (80, 179) and (c0, r0) == (10, 10)
    kept = mask != 255
    assert kept[0].any() and kept[-1].any() and kept[:, 0].any() and kept[:, -1].any()
    assert 0.2 < inside.mean() < 0.8
    assert (mask[~inside] == 255).all()
    np.testing.assert_array_equal(mask[inside], full[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]][inside])
    # windows missing the AOI are never run
    assert 0 < int(re.search(r": (\d+) windows", res.stderr).group(1)) < full_windows


def test_aoi_refusals(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    weights, _ = tiny_unet
    src = rgb(tmp_path)
    out = tmp_path / "out"
    base = ["predict", str(src), "--weights", str(weights), "--out", str(out)]
    res = runner.invoke(cli, [*base, "--aoi", "600000,4700001,600100,4700002.5"])  # (UTM metres, not 4.7e+06)
    assert_one_line_error(res, "--aoi box 600000,4700001,600100,4700002.5 does not overlap scene.tif",
                          "AOI bounds 600000,4700001,600100,4700002.5", "scene bounds 500000")
    res = runner.invoke(cli, [*base, "--aoi", "500300,4799500,500100,4799900"])
    assert_one_line_error(res, "minx < maxx")
    res = runner.invoke(cli, [*base, "--aoi", "500100,4799500"])
    assert_one_line_error(res, "does not exist", "minx,miny,maxx,maxy")
    pts = tmp_path / "pts.geojson"
    pts.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                   "geometry": {"type": "Point", "coordinates": [15.0, 43.3]}}]}))
    res = runner.invoke(cli, [*base, "--aoi", str(pts)])
    assert_one_line_error(res, "has no polygons")
    for spec, said in ((str(tmp_path), "is a folder"), ("", "is empty")):  # (unexpected error: IsADirectoryError)
        res = runner.invoke(cli, [*base, "--aoi", spec])
        assert_one_line_error(res, said, "give a vector file")
    assert not out.exists() or outputs(out) == []


def test_predict_on_a_degree_grid_gives_class_areas_in_m2(tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """An EPSG:4326 scene (as many exports are): class areas geodesic row by row, polygons measured in
    m² with a minimum mapping unit in m²; a unit larger than the scene is refused before any output."""
    import rasterio.transform

    from geoseg.engine import PredictOptions, segment_scene

    pyproj = pytest.importorskip("pyproj")
    src = rgb(tmp_path, h=80, w=60, crs="EPSG:4326", transform=rasterio.transform.from_origin(10.0, 61.0, 0.01, 0.01))
    res = segment_scene(src, tmp_path / "out", weights=tiny_unet[0], options=PredictOptions(min_area=2e6, simplify=0, vector="gpkg"))
    with rasterio.open(res.mask) as ds:
        mask, classes = ds.read(1), read_classes(ds)
    geod = pyproj.Geod(ellps="WGS84")
    lat = 61.0 - 0.01 * np.arange(81)
    row = np.array([abs(geod.polygon_area_perimeter([10, 10.01, 10.01, 10], [lat[r], lat[r], lat[r + 1], lat[r + 1]])[0])
                    for r in range(80)])
    want = {c.name: float(((mask == c.id) * row[:, None]).sum()) for c in classes}
    assert res.class_area is not None and set(res.class_area) == set(want)
    for name, area in want.items():
        assert res.class_area[name] == pytest.approx(area, rel=1e-9, abs=1e-6)
    assert sum(res.class_area.values()) == pytest.approx(row.sum() * 60 * (mask != 255).mean(), rel=0.02)
    import pyogrio

    area = pyogrio.raw.read(res.extra_outputs[0], layer="landcover")[3][2]
    assert area.sum() == pytest.approx(sum(want.values()), rel=1e-3) and area.min() >= 2e6 * 0.99
    with pytest.raises(ParameterError, match="not smaller than the whole mask"):
        segment_scene(src, tmp_path / "big", weights=tiny_unet[0], options=PredictOptions(min_area=1e12, vector="gpkg"))
    assert not (tmp_path / "big").exists() or outputs(tmp_path / "big") == []


def test_an_unwritable_export_cache_falls_back_to_a_temporary_one(runner: CliRunner, tmp_path: Path,
                                                                  tiny_unet: tuple[Path, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cron user or a container with a read-only home still predicts (through Paddle Inference): the
    export goes to a temporary folder for the run, and the log says how to keep it."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(blocker / "cache"))
    src = rgb(tmp_path)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "out"),
                              "--vector", "none"])
    assert res.exit_code == 0, res.output
    said = [line for line in res.stderr.splitlines() if "export cache" in line]
    assert len(said) == 1 and said[0].startswith("warning: cannot write the export cache ") and "GEOSEG_CACHE_DIR" in said[0]
    assert (tmp_path / "out" / "scene_landcover.tif").exists() and blocker.read_text().startswith("a file")
    # a library call: a PerformanceWarning (the run goes on; each run exports again) with the same words
    from geoseg.engine import segment_scene
    from geoseg.errors import PerformanceWarning

    with pytest.warns(PerformanceWarning, match="^cannot write the export cache .*: exporting into .* set GEOSEG_CACHE_DIR"):
        segment_scene(src, tmp_path / "lib", weights=tiny_unet[0])
    assert said[0] == "warning: " + str(_warning_said(src, tmp_path / "lib2", tiny_unet[0]))


def test_a_killed_runs_temporary_export_cache_is_removed(tmp_path: Path, tiny_unet: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed with kill -9 never removed its temporary export cache: the next run that needs one
    removes those of processes that are gone, and leaves a live process's alone."""
    import subprocess
    import tempfile

    from geoseg.engine import PredictOptions, segment_scene
    from geoseg.errors import PerformanceWarning

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, alive = tmp_path / "tmp" / f"geoseg-exports-{gone.pid}", tmp_path / "tmp" / f"geoseg-exports-{os.getppid()}"
    dead_new = tmp_path / "tmp" / f"geoseg-exports-{gone.pid}-abcd1234"  # (named as since session 29)
    # a folder named as this process's would have been before (another local user's plant: its model was loaded)
    planted = tmp_path / "tmp" / f"geoseg-exports-{os.getpid()}"
    for d in (dead, alive, dead_new, planted):
        (d / "key").mkdir(parents=True)
    with pytest.warns(PerformanceWarning, match="cannot write the export cache"):
        segment_scene(rgb(tmp_path), tmp_path / "out", weights=tiny_unet[0], options=PredictOptions(vector="none"))
    assert not dead.exists() and not dead_new.exists() and (alive / "key").is_dir()
    (mine,) = (tmp_path / "tmp").glob(f"geoseg-exports-{os.getpid()}-*")  # this run's (removed at its exit)
    assert (mine.stat().st_mode & 0o777) == 0o700 and list(mine.glob("*/DONE"))
    assert list(planted.iterdir()) == [planted / "key"]  # (never used)


def _warning_said(src: Path, out: Path, weights: Path) -> Warning:
    from geoseg.engine import segment_scene
    from geoseg.errors import GeosegWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        segment_scene(src, out, weights=weights)
    return next(w.message for w in seen if issubclass(w.category, GeosegWarning))  # type: ignore[return-value]


def test_info_says_what_an_aoi_leaves_to_run(runner: CliRunner, tmp_path: Path) -> None:
    src = rgb(tmp_path, h=600, w=900)  # 10 m pixels from 500000/4800000
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--tile-size", "128", "--overlap", "32", "--json",
                              "--aoi", "500101,4796001,501499,4799899"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["aoi"]["window"] == [10, 10, 140, 390] and d["aoi"]["megapixels"] == round(140 * 390 / 1e6, 3)
    # windows of 128 px every 96 px: 2 columns (offsets 0, 96) and 5 rows (0 ... 384) of 10 x 6 meet it
    assert (d["windows"], d["aoi"]["windows"]) == (60, 10)
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--aoi", "500101,4796001,501499,4799899"])
    assert "140 x 390 px at column 10, row 10" in res.stdout
    res = runner.invoke(cli, ["info", str(src), "--no-model", "--aoi", "0,0,10,10"])
    assert_one_line_error(res, "does not overlap")


def test_info_counts_the_aoi_windows_predict_runs(runner: CliRunner, tmp_path: Path,
                                                  tiny_unet: tuple[Path, Path]) -> None:
    """Two blocks joined by a bridge thinner than a pixel that holds no pixel centre: the windows only the
    bridge crosses are not run by predict (nothing of the AOI in them), and info does not count them."""
    import pyogrio
    import shapely

    src = rgb(tmp_path, h=300, w=900)  # 10 m pixels from 500000/4800000
    blocks = [shapely.box(500100, 4799000, 501000, 4799900), shapely.box(507000, 4799000, 508000, 4799900)]
    bridge = shapely.box(501000, 4799492, 507000, 4799494)  # rows 50.6-50.8: no pixel centre (.5) in it
    aoi = tmp_path / "aoi.gpkg"
    pyogrio.raw.write(aoi, np.array([shapely.to_wkb(shapely.union_all([*blocks, bridge]))], object), [], [],
                      crs="EPSG:32633", geometry_type="Polygon", driver="GPKG")
    opts = ["--tile-size", "64", "--overlap", "16", "--aoi", str(aoi)]
    res = runner.invoke(cli, ["info", str(src), "--weights", str(tiny_unet[0]), "--json", *opts])
    assert res.exit_code == 0, res.output
    counted = json.loads(res.stdout)["aoi"]["windows"]
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--vector", "none",
                              "--out", str(tmp_path / "out"), *opts])
    assert res.exit_code == 0, res.output
    ran = int(re.search(r": (\d+) windows", res.stderr).group(1))
    # windows of 64 px every 48 px: 3 rows (0, 48, 96) meet rows 10-99; columns 0-96 and 672-768 meet the
    # blocks (cols 10-99, 700-799): 3 + 3 columns, 18 windows; the bridge alone meets 11 more columns
    assert counted == ran == 18


def test_a_vrt_mosaic_of_adjacent_tiles_predicts_as_one_seamless_scene(runner: CliRunner, tmp_path: Path,
                                                                       tiny_unet: tuple[Path, Path]) -> None:
    """Tiles of one acquisition (gdalbuildvrt mosaic.vrt tiles/*.tif) give the whole scene's mask: no seam."""
    from xml.sax.saxutils import escape

    src = rgb(tmp_path, h=90, w=150)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    with rasterio.open(src) as ds:
        t = ds.transform
        xml = [f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}"><SRS>{escape(ds.crs.to_wkt())}</SRS>',
               f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>"]
        parts = {"west.tif": (0, 70), "east.tif": (70, 150)}
        for name, (c0, c1) in parts.items():
            win = rasterio.windows.Window(c0, 0, c1 - c0, ds.height)
            with rasterio.open(tiles / name, "w", **{**ds.profile, "width": c1 - c0,
                                                     "transform": ds.window_transform(win)}) as one:
                one.write(ds.read(window=win))
        for b in range(1, ds.count + 1):
            sources = "".join(
                f'<SimpleSource><SourceFilename relativeToVRT="1">tiles/{name}</SourceFilename><SourceBand>{b}</SourceBand>'
                f'<SrcRect xOff="0" yOff="0" xSize="{c1 - c0}" ySize="{ds.height}"/>'
                f'<DstRect xOff="{c0}" yOff="0" xSize="{c1 - c0}" ySize="{ds.height}"/></SimpleSource>'
                for name, (c0, c1) in parts.items())
            xml.append(f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue>{sources}</VRTRasterBand>')
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text("".join(xml) + "</VRTDataset>")
    masks = {}
    for name, path in (("whole", src), ("mosaic", vrt)):
        res = runner.invoke(cli, ["-q", "predict", str(path), "--weights", str(tiny_unet[0]), "--vector", "none",
                                  "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        with rasterio.open(next((tmp_path / name).glob("*_landcover.tif"))) as ds:
            masks[name] = (ds.read(1), ds.transform)
    np.testing.assert_array_equal(masks["mosaic"][0], masks["whole"][0])
    assert masks["mosaic"][1] == masks["whole"][1]
    # predicted tile by tile, the same pixels differ near the tiles' shared edge (the seam a mosaic avoids)
    res = runner.invoke(cli, ["-q", "predict", str(tiles / "west.tif"), "--weights", str(tiny_unet[0]), "--vector",
                              "none", "--out", str(tmp_path / "west")])
    with rasterio.open(tmp_path / "west" / "west_landcover.tif") as ds:
        west = ds.read(1)
    assert (west[:, 60:] != masks["whole"][0][:, 60:70]).any()


def test_an_edited_aoi_file_is_read_again(tmp_path: Path) -> None:
    from geoseg.aoi import load_aoi
    from geoseg.io import open_scene

    meta = open_scene(rgb(tmp_path, h=100, w=100))  # UTM 33N, 10 m from 500000/4800000

    def write(x1: float) -> Path:
        ring = [[500000.0, 4799000.0], [x1, 4799000.0], [x1, 4800000.0], [500000.0, 4800000.0], [500000.0, 4799000.0]]
        aoi = tmp_path / "aoi.geojson"
        aoi.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
            "name": "EPSG:32633"}}, "features": [{"type": "Feature", "properties": {},
                                                  "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
        return aoi

    assert load_aoi(write(500200.0), meta).window.width == 20
    assert load_aoi(write(500500.0), meta).window.width == 50  # same name and size, new content


def test_an_aoi_file_with_a_crs_on_a_scene_without_one_is_warned_about(tmp_path: Path) -> None:
    """The AOI's coordinates were taken for the scene's without a word (an AOI without a CRS is warned about)."""
    from geoseg.aoi import load_aoi
    from geoseg.errors import NoCRSWarning
    from geoseg.io import open_scene

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = open_scene(rgb(tmp_path, h=100, w=100, crs=None))
    ring = [[500000.0, 4799000.0], [500200.0, 4799000.0], [500200.0, 4800000.0], [500000.0, 4800000.0],
            [500000.0, 4799000.0]]
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": "EPSG:32633"}}, "features": [feature]}))
    with pytest.warns(NoCRSWarning, match="scene.tif has no CRS: the coordinates of --aoi aoi.geojson are taken as"):
        assert load_aoi(aoi, meta).window.width == 20
    bare = tmp_path / "bare.gpkg"  # without a CRS either: nothing to say
    import pyogrio.raw
    import shapely

    pyogrio.raw.write(bare, np.array([shapely.to_wkb(shapely.Polygon(ring))], object), [], [], geometry_type="Polygon")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoCRSWarning)
        assert load_aoi(bare, meta).window.width == 20


def test_a_corrupt_geopackage_is_told_without_sqlite_s_statement(tmp_path: Path) -> None:
    """The error quoted SQLite's raw statement: "sqlite3_prepare_v2(SELECT COUNT(*) FROM sqlite_master WHERE ...)
    failed: file is not a database; file is not a database"."""
    from geoseg.io import read_vector

    bad = tmp_path / "broken.gpkg"
    bad.write_bytes(b"SQLite format 3\x00" + np.random.default_rng(0).bytes(4000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ParameterError) as err:
            read_vector(bad, missing="missing", unreadable=f"--aoi {bad} cannot be read as vector data")
    assert str(err.value) == f"--aoi {bad} cannot be read as vector data: file is not a database"


def test_a_ready_predictor_shared_by_threads_gives_each_its_own_output(tiny_unet: tuple[Path, Path]) -> None:
    """A Dask worker with several threads lends its one predictor to all of them: a Paddle predictor
    holds one input buffer, so two threads' calls ran on each other's inputs (wrong masks, or a batch
    of the other's size and a fatal ModelError)."""
    import threading

    from geoseg.engine import ModelSource, build_predictor, resolve_model

    source: ModelSource = resolve_model(None, weights=tiny_unet[0])
    predict, _ = build_predictor(source, "cpu", runtime="inference", threads=1)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1 + i % 2, 3, 64, 64)).astype(np.float32) for i in range(6)]
    alone = [predict(x) for x in inputs]
    got: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        got[i] = [predict(inputs[i]) for _ in range(8)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in got.items():
        for y in outs:
            np.testing.assert_array_equal(y, alone[i])


def _aoi_pixels(aoi, meta) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The scene-sized HW mask of the pixels an Aoi keeps."""
    from rasterio.windows import Window

    full = np.zeros((meta.height, meta.width), bool)
    w = aoi.window
    inside = aoi.pixels(Window(w.col_off, w.row_off, w.width, w.height))
    full[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] = inside
    return full


def _geojson(path: Path, *geometries: dict, crs: str | None = None) -> Path:
    doc: dict = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": g} for g in geometries]}
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def test_an_aoi_in_degrees_keeps_its_shape_on_a_projected_scene(tmp_path: Path) -> None:
    """A lon/lat box's edges were reprojected as chords between its 4 corners: on a UTM scene about
    2 % of the box's pixels were missed and as many taken outside (its lines of latitude are curves
    there), and a polar cap on a polar stereographic scene became a line."""
    import pyproj

    from geoseg.aoi import load_aoi
    from geoseg.io import open_scene

    scene = rgb(tmp_path, h=120, w=200, crs="EPSG:32633", transform=from_origin(400000.0, 6700000.0, 1000.0, 1000.0))
    meta = open_scene(scene)
    box = {"type": "Polygon", "coordinates": [[[14.0, 59.3], [17.0, 59.3], [17.0, 60.0], [14.0, 60.0], [14.0, 59.3]]]}
    got = _aoi_pixels(load_aoi(_geojson(tmp_path / "box.geojson", box), meta), meta)
    rows, cols = np.mgrid[0:120, 0:200]
    x, y = 400000.0 + (cols + 0.5) * 1000.0, 6700000.0 - (rows + 0.5) * 1000.0
    lon, lat = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(x, y)
    truth = (lon > 14) & (lon < 17) & (lat > 59.3) & (lat < 60.0)
    assert truth.sum() > 5000 and (got != truth).sum() <= 0.002 * truth.sum(), (got != truth).sum()
    # the polar cap north of 85 degrees on a polar stereographic grid (25 km pixels, pole in the middle)
    polar = rgb(tmp_path, name="polar.tif", h=100, w=100, crs="EPSG:3413",
                transform=from_origin(-1250000.0, 1250000.0, 25000.0, 25000.0))
    cap = {"type": "Polygon", "coordinates": [[[-180.0, 85.0], [180.0, 85.0], [180.0, 90.0], [-180.0, 90.0],
                                               [-180.0, 85.0]]]}
    meta = open_scene(polar)
    got = _aoi_pixels(load_aoi(_geojson(tmp_path / "cap.geojson", cap), meta), meta)
    x, y = -1250000.0 + (cols[:100, :100] + 0.5) * 25000.0, 1250000.0 - (rows[:100, :100] + 0.5) * 25000.0
    lat = pyproj.Transformer.from_crs("EPSG:3413", "EPSG:4326", always_xy=True).transform(x, y)[1]
    truth = lat > 85.0
    assert truth.sum() > 500 and (got != truth).sum() <= 0.01 * truth.sum(), ((got != truth).sum(), truth.sum())


def test_an_aoi_across_the_antimeridian_on_a_degree_scene(tmp_path: Path) -> None:
    """A scene of longitudes 179..181 and an AOI in UTM zone 1 around 180 degrees: reprojected
    longitudes wrapped to -180..180, so the AOI took the wrong side of the scene."""
    from geoseg.aoi import load_aoi
    from geoseg.io import open_scene

    scene = rgb(tmp_path, h=80, w=200, crs="EPSG:4326", transform=from_origin(179.0, -16.0, 0.01, 0.01))
    meta = open_scene(scene)
    # a box in UTM 1S (EPSG:32701) from about 179.8 E to 180.2 (-179.8), 16.3 to 16.5 S
    import pyproj

    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32701", always_xy=True)
    ring = [to_utm.transform(lon, lat) for lon, lat in ((179.8, -16.5), (-179.8, -16.5), (-179.8, -16.3),
                                                        (179.8, -16.3), (179.8, -16.5))]
    aoi = load_aoi(_geojson(tmp_path / "utm.geojson", {"type": "Polygon", "coordinates": [ring]}, crs="EPSG:32701"),
                   meta)
    assert (aoi.window.col_off, aoi.window.width) == (80, 40), aoi.window  # columns 179.8..180.2


def test_an_aoi_of_invalid_or_collected_polygons(tmp_path: Path) -> None:
    """A digitising spike (a self-intersecting ring) kept its collapsed part as a line burnt into the AOI
    (70 columns instead of 20), and polygons in a GeometryCollection were dropped without a word."""
    from geoseg.aoi import load_aoi
    from geoseg.io import open_scene

    meta = open_scene(rgb(tmp_path, h=100, w=100, crs="EPSG:32633"))  # 10 m from 500000/4800000
    x0, y0 = 500200.0, 4799600.0
    spike = {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + 200, y0], [x0 + 200, y0 + 200], [x0, y0 + 200],
                                                 [x0, y0], [x0 + 700, y0], [x0, y0]]]}
    aoi = load_aoi(_geojson(tmp_path / "spike.geojson", spike, crs="EPSG:32633"), meta)
    assert (aoi.window.width, aoi.window.height) == (20, 20)
    a = {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + 100, y0], [x0 + 100, y0 + 100], [x0, y0 + 100], [x0, y0]]]}
    b = {"type": "Polygon", "coordinates": [[[x0 + 400, y0], [x0 + 600, y0], [x0 + 600, y0 + 100], [x0 + 400, y0 + 100],
                                             [x0 + 400, y0]]]}
    both = {"type": "GeometryCollection", "geometries": [a, {"type": "LineString", "coordinates": [[x0, y0], [x0, 0]]}, b]}
    aoi = load_aoi(_geojson(tmp_path / "coll.geojson", both, crs="EPSG:32633"), meta)
    assert (aoi.window.col_off, aoi.window.width) == (20, 60) and _aoi_pixels(aoi, meta).sum() == 100 + 200
    with pytest.raises(ParameterError, match="must be finite numbers"):  # (it was "unexpected error: ValueError")
        load_aoi("500000,4799000,inf,4800000", meta)
    # a box whose edges pass through pixel centres: the window holds the pixels GDAL's rasterize burns,
    # no more (the centres on its left edge made a column of nodata) and no fewer (its top, bottom and
    # right rows and columns, burnt by GDAL, were cut off)
    aoi = load_aoi("500195,4799855,500235,4799895", meta)  # centres of columns 19..23, rows 10..14
    burnt = features.rasterize([(shapely.box(500195, 4799855, 500235, 4799895), 1)], out_shape=(meta.height, meta.width),
                               transform=meta.transform)
    rows, cols = np.nonzero(burnt)
    assert (aoi.window.col_off, aoi.window.row_off, aoi.window.width, aoi.window.height) == (
        cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) == (20, 10, 4, 5)
    assert np.all(aoi.pixels(aoi.window))


def _predict_while_paddle_loads(tmp_path: Path, loading: str) -> Any:
    """Run ``geoseg predict`` in a new process whose paddle import is played by the function body
    ``loading`` (indented four spaces); return the finished process. The stop signals are held back from the first
    line, as the console script holds them (``geoseg_cli.main``): threads the imports start (OpenBLAS's) inherit the
    block. Python's own Ctrl-C handler is put back first: a test run started in the background (`cmd &` in a script)
    ignores SIGINT, as its children then do, and geoseg rightly leaves an ignored SIGINT ignored (the test failed
    there, in .ci/run too)."""
    import subprocess

    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})\n"
              "import geoseg_cli.main as m\ndef loading_paddle():\n" + loading
              + "m._import_paddle_first = loading_paddle\nm.cli([\"predict\", sys.argv[1], \"--model\", \"unet\"])\n")
    return subprocess.run([sys.executable, "-c", script, str(tmp_path / "none.tif")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_sigterm_while_paddle_loads_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM in the second paddle takes to import met paddle's own handler, installed by the import:
    a C++ "FatalError" dump, death by the signal, and now and then a hang. It is held back until
    geoseg's handler is set: exit 143 with geoseg's line. (Paddle's handler is played by one that
    exits 99, the signal sent from inside the import.)"""
    proc = _predict_while_paddle_loads(tmp_path, (
        "    signal.signal(signal.SIGTERM, lambda *a: os._exit(99))  # as paddle's import installs its own\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.3)\n"))
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert "terminated (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_while_paddle_loads_is_an_interrupt(tmp_path: Path) -> None:
    """Ctrl-C in the second paddle takes to import came out of the import as an ImportError: "PaddlePaddle
    is not installed", exit 1. SIGINT is held back with SIGTERM until the import is over: exit 130 with
    geoseg's line. (The import is played by one that turns a KeyboardInterrupt into that exit.)"""
    proc = _predict_while_paddle_loads(tmp_path, (
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.3)\n"
        "    except KeyboardInterrupt:\n"
        "        sys.stderr.write('Error: PaddlePaddle is not installed\\n')\n"
        "        os._exit(1)\n"))
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr and "not installed" not in proc.stderr


def test_a_deleted_working_folder_is_said_in_one_line(tmp_path: Path) -> None:
    """A cron job whose folder was removed: paddle's import failed with "partially initialized module
    'paddle' has no attribute 'tensor'", even for absolute paths."""
    import subprocess

    gone = tmp_path / "gone"
    gone.mkdir()
    # as the console script runs (no '' on sys.path: Python 3.13's import of it fails without a cwd)
    script = f"import os, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; os.chdir({str(gone)!r}); " \
             f"os.rmdir({str(gone)!r}); sys.argv = ['geoseg', 'info', sys.argv[1]]; import geoseg_cli; geoseg_cli.main()"
    src = rgb(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the current folder no longer exists" in lines[0] and "cd " in lines[0], proc.stderr


@pytest.mark.slow
def test_sigterm_at_any_moment_of_the_start_is_a_clean_exit(tmp_path: Path) -> None:
    """The console script holds SIGTERM back from its first line until geoseg's handler is set: in the
    first second (imports, paddle loading) a SIGTERM met paddle's handler in a thread an import had
    started (a C++ "FatalError" dump, death by the signal, now and then a hang)."""
    import signal
    import subprocess
    import time

    from tests.conftest import SAMPLE_DATA

    script = Path(sys.executable).parent / "geoseg"
    if not script.exists():
        pytest.skip("the geoseg console script is not installed beside this Python")
    scene = SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif"
    for i, delay in enumerate((0.05, 0.4, 0.8, 1.2)):
        proc = subprocess.Popen([str(script), "predict", str(scene), "--model", "unet", "--out", str(tmp_path / f"o{i}")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        if delay < 0.1 and proc.returncode == -signal.SIGTERM:
            # the signal came in Python's own start-up, before the script's first line (~50 ms, longer on
            # a busy machine): the default action ends it there, silently, before anything is written
            assert err == "" and not (tmp_path / f"o{i}").exists(), (delay, err[-1500:])
            continue
        assert proc.returncode == 143, (delay, proc.returncode, err[-1500:])
        assert "FatalError" not in err and "Traceback" not in err, (delay, err[-1500:])
        assert not list(tmp_path.glob(f"o{i}/*landcover*")), delay


def test_names_the_vector_writer_takes_for_uri_syntax(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """pyogrio reads a path as a URI: the polygons of 'a;b.tif' were written at '.geoseg-a' (left there
    for good, "no such table: gpkg_contents"), those of 'c!d.tif' as FlatGeobuf failed with "unexpected
    error: FileNotFoundError". Temp names leave ';' and '!' out; then geoseg could not read back its own
    'a;b_landcover.gpkg' (an AOI, a reference: "rename the file"), and a folder holding '!' was refused for
    polygons (batch: each scene failed, every night). Both are now reached through links with clean names."""
    import sqlite3

    import pyogrio.raw
    import shapely

    from geoseg.io import read_vector

    weights = str(tiny_unet[0])
    temp = tmp_path / "temp"
    temp.mkdir()
    tempfile.tempdir, old_tempdir = str(temp), tempfile.tempdir  # (where the links are made: all must go)
    for name, fmt, folder in (("a;b.tif", "gpkg", "out_gpkg"), ("c!d.tif", "fgb", "out_fgb"),
                              ("e;f!g.tif", "gpkg", "o!1"), ("h.tif", "fgb", "o!2;x")):
        src = rgb(tmp_path, name, h=40, w=48)
        out = tmp_path / folder
        out.mkdir(exist_ok=True)
        res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", str(out), "--vector", fmt])
        assert res.exit_code == 0, res.output
        stem = name[:-4]
        assert outputs(out) == sorted([f"{stem}_landcover.qml", f"{stem}_landcover.tif", f"{stem}_landcover.tif.aux.xml",
                                       f"{stem}_landcover.{fmt}"]), outputs(out)
        odd = read_vector(out / f"{stem}_landcover.{fmt}", missing="missing", unreadable="unreadable")
        clean = tmp_path / f"clean.{fmt}"
        (out / f"{stem}_landcover.{fmt}").rename(clean)
        _, _, wkb, values = pyogrio.raw.read(clean, layer="landcover")
        assert len(wkb) > 0 and len(odd.geoms) == len(wkb) and odd.crs is not None
        assert shapely.equals(odd.geoms, shapely.from_wkb(wkb)).all() and (odd.values[0] == values[0]).all()
        if fmt == "gpkg":
            with sqlite3.connect(clean) as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            db.close()
    tempfile.tempdir = old_tempdir
    assert not list(temp.glob("geoseg-ogr-*"))  # (the links go)
    src = rgb(tmp_path, "s.tif", h=40, w=48)
    with rasterio.open(src) as ds:
        b = ds.bounds
    # an AOI, and a shapefile whose sidecars (.prj: its CRS) must be found beside it
    pyogrio.raw.write(tmp_path / "area.gpkg", shapely.to_wkb(np.array([shapely.box(*b)])), [], [],
                      geometry_type="Polygon", crs="EPSG:32633", driver="GPKG")
    (tmp_path / "area.gpkg").rename(tmp_path / "area;1!.gpkg")
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", str(tmp_path / "o3"),
                              "--vector", "none", "--aoi", str(tmp_path / "area;1!.gpkg")])
    assert res.exit_code == 0, res.output
    pyogrio.raw.write(tmp_path / "ref.shp", shapely.to_wkb(np.array([shapely.box(*b)])), [np.array([3])], ["cls"],
                      geometry_type="Polygon", crs="EPSG:32633", driver="ESRI Shapefile")
    shp = sorted(tmp_path.glob("ref.*"))
    assert {p.suffix for p in shp} >= {".shp", ".dbf", ".shx", ".prj"}
    for p in shp:
        p.rename(tmp_path / f"r;e!f{p.suffix}")
    v = read_vector(tmp_path / "r;e!f.shp", missing="missing", unreadable="unreadable")
    assert v.fields == ["cls"] and list(v.values[0]) == [3] and v.crs == rasterio.crs.CRS.from_epsg(32633)
    # a read error names the file as given, not the link it was read through
    (tmp_path / "x;y.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(ParameterError) as caught:
        read_vector(tmp_path / "x;y.gpkg", missing="missing", unreadable="unreadable")
    assert str(tmp_path / "x;y.gpkg") in str(caught.value) and "geoseg-ogr" not in str(caught.value), caught.value


def test_names_gdal_cannot_take_are_one_line_errors(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A scene or --out named in bytes that are not UTF-8 ended in "unexpected error: UnicodeEncodeError";
    a /vsicurl/ path in "unexpected error: Missing url parameter" (its URL's '//' lost in a path)."""
    import os

    src = rgb(tmp_path, "s.tif", h=16, w=16)
    bad = tmp_path / os.fsdecode(b"caf\xe9.tif")
    try:
        bad.write_bytes(src.read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no file name that is not UTF-8")
    for args, words in (
        (["info", str(bad)], ("caf\\xe9.tif", "not valid UTF-8", "rename it")),
        (["predict", str(bad), "--weights", str(tiny_unet[0])], ("caf\\xe9.tif", "not valid UTF-8", "rename it")),
        (["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / os.fsdecode(b"o\xe9.tif"))],
         ("o\\xe9.tif", "not valid UTF-8", "choose another name")),
        (["info", "/vsicurl/http://127.0.0.1:9/s.tif"], ("/vsicurl/", "download the scene first")),
        (["info", "https://example.com/s.tif"], ("input https://example.com/s.tif: URLs are not read as such",)),
    ):
        res = runner.invoke(cli, args)
        assert_one_line_error(res, *words)
        assert "unexpected" not in res.output


def test_an_output_name_past_the_file_system_s_limit_is_one_line(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A scene named with 240 characters: its '<stem>_landcover.tif.aux.xml' passed 255 bytes, and predict
    ended in "unexpected error: OSError: [Errno 36] File name too long"."""
    try:
        src = rgb(tmp_path, "a" * 240 + ".tif", h=16, w=16)
    except OSError:
        pytest.skip("this file system takes no name that long")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")])
    assert_one_line_error(res, "is too long for its file system", "give a shorter name")
    assert not (tmp_path / "o").exists() or outputs(tmp_path / "o") == []
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "short.tif"),
                              "--vector", "none"])
    assert res.exit_code == 0, res.output


def test_a_degree_grid_beyond_the_poles_is_one_line(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """EPSG:4326 with latitudes from 100 down: its ground sizes were NaN: info printed 'about nan m', predict
    failed on 'simplify nan is not allowed', vectorize on 'cannot convert float NaN to integer'. A grid whose
    top edge passes 90 by less than half a pixel is fine."""
    from affine import Affine

    src = rgb(tmp_path, "far.tif", h=20, w=20, crs="EPSG:4326", transform=Affine(0.001, 0, 10, 0, -0.001, 100))
    for args in (["info", str(src)], ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")]):
        res = runner.invoke(cli, args)
        assert_one_line_error(res, "beyond the poles", "latitude 99.9995")
    mask = write_raster(tmp_path / "m.tif", np.ones((1, 20, 20), np.uint8), crs="EPSG:4326",
                        transform=Affine(0.001, 0, 10, 0, -0.001, 100))
    res = runner.invoke(cli, ["vectorize", str(mask), "--out", str(tmp_path / "m.gpkg"), "--min-area", "1000"])
    assert_one_line_error(res, "beyond the poles")
    res = runner.invoke(cli, ["evaluate", str(mask), "--reference", str(mask)])
    assert_one_line_error(res, "beyond the poles")
    ok = rgb(tmp_path, "top.tif", h=20, w=20, crs="EPSG:4326", transform=Affine(0.001, 0, 10, 0, -0.001, 90.0004))
    res = runner.invoke(cli, ["-q", "predict", str(ok), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output


def test_geojson_of_a_crs_without_a_way_to_wgs84_is_refused_before_any_work(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A local (engineering) CRS: --vector geojson failed after the mask with "unexpected error:
    CPLE_NotSupportedError: Cannot find coordinate operations from '{ PROJJSON ... }'"; vectorize too."""
    from rasterio.crs import CRS

    local = CRS.from_wkt('LOCAL_CS["arbitrary",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    src = rgb(tmp_path, "local.tif", h=20, w=20, crs=local)
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o"),
                              "--vector", "geojson"])
    assert_one_line_error(res, "cannot be converted to longitudes/latitudes", "--vector gpkg")
    assert not (tmp_path / "o").exists() or outputs(tmp_path / "o") == []
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output  # (a GeoPackage keeps the CRS)
    res = runner.invoke(cli, ["vectorize", str(tmp_path / "o" / "local_landcover.tif"), "--out", str(tmp_path / "p.geojson")])
    assert_one_line_error(res, "cannot be converted to longitudes/latitudes")
    assert not (tmp_path / "p.geojson").exists()
    # a projection whose (0, 0) lies outside its domain is tried where its data lie
    from geoseg.vectorize import check_geojson_crs

    ortho = CRS.from_proj4("+proj=ortho +lat_0=40 +lon_0=-100 +x_0=10000000 +y_0=0 +datum=WGS84")
    check_geojson_crs(ortho, "ortho.tif", (10_000_000.0, 0.0))


def test_a_vrt_whose_source_is_missing_is_not_called_corrupt(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A VRT whose band file was moved away: "the file may be corrupt or truncated; check it with gdalinfo
    -checksum", which sent users after a file that was whole."""
    write_band_vrt(rgb(tmp_path, "stack.tif", h=20, w=20), tmp_path / "bands.vrt")
    (tmp_path / "B2.tif").rename(tmp_path / "moved.tif")
    res = runner.invoke(cli, ["predict", str(tmp_path / "bands.vrt"), "--weights", str(tiny_unet[0]),
                              "--out", str(tmp_path / "o")])
    assert_one_line_error(res, "a file it reads is missing")
    assert "corrupt" not in res.output


def test_an_export_past_the_file_size_limit_is_refused_and_a_damaged_cache_is_made_again(
        runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `ulimit -f` Paddle cut the first export's files at the limit without an error and the cache marked
    them done: every later predict failed ("cannot load ... parse error at line 1, column 102401"), also without
    the limit, until someone found and deleted the cache. The export is refused in one line naming the limit, and
    a cached export that cannot be loaded is made again."""
    import subprocess

    cache = tmp_path / "cache"
    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(cache))
    scene = rgb(tmp_path)
    limited = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
               "from geoseg_cli import main; main()")
    r = subprocess.run([sys.executable, "-c", limited, "predict", str(scene), "--weights", str(tiny_unet[0]),
                        "--out", str(tmp_path / "o1"), "--vector", "none"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "file too large: this process may not write files over 20000 bytes (ulimit -f)" in r.stderr, r.stderr
    assert not list(cache.rglob("DONE"))  # nothing cached
    # without the limit: exported and cached; then a damaged cached export is made again, with a warning
    args = ["predict", str(scene), "--weights", str(tiny_unet[0]), "--vector", "none"]
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    (done,) = cache.rglob("DONE")
    program = next(p for p in done.parent.iterdir() if p.suffix in (".json", ".pdmodel"))
    whole = program.read_bytes()
    program.write_bytes(whole[: len(whole) // 2])
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "o3")])
    assert res.exit_code == 0, res.output
    assert "cannot be loaded: exporting the model again" in res.stderr, res.stderr
    assert len(program.read_bytes()) > len(whole) // 2 and (program.suffix != ".json" or json.loads(program.read_bytes()))
    with rasterio.open(tmp_path / "o2" / "scene_landcover.tif") as a, rasterio.open(tmp_path / "o3" / "scene_landcover.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def _console_script() -> Path:
    script = Path(sys.executable).parent / "geoseg"
    if not script.exists():
        pytest.skip("the geoseg console script is not installed beside this Python")
    return script


def test_closed_standard_streams_and_a_full_stdout(tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """A cron job or daemon that closed stderr (2>&-): predict and batch ended exit 1 writing nothing
    ('NoneType' object has no attribute 'isatty'); with stdout closed a finished predict ended exit 1. Stdout
    on a full device blamed the outputs' disk ("no space left on the device: free some space")."""
    import subprocess

    script = _console_script()
    scene = rgb(tmp_path)
    args = [str(script), "predict", str(scene), "--weights", str(tiny_unet[0]), "--vector", "none"]
    for fd in (1, 2):
        r = subprocess.run([*args, "--out", str(tmp_path / f"closed{fd}")], preexec_fn=lambda fd=fd: os.close(fd),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 0, fd
        assert (tmp_path / f"closed{fd}" / "scene_landcover.tif").exists(), fd
    with open("/dev/full", "w") as full:
        r = subprocess.run([str(script), "info", str(scene), "--no-model"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        "Error: cannot write to the standard output (No space left on device)", r.stderr


def test_sighup_stops_a_predict_as_sigterm_does(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed, no nohup) ended predict with exit 129 and no word, its mask published
    without its polygons (a rerun then refused: 'already exists') and temp files left."""
    import signal
    import subprocess
    import time

    from tests.conftest import SAMPLE_DATA

    script = _console_script()
    scene = SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif"
    out = tmp_path / "o"
    proc = subprocess.Popen([str(script), "predict", str(scene), "--model", "unet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not (out.exists() and any(out.iterdir())) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)  # until it writes
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run ended before the signal")
    assert proc.returncode == 129, (proc.returncode, err[-1500:])
    assert "terminated (SIGHUP)" in err and "Traceback" not in err, err[-1500:]
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".geoseg-")]


def test_odd_homes_and_cache_folders(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A user without HOME and without a passwd entry (docker --user 54321): 'unexpected error: RuntimeError:
    Could not determine home directory'. GEOSEG_CACHE_DIR='~/gc' or ' ' made folders named '~' or ' ' where
    the job ran; XDG_CACHE_HOME was not read; `--model unet` in a folder this user may not read: 'unexpected
    error: PermissionError'."""
    import pathlib

    from geoseg.engine import cache_dir

    scene = rgb(tmp_path)
    args = ["predict", str(scene), "--weights", str(tiny_unet[0]), "--vector", "none"]
    monkeypatch.setenv("GEOSEG_CACHE_DIR", "~/gc")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "gc"
    for bad in (" ", "rel/cache"):
        monkeypatch.setenv("GEOSEG_CACHE_DIR", bad)
        res = runner.invoke(cli, [*args, "--out", str(tmp_path / "x")])
        assert_one_line_error(res, "GEOSEG_CACHE_DIR")
    monkeypatch.delenv("GEOSEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "geoseg"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pathlib.Path, "home", staticmethod(no_home))
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # (this process's fallback, not an earlier test's)
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "homeless")])
    assert res.exit_code == 0, res.output
    assert "no export cache: no home folder" in res.stderr and (tmp_path / "homeless" / "scene_landcover.tif").exists()
    monkeypatch.undo()

    real_is_dir = pathlib.Path.is_dir

    def unreadable(self: Path) -> bool:  # as Path.is_dir of a relative name in a folder this user may not read
        if not self.is_absolute():
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(pathlib.Path, "is_dir", unreadable)
    from geoseg.engine import resolve_model

    assert resolve_model("unet").card.architecture == "unet"


def test_too_many_open_files_names_the_limit() -> None:
    """`ulimit -n 8`: "unexpected error: OSError: [Errno 24] Too many open files", with no hint."""
    import errno
    import resource

    from geoseg_cli.main import to_click_error

    msg = to_click_error(OSError(errno.EMFILE, "Too many open files")).format_message()
    assert msg == (f"too many open files: this process may open {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} "
                   "(ulimit -n): raise the limit")


def test_a_whole_cached_export_is_kept_when_paddle_fails_otherwise(runner: CliRunner, tmp_path: Path,
                                                                     tiny_unet: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Any error loading the predictor (a device out of memory, a bad thread count) threw away the cached export
    that other processes share and made it again, saying it 'cannot be loaded'."""
    import geoseg.models.inference as gi

    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(tmp_path / "cache"))
    args = ["predict", str(rgb(tmp_path)), "--weights", str(tiny_unet[0]), "--vector", "none"]
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "o1")]).exit_code == 0
    (done,) = (tmp_path / "cache").rglob("DONE")
    before = done.stat().st_mtime_ns

    class Failing:
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            raise gi.ModelError("Paddle Inference cannot create a predictor: out of device memory")

    monkeypatch.setattr(gi, "InferencePredictor", Failing)
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "o2")])
    assert_one_line_error(res, "out of device memory")
    assert "exporting the model again" not in res.output and done.exists()
    assert list((tmp_path / "cache").rglob("DONE")) == [done] and done.stat().st_mtime_ns >= before


def _deep_folder(root: Path, length: int) -> Path:
    """A folder under ``root`` whose absolute path is ``length`` bytes long."""
    folder = root.absolute()
    while length - len(str(folder)) > 201:
        folder = folder / ("d" * 150)
    folder = folder / ("d" * (length - len(str(folder)) - 1))
    folder.mkdir(parents=True)
    assert len(str(folder)) == length
    return folder


def test_paths_too_long_for_sqlite_or_the_file_system_are_one_line_errors_before_any_work(
        runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Python's sqlite3 opens at most 504 bytes of path: a GeoPackage in a folder of ~460 bytes had its polygons
    written and its style failed ("unable to open database file"), after the mask was published; batch's manifest
    was "unexpected error: OperationalError". Past PATH_MAX, "unexpected error: OSError: [Errno 36]"."""
    from geoseg.atomic import SQLITE_PATH_MAX, check_path_length
    from geoseg.errors import OutputError

    weights = str(tiny_unet[0])
    src = rgb(tmp_path, "s.tif", h=40, w=48)
    deep = _deep_folder(tmp_path / "deep", 470)
    res = runner.invoke(cli, ["predict", str(src), "--weights", weights, "--out", str(deep)])
    assert_one_line_error(res, "its path is too long for a GeoPackage", f"at most {SQLITE_PATH_MAX} bytes",
                          "--vector fgb")
    assert outputs(deep) == []
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", str(deep), "--vector", "fgb"])
    assert res.exit_code == 0 and "s_landcover.fgb" in outputs(deep), res.output
    mask = deep / "s_landcover.tif"
    res = runner.invoke(cli, ["vectorize", str(mask), "--out", str(deep / "v.gpkg")])
    assert_one_line_error(res, "its path is too long for a GeoPackage")
    res = runner.invoke(cli, ["-q", "vectorize", str(mask), "--out", str(deep / "v.fgb")])
    assert res.exit_code == 0 and (deep / "v.fgb").is_file(), res.output
    # a shorter folder still takes a GeoPackage, with its style
    shallow = _deep_folder(tmp_path / "shallow", 420)
    res = runner.invoke(cli, ["-q", "vectorize", str(mask), "--out", str(shallow / "v.gpkg")])
    assert res.exit_code == 0 and (shallow / "v.gpkg").is_file(), res.output
    # batch: its manifest, refused before any folder is made
    archive = tmp_path / "arch"
    archive.mkdir()
    rgb(archive, "a.tif", h=40, w=48)
    out = _deep_folder(tmp_path / "bdeep", 490) / "b"
    res = runner.invoke(cli, ["batch", str(archive), "--weights", weights, "--out", str(out), "--vector", "none"])
    assert_one_line_error(res, "its path is too long for the batch manifest", "choose a shorter --out")
    assert not out.exists()
    # measured as SQLite measures it, with links resolved: a short link to the deep folder is refused too
    (tmp_path / "short").symlink_to(deep)
    res = runner.invoke(cli, ["vectorize", str(mask), "--out", str(tmp_path / "short" / "w.gpkg")])
    assert_one_line_error(res, "its path is too long for a GeoPackage")
    (tmp_path / "short2").symlink_to(out.parent)
    res = runner.invoke(cli, ["batch", str(archive), "--weights", weights, "--out", str(tmp_path / "short2" / "b"),
                              "--vector", "none"])
    assert_one_line_error(res, "its path is too long for the batch manifest")
    # a folder --out made for the run goes again when the run is refused (also one named like a .tif)
    res = runner.invoke(cli, ["predict", str(src), "--weights", weights, "--out", f"{deep / 'new.tif'}/"])
    assert_one_line_error(res, "its path is too long for a GeoPackage")
    assert not (deep / "new.tif").exists()
    with pytest.raises(OutputError, match=r"its path is too long for its file system \(4,\d\d\d bytes with geoseg's "
                                          r"temp names, at most 4,096\)"):
        check_path_length(Path("/" + "/".join(["e" * 200] * 21)) / "x.tif")


def test_a_folder_named_like_a_tif_is_a_folder(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An archive's subfolder 'dir.tif' failed each of its scenes in batch ("output .../dir.tif is a folder: give a
    file name"), as did `predict --out existing.tif/`; '--out new.tif/' wrote a mask named new.tif. A path below a
    file said "create it first", which cannot be done."""
    weights = str(tiny_unet[0])
    src = rgb(tmp_path, "s.tif", h=40, w=48)
    (tmp_path / "existing.tif").mkdir()
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", str(tmp_path / "existing.tif"),
                              "--vector", "none"])
    assert res.exit_code == 0 and outputs(tmp_path / "existing.tif") == [
        "s_landcover.qml", "s_landcover.tif", "s_landcover.tif.aux.xml"], res.output
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", f"{tmp_path / 'new.tif'}/",
                              "--vector", "none"])
    assert res.exit_code == 0 and (tmp_path / "new.tif" / "s_landcover.tif").is_file(), res.output
    res = runner.invoke(cli, ["-q", "predict", str(src), "--weights", weights, "--out", str(tmp_path / "m.tif"),
                              "--vector", "none"])
    assert res.exit_code == 0 and (tmp_path / "m.tif").is_file(), res.output  # (a .tif name is still the mask's)
    for out in (tmp_path / "s.tif" / "sub" / "x.tif", tmp_path / "s.tif" / "sub" / "folder"):
        res = runner.invoke(cli, ["predict", str(src), "--weights", weights, "--out", str(out)])
        assert_one_line_error(res, f"{src} is a file, not a folder: choose another --out")
    archive = tmp_path / "arch"
    (archive / "dir.tif").mkdir(parents=True)
    rgb(archive / "dir.tif", "j.tif", h=40, w=48)
    res = runner.invoke(cli, ["-q", "batch", str(archive), "--weights", weights, "--out", str(tmp_path / "bout"),
                              "--vector", "none"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bout" / "dir.tif" / "j_landcover.tif").is_file()


def test_a_fifo_or_a_pipe_is_refused_in_one_line(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`mkfifo scene.tif; geoseg info scene.tif` (and predict, vectorize, evaluate) waited for a writer for good;
    `geoseg info <(cat scene.tif)` said "the file may be corrupt or truncated"."""
    fifo = tmp_path / "fifo.tif"
    os.mkfifo(fifo)
    for args in (["info", str(fifo), "--no-model"], ["predict", str(fifo)], ["vectorize", str(fifo)],
                 ["evaluate", str(fifo), "--reference", str(fifo)]):
        res = runner.invoke(cli, args)
        assert_one_line_error(res, f"{fifo} is not a regular file but a FIFO (named pipe)", "save it to a file first")
    vfifo = tmp_path / "fifo.gpkg"  # (a vector input: an AOI, a reference, polygon labels)
    os.mkfifo(vfifo)
    mask = tmp_path / "m.tif"
    write_raster(mask, np.ones((1, 8, 8), np.uint8), crs="EPSG:32633")
    res = runner.invoke(cli, ["evaluate", str(mask), "--reference", str(vfifo)])
    assert_one_line_error(res, f"{vfifo} is not a regular file but a FIFO (named pipe)")
    read, write = os.pipe()
    try:
        res = runner.invoke(cli, ["info", f"/dev/fd/{read}", "--no-model"])
        assert_one_line_error(res, "is not a regular file but a FIFO (named pipe)")
    finally:
        os.close(read)
        os.close(write)


def test_a_gzipped_scene_s_outputs_are_named_after_the_scene() -> None:
    """/vsigzip/a.tif.gz wrote a.tif_landcover.tif."""
    from geoseg.engine import output_paths

    assert output_paths(Path("/vsigzip/d/g z.tif.gz"), "out.tif")[0] == Path("out.tif")
    assert output_paths(Path("/vsigzip/d/g z.tif.gz"), None)[0] == Path.cwd() / "g z_landcover.tif"
    assert output_paths(Path("/d/a.b.tif"), None)[0] == Path("/d/a.b_landcover.tif")


def test_an_absolute_gzipped_scene_is_read_and_a_plain_one_is_told_its_path(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/vsigzip//abs/g.tif.gz said 'does not exist' (it became GDAL's braces, which /vsigzip/ does not take); a
    plain g.tif.gz was 'not a raster GDAL can read as a GeoTIFF ... a download cut short?'."""
    import gzip

    scene = rgb(tmp_path, "g.tif", h=40, w=48)
    (tmp_path / "g.tif.gz").write_bytes(gzip.compress(scene.read_bytes()))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = runner.invoke(cli, ["-q", "predict", f"/vsigzip/{tmp_path / 'g.tif.gz'}", "--weights", str(tiny_unet[0]),
                              "--vector", "none"])
    assert res.exit_code == 0, res.output
    with rasterio.open(work / "g_landcover.tif") as out, rasterio.open(scene) as ds:
        assert out.transform == ds.transform and out.shape == ds.shape
    res = runner.invoke(cli, ["predict", str(tmp_path / "g.tif.gz"), "--weights", str(tiny_unet[0])])
    assert_one_line_error(res, "is gzip-compressed", f"/vsigzip/{tmp_path / 'g.tif.gz'}")
    # the path stays the one typed (in messages too) and absolute: a library caller may change folders after
    from rasterio.windows import Window

    from geoseg.io import open_scene, read_scene_window

    typed = f"/vsigzip/{tmp_path / 'g.tif.gz'}"
    meta = open_scene(typed)
    assert str(meta.path) == os.fspath(meta.path) == typed and meta.path.name == "g.tif.gz"
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "work" / "deeper")
    assert read_scene_window(meta, Window(0, 0, 8, 8), (1, 2, 3))[0].shape[-2:] == (8, 8)
    res = runner.invoke(cli, ["info", typed.replace("g.tif.gz", "nope.tif.gz"), "--no-model"])
    assert_one_line_error(res, f"input {typed.replace('g.tif.gz', 'nope.tif.gz')} does not exist")


def test_a_file_named_tif_is_read_as_a_geotiff_only(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL opens by content: an uploaded 'scene.tif' that was a VRT read another user's file (or fetched a URL,
    as a WMS description) into the batch's outputs, which finished 'ok'. The same VRT named .vrt still runs."""
    other = rgb(tmp_path, "other_customer.tif", h=40, w=48)
    with rasterio.open(other) as ds:
        w, h = ds.width, ds.height
    vrt = (f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>EPSG:32633</SRS>'
           '<GeoTransform>500000, 10, 0, 4800000, 0, -10</GeoTransform>'
           + "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="0">'
                     f'{other}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>'
                     for b in (1, 2, 3)) + "</VRTDataset>")
    up = tmp_path / "up"
    up.mkdir()
    (up / "scene.tif").write_text(vrt)
    for args in (["info", str(up / "scene.tif"), "--no-model"],
                 ["predict", str(up / "scene.tif"), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")]):
        res = runner.invoke(cli, args)
        assert_one_line_error(res, "is not a raster GDAL can read as a GeoTIFF", "its own extension")
    # every other read of a user's raster too: a mask to vectorize, a prediction or reference to evaluate, a
    # gzipped one (the batch's fingerprint of a scene's band names: test_batch)
    import gzip

    classes = write_raster(tmp_path / "classes.tif", np.arange(40 * 48, dtype=np.uint8).reshape(40, 48) % 3 + 1,
                           crs="EPSG:32633")
    (up / "mask.tif").write_text(vrt.replace(str(other), str(classes)).split('<VRTRasterBand dataType="Byte" band="2">')[0]
                                 + "</VRTDataset>")
    with rasterio.open(up / "mask.tif") as ds:  # (GDAL reads it, as it would any VRT)
        assert ds.driver == "VRT" and ds.count == 1
    (up / "g.tif.gz").write_bytes(gzip.compress(vrt.encode()))
    (up / "g.vrt.gz").write_bytes(gzip.compress(vrt.encode()))
    monkeypatch.chdir(up)  # (a relative /vsigzip/ path: GDAL reads it)
    res = runner.invoke(cli, ["info", "/vsigzip/g.vrt.gz", "--no-model"])
    assert res.exit_code == 0, res.output  # (GDAL reads a gzipped VRT named as one)
    for args in (["vectorize", str(up / "mask.tif"), "--out", str(tmp_path / "v.gpkg")],
                 ["evaluate", str(up / "mask.tif"), "--reference", str(classes)],
                 ["evaluate", str(classes), "--reference", str(up / "mask.tif")],
                 ["info", "/vsigzip/g.tif.gz", "--no-model"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 1 and "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1, (
            args, res.output)
        assert "mask.tif" in res.stderr or "g.tif.gz" in res.stderr, res.stderr
    (up / "scene.vrt").write_text(vrt)
    res = runner.invoke(cli, ["-q", "predict", str(up / "scene.vrt"), "--weights", str(tiny_unet[0]), "--out",
                              str(tmp_path / "o"), "--vector", "none"])
    assert res.exit_code == 0, res.output


def test_a_scene_of_too_many_windows_is_refused_before_any_work(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A sparse GeoTIFF of a few kB declaring 400,000 x 400,000 pixels (an upload to a nightly batch): predict
    listed its windows until memory ran out (7.8 GB for 1,000,000 x 1,000,000), and would have run for months."""
    from geoseg.engine import MAX_WINDOWS

    big = tmp_path / "big.tif"
    with rasterio.open(big, "w", driver="GTiff", width=400_000, height=400_000, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4800000, 10, 10), tiled=True, blockxsize=16384,
                       blockysize=16384, sparse_ok=True, compress="deflate"):
        pass
    assert big.stat().st_size < 1_000_000
    res = runner.invoke(cli, ["predict", str(big), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")])
    assert_one_line_error(res, "big.tif is 400,000 x 400,000 pixels", f"more than one predict runs ({MAX_WINDOWS:,})",
                          "cut it into parts")
    assert not (tmp_path / "o").exists()


def test_a_model_name_is_the_model_also_beside_a_folder_of_that_name(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model unet` in a working folder holding a folder 'unet' (an export a colleague sent, or planted) ran
    that folder's model without a word. Both meanings are there: refused in one line; `./unet` is the folder."""
    from geoseg.engine import resolve_model

    res = runner.invoke(cli, ["export", "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "unet")])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)
    said = ("--model unet names geoseg's unet, and a folder unet/ lies here too: pass ./unet to run that folder, or "
            "run from another folder for geoseg's unet")
    src = rgb(tmp_path, "s.tif", h=40, w=48)
    (tmp_path / "arch").mkdir()
    rgb(tmp_path / "arch", "a.tif", h=40, w=48)
    for args in (["predict", str(src), "--model", "unet", "--out", "o"], ["info", str(src), "--model", "unet"],
                 ["batch", "arch", "--model", "unet", "--out", "b"]):  # (batch made the name the folder's path)
        res = runner.invoke(cli, args)
        assert_one_line_error(res, said)
    assert resolve_model("./unet").export_dir is not None
    assert resolve_model(tmp_path / "unet").export_dir is not None  # (a Path is a folder)
    # where the folder cannot be meant, the name is the model: with --weights, and for export (which takes none)
    assert resolve_model("unet", weights=tiny_unet[0]).export_dir is None
    res = runner.invoke(cli, ["export", "--model", "unet", "--out", "unet", "--overwrite"])
    assert res.exit_code == 0 and res.stdout.strip().endswith("unet"), res.output


def test_the_window_limit_can_be_raised_on_purpose(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4,000,000-window refusal had no way round it for a scene that large on purpose; a bad value is one line."""
    from geoseg.engine import max_windows

    src = rgb(tmp_path, "s.tif", h=40, w=48)
    monkeypatch.setenv("GEOSEG_MAX_WINDOWS", "1")
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o"),
                              "--tile-size", "32", "--overlap", "8"])
    assert_one_line_error(res, "s.tif is 48 x 40 pixels", "more than one predict runs (1)", "GEOSEG_MAX_WINDOWS")
    monkeypatch.setenv("GEOSEG_MAX_WINDOWS", "10000000")
    assert max_windows() == 10_000_000
    for bad in ("lots", "²"):
        monkeypatch.setenv("GEOSEG_MAX_WINDOWS", bad)
        res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o")])
        assert_one_line_error(res, f"GEOSEG_MAX_WINDOWS={bad!r}: give a whole number of windows")
    (tmp_path / "arch").mkdir()
    rgb(tmp_path / "arch", "a.tif", h=40, w=48)
    res = runner.invoke(cli, ["batch", str(tmp_path / "arch"), "--weights", str(tiny_unet[0]), "--out",
                              str(tmp_path / "b")])  # (once, before any scene: each failed, exit 3)
    assert_one_line_error(res, "GEOSEG_MAX_WINDOWS='²': give a whole number of windows")


def test_an_aoi_window_has_no_empty_row_or_column_at_its_edges(tmp_path: Path) -> None:
    """On a rotated grid the window of an AOI box's bounds held a row or column of nodata at an edge
    about half the time (the mask came out a row larger than the AOI's pixels)."""
    import types

    from affine import Affine

    from geoseg.aoi import load_aoi

    t = Affine.translation(500000, 4000000) * Affine.rotation(20) * Affine.scale(10, -10)
    meta = types.SimpleNamespace(transform=t, crs=rasterio.crs.CRS.from_epsg(32617), width=200, height=200,
                                 path=tmp_path / "s.tif")
    rng = np.random.default_rng(0)
    for _ in range(40):
        c, r = rng.uniform(30, 170, 2)
        x, y = t @ (c, r)
        w, h = rng.uniform(20, 400, 2)
        aoi = load_aoi(f"{x - w},{y - h},{x + w},{y + h}", meta)
        inside = aoi.pixels(aoi.window)
        if isinstance(inside, np.ndarray):
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # the window still holds every pixel of the AOI: the scene's pixels inside lie in it
        everything = aoi.pixels(rasterio.windows.Window(0, 0, 200, 200))
        assert isinstance(everything, np.ndarray)
        rows, cols = np.nonzero(everything)
        win = aoi.window
        assert rows.min() == win.row_off and rows.max() == win.row_off + win.height - 1
        assert cols.min() == win.col_off and cols.max() == win.col_off + win.width - 1


def test_info_and_messages_say_what_they_mean(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """info said "pixel size: unknown (no geotransform)" of a scene with one but no CRS; --min-area -5 was
    "min_area -5.0 is not allowed"."""
    from rasterio.transform import from_origin as origin

    src = rgb(tmp_path, "nocrs.tif", h=20, w=24, crs=None, transform=origin(630534.0, 228114.0, 28.5, 28.5))
    res = runner.invoke(cli, ["info", str(src), "--no-model"])
    assert res.exit_code == 0 and "pixel size: 28.5 x 28.5 (in the geotransform's units: no CRS)" in res.output, \
        res.output
    scene = rgb(tmp_path)
    for option, value in (("--min-area", "-5"), ("--simplify", "-1"), ("--min-area", "nan"), ("--simplify", "inf")):
        res = runner.invoke(cli, ["predict", str(scene), "--weights", str(tiny_unet[0]), "--out", str(tmp_path / "o"),
                                  option, value])  # (a usage error: -1, nan and inf failed the run, exit 1)
        assert res.exit_code == 2 and f"Invalid value for '{option}': {value} is not allowed: use a number >= 0" \
            in res.output, res.output


def test_an_overlap_near_the_window_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a 128-px window with an overlap of 127 ran 114,000 windows on a 489x443 scene without a word
    from geoseg.engine import scene_grid
    from geoseg.io import open_scene

    meta = open_scene(rgb(tmp_path, h=443, w=489))
    with caplog.at_level("WARNING", logger="geoseg"):
        usual = scene_grid(meta, None, 128, 32)
    assert not [r for r in caplog.records if "overlap" in r.getMessage()]
    with caplog.at_level("WARNING", logger="geoseg"):
        grid = scene_grid(meta, None, 128, 120)
    msgs = [r.getMessage() for r in caplog.records if "overlap of 120" in r.getMessage()]
    assert len(grid) > 4 * len(usual)
    assert len(msgs) == 1 and f"{len(grid):,} windows" in msgs[0] and "each pixel is predicted about 256 times" in msgs[0], msgs
