"""``geoseg batch``: exactly-once manifest, failure isolation, kill -9 safety, lock, Dask workers."""

from __future__ import annotations

import json
import re
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from distributed.diagnostics.plugin import WorkerPlugin

from geoseg.batch import BatchLock, discover_scenes, parse_resources
from geoseg.errors import BatchLockedError, BatchWarning, GeosegWarning, ModelError, NoRoomError, ParameterError
from geoseg_cli.main import EXIT_LOCKED, EXIT_OK, EXIT_PARTIAL, cli
from tests.conftest import write_band_vrt, write_raster

pytest.importorskip("paddle")

GEOSEG = Path(sys.executable).parent / "geoseg"


def make_archive(root: Path, n: int, size: tuple[int, int] = (96, 128), seed: int = 0) -> list[Path]:
    """``n`` random 3-band uint8 scenes spread over ``root`` and two sub-folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = root / ("" if i % 3 == 0 else f"d{i % 3}/x")
        sub.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, (3, *size), dtype=np.uint8)
        paths.append(write_raster(sub / f"scene{i}.tif", data))
    return paths


def batch_args(tiny_unet: tuple[Path, Path], *extra: str) -> list[str]:
    return ["batch", *extra, "--weights", str(tiny_unet[0]), "--threads", "1"]


def run_cli(runner, tiny_unet, inputs, out, *extra: str):  # type: ignore[no-untyped-def]
    return runner.invoke(cli, batch_args(tiny_unet, *map(str, inputs), "--out", str(out), *extra))


def report_of(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def statuses(report: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {s["key"]: s["status"] for s in report["scenes"]}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".geoseg-*") if p.is_file()]


def read_masks(out: Path) -> dict[str, np.ndarray]:
    masks = {}
    for p in sorted(out.rglob("*_landcover.tif")):
        with rasterio.open(p) as ds:
            masks[p.relative_to(out).as_posix()] = ds.read(1)
    return masks


# ---- inputs ------------------------------------------------------------------------------------
def test_discover_mirrors_tree_lists_and_skips_the_output_folder(tmp_path: Path) -> None:
    arch = tmp_path / "arch"
    make_archive(arch, 4, size=(16, 16))
    (arch / "notes.txt").write_text("x")
    (arch / "d1" / "x" / "upper.TIFF").write_bytes((arch / "scene0.tif").read_bytes())
    out = arch / "out"  # an output folder inside the archive is never read back
    out.mkdir()
    (out / "scene0_landcover.tif").write_bytes(b"x")
    keys = [s.key for s in discover_scenes([arch], out)]
    assert keys == ["scene0.tif", "scene3.tif", "d1/x/scene1.tif", "d1/x/upper.TIFF", "d2/x/scene2.tif"]
    assert [s.key for s in discover_scenes([arch], out, ["scene[12].tif"])] == ["d1/x/scene1.tif", "d2/x/scene2.tif"]

    lst = tmp_path / "list.txt"
    lst.write_text("# tonight\narch/scene3.tif\n\n" + str(arch / "d2") + "\nmissing.tif\n")
    listed = discover_scenes([f"@{lst}"], out)
    assert [(s.key, s.out_dir) for s in listed] == [("scene3.tif", "."), ("x/scene2.tif", "x"), ("missing.tif", ".")]

    with pytest.raises(ParameterError, match="does not exist"):
        discover_scenes([tmp_path / "nope"], out)
    lst.write_text(f"/vsizip/{tmp_path}/a.zip/scene.tif\n")  # a GDAL path: predict reads it, batch says why not
    for given in ([f"@{lst}"], [f"/vsizip/{tmp_path}/a.zip/scene.tif"]):
        with pytest.raises(ParameterError, match="batch reads scenes from disk.*geoseg predict"):
            discover_scenes(given, out)
    same = discover_scenes([arch / "scene0.tif", arch / "d1" / ".." / "scene0.tif"], out)
    assert [s.key for s in same] == ["scene0.tif"]  # one file given twice is one scene
    # name clashes are scenes that fail (each with the reason), not an error for the whole batch
    other = _copy(arch / "scene3.tif", tmp_path / "scene3.tif")
    clash = discover_scenes([arch / "scene3.tif", other], out)
    assert len(clash) == 1 and "would both write scene3_landcover.*:" in (clash[0].conflict or "")
    _copy(arch / "scene3.tif", arch / "scene3.tiff")
    found = {s.key: s.conflict for s in discover_scenes([arch], out)}
    assert "same outputs" in (found["scene3.tif"] or "") and "same outputs" in (found["scene3.tiff"] or "")
    assert found["scene0.tif"] is None
    assert parse_resources("GPU=1, MEM=4e9") == {"GPU": 1.0, "MEM": 4e9}
    with pytest.raises(ParameterError):
        parse_resources("GPU")
    # GPU=0 hung for good on a cluster whose workers offer no GPU (Dask places such a task nowhere, and
    # 0 >= 0 made every worker look suitable); GPU=1,GPU=2 kept the last
    for text, said in (("GPU=0", "asks for no amount"), ("GPU=-1", "asks for no amount"), ("GPU=nan", "asks for no amount"),
                       ("GPU=1,GPU=2", "given twice")):
        with pytest.raises(ParameterError, match=said):
            parse_resources(text)

    class Client:
        def scheduler_info(self):  # type: ignore[no-untyped-def]
            return {"workers": {"a": {"resources": {}}, "b": {"resources": {"GPU": 1}}}}

    from geoseg.batch import _workers

    assert _workers(Client(), {"GPU": 0.5})[:2] == (2, 1)  # (a worker without the name is no fit)


def test_resources_without_a_cluster_are_said_to_be_ignored(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without --scheduler or --workers, --resources placed nothing and was ignored without a word (a cron job's
    GEOSEG_BATCH_RESOURCES runs on: a warning, in the log file too)."""
    arch, out, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "b.log"
    make_archive(arch, 1, size=(64, 64))
    r = runner.invoke(cli, batch_args(tiny_unet, str(arch), "--out", str(out), "--log-file", str(logf), "--dry-run"),
                      env={"GEOSEG_BATCH_RESOURCES": "GPU=1"})
    said = "--resources GPU=1 places scene tasks on Dask workers: without --scheduler or --workers the scenes run"
    assert r.exit_code == EXIT_OK and said in r.stderr and said in logf.read_text(), r.output


def test_a_refused_run_creates_no_output_folder(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch = tmp_path / "arch"
    make_archive(arch, 2, size=(16, 16))
    out = tmp_path / "results"
    r = runner.invoke(cli, ["batch", str(arch), "--out", str(out), "--weights", str(tmp_path / "none.pdparams")])
    assert r.exit_code != 0 and not out.exists(), r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--report", tmp_path / "arch" / "scene0.tif" / "run.json")
    assert r.exit_code == 1 and not out.exists(), r.output


def test_a_name_clash_fails_those_scenes_and_the_others_run(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """a.tif and a.tiff in one folder, or two input folders both holding d1/x/scene1.tif, stopped the whole
    nightly batch (exit 1, nothing done); the README promises one bad scene never stops the rest."""
    arch, other, out, rep = tmp_path / "arch", tmp_path / "other", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 3, size=(16, 16))  # scene0.tif, d1/x/scene1.tif, d2/x/scene2.tif
    _copy(arch / "scene0.tif", arch / "scene0.tiff")
    (other / "d1" / "x").mkdir(parents=True)
    _copy(arch / "scene0.tif", other / "d1" / "x" / "scene1.tif")
    _copy(arch / "scene0.tif", other / "solo.tif")
    r = run_cli(runner, tiny_unet, [arch, other], out, "--vector", "none", "--report", rep)
    assert r.exit_code == EXIT_PARTIAL, r.output
    scenes = {s["key"]: s for s in report_of(rep)["scenes"]}
    assert {k: s["status"] for k, s in scenes.items()} == {
        "scene0.tif": "failed", "scene0.tiff": "failed", "d1/x/scene1.tif": "failed", "d2/x/scene2.tif": "ok",
        "solo.tif": "ok"}
    assert "same outputs (same name, same folder): rename one" in scenes["scene0.tiff"]["error"]
    assert "would both write d1/x/scene1_landcover.*:" in scenes["d1/x/scene1.tif"]["error"]
    assert "FAILED  scene0.tif" in r.output and "Error" not in r.output
    assert "5 scene(s): 2 to run (new: 2), 0 skipped, 0 unreadable, 3 with clashing output names" in r.output
    assert sorted(read_masks(out)) == ["d2/x/scene2_landcover.tif", "solo_landcover.tif"]
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:
        rows = dict(db.execute("SELECT key, status FROM scenes"))
    db.close()
    assert rows["scene0.tiff"] == rows["d1/x/scene1.tif"] == "failed" and rows["solo.tif"] == "done"
    r = run_cli(runner, tiny_unet, [arch, other], out, "--vector", "none", "--dry-run")
    assert "run	scene0.tif	fails: " in r.stdout and "skip	solo.tif" in r.stdout, r.output


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


# ---- exactly once --------------------------------------------------------------------------------
def test_vrt_scene_reruns_when_a_band_file_changes(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A VRT over per-band files is one scene; replacing a band file under the unchanged VRT reruns it."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    arch.mkdir()
    src = write_raster(tmp_path / "whole.tif", np.random.default_rng(1).integers(0, 256, (3, 40, 48), dtype=np.uint8))
    vrt = write_band_vrt(src, arch / "scene.vrt")
    r = run_cli(runner, tiny_unet, [arch], out, "--pattern", "*.vrt")
    assert r.exit_code == EXIT_OK and (out / "scene_landcover.tif").exists(), r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--pattern", "*.vrt", "--dry-run")
    assert r.stdout.splitlines()[-1].startswith("skip\tscene.vrt"), r.output
    vrt_stat = vrt.stat()
    band = arch / "B2.tif"
    st = band.stat()
    os.utime(band, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new band file; the VRT itself is untouched
    assert vrt.stat().st_mtime_ns == vrt_stat.st_mtime_ns
    r = run_cli(runner, tiny_unet, [arch], out, "--pattern", "*.vrt", "--dry-run")
    assert "run\tscene.vrt\tinput changed" in r.stdout, r.output


def test_a_sidecar_that_arrives_reruns_the_scene_and_cached_statistics_rerun_nothing(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path) -> None:
    """A corrected georeference (.aux.xml) or a mask (.msk) that arrived beside an unchanged scene left it
    skipped with outputs of the old one; statistics cached by gdalinfo -stats or QGIS, in the scene's or
    in the mask's .aux.xml, rerun nothing (the mask's reran the scene: "changed size")."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    scene = make_archive(arch, 1)[0]
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK

    def dry() -> str:
        return run_cli(runner, tiny_unet, [arch], out, "--dry-run").stdout.splitlines()[-1]

    mask = out / "scene0_landcover.tif"
    for raster in (mask, scene):  # (what QGIS and gdalinfo -stats do)
        with rasterio.open(raster) as ds:
            ds.stats(indexes=[1])  # (rasterio 2 drops .statistics)
        assert Path(f"{raster}.aux.xml").exists()
        assert dry().startswith("skip\tscene0.tif"), raster
    with rasterio.open(scene) as ds:
        t = ds.transform
    side = Path(f"{scene}.aux.xml")
    side.write_text(side.read_text().replace("<PAMDataset>", f"<PAMDataset><GeoTransform>{t.c + 1000}, {t.a}, 0, {t.f}, 0, "
                                                               f"{t.e}</GeoTransform>", 1))
    assert dry() == "run\tscene0.tif\tinput changed"
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    with rasterio.open(mask) as ds:
        assert ds.transform.c == t.c + 1000  # the georeference GDAL reads from the sidecar
    assert dry().startswith("skip\tscene0.tif")
    with rasterio.open(scene) as ds:  # GDAL rewrites the sidecar with other spacing and number formats
        ds.stats(indexes=[1])
    assert "STATISTICS_MEAN" in side.read_text() and dry().startswith("skip\tscene0.tif")
    # the analyst restyles the mask in QGIS (its .qml): no rerun
    style = out / "scene0_landcover.qml"
    style.write_text(style.read_text().replace('opacity="1"', 'opacity="0.5"'))
    assert dry().startswith("skip\tscene0.tif")
    scene.with_suffix(".tfw").write_text("10\n0\n0\n-10\n0\n0\n")
    assert dry() == "run\tscene0.tif\tinput changed"


def test_run_batch_takes_one_input_as_a_string_or_a_path_like(tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """run_batch("archive", ...) read the string as its characters: the folders "a", "r", "c", ... of the
    working folder, or "input t does not exist"."""
    from geoseg.batch import BatchModel, run_batch

    class Where:  # an os.PathLike that is no pathlib.Path (str() of it names the object)
        def __init__(self, p: Path) -> None:
            self.p = p

        def __fspath__(self) -> str:
            return str(self.p)

    arch = tmp_path / "arch"
    make_archive(arch, 2)
    model = BatchModel(weights=str(tiny_unet[0]))
    for inputs in (str(arch), Where(arch), [Where(arch)]):
        planned = run_batch(inputs, tmp_path / "out", model, batch={"dry_run": True}).planned
        assert sorted(s.key for s, _ in planned) == ["d1/x/scene1.tif", "scene0.tif"], inputs


def test_gdal_rewriting_another_tool_s_aux_xml_reruns_nothing(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An .aux.xml written by another tool (<SRS>EPSG:32633</SRS>): GDAL rewrote it when it cached statistics
    (QGIS opening the scene), with the whole WKT and an axis mapping, and the scene reran."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    scene = make_archive(arch, 1)[0]
    aux = Path(f"{scene}.aux.xml")
    aux.write_text("<PAMDataset>\n  <SRS>EPSG:32633</SRS>\n</PAMDataset>\n")
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    with rasterio.open(scene) as ds:
        ds.stats(indexes=[1])
    assert "PROJCS" in aux.read_text() or "PROJCRS" in aux.read_text()  # (rewritten by GDAL)
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.splitlines()[-1].startswith("skip\tscene0.tif"), r.output
    aux.write_text("<PAMDataset>\n  <SRS>EPSG:32632</SRS>\n</PAMDataset>\n")  # another CRS: it runs
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.splitlines()[-1] == "run\tscene0.tif\tinput changed", r.output


def test_statistics_cached_for_a_scene_with_band_names_rerun_nothing(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """GDAL caching statistics (QGIS opening the scene) also copies each band's description into the
    .aux.xml (<Description>B1_blue</Description>): every scene with band names reran the next night. A
    description the raster holds itself says nothing new; one changed in the sidecar does."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    scene = make_archive(arch, 1)[0]
    with rasterio.open(scene, "r+") as ds:
        for i, name in enumerate(("red", "green", "blue"), 1):
            ds.set_band_description(i, name)
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    with rasterio.open(scene) as ds:
        ds.stats(indexes=[1])
    aux = Path(f"{scene}.aux.xml")
    assert "<Description>red</Description>" in aux.read_text()
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.splitlines()[-1].startswith("skip\tscene0.tif"), r.output
    aux.write_text(aux.read_text().replace("<Description>red</Description>", "<Description>nir</Description>"))
    with rasterio.open(scene) as ds:
        assert ds.descriptions[0] == "nir"  # (what GDAL, and band picking by name, read)
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.splitlines()[-1] == "run\tscene0.tif\tinput changed", r.output


def test_a_scene_done_before_sidecars_counted_is_not_redone_for_the_sidecar_it_had(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path) -> None:
    """Upgrading made every done scene with a world file or .aux.xml beside it run again once (its
    fingerprint now covers them): the first run adopts the sidecars a scene already had."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    scene = make_archive(arch, 1)[0]
    world = scene.with_suffix(".tfw")
    world.write_text("10\n0\n0\n-10\n500000\n4800000\n")
    os.utime(world, (time.time() - 60, time.time() - 60))  # (delivered with the scene, before the run)
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    db = sqlite3.connect(out / ".geoseg" / "manifest.sqlite")
    (head,) = db.execute("SELECT head_hash FROM scenes").fetchone()
    assert head.count("+") == 1 and not head.endswith("+")  # the file's part and its sidecars'
    db.execute("UPDATE scenes SET head_hash = ?", (head.split("+")[0],))  # as a run before session 26 wrote it
    db.commit()
    db.close()

    def dry() -> str:
        return run_cli(runner, tiny_unet, [arch], out, "--dry-run").stdout.splitlines()[-1]

    assert dry().startswith("skip\tscene0.tif")
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    db = sqlite3.connect(out / ".geoseg" / "manifest.sqlite")
    assert db.execute("SELECT head_hash FROM scenes").fetchone() == (head,)  # adopted by the run
    db.close()
    world.write_text("10\n0\n0\n-10\n501000\n4800000\n")  # a later change of it counts
    assert dry() == "run\tscene0.tif\tinput changed"
    # a sidecar that came after the old version's run is no sidecar the scene had: it runs
    db = sqlite3.connect(out / ".geoseg" / "manifest.sqlite")
    db.execute("UPDATE scenes SET head_hash = ?", (head.split("+")[0],))
    db.commit()
    db.close()
    assert dry() == "run\tscene0.tif\tinput changed"
    world.unlink()  # and so does its going
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    assert dry().startswith("skip\tscene0.tif")


def test_second_run_skips_touch_reruns_one_force_redoes_all(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    scenes = make_archive(arch, 4)
    r = run_cli(runner, tiny_unet, [arch], out, "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    report = report_of(rep)
    assert report["counts"] == {"ok": 4, "skipped": 0, "failed": 0}
    first = {s["key"]: s for s in report["scenes"]}
    assert first["d1/x/scene1.tif"]["windows"] == 6 and first["d1/x/scene1.tif"]["megapixels_per_s"] > 0
    # Each scene's class statistics (10 m pixels of a projected CRS: 100 m² each).
    for key, mask_key in (("scene0.tif", "scene0_landcover.tif"), ("d1/x/scene1.tif", "d1/x/scene1_landcover.tif")):
        with rasterio.open(out / mask_key) as ds:
            m = ds.read(1)
        px = first[key]["class_pixels"]
        assert sum(px.values()) == int((m != 255).sum()) and max(px.values()) > 0
        assert first[key]["class_area"] == {k: 100.0 * v for k, v in px.items()}
        assert first[key]["class_area_units"] == "m2"
    # Outputs mirror the input tree; one log line per scene.
    masks = read_masks(out)
    assert sorted(masks) == ["d1/x/scene1_landcover.tif", "d2/x/scene2_landcover.tif",
                             "scene0_landcover.tif", "scene3_landcover.tif"]
    assert all(m.shape == (96, 128) and m.max() < 4 for m in masks.values())
    assert sum(" ok " in line for line in r.output.splitlines()) == 4
    assert "wrote " not in r.output  # the engine's own line is muted without -v
    assert (out / ".geoseg" / "manifest.sqlite").exists()

    r = run_cli(runner, tiny_unet, [arch], out, "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    assert set(statuses(report_of(rep)).values()) == {"skipped"}

    st = scenes[1].stat()
    os.utime(scenes[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    (out / "scene3_landcover.qml").unlink()  # a damaged output is redone too
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.exit_code == EXIT_OK, r.output
    assert sorted(line for line in r.stdout.splitlines() if line.startswith("run")) == [
        "run\td1/x/scene1.tif\tinput changed", "run\tscene3.tif\toutput scene3_landcover.qml is missing"]
    r = run_cli(runner, tiny_unet, [arch], out, "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    assert statuses(report_of(rep)) == {"scene0.tif": "skipped", "d1/x/scene1.tif": "ok",
                                        "d2/x/scene2.tif": "skipped", "scene3.tif": "ok"}
    assert (out / "scene3_landcover.qml").exists()

    # Options from the environment (cron); other parameters or --force redo everything.
    env = {"GEOSEG_BATCH_WEIGHTS": str(tiny_unet[0]), "GEOSEG_BATCH_OUT": str(out), "GEOSEG_BATCH_DRY_RUN": "1"}
    r = runner.invoke(cli, ["batch", str(arch)], env=env)
    assert r.exit_code == EXIT_OK and r.stdout.count("skip\t") == 4, r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run", "--overlap", "8")
    assert r.stdout.count("parameters changed") == 4
    r = run_cli(runner, tiny_unet, [arch], out, "--force", "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    assert set(statuses(report_of(rep)).values()) == {"ok"}
    assert {k: v.tolist() for k, v in read_masks(out).items()} == {k: v.tolist() for k, v in masks.items()}
    assert temp_files(out) == []


def test_the_run_s_first_line_comes_before_its_scenes_lines(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A night with skipped or unreadable scenes logged their lines first and the run's line after them (the README
    and a monitor reading the log's first line take it for the run's)."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(64, 64))
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    (arch / "broken.tif").write_bytes(b"")
    (arch / "scene2.tif").write_bytes((arch / "scene0.tif").read_bytes())
    r = run_cli(runner, tiny_unet, [arch], out)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("4 scene(s): 2 to run (new: 2), 2 skipped, 0 unreadable"), r.stderr
    assert sum(" skip " in ln for ln in lines) == 2 and sum("FAILED" in ln for ln in lines) == 1, r.stderr
    assert re.search(r"\] ok +scene2\.tif  1 window  ", r.stderr), r.stderr  # (it said "1 windows")


def test_a_stop_before_the_run_s_first_line_still_logs_the_scenes_decided(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The skipped scenes' lines wait for the run's first line; a stop before it lost them (the report had them)."""
    import geoseg.batch as gb

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 3, size=(64, 64))
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    real, calls = gb.input_fingerprint, []

    def stopping(path):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(gb, "input_fingerprint", stopping)
    r = run_cli(runner, tiny_unet, [arch], out)
    assert r.exit_code == 130 and r.stderr.count(" skip ") == 2 and "interrupted" in r.stderr, r.output


def test_a_failed_scene_s_earlier_mask_left_out_of_the_mosaic_is_said(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A scene that failed tonight keeps last night's outputs on disk, and the mosaic left its mask out without a
    word (the archive map lost an area; the log named only the failure)."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(64, 64))
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == EXIT_OK
    (arch / "scene0.tif").write_bytes(b"not a tiff")
    r = run_cli(runner, tiny_unet, [arch], out)
    assert r.exit_code == 3 and (out / "scene0_landcover.tif").exists(), r.output
    assert "the mosaic leaves out 1 mask(s) of scenes that failed this run (their earlier outputs stay on disk): " \
           "scene0.tif" in r.stderr, r.stderr
    assert "scene0_landcover.tif" not in (out / "landcover.vrt").read_text()


def test_a_path_variable_takes_tilde_as_home(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """cron expands no '~': GEOSEG_BATCH_OUT=~/results wrote into a folder named '~' in the working folder (the
    shell expands it on a command line; the same value from a variable means the same)."""
    arch, home, work = tmp_path / "arch", tmp_path / "home", tmp_path / "work"
    make_archive(arch, 1, size=(64, 64))
    home.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    env = {"GEOSEG_BATCH_WEIGHTS": str(tiny_unet[0]).replace(str(tmp_path), "~/..", 1), "GEOSEG_BATCH_OUT": "~/results",
           "GEOSEG_BATCH_LOG_FILE": "~/batch.log", "GEOSEG_BATCH_VECTOR": "none"}
    r = runner.invoke(cli, ["-q", "batch", str(arch)], env=env)
    assert r.exit_code == EXIT_OK, r.output
    assert (home / "results" / "scene0_landcover.tif").exists() and (home / "batch.log").exists()
    assert list(work.iterdir()) == []


def test_corrupt_scene_fails_alone_exit_3(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out, rep, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "r" / "report.json", tmp_path / "batch.log"
    make_archive(arch, 4, size=(64, 64))
    good = (arch / "scene0.tif").read_bytes()
    (arch / "d1" / "broken.tif").write_bytes(good[: len(good) // 3])  # truncated
    (arch / "d2" / "text.tif").write_text("not a tiff\n")
    r = run_cli(runner, tiny_unet, [arch], out, "--report", rep, "--log-file", logf)
    assert r.exit_code == EXIT_PARTIAL, r.output
    report = report_of(rep)
    assert report["counts"] == {"ok": 4, "skipped": 0, "failed": 2}
    assert report["exit_status"] == EXIT_PARTIAL
    failed = {s["key"]: s for s in report["scenes"] if s["status"] == "failed"}
    assert set(failed) == {"d1/broken.tif", "d2/text.tif"}
    assert "not a raster" in failed["d2/text.tif"]["error"]
    assert all(s["error"] and s["outputs"] == [] for s in failed.values())
    assert len(read_masks(out)) == 4 and not list(out.rglob("broken*")) and not list(out.rglob("text*"))
    log_text = logf.read_text()
    assert "FAILED  d1/broken.tif" in log_text and log_text.count(" ok ") == 4
    # The manifest records the failure with its reason; the next run retries only the failed ones.
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:
        rows = dict(db.execute("SELECT key, status FROM scenes"))
    assert rows["d1/broken.tif"] == "failed" and rows["scene0.tif"] == "done"
    # A model that cannot load is fatal: exit 1, one line.
    junk = tmp_path / "junk.pdparams"
    junk.write_bytes(np.random.default_rng(1).bytes(3000))
    _copy(tiny_unet[1], tmp_path / "junk.yaml")
    r = runner.invoke(cli, ["batch", str(arch), "--out", str(tmp_path / "o2"), "--weights", str(junk)])
    assert r.exit_code == 1 and "corrupt" in r.output, r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    runs = [line for line in r.stdout.splitlines() if line.startswith("run")]
    assert runs == ["run\td1/broken.tif\tfailed before", "run\td2/text.tif\tfailed before"]


# ---- crash safety and the lock -----------------------------------------------------------------------
def _start_batch(tiny_unet, inputs: Path, out: Path, log: Path) -> subprocess.Popen:  # type: ignore[no-untyped-def, type-arg]
    cmd = [str(GEOSEG)] if GEOSEG.exists() else [sys.executable, "-c", "from geoseg_cli.main import cli; cli()"]
    with open(log, "wb") as f:
        return subprocess.Popen([*cmd, *batch_args(tiny_unet, str(inputs), "--out", str(out))], stdout=f, stderr=f)


def _wait_for(cond, proc, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > end:
            pytest.fail(f"batch subprocess ended or timed out first (rc={proc.returncode})")
        time.sleep(0.01)


def _done_count(out: Path) -> int:
    db_path = out / ".geoseg" / "manifest.sqlite"
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM scenes WHERE status = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _signal_mid_scene(tiny_unet, arch: Path, out: Path, log: Path, sig: int) -> int:  # type: ignore[no-untyped-def]
    """Run a batch in a subprocess and send it ``sig`` while a scene is being written (its staging/temp
    files exist), after one is done; return its exit status."""
    proc = _start_batch(tiny_unet, arch, out, log)
    try:
        _wait_for(lambda: _done_count(out) >= 1 and bool(temp_files(out)), proc)
        assert proc.poll() is None, "the batch finished before the signal: give it more scenes"
        os.kill(proc.pid, sig)
        return proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_mid_scene_leaves_no_temp_files(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """cron's timeout, kill or a stopping container send SIGTERM: the run stops as on Ctrl-C, with exit
    143, one line, and its temp files removed at once (not only by the next run)."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 12, size=(160, 192))
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "warm")  # warms the export cache
    assert r.exit_code == EXIT_OK, r.output
    rc = _signal_mid_scene(tiny_unet, arch, out, tmp_path / "term.log", signal.SIGTERM)
    log = (tmp_path / "term.log").read_text()
    assert rc == 143, log
    assert "terminated (SIGTERM)" in log and "Traceback" not in log and "FatalError" not in log
    assert "ccache" not in log  # paddle, imported before logging is set up, says nothing
    assert temp_files(out) == []
    assert 1 <= _done_count(out) < 12


def test_kill_9_mid_run_then_rerun_matches_uninterrupted(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out, ref, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "ref", tmp_path / "report.json"
    make_archive(arch, 12, size=(160, 192))
    r = run_cli(runner, tiny_unet, [arch], ref)  # the uninterrupted reference (also warms the export cache)
    assert r.exit_code == EXIT_OK, r.output

    _signal_mid_scene(tiny_unet, arch, out, tmp_path / "killed.log", signal.SIGKILL)
    done_before = _done_count(out)
    assert 1 <= done_before < 12
    # the scenes the killed run had queued or was running: why they run again (never ran is not 'interrupted')
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.count("\tnot finished by an interrupted run") == 11 - done_before, r.output
    assert r.stdout.count("\tthe batch process died while running it (runs last)") == 1, r.output  # (its own? unknown)
    # Leftovers of other killed runs (temp output, GDAL staging file, its sidecar) are cleaned too.
    planted = [out / "d1" / "x" / ".geoseg-scene1_landcover.tif.0a1b2c3d.tmp",
               out / ".geoseg-scene0_landcover.tif.0a1b2c3d.staging.tif",
               out / ".geoseg-scene0_landcover.tif.0a1b2c3d.staging.tif.aux.xml"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")

    r = run_cli(runner, tiny_unet, [arch], out, "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    assert "taking over the lock" in r.output  # the dead run's lock was stale
    counts = report_of(rep)["counts"]
    assert counts["failed"] == 0 and counts["skipped"] == done_before and counts["ok"] == 12 - done_before
    assert temp_files(out) == [] and temp_files(ref) == []
    got, want = read_masks(out), read_masks(ref)
    assert sorted(got) == sorted(want) and len(got) == 12
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for qml in out.rglob("*.qml"):
        assert qml.read_text().rstrip().endswith("</qgis>")
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.count("skip\t") == 12


def test_second_concurrent_run_exits_with_lock_code(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 12, size=(160, 192))
    lock = out / ".geoseg" / "lock"
    proc = _start_batch(tiny_unet, arch, out, tmp_path / "first.log")
    try:
        _wait_for(lambda: lock.exists() and lock.read_text().startswith(f"pid {proc.pid} "), proc)
        r = run_cli(runner, tiny_unet, [arch], out)
        first_still_running = proc.poll() is None
        assert proc.wait(timeout=120) == EXIT_OK, (tmp_path / "first.log").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert first_still_running
    assert r.exit_code == EXIT_LOCKED, r.output
    assert "locked by another geoseg batch run" in r.output and f"pid {proc.pid}" in r.output
    assert len(read_masks(out)) == 12 and temp_files(out) == []
    # The library raises the same error; a released lock is free again.
    with BatchLock(out):
        with pytest.raises(BatchLockedError):
            BatchLock(out).acquire()
    assert lock.read_text() == ""


# ---- Dask ------------------------------------------------------------------------------------------------
def test_local_cluster_two_workers_load_model_once_each(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    distributed = pytest.importorskip("distributed")
    arch, out, ref, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "ref", tmp_path / "report.json"
    make_archive(arch, 8, size=(96, 128))
    (arch / "bad.tif").write_text("junk")  # a failure on a worker comes back to the client
    r = run_cli(runner, tiny_unet, [arch], ref)  # in-process reference
    assert r.exit_code == EXIT_PARTIAL, r.output
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        # The scheduler address comes from the environment, as in a cron job.
        r = runner.invoke(cli, batch_args(tiny_unet, str(arch), "--out", str(out), "--report", str(rep)),
                          env={"GEOSEG_SCHEDULER": cluster.scheduler_address})
        assert r.exit_code == EXIT_PARTIAL, r.output
        addresses = set(cluster.scheduler_info["workers"])
    report = report_of(rep)
    assert report["counts"] == {"ok": 8, "skipped": 0, "failed": 1}
    workers = report["workers"]
    assert set(workers) == addresses and len(addresses) == 2
    assert set(workers.values()) == {1}  # the model was loaded once per worker...
    used = {s["worker"] for s in report["scenes"] if s["status"] == "ok"}
    assert used == addresses  # ...and both workers did work
    assert [s["key"] for s in report["scenes"] if s["status"] == "failed"] == ["bad.tif"]
    assert "not a raster" in report["scenes"][0]["error"]
    # Same masks as in one process; the client's manifest makes the next run skip them.
    got, want = read_masks(out), read_masks(ref)
    assert sorted(got) == sorted(want) and len(got) == 8
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.count("skip\t") == 8


def test_a_local_cluster_prints_one_line_per_scene(tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--workers 2 in a real process: the scheduler's and nannies' INFO chatter (about 30 lines, through
    PaddlePaddle's root log handler) stays out of the output; -v shows it."""
    arch = tmp_path / "arch"
    make_archive(arch, 2, size=(40, 48))
    cmd = [str(GEOSEG)] if GEOSEG.exists() else [sys.executable, "-c", "from geoseg_cli.main import cli; cli()"]
    run = subprocess.run([*cmd, *batch_args(tiny_unet, str(arch), "--out", str(tmp_path / "out"), "--workers", "2",
                                            "--vector", "none", "--no-mosaic")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == EXIT_OK, run.stderr
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    assert not [ln for ln in lines if "INFO" in ln or "Scheduler at" in ln or "Nanny" in ln], lines
    assert sum(" ok " in ln for ln in lines) == 2 and len(lines) <= 6, lines


def test_a_local_cluster_does_not_take_port_8787() -> None:
    """Two nightly batches with --workers on one machine: the second warned "Port 8787 is already in
    use ... Hosting the HTTP server on port N instead" (the scheduler's HTTP server starts even
    without a dashboard, on 8787 by default); each now takes a free port."""
    import warnings

    from geoseg.batch import BatchOptions, dask_client

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dask_client(BatchOptions(workers=1)) as client:
            assert client.submit(sum, [1, 2]).result() == 3
            port = client.cluster.scheduler.http_server.port
    assert port != 8787 and not [w for w in seen if "already in use" in str(w.message)]


def test_workers_option_starts_a_local_cluster(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("distributed")
    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 3, size=(64, 64))
    # float values 0..255 where the model learned 8-bit data scaled to 0..1: an input-range warning
    write_raster(arch / "float.tif", np.random.default_rng(1).uniform(0, 255, (3, 64, 64)).astype(np.float32))
    r = run_cli(runner, tiny_unet, [arch], out, "--workers", "2", "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    report = report_of(rep)
    assert report["counts"]["ok"] == 4 and all(s["worker"] for s in report["scenes"])
    assert 1 <= len(report["workers"]) <= 2 and set(report["workers"].values()) == {1}
    # a worker's warnings come back to the client: in the report (and its log), as in a local run
    warned = {s["key"]: s["warnings"] for s in report["scenes"] if s["warnings"]}
    assert list(warned) == ["float.tif"] and "standard deviations" in warned["float.tif"][0], warned
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "here", "--report", tmp_path / "here.json")
    assert {s["key"]: s["warnings"] for s in report_of(tmp_path / "here.json")["scenes"] if s["warnings"]} == warned
    r = run_cli(runner, tiny_unet, [arch], out, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert r.exit_code == 2 and "not both" in r.output and "environment" not in r.output
    # the scheduler from a cron environment's GEOSEG_SCHEDULER: the user never typed --scheduler
    r = runner.invoke(cli, ["batch", str(arch), "--out", str(out), "--weights", str(tiny_unet[0]), "--workers", "2"],
                      env={"GEOSEG_SCHEDULER": "tcp://127.0.0.1:1"})
    assert r.exit_code == 2 and "set by the environment variable GEOSEG_SCHEDULER: unset it" in r.output, r.output


def test_a_relative_weights_path_reaches_workers_started_in_another_folder(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights models/x.pdparams (relative to the job's folder) with --scheduler: every scene failed with
    "weights file models/x.pdparams does not exist" on workers started elsewhere; a malformed --scheduler
    was "unexpected error: ValueError" after the run had marked its scenes running."""
    import shutil

    distributed = pytest.importorskip("distributed")
    job, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    (job / "models").mkdir(parents=True)
    elsewhere.mkdir()
    for f in tiny_unet:
        shutil.copy(f, job / "models" / f.name)
    make_archive(job / "arch", 1)
    monkeypatch.chdir(elsewhere)  # where the workers start
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.chdir(job)
        r = runner.invoke(cli, ["batch", "arch", "--out", "out", "--weights", f"models/{tiny_unet[0].name}",
                                "--scheduler", cluster.scheduler_address, "--vector", "none"])
        assert r.exit_code == EXIT_OK, r.output
    assert (job / "out" / "scene0_landcover.tif").exists()
    for address, words in (("foo:bar", "invalid literal"), ("tcp://head", "missing port")):
        r = runner.invoke(cli, ["batch", "arch", "--out", "out2", "--weights", f"models/{tiny_unet[0].name}",
                                "--scheduler", address])
        assert r.exit_code == 1 and f"--scheduler {address}: not a Dask scheduler address" in r.output, r.output
        assert words in r.output and "unexpected" not in r.output and not (job / "out2").exists()


def test_prior_adaptation_is_a_result_parameter() -> None:
    # A run with adaptation gives other masks, so switching it must re-run scenes, not skip them.
    from geoseg.batch import result_params
    from geoseg.engine import PredictOptions
    from tests.test_engine import identity_card

    plain_card = identity_card(1, 2).replace(class_prior=(0.5, 0.5))
    adapt_card = plain_card.replace(adapt_prior=True)
    base = result_params(PredictOptions(), plain_card)
    assert "adapt_prior" not in base
    assert result_params(PredictOptions(adapt_prior=False), adapt_card) == base
    on = result_params(PredictOptions(), adapt_card)
    assert on == result_params(PredictOptions(adapt_prior=True), plain_card) != base
    assert on["adapt_prior"] is True and on["prior_max_ratio"] == 2.0
    assert result_params(PredictOptions(adapt_prior=True, prior_max_ratio=3.0), plain_card) != on


def test_vector_classes_in_batch_are_checked_first_and_a_parameter(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from geoseg.batch import result_params
    from geoseg.engine import PredictOptions
    from tests.test_engine import identity_card

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(40, 48))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector-classes", "roads")
    assert r.exit_code == 1 and "class 'roads' is not one of" in r.output and "Traceback" not in r.output, r.output
    assert not list(out.glob("*.tif"))  # refused once, before any scene
    card = identity_card(1, 2)
    assert "vector_classes" not in result_params(PredictOptions(), card)  # earlier manifests stay valid
    assert result_params(PredictOptions(vector="gpkg", vector_classes=("1",)), card)["vector_classes"] == ["1"]


def test_a_window_grid_no_scene_can_take_is_refused_before_any_scene(runner, tiny_unet,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    """--overlap as large as the window failed every scene (exit 3), and the manifest then took a finished
    archive's scenes for failed: their masks left the mosaic. --overlap -1 is a usage error."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(40, 48))
    assert run_cli(runner, tiny_unet, [arch], out).exit_code == 0
    mosaic = (out / "landcover.vrt").read_text()
    r = run_cli(runner, tiny_unet, [arch], out, "--overlap", "64")  # the card's window: 64
    assert r.exit_code == 1 and "overlap 64 must be smaller than the tile size 64" in r.output, r.output
    assert (out / "landcover.vrt").read_text() == mosaic
    r = run_cli(runner, tiny_unet, [arch], out, "--overlap", "64", "--tile-size", "64")  # both given: a usage error
    assert r.exit_code == 2 and "'--overlap': 64 must be smaller than --tile-size 64" in r.output, r.output
    assert (out / "landcover.vrt").read_text() == mosaic
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.exit_code == 0 and r.stdout.count("skip\t") == 2, r.stdout
    assert run_cli(runner, tiny_unet, [arch], out, "--overlap", "-1").exit_code == 2


def test_probabilities_in_batch_are_outputs_and_a_parameter(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 1, size=(40, 48))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK and not (out / "scene0_probabilities.tif").exists(), r.output
    # asking for probabilities later redoes the scene (the outputs differ), then it is done
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--probabilities", "uint8", "--dry-run")
    assert r.stdout.splitlines()[-1] == "run\tscene0.tif\tparameters changed", r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--probabilities", "uint8")
    assert r.exit_code == EXIT_OK, r.output
    with rasterio.open(out / "scene0_probabilities.tif") as ds:
        assert (ds.count, ds.dtypes[0], ds.shape) == (4, "uint8", (40, 48))
    # it is one of the scene's recorded outputs: a deleted one is redone
    (out / "scene0_probabilities.tif").unlink()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--probabilities", "uint8", "--dry-run")
    assert r.stdout.splitlines()[-1] == "run\tscene0.tif\toutput scene0_probabilities.tif is missing", r.output
    # runs without probabilities keep their parameters (manifests of earlier versions stay valid)
    from geoseg.batch import result_params
    from geoseg.engine import PredictOptions
    from tests.test_engine import identity_card

    card = identity_card(1, 2)
    assert "probabilities" not in result_params(PredictOptions(), card)
    assert result_params(PredictOptions(probabilities="float32"), card)["probabilities"] == "float32"


def test_aoi_in_batch_skips_scenes_it_misses_without_failing(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from rasterio.transform import from_origin

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    arch.mkdir()
    rng = np.random.default_rng(3)
    write_raster(arch / "here.tif", rng.integers(1, 256, (3, 64, 80), dtype=np.uint8))  # origin 500000/4800000, 10 m
    write_raster(arch / "away.tif", rng.integers(1, 256, (3, 64, 80), dtype=np.uint8),
                 transform=from_origin(600000.0, 4700000.0, 10.0, 10.0))
    box = "500101,4799501,500499,4799899"  # cols 10-49, rows 10-49 of here.tif
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--aoi", box, "--report", rep)
    assert r.exit_code == EXIT_OK, r.output
    report = {s["key"]: s for s in report_of(rep)["scenes"]}
    assert report["here.tif"]["status"] == "ok" and report["away.tif"]["status"] == "skipped"
    assert report["away.tif"]["reason"] == "outside the AOI" and "does not overlap away.tif" in report["away.tif"]["error"]
    assert "skip" in r.output and "outside the AOI" in r.output
    assert "2 scene(s): 1 to run (new: 1), 1 skipped" in r.output  # known from its header: never sent to the model
    with rasterio.open(out / "here_landcover.tif") as ds:
        assert ds.shape == (40, 40) and (ds.transform.c, ds.transform.f) == (500100.0, 4799900.0)
    assert not list(out.glob("away*"))
    # the next night: nothing to do for either (the missed scene is not retried)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--aoi", box, "--dry-run")
    assert sorted(r.stdout.splitlines()) == ["skip\taway.tif\toutside the AOI", "skip\there.tif\tdone, unchanged"], r.output
    # another AOI is another result
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--aoi", "500101,4799501,500299,4799899", "--dry-run")
    # (the run tests the missed scene again from its header, and skips it again: no "parameters changed" run)
    assert r.stdout.splitlines() == ["skip\taway.tif\toutside the AOI", "run\there.tif\tparameters changed"], r.output
    # a box that is not one is refused once, before any scene
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "out2", "--aoi", "500499,4799501,500101,4799899")
    assert r.exit_code == 1 and "minx < maxx" in r.output and not list((tmp_path / "out2").rglob("*.tif")), r.output
    assert "FAILED" not in r.output


def test_batch_lays_its_masks_into_one_styled_vrt_mosaic(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from rasterio.transform import from_origin

    arch, out = tmp_path / "arch", tmp_path / "out"
    (arch / "b").mkdir(parents=True)
    rng = np.random.default_rng(5)
    west = rng.integers(1, 256, (3, 40, 50), dtype=np.uint8)
    east = rng.integers(1, 256, (3, 40, 50), dtype=np.uint8)
    east[:, :, :10] = 0  # east's first 10 columns (over west's last 10) are its nodata collar
    write_raster(arch / "west.tif", west, nodata=0)  # origin 500000/4800000, 10 m
    write_raster(arch / "b" / "east.tif", east, nodata=0, transform=from_origin(500400.0, 4800000.0, 10.0, 10.0))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK and "mosaic of 2 mask(s): landcover.vrt" in r.output, r.output
    with rasterio.open(out / "west_landcover.tif") as w, rasterio.open(out / "b" / "east_landcover.tif") as e:
        wm, em = w.read(1), e.read(1)
    with rasterio.open(out / "landcover.vrt") as v:
        assert v.shape == (40, 90) and (v.transform.c, v.transform.f, v.transform.a) == (500000.0, 4800000.0, 10.0)
        assert v.crs == rasterio.crs.CRS.from_epsg(32633) and v.nodata == 255
        assert v.colormap(1)[1][3] == 255 and v.colormap(1)[255][3] == 0
        from geoseg.io import read_classes

        with rasterio.open(out / "west_landcover.tif") as w:
            assert read_classes(v) == read_classes(w) is not None  # the class table, as in the masks
        mosaic = v.read(1)
    np.testing.assert_array_equal(mosaic[:, :40], wm[:, :40])
    np.testing.assert_array_equal(mosaic[:, 40:50], wm[:, 40:50])  # east's nodata collar does not hide west
    np.testing.assert_array_equal(mosaic[:, 50:], em[:, 10:])
    assert (out / "landcover.qml").read_text().count("<paletteEntry") == 4
    # the archive's polygons in one go, with the class names of the masks
    import pyogrio

    r = runner.invoke(cli, ["-q", "vectorize", str(out / "landcover.vrt"), "--out", str(tmp_path / "all.gpkg")])
    assert r.exit_code == 0, r.output
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "all.gpkg", layer="landcover")
    assert set(fields[list(meta["fields"]).index("class_id")]) == set(np.unique(mosaic)) - {255}
    # a scene in another CRS: one mosaic per CRS; when its mask is gone, its mosaic goes too
    write_raster(arch / "utm32.tif", rng.integers(1, 256, (3, 30, 30), dtype=np.uint8), crs="EPSG:32632")
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    vrts = sorted(p.name for p in out.glob("*.vrt"))
    assert vrts == ["landcover_epsg32632_10.vrt", "landcover_epsg32633_10.vrt"], r.output
    for f in out.glob("utm32_*"):
        f.unlink()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--pattern", "west.tif", "--pattern", "east.tif")
    assert r.exit_code == EXIT_OK, r.output
    assert sorted(p.name for p in out.glob("*.vrt")) == ["landcover.vrt"]
    assert not list(out.glob("landcover_*"))
    # --no-mosaic writes none
    out2 = tmp_path / "out2"
    r = run_cli(runner, tiny_unet, [arch / "west.tif"], out2, "--vector", "none", "--no-mosaic")
    assert r.exit_code == EXIT_OK and not list(out2.glob("*.vrt")), r.output


# ---- outputs in the input tree, output folder errors, stale outputs --------------------------------------
def test_out_equal_to_the_input_folder_never_takes_its_own_outputs_as_scenes(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch = tmp_path / "arch"
    make_archive(arch, 1, size=(16, 16))  # scene0.tif
    opts = ("--vector", "gpkg", "--confidence", "uint8")
    for _ in range(2):  # a nightly job: the second night finds only its own outputs beside the scene
        r = run_cli(runner, tiny_unet, [arch], arch, *opts, "--dry-run")
        assert [line.split("\t")[1] for line in r.stdout.splitlines()] == ["scene0.tif"], r.output
        r = run_cli(runner, tiny_unet, [arch], arch, *opts)
        assert r.exit_code == EXIT_OK, r.output
    assert not list(arch.rglob("*_landcover_landcover*")) and not list(arch.rglob("*_confidence_*"))
    # sub-folders of an input folder that is the output folder are walked, their outputs skipped
    make_archive(arch, 2, size=(16, 16))  # + d1/x/scene1.tif
    for _ in range(2):
        r = run_cli(runner, tiny_unet, [arch], arch, *opts)
        assert r.exit_code == EXIT_OK, r.output
    assert sorted(p.relative_to(arch).as_posix() for p in arch.rglob("*_landcover.tif")) == [
        "d1/x/scene1_landcover.tif", "scene0_landcover.tif"]
    assert not list(arch.rglob("*_landcover_landcover*")) and not list(arch.rglob("*_confidence_*"))
    r = run_cli(runner, tiny_unet, [arch], arch, *opts, "--dry-run")
    assert r.stdout.count("skip\t") == 2 and "run\t" not in r.stdout, r.output
    # the mosaic is an output too (a .vrt pattern does not take it)
    assert (arch / "landcover.vrt").exists()
    assert [s.key for s in discover_scenes([arch], arch, ["*.tif", "*.vrt"])] == ["scene0.tif", "d1/x/scene1.tif"]
    # a user's file named like an output, outside the output folder, is a scene
    other = tmp_path / "other"
    other.mkdir()
    _copy(arch / "scene0.tif", other / "field_landcover.tif")
    assert [s.key for s in discover_scenes([other, arch], arch)] == ["field_landcover.tif", "scene0.tif", "d1/x/scene1.tif"]


def test_an_output_folder_that_cannot_be_one_is_one_line_error(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch = tmp_path / "arch"
    make_archive(arch, 1, size=(16, 16))
    (tmp_path / "base.yaml").write_text("x: 1\n")
    for out in (tmp_path / "base.yaml" / "sub", tmp_path / "base.yaml" / "a" / "b"):
        for extra in ((), ("--dry-run",)):
            r = run_cli(runner, tiny_unet, [arch], out, *extra)
            assert r.exit_code == 1 and "unexpected" not in r.output, r.output
            assert "base.yaml is a file, not a folder" in r.output, r.output
    if Path("/proc/self").exists():  # a folder no one can create a folder in
        r = run_cli(runner, tiny_unet, [arch], "/proc/geoseg-batch-test")
        assert r.exit_code == 1 and "unexpected" not in r.output, r.output
        assert "give a writable folder for --out" in r.output, r.output


def test_a_redone_scene_drops_its_outputs_the_new_run_does_not_write(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    arch.mkdir()
    write_raster(arch / "a0.tif", np.random.default_rng(4).integers(0, 256, (3, 24, 32), dtype=np.uint8))
    r = run_cli(runner, tiny_unet, [arch], out, "--confidence", "uint8", "--vector", "geojson")
    assert r.exit_code == EXIT_OK, r.output
    assert (out / "a0_confidence.tif").exists() and (out / "a0_landcover.geojson").exists()
    mine = _copy(arch / "a0.tif", out / "a0_notes.tif")  # the user's own file beside the outputs stays
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    assert not (out / "a0_confidence.tif").exists() and not (out / "a0_landcover.geojson").exists()
    assert (out / "a0_landcover.tif").exists() and mine.exists()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.stdout.splitlines() == ["skip\ta0.tif\tdone, unchanged"], r.output


def test_dry_run_says_which_scenes_a_live_run_is_doing(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:
        db.execute("UPDATE scenes SET status = 'running' WHERE key = 'scene0.tif'")
    db.close()
    with BatchLock(out):  # a live run (this process, another open file) holds the lock
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert "run\tscene0.tif\trunning now (another batch holds the lock)" in r.stdout, r.output
    assert "skip\td1/x/scene1.tif" in r.stdout, r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")  # lock free: the run died
    assert "run\tscene0.tif\tnot finished by an interrupted run" in r.stdout, r.output


_CRASH_ON = """
import os, signal
import geoseg.batch as gb
real = gb.run_scene
def crash_on(scene, *args, **kwargs):  # a scene that crashes the process (a segfault in a library, the OOM killer)
    if scene.key == BAD:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(scene, *args, **kwargs)
gb.run_scene = crash_on
from geoseg_cli.main import cli
cli()
"""


def _batch_crashing_on(tiny_unet, key: str, arch: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def, type-arg]
    script = _CRASH_ON.replace("BAD", repr(key))
    return subprocess.run([sys.executable, "-c", script, *batch_args(tiny_unet, str(arch), "--out", str(out), *extra)],
                          capture_output=True, text=True, timeout=300)


def _manifest_rows(out: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(f"file:{out / '.geoseg' / 'manifest.sqlite'}?mode=ro", uri=True) as db:
        rows = {k: (s, c) for k, s, c in db.execute("SELECT key, status, crashes FROM scenes")}
    db.close()
    return rows


def test_a_scene_that_crashes_the_process_runs_last_then_is_held_back(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A scene that killed the batch process (a library's segfault, the OOM killer) killed every nightly run at
    the same place: the scenes after it never ran.  The next run runs it last; after a second crash later runs
    hold it back, failed with one line, until it changes or --force runs it."""
    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))  # scene0.tif, d1/x/scene1.tif, d2/x/scene2.tif, scene3.tif
    bad = "d1/x/scene1.tif"
    r = _batch_crashing_on(tiny_unet, bad, arch, out, "--vector", "none")
    assert r.returncode == -signal.SIGKILL, r.stderr
    rows = _manifest_rows(out)
    assert rows[bad] == ("started", 0) and rows["d2/x/scene2.tif"] == ("running", 0), rows  # (never ran)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert f"run\t{bad}\tthe batch process died while running it (runs last)" in r.stdout, r.output

    r = _batch_crashing_on(tiny_unet, bad, arch, out, "--vector", "none")  # the others first, then it: killed again
    assert r.returncode == -signal.SIGKILL, r.stderr
    rows = _manifest_rows(out)
    assert rows[bad] == ("started", 1) and all(s == "done" for k, (s, _) in rows.items() if k != bad), rows
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert f"run\t{bad}\tfails: held back: it crashed the process running it 2 times (--force runs it)" in r.stdout

    for _ in range(2):  # held back: failed without running, also in the run after
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
        assert r.exit_code == EXIT_PARTIAL and "died 2 times while running this scene" in r.output, r.output
        report = report_of(rep)
        assert statuses(report) == {"scene0.tif": "skipped", bad: "failed", "d2/x/scene2.tif": "skipped",
                                    "scene3.tif": "skipped"}
        assert _manifest_rows(out)[bad] == ("failed", 2)
    # a stop (SIGTERM, Ctrl-C) in a scene is no crash: --force runs it, a stop leaves it to do, not started
    import geoseg.batch as gb
    from geoseg_cli.main import Terminated

    real = gb.run_scene

    def stop(scene, *args, **kwargs):  # type: ignore[no-untyped-def]
        if scene.key == bad:
            raise Terminated()
        return real(scene, *args, **kwargs)

    gb.run_scene = stop
    try:
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--force")
    finally:
        gb.run_scene = real
    assert r.exit_code == 143, r.output
    assert _manifest_rows(out)[bad] == ("running", 2)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--force")  # it ran through: the count is gone
    assert r.exit_code == EXIT_OK, r.output
    assert set(_manifest_rows(out).values()) == {("done", 0)}


def test_a_crashing_scene_gets_its_tries_again_once_it_changes(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    for _ in range(2):
        assert _batch_crashing_on(tiny_unet, "scene0.tif", arch, out, "--vector", "none").returncode == -signal.SIGKILL
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_PARTIAL and "died 2 times" in r.output, r.output
    assert "0 to run, 1 skipped, 0 unreadable, 1 held back (they crashed the process running them)" in r.output
    make_archive(arch, 1, size=(16, 16), seed=5)  # scene0.tif replaced (fixed)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK and "1 to run" in r.output, r.output
    assert _manifest_rows(out)["scene0.tif"] == ("done", 0)


def test_a_manifest_without_the_crash_count_is_read_and_upgraded(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:  # as a manifest of session 27 had it
        db.execute("ALTER TABLE scenes DROP COLUMN crashes")
    db.close()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")  # read-only: changes nothing
    assert r.exit_code == EXIT_OK and r.stdout.count("skip\t") == 2, r.output
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:
        assert "crashes" not in {row[1] for row in db.execute("PRAGMA table_info(scenes)")}
    db.close()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--force")
    assert r.exit_code == EXIT_OK, r.output
    assert set(_manifest_rows(out).values()) == {("done", 0)}


# ---- mosaic groups ----------------------------------------------------------------------------------------
def _mask(path: Path, classes: list[tuple[int, str]], x0: float = 500000.0, crs: str = "EPSG:32633") -> Path:
    from rasterio.transform import from_origin

    from geoseg.card import ClassInfo
    from geoseg.io import classes_tag

    data = (np.arange(20 * 30).reshape(20, 30) % len(classes)).astype(np.uint8)
    write_raster(path, data, crs=crs, transform=from_origin(x0, 4800000.0, 10.0, 10.0), nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**classes_tag([ClassInfo(i, n, (i * 30, 100, 50)) for i, n in classes]))
    return path


def test_a_mosaic_of_more_masks_than_the_open_file_limit(tmp_path: Path) -> None:
    """Every mask was held open until the VRT was written: 150 masks under a limit of 64 open files got no
    mosaic ("Too many open files"), the old landcover.vrt stayed stale, and the run still exited 0."""
    out = tmp_path / "out"
    out.mkdir()
    masks = [_mask(out / f"t{i:03d}_landcover.tif", SEVEN, x0=500000.0 + 300 * i) for i in range(150)]
    script = ("import resource, sys; from geoseg.mosaic import write_mosaics; "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
              "print([p.name for p in write_mosaics(sys.argv[1], sys.argv[2:], [])])")
    r = subprocess.run([sys.executable, "-c", script, str(out), *map(str, masks)], capture_output=True, text=True)
    assert r.returncode == 0 and "['landcover.vrt', 'landcover.qml']" in r.stdout, r.stderr[-2000:]
    assert len(_vrt_sources(out / "landcover.vrt")) == 150


def test_the_newest_mask_is_on_top_of_the_mosaic_and_an_edited_mosaic_style_is_kept(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path) -> None:
    """Sources were laid in key order, so a corrected scene under a name sorting first stayed under the
    old scene's mask where they overlap; the mosaic's .qml an analyst restyled was rewritten every night."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    arch.mkdir()
    data = np.random.default_rng(3).integers(0, 256, (3, 40, 48), dtype=np.uint8)
    write_raster(arch / "b_scene.tif", data)
    assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK
    time.sleep(1.1)  # (finished times are in seconds)
    write_raster(arch / "a_scene_corrected.tif", data[::-1].copy())  # same footprint, later, sorts first
    assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK
    text = (out / "landcover.vrt").read_text()  # (in the VRT's order: later sources draw over earlier ones)
    assert text.index("b_scene_landcover.tif") < text.index("a_scene_corrected_landcover.tif")
    style = out / "landcover.qml"
    edited = style.read_text().replace('opacity="1"', 'opacity="0.6"')
    style.write_text(edited)
    (arch / "c_scene.tif").write_bytes((arch / "b_scene.tif").read_bytes())  # a new night's scene
    assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK
    assert style.read_text() == edited and len(_vrt_sources(out / "landcover.vrt")) == 3
    style.unlink()  # a style that is gone is written again
    assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK
    assert 'opacity="1"' in style.read_text()
    for damaged in ("null", '"x"', '{"styles": null}', '{"files": [1]}'):  # (an AttributeError stopped the run)
        (out / ".geoseg" / "mosaics.json").write_text(damaged)
        (arch / "c_scene.tif").touch()
        assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK, damaged
        assert (out / "landcover.vrt").exists()


def test_mosaic_keeps_masks_of_different_class_tables_apart(tmp_path: Path) -> None:
    from geoseg.card import ClassInfo
    from geoseg.io import read_classes
    from geoseg.mosaic import write_mosaics

    out = tmp_path / "out"
    out.mkdir()
    a = _mask(out / "a_landcover.tif", SEVEN)
    b = _mask(out / "b_landcover.tif", SEVEN, x0=500300.0)  # whole pixels east of a: aligned
    c = _mask(out / "c_landcover.tif", [(0, "urban"), (1, "farm")], x0=500600.0)  # another model's mask
    fallback = [ClassInfo(0, "urban", (1, 2, 3)), ClassInfo(1, "farm", (4, 5, 6))]
    vrts = sorted(p for p in write_mosaics(out, [a, b, c], fallback) if p.suffix == ".vrt")
    assert len(vrts) == 2 and all(v.name.startswith("landcover_classes") for v in vrts), vrts
    found = []
    for v in vrts:
        with rasterio.open(v) as ds:
            found.append((_vrt_sources(v), [k.name for k in read_classes(ds)]))
    found.sort()
    assert found == [(["a_landcover.tif", "b_landcover.tif"], [n for _, n in SEVEN]),
                     (["c_landcover.tif"], ["urban", "farm"])]
    for v in vrts:  # each style has its own classes
        qml = v.with_suffix(".qml").read_text()
        assert ("developed" in qml) == ("a_landcover.tif" in v.read_text()) and ("urban" in qml) != ("developed" in qml)
    # one model only: one landcover.vrt with the masks' class table
    assert [p.name for p in write_mosaics(out, [a, b], fallback)] == ["landcover.vrt", "landcover.qml"]
    with rasterio.open(out / "landcover.vrt") as v:
        assert [k.name for k in read_classes(v)] == [n for _, n in SEVEN]


def test_mosaic_says_how_many_masks_it_holds_and_why_it_left_some_out(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The log said "mosaic of 14 mask(s)" for 8 and called a north-down mask "no CRS, GCPs or a
    rotated grid": it counts the masks in the VRTs and names each left-out mask's reason."""
    import logging

    from rasterio.transform import Affine

    from geoseg.mosaic import write_mosaics

    out = tmp_path / "out"
    out.mkdir()
    a = _mask(out / "a_landcover.tif", SEVEN)
    b = _mask(out / "b_landcover.tif", SEVEN, x0=500300.0)
    down = _mask(out / "down_landcover.tif", SEVEN)
    with rasterio.open(down, "r+") as ds:
        ds.transform = Affine(10.0, 0, 500000.0, 0, 10.0, 4800000.0)
    turned = _mask(out / "turned_landcover.tif", SEVEN)
    with rasterio.open(turned, "r+") as ds:
        ds.transform = Affine(8.0, 6.0, 500000.0, 6.0, -8.0, 4800000.0)
    bare = _mask(out / "bare_landcover.tif", SEVEN, crs=None)
    with caplog.at_level(logging.INFO, logger="geoseg"), pytest.warns(BatchWarning) as warned:
        assert [p.name for p in write_mosaics(out, [a, b, down, turned, bare], [])] == ["landcover.vrt", "landcover.qml"]
    assert "mosaic of 2 mask(s): landcover.vrt" in caplog.text
    assert [str(w.message) for w in warned if w.category is BatchWarning] == [
        "3 mask(s) not in the mosaic (a VRT takes north-up map grids only): down_landcover.tif (north-down grid), "
        "turned_landcover.tif (rotated grid), bare_landcover.tif (no CRS)"]
    # (rasterio's bounds of the rotated mask warned "Use `@` matmul", naming geoseg's line: -W error, no mosaic)
    assert [w.category for w in warned] == [BatchWarning], [str(w.message) for w in warned]


def test_mosaic_keeps_masks_on_unaligned_grids_apart(tmp_path: Path) -> None:
    from geoseg.mosaic import write_mosaics

    out = tmp_path / "out"
    out.mkdir()
    a = _mask(out / "a_landcover.tif", SEVEN)
    b = _mask(out / "b_landcover.tif", SEVEN, x0=500300.0)
    d = _mask(out / "d_landcover.tif", SEVEN, x0=501005.0)  # half a pixel off a's grid
    e = _mask(out / "e_landcover.tif", SEVEN, x0=500600.0000001)  # off by float noise only: aligned
    # 0.0004 and 0.0006 px off (0.0002 px apart, within the tolerance): one grid (rounding made two)
    f = _mask(out / "f_landcover.tif", SEVEN, x0=500900.004)
    g = _mask(out / "g_landcover.tif", SEVEN, x0=501200.006)
    vrts = sorted(p for p in write_mosaics(out, [a, b, d, e, f, g], []) if p.suffix == ".vrt")
    assert sorted(_vrt_sources(v) for v in vrts) == [["a_landcover.tif", "b_landcover.tif", "e_landcover.tif",
                                                      "f_landcover.tif", "g_landcover.tif"],
                                                     ["d_landcover.tif"]], vrts
    assert [v.name for v in vrts] == ["landcover_grid000x000.vrt", "landcover_grid500x000.vrt"]
    for v in vrts:  # whole-pixel offsets only: GDAL copies, never resamples
        offsets = [part.split('"')[1] for part in v.read_text().split("xOff=")[1:]]
        assert offsets and all("." not in x for x in offsets), offsets


def test_mosaic_split_is_one_warning_naming_the_new_files(tmp_path: Path) -> None:
    from geoseg.mosaic import write_mosaics

    out, state = tmp_path / "out", tmp_path / "out" / ".geoseg"
    state.mkdir(parents=True)
    a = _mask(out / "a_landcover.tif", SEVEN)
    u = _mask(out / "u_landcover.tif", SEVEN, crs="EPSG:32632")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_mosaics(out, [a], [], state_dir=state)
        assert (out / "landcover.vrt").exists() and not [w for w in seen if issubclass(w.category, GeosegWarning)]
        write_mosaics(out, [a, u], [], state_dir=state)
        warned = [str(w.message) for w in seen if w.category is BatchWarning]
        assert len(warned) == 1 and "\n" not in warned[0], warned
        assert "landcover_epsg32632_10.vrt, landcover_epsg32633_10.vrt" in warned[0] and "removed landcover.vrt" in warned[0]
        seen.clear()
        write_mosaics(out, [a, u], [], state_dir=state)  # the same split the next night: nothing new to say
        assert not [w for w in seen if issubclass(w.category, GeosegWarning)]


SEVEN = list(enumerate(["water", "developed", "forest", "crop", "grass", "bare", "wetland"]))


def _vrt_sources(vrt: Path) -> list[str]:
    return sorted(s.split(">")[1].split("<")[0] for s in vrt.read_text().split("<SourceFilename")[1:])


def test_workers_of_batch_s_own_cluster_stop_quietly(caplog) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C reaches every process of the terminal's group: each worker of batch's LocalCluster printed
    a KeyboardInterrupt traceback, and a stopped run's workers logged cancelled tasks and heartbeat
    failures (with tracebacks) into a cron job's stderr. A user's own cluster (--scheduler) is left alone."""
    import logging
    import pickle
    import signal

    from geoseg.batch import BatchModel, ModelPlugin

    before = signal.getsignal(signal.SIGINT)
    try:
        ModelPlugin(BatchModel(), "p", ("x",), own_cluster=False).setup(None)
        assert signal.getsignal(signal.SIGINT) == before
        plugin = pickle.loads(pickle.dumps(ModelPlugin(BatchModel(), "p", ("x",), own_cluster=True)))
        plugin.setup(None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("distributed.worker.state_machine").warning(
            "Async instruction for <Task cancelled name=\"execute('x')\"> ended with CancelledError")
        logging.getLogger("distributed.worker").error("Failed to communicate with scheduler during heartbeat.")
        logging.getLogger("distributed.worker").warning("Worker is at 85% memory usage.")
    assert [r.getMessage() for r in caplog.records] == ["Worker is at 85% memory usage."]


def test_a_worker_of_batch_s_own_cluster_dies_quietly_by_sigterm() -> None:
    """cron's `timeout` signals the whole process group: each worker printed Paddle's C++ "FatalError"
    dump, as paddle was first imported in a task's thread, where its SIGTERM handler could not be put
    back. The plugin imports paddle in the worker's main thread (and puts the handler back)."""
    pytest.importorskip("paddle")
    script = """
import os, signal, threading
from geoseg.batch import BatchModel, ModelPlugin
ModelPlugin(BatchModel(), "p", ("x",), own_cluster=True).setup(None)
t = threading.Thread(target=lambda: __import__("geoseg.errors").errors.require_paddle())  # as a scene loads it
t.start(); t.join()
import time; time.sleep(1)  # (paddle installs its handler a moment after the import returns)
os.kill(os.getpid(), signal.SIGTERM)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    said = r.stdout + r.stderr  # (paddle's dump goes to stdout)
    assert r.returncode == -signal.SIGTERM and "FatalError" not in said, (r.returncode, said[-800:])


def test_distributed_s_interrupted_sync_traceback_is_dropped() -> None:
    import logging

    from geoseg.batch import _InterruptedSyncNoise

    def record(exc: BaseException, msg: str) -> logging.LogRecord:
        return logging.LogRecord("tornado.application", logging.ERROR, "ioloop.py", 1, msg, (), (type(exc), exc, None))

    noise = _InterruptedSyncNoise()
    bug = NameError("cannot access free variable 'future' where it is not associated with a value in enclosing scope")
    assert not noise.filter(record(bug, "Exception in callback functools.partial(<function sync.<locals>.cancel>)"))
    assert noise.filter(record(ValueError("x"), "Exception in callback functools.partial(<function cancel>)"))


_WATCH: dict[str, object] = {}  # what the in-process worker's task and the test share (not picklable)


def _wait_until_cancelled() -> None:
    """A Dask task (in-process worker) that watches its own cancel check, as a scene does."""
    from distributed import get_worker

    import geoseg.batch as gb

    seen, started = _WATCH["seen"], _WATCH["started"]
    check = gb.task_cancelled(get_worker())
    seen.append(check())
    started.set()
    t0 = time.monotonic()
    while not check() and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    seen.append(check())


@pytest.mark.parametrize("how", ["future cancelled", "cluster closed"])
def test_a_running_scene_task_learns_that_the_run_stopped(how: str) -> None:
    """A stopped batch cancels its futures and closes its own cluster, but a running task's thread goes on:
    a scene then still published its mask while the manifest said "not finished by an interrupted run".
    The scene asks task_cancelled (before each batch of windows and before its mask lands)."""
    import threading

    from distributed import Client, LocalCluster, get_worker

    import geoseg.batch as gb

    seen: list[bool] = []
    started = threading.Event()
    _WATCH.update(seen=seen, started=started)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(lambda: gb.task_cancelled(get_worker()) is not None, pure=False).result()
        fut = client.submit(_wait_until_cancelled, pure=False)
        assert started.wait(30)
        if how == "future cancelled":
            fut.cancel()
            t0 = time.monotonic()
            while len(seen) < 2 and time.monotonic() - t0 < 30:
                time.sleep(0.02)
    assert seen == [False, True]
    assert gb.task_cancelled(object()) is None  # outside a task: nothing to ask


@pytest.mark.parametrize("own_cluster, device, gpus, name, expected", [
    (True, "auto", 2, 3, "gpu:1"), (True, "gpu", 4, 2, "gpu:2"), (True, "auto", 1, 3, "auto"),
    (True, "auto", 0, 1, "auto"), (True, "cpu", 2, 1, "cpu"), (False, "gpu", 2, 1, "gpu"),
    (True, "gpu", 2, "tcp://w", "gpu")])
def test_batch_s_own_workers_spread_over_the_gpus(monkeypatch: pytest.MonkeyPatch, own_cluster: bool, device: str,
                                                  gpus: int, name: object, expected: str) -> None:
    """--workers N on a machine with several GPUs ran every worker on GPU 0. Worker i of batch's own
    LocalCluster now takes GPU i mod count; a user's cluster keeps its own mapping (CUDA_VISIBLE_DEVICES)."""
    import types

    import geoseg.batch as gb

    monkeypatch.setattr(gb, "gpu_count", lambda: gpus)
    plugin = gb.ModelPlugin(gb.BatchModel(device=device), "p", own_cluster=own_cluster)
    before = signal.getsignal(signal.SIGINT)
    try:
        plugin.setup(types.SimpleNamespace(name=name))  # (a worker of batch's own cluster ignores Ctrl-C)
    finally:
        signal.signal(signal.SIGINT, before)
    assert plugin.device() == expected


def test_a_lost_scheduler_stops_the_run_without_failing_its_scenes(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the Dask scheduler went away every scene not finished came back "failed ... cancelled for
    reason: scheduler-connection-lost" (exit 3), also scenes a worker was finishing: the scenes were not
    at fault. The run now stops (exit 1, one line), its report says so and the scenes stay to be redone."""
    import concurrent.futures

    distributed = pytest.importorskip("distributed")
    from distributed.client import Future

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))
    real, real_gather, calls = Future.result, Future._result, []

    def lost(self) -> BaseException:  # type: ignore[no-untyped-def]
        cancelled = getattr(distributed.client, "FutureCancelledError", None)  # (since distributed 2024)
        if cancelled is not None:
            return cancelled(self.key, "scheduler-connection-lost")
        exc = concurrent.futures.CancelledError()
        exc.reason = "scheduler-connection-lost"  # type: ignore[attr-defined]
        return exc

    def lost_after_one(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 1:  # (as distributed's client cancels every future when its scheduler is gone)
            raise lost(self)
        return real(self, *args, **kwargs)

    async def gathered_lost_after_one(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)  # (as_completed gathers each result as its task ends)
        if len(calls) > 1:
            raise lost(self)
        return await real_gather(self, *args, **kwargs)

    monkeypatch.setattr(Future, "result", lost_after_one)
    monkeypatch.setattr(Future, "_result", gathered_lost_after_one)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        r = runner.invoke(cli, batch_args(tiny_unet, str(arch), "--out", str(out), "--report", str(rep),
                                          "--vector", "none", "--scheduler", cluster.scheduler_address))
    assert r.exit_code == 1 and "lost the connection to the Dask scheduler" in r.output, r.output
    assert "3 scene(s) not finished (the next run redoes them)" in r.output and "FAILED" not in r.output
    report = report_of(rep)
    assert report["counts"] == {"ok": 1, "skipped": 0, "failed": 0} and len(report["stopped"]["not_finished"]) == 3
    assert list(report["workers"].values()) == [1], report["workers"]  # the worker that ran it, as if not stopped
    monkeypatch.undo()
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.count("\tnot finished by an interrupted run") == 3, r.output


# ---- robustness: a cluster without workers, scene I/O errors, stopped runs, --report, a damaged manifest ---------
def test_a_cluster_without_a_usable_worker_stops_in_bounded_time(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler with no worker (or none offering --resources, or all of them gone mid-run) took the
    scenes and waited forever, silently, holding the lock: every later cron run exited 4."""
    distributed = pytest.importorskip("distributed")
    import geoseg.batch as gb

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 2, size=(16, 16))
    monkeypatch.setattr(gb, "WORKER_WAIT_S", 0.5)
    monkeypatch.setattr(gb, "NO_WORKER_GRACE_S", 0.5)
    monkeypatch.setattr(gb, "WORKER_POLL_S", 0.1)
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        where = cluster.scheduler_address
        t0 = time.monotonic()
        r = run_cli(runner, tiny_unet, [arch], out, "--scheduler", where, "--vector", "none")
        assert r.exit_code == 1 and f"no Dask worker joined the scheduler {where} within 0.5 s" in r.output, r.output
        assert time.monotonic() - t0 < 30 and "Traceback" not in r.output
        assert BatchLock(out).held_by() is None  # the next run is not locked out
        # every worker gone while the scenes wait: the run notices and stops, with its report
        monkeypatch.setattr(gb, "_wait_for_workers", lambda *a: None)
        r = run_cli(runner, tiny_unet, [arch], out, "--scheduler", where, "--vector", "none", "--report", rep)
        assert r.exit_code == 1 and f"the Dask cluster {where} has had no worker for 0.5 s" in r.output, r.output
        assert "2 scene(s) not finished" in r.output and "has no worker now" in r.output
        report = report_of(rep)
        assert report["stopped"]["not_finished"] == ["scene0.tif", "d1/x/scene1.tif"] and report["exit_status"] == 1
    assert _done_count(out) == 0
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.stdout.count("\tnot finished by an interrupted run") == 2, r.output
    monkeypatch.undo()
    # workers, but none with the resources the scenes ask for: refused at once, naming what they offer
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  resources={"MEM": 1}) as cluster:
        r = run_cli(runner, tiny_unet, [arch], out, "--scheduler", cluster.scheduler_address, "--resources", "GPU=1")
    assert r.exit_code == 1 and "offers --resources GPU=1 (its 1 worker(s) offer: MEM=1)" in r.output, r.output
    assert _done_count(out) == 0


def test_a_raw_gdal_error_fails_that_scene_only(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """rasterio's CPLE_* errors (a staging file that vanished) and RasterioError derive from neither OSError
    nor GeosegError: they escaped run_scene and aborted the batch ("unexpected error: CPLE_OpenFailedError")."""
    import rasterio.errors
    from rasterio._err import CPLE_OpenFailedError

    import geoseg.engine

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 3, size=(16, 16))
    real = geoseg.engine.segment_scene

    def flaky(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).name == "scene1.tif":
            raise CPLE_OpenFailedError(4, 4, "/out/.geoseg-scene1.staging.tif: No such file or directory")
        if Path(path).name == "scene2.tif":
            raise rasterio.errors.RasterioError("write failed")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(geoseg.engine, "segment_scene", flaky)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == EXIT_PARTIAL and "unexpected" not in r.output, r.output
    scenes = {s["key"]: s for s in report_of(rep)["scenes"]}
    assert {k: s["status"] for k, s in scenes.items()} == {
        "scene0.tif": "ok", "d1/x/scene1.tif": "failed", "d2/x/scene2.tif": "failed"}
    assert scenes["d1/x/scene1.tif"]["error"].startswith("CPLE_OpenFailedError: /out/.geoseg-scene1.staging.tif")
    assert scenes["d2/x/scene2.tif"]["error"] == "RasterioError: write failed"


def test_a_broken_gpu_stops_the_batch_instead_of_failing_every_scene(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Paddle raises a GPU's own failure ("(External) CUDA error(700), an illegal memory access ...") as
    OSError: the batch took it for one scene's I/O error and went on, and every later scene failed the
    same way on the broken device. It now stops the run (exit 1, the report says why); the next run
    (a new process) redoes the scenes."""
    import geoseg.batch as gb

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))
    build, calls = gb.BatchModel.build, []

    def broken_after_one_scene(self):  # type: ignore[no-untyped-def]
        predictor, desc, source = build(self)

        def run(x):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) > 1:
                raise OSError("(External) CUDA error(700), an illegal memory access was encountered.")
            return predictor(x)

        return run, desc, source

    monkeypatch.setattr(gb.BatchModel, "build", broken_after_one_scene)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == 1 and "CUDA error(700)" in r.output and "the model failed on its device" in r.output, r.output
    report = report_of(rep)
    assert report["counts"]["ok"] == 1 and report["counts"]["failed"] == 0 and len(calls) == 2, report["counts"]
    assert len(report["stopped"]["not_finished"]) == 3


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_still_writes_its_report(runner, tiny_unet, tmp_path: Path, signal_name: str,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM (cron's timeout) mid-run wrote no --report: it now holds the scenes finished so far,
    why the run stopped and which scenes it did not finish; the exit status stays 130 / 143."""
    import geoseg.batch as gb
    from geoseg_cli.main import Terminated

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "r" / "report.json"
    make_archive(arch, 3, size=(16, 16))
    real, calls = gb.run_scene, []

    def stop_at_the_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise Terminated() if signal_name == "SIGTERM" else KeyboardInterrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(gb, "run_scene", stop_at_the_second)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    code = 143 if signal_name == "SIGTERM" else 130
    assert r.exit_code == code, r.output
    report = report_of(rep)
    assert report["exit_status"] == code and signal_name in report["stopped"]["reason"]
    assert report["stopped"]["not_finished"] == ["d1/x/scene1.tif", "d2/x/scene2.tif"]
    assert statuses(report) == {"scene0.tif": "ok"} and report["counts"]["ok"] == 1
    # a run that goes through says it was not stopped
    monkeypatch.undo()
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == EXIT_OK and report_of(rep)["stopped"] is None, r.output


def test_a_refused_command_line_reaches_the_log_file(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A bad option value (Click's usage error, before the run opens its log) went to stderr only, which a
    cron job often sends nowhere: the --log-file (also named by GEOSEG_BATCH_LOG_FILE) gets the line too."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 1, size=(16, 16))
    logf = tmp_path / "logs" / "night.log"
    r = run_cli(runner, tiny_unet, [arch], out, "--log-file", logf, "--workers", "-3")
    assert r.exit_code == 2 and logf.read_text().rstrip().endswith(
        "ERROR Error: Invalid value for '--workers': -3 is not in the range x>=0."), r.output
    envlog = tmp_path / "logs" / "env.log"
    r = runner.invoke(cli, batch_args(tiny_unet, str(arch), "--out", str(out), "--tile-size", "abc"),
                      env={"GEOSEG_BATCH_LOG_FILE": str(envlog)})
    assert r.exit_code == 2 and "'abc' is not a valid integer" in envlog.read_text(), r.output
    assert not out.exists()


def test_report_path_is_checked_before_any_scene(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--report under a file ran every scene and then blamed --out; under /proc it ended with "unexpected
    error: FileNotFoundError". Both are refused first, in one line naming --report."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 1, size=(16, 16))
    (tmp_path / "afile").write_text("x")
    bad = [tmp_path / "afile" / "run.json"]
    if Path("/proc/self").exists():
        bad.append(Path("/proc/geoseg-nope/run.json"))
    for report in bad:
        r = run_cli(runner, tiny_unet, [arch], out, "--report", report)
        assert r.exit_code == 1 and f"--report {report}: " in r.output and "unexpected" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists(), r.output
    assert "afile is a file, not a folder" in run_cli(runner, tiny_unet, [arch], out, "--report", bad[0]).output
    r = run_cli(runner, tiny_unet, [arch], out, "--report", tmp_path / "new" / "dir" / "run.json", "--vector", "none")
    assert r.exit_code == EXIT_OK and (tmp_path / "new" / "dir" / "run.json").exists(), r.output
    assert temp_files(tmp_path / "new") == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_manifest_is_moved_aside_and_the_run_goes_on(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               damage: str) -> None:
    """A damaged manifest gave "unexpected error: DatabaseError: file is not a database" every night."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    path = out / ".geoseg" / "manifest.sqlite"
    if damage == "garbage":
        path.write_text("garbage\n")
    else:
        with sqlite3.connect(path) as db:  # pages enough to truncate, then half of them cut off
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(f"pad{i}", "x" * 2000) for i in range(40)])
        db.close()
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.exit_code == EXIT_OK and "is damaged" in r.output and r.stdout.count("run\t") == 2, r.output
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK and "is damaged" in r.output and "moved it to manifest.sqlite.corrupt-" in r.output
    assert r.output.count(" ok ") == 2 and len(list((out / ".geoseg").glob("manifest.sqlite.corrupt-*"))) == 1
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.stdout.count("skip\t") == 2 and "damaged" not in r.output, r.output


def _aoi_without_crs(path: Path) -> Path:
    """A GeoPackage polygon over every 16 x 16 scene of :func:`make_archive`, without a CRS."""
    import pyogrio.raw
    import shapely

    box = shapely.box(500001.0, 4799841.0, 500159.0, 4799999.0)
    pyogrio.raw.write(path, shapely.to_wkb(np.array([box])), [np.array([1])], ["id"], geometry_type="Polygon",
                      driver="GPKG")
    return path


def test_batch_warnings_reach_stderr_the_log_file_and_the_report_once(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A warning raised while a scene runs (float values far from the model's range) is that scene's: one
    ``warning:`` line on stderr and in --log-file, and in its report entry. One about the run's input
    (an --aoi file without a CRS, read once for every scene) is one line, said before the scenes run."""
    arch, out, rep, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json", tmp_path / "batch.log"
    make_archive(arch, 1, size=(16, 16))
    write_raster(arch / "float.tif", np.random.default_rng(1).uniform(0, 255, (3, 16, 16)).astype(np.float32))
    aoi = _aoi_without_crs(tmp_path / "aoi.gpkg")
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--aoi", aoi, "--report", rep, "--log-file", logf)
    assert r.exit_code == EXIT_OK, r.output
    no_crs = "aoi.gpkg has no CRS: its coordinates are taken to be in the scene's CRS"
    scenes = {s["key"]: s["warnings"] for s in report_of(rep)["scenes"]}
    assert scenes["scene0.tif"] == [] and len(scenes["float.tif"]) == 1, scenes
    in_scene = scenes["float.tif"][0]
    assert "standard deviations" in in_scene
    stderr, log_text = r.stderr.splitlines(), logf.read_text()
    for said in (no_crs, in_scene):
        assert stderr.count(f"warning: {said}") == 1, r.stderr
        assert log_text.count(f"WARNING warning: {said}\n") == 1, log_text
    assert "Warning" not in r.stderr and stderr.index(f"warning: {no_crs}") < stderr.index(f"warning: {in_scene}")


def test_batch_s_own_warnings_are_batch_warnings_to_a_library_and_one_line_to_the_cli(  # type: ignore[no-untyped-def]
        runner, tiny_unet, tmp_path: Path) -> None:
    """The batch's warnings about its folder (here: a damaged manifest, found by a dry run) are
    :class:`BatchWarning` objects for a library caller, and the CLI's one ``warning:`` line, also in --log-file."""
    from geoseg.batch import BatchModel, BatchOptions, run_batch
    from geoseg.engine import PredictOptions

    arch, out, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "batch.log"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    manifest = out / ".geoseg" / "manifest.sqlite"
    manifest.write_text("garbage\n")
    said = f"the manifest {manifest} is damaged: a run will move it aside and redo every scene"
    with pytest.warns(BatchWarning) as warned:
        res = run_batch([arch], out, BatchModel(weights=str(tiny_unet[0]), threads=1), PredictOptions(),
                        BatchOptions(dry_run=True))
    assert [str(w.message) for w in warned if issubclass(w.category, GeosegWarning)] == [said]
    assert [w.filename for w in warned if w.category is BatchWarning] == [__file__]
    assert len(res.planned) == 2 and all(reason is not None for _, reason in res.planned)  # both would run
    assert res.to_dict() == res.report() and json.loads(json.dumps(res.to_dict()))["out"] == str(out)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run", "--log-file", logf)
    assert r.exit_code == EXIT_OK, r.output
    assert r.stderr.splitlines() == [f"warning: {said}"], r.stderr
    assert logf.read_text().count(f"WARNING warning: {said}\n") == 1
    with warnings.catch_warnings():  # escalated, it stops a library call before any scene runs
        warnings.simplefilter("error", BatchWarning)
        with pytest.raises(BatchWarning, match="is damaged"):
            run_batch([arch], out, BatchModel(weights=str(tiny_unet[0]), threads=1), PredictOptions(),
                      BatchOptions(dry_run=True))


def test_a_dead_writer_s_temp_file_is_gone_at_the_end_of_the_run(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A Dask worker killed mid-scene left its staging file in DIR after a run that otherwise ended
    well (the scene was redone on another worker): the run removes dead writers' temp files at its end."""
    import subprocess
    import sys

    import geoseg.batch as gb
    from geoseg.atomic import temp_name

    arch = tmp_path / "arch"
    make_archive(arch, 2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    planted: list[Path] = []
    run_scene = gb.run_scene

    def dying_worker(scene, out_dir, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not planted:  # what a worker killed while writing this scene leaves
            t = temp_name(Path(out_dir) / f"{Path(scene.key).stem}_landcover.tif").with_suffix(".staging.tif")
            dead = t.with_name(t.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
            dead.write_bytes(b"half a file")
            planted.append(dead)
        return run_scene(scene, out_dir, *args, **kwargs)

    monkeypatch.setattr(gb, "run_scene", dying_worker)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    assert planted and not planted[0].exists() and temp_files(out) == []


def test_mosaic_names_carry_only_the_parts_that_tell_groups_apart() -> None:
    """Masks at 28.5 m and 10 m (each group on its own grid phase) were named
    landcover_epsg32119_28.5_grid000x000.vrt: the phase part is only for groups of one CRS, size and
    class table, the class part only for groups of one CRS and size."""
    from rasterio.crs import CRS

    from geoseg.mosaic import _group_names

    utm = CRS.from_epsg(32119).to_wkt()
    a, b = "[[1, \"a\", [1, 2, 3]]]", "[[1, \"b\", [1, 2, 3]]]"
    assert _group_names([(utm, 28.5, 28.5, (0, 0), a), (utm, 10.0, 10.0, (400, 400), a)]) == [
        "landcover_epsg32119_28.5", "landcover_epsg32119_10"]
    assert _group_names([(utm, 10.0, 10.0, (0, 0), a), (utm, 10.0, 10.0, (500, 0), a),
                         (utm, 28.5, 28.5, (0, 0), a)]) == [
        "landcover_epsg32119_10_grid000x000", "landcover_epsg32119_10_grid500x000", "landcover_epsg32119_28.5"]
    names = _group_names([(utm, 10.0, 10.0, (0, 0), a), (utm, 10.0, 10.0, (0, 0), b), (utm, 10.0, 10.0, (500, 0), b)])
    assert names[0].startswith("landcover_classes") and "_grid" not in names[0]
    assert names[1].endswith("_grid000x000") and names[2].endswith("_grid500x000") and len(set(names)) == 3
    # sizes apart in the 7th digit (scenes warped one by one), and groups no part tells apart: one name
    # each (the second group's VRT replaced the first's)
    assert _group_names([(utm, 29.998712, 29.998712, (0, 0), a), (utm, 29.998734, 29.998734, (0, 0), a)]) == [
        "landcover_epsg32119_29.998712", "landcover_epsg32119_29.998734"]
    names = _group_names([(utm, 10.0, 10.0, (0, 0), a), (utm + " ", 10.0, 10.0, (0, 0), a)])
    assert len(set(names)) == 2 and all(n.startswith("landcover_epsg32119_10_") for n in names)


# ---- odd archives, full disks, dry runs that write nothing, the log ---------------------------------------
def test_a_scene_whose_name_is_not_utf8_fails_alone(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A latin-1 file name (``caf\\xe9.tif``, which Python holds with a surrogate escape) stopped the whole
    run, the dry run too: "unexpected error: UnicodeEncodeError ... surrogates not allowed" (SQLite took the
    name). It now fails alone, named readably, and the other scenes run."""
    arch, out, rep, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json", tmp_path / "batch.log"
    make_archive(arch, 1, size=(16, 16))
    bad = arch / os.fsdecode(b"caf\xe9.tif")
    try:
        _copy(arch / "scene0.tif", bad)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no file name that is not UTF-8")
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep, "--log-file", logf)
    assert r.exit_code == EXIT_PARTIAL and "unexpected" not in r.output, r.output
    report = report_of(rep)
    assert statuses(report) == {"caf\\xe9.tif": "failed", "scene0.tif": "ok"}
    failed = next(s for s in report["scenes"] if s["status"] == "failed")
    assert "its name is not valid UTF-8" in failed["error"] and "rename it" in failed["error"]
    assert failed["input"].endswith("caf\\xe9.tif") and failed["reason"] == "name not UTF-8"
    assert "FAILED  caf\\xe9.tif: input " in logf.read_text()
    with sqlite3.connect(out / ".geoseg" / "manifest.sqlite") as db:
        rows = dict(db.execute("SELECT key, status FROM scenes"))
    db.close()
    assert rows == {"caf\\xe9.tif": "failed", "scene0.tif": "done"}
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.exit_code == EXIT_OK and "run\tcaf\\xe9.tif\tfails: input " in r.stdout, r.output
    assert "skip\tscene0.tif" in r.stdout


def test_dask_forgets_each_scene_s_task_once_its_result_is_taken(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers, a worker killed (kill -9, OOM) took with it the results of the scenes it had run:
    the client still held their futures, so the scheduler ran those scenes again and rewrote outputs
    recorded done (the next dry run said "output changed"). Each future is now released as soon as its
    result is taken, before the scene is recorded."""
    distributed = pytest.importorskip("distributed")
    import geoseg.batch as gb

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 3, size=(16, 16))
    released: list[str] = []
    real_release = distributed.Future.release

    def release(self):  # type: ignore[no-untyped-def]
        released.append(str(self.key))
        return real_release(self)

    monkeypatch.setattr(distributed.Future, "release", release)
    seen: dict[str, bool] = {}
    real_log = gb._log_outcome

    def log_outcome(o, i, n):  # type: ignore[no-untyped-def]
        seen[o.key] = any(f"-{o.key}-" in k for k in released)  # (the task key names the scene)
        real_log(o, i, n)

    monkeypatch.setattr(gb, "_log_outcome", log_outcome)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--scheduler", cluster.scheduler_address)
    assert r.exit_code == EXIT_OK, r.output
    assert seen == {"scene0.tif": True, "d1/x/scene1.tif": True, "d2/x/scene2.tif": True}


class _KillWorkerOn(WorkerPlugin):
    """A Dask worker plugin (set up again on every restarted worker) with which the scene ``key`` kills its
    worker process, as a library's segmentation fault or the out-of-memory killer would."""

    name = "test-kill-worker-on"

    def __init__(self, key: str) -> None:
        self.key = key

    def setup(self, worker):  # type: ignore[no-untyped-def]
        import geoseg.batch as gb

        real, key = gb.run_scene, self.key

        def run_scene(scene, *args, **kwargs):  # type: ignore[no-untyped-def]
            if scene.key == key:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(scene, *args, **kwargs)

        gb.run_scene = run_scene

    def teardown(self, worker):  # type: ignore[no-untyped-def]
        pass


@pytest.mark.slow
def test_scenes_queued_on_a_dask_worker_that_died_run_again_alone(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Dask fails (KilledWorker) every task that was on a worker when it died: the scenes queued beside the one
    that killed it failed too, for nothing they did.  They run again one at a time; only the scene that kills its
    worker fails, saying so."""
    distributed = pytest.importorskip("distributed")
    import dask

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))
    bad = "scene0.tif"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 4.0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        register = getattr(client, "register_plugin", None) or client.register_worker_plugin
        register(_KillWorkerOn(bad), name=_KillWorkerOn.name)
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--scheduler", cluster.scheduler_address,
                    "--report", rep)
        assert r.exit_code == EXIT_PARTIAL, r.output
        assert "running them again, one at a time" in r.output, r.output
        report = report_of(rep)
        assert statuses(report) == {bad: "failed", "d1/x/scene1.tif": "ok", "d2/x/scene2.tif": "ok", "scene3.tif": "ok"}
        err = next(s["error"] for s in report["scenes"] if s["key"] == bad)
        assert "KilledWorker" in err and err.endswith("(its worker died again when it ran alone)"), err
        # counted as a batch process's death is: after the second night it is held back, without killing workers
        assert _manifest_rows(out)[bad] == ("failed", 1)
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--scheduler", cluster.scheduler_address)
        assert r.exit_code == EXIT_PARTIAL and _manifest_rows(out)[bad] == ("failed", 2), r.output
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--scheduler", cluster.scheduler_address)
        assert r.exit_code == EXIT_PARTIAL and "held back (they crashed the process running them)" in r.output, r.output
        assert "died 2 times while running this scene" in r.output and _manifest_rows(out)[bad] == ("failed", 2)


class _FullDisk:
    """A manifest connection whose writes fail as SQLite's do on a full disk, after ``ok`` good ones."""

    def __init__(self, db: sqlite3.Connection, ok: int, error: str = "database or disk is full") -> None:
        self.db, self.ok, self.error = db, ok, error

    def executemany(self, *args):  # type: ignore[no-untyped-def]
        if self.ok <= 0:
            raise sqlite3.OperationalError(self.error)
        self.ok -= 1
        return self.db.executemany(*args)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.db, name)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.db.__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        return self.db.__exit__(*exc)


def test_a_full_disk_under_the_manifest_is_one_line_naming_it(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's "database or disk is full" (or "disk I/O error" past ``ulimit -f``) escaped as "unexpected
    error: OperationalError" (exit 1). It is now the one-line no-space error naming the manifest; the run
    stops with its report, and the next run redoes the scenes not recorded."""
    import geoseg.batch as gb

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 3, size=(16, 16))
    real_open = gb.Manifest._open

    def open_on_a_filling_disk(self):  # type: ignore[no-untyped-def]
        real_open(self)
        self._db = _FullDisk(self._db, ok=3)  # the "running" rows and the first scene (started, done) fit

    monkeypatch.setattr(gb.Manifest, "_open", open_on_a_filling_disk)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    manifest = out / ".geoseg" / "manifest.sqlite"
    assert r.exit_code == 1 and "unexpected" not in r.output, r.output
    assert f"Error: cannot write the manifest {manifest}: no space left on the device: free some space" in r.output
    report = report_of(rep)
    assert report["exit_status"] == 1 and "no space left" in report["stopped"]["reason"]
    assert report["counts"]["ok"] == 1 and len(report["stopped"]["not_finished"]) == 2
    # "disk I/O error": SQLite's word for EFBIG, past the file-size limit (ulimit -f)
    monkeypatch.setattr(gb, "file_size_limit", lambda: 4096)
    err = gb.Manifest(out)._write_error(sqlite3.OperationalError("disk I/O error"))
    assert "file too large: this process may not write files over 4096 bytes (ulimit -f)" in str(err)
    assert isinstance(err, NoRoomError)  # (a pipeline catching NoRoomError sees it)


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EFBIG"])
def test_a_scene_that_finds_no_room_stops_the_run(runner, tiny_unet, tmp_path: Path, errno_name: str,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a scene could not be written for lack of room (a full disk, the file-size limit), every later
    scene ran the model only to fail the same way (exit 3). The run now stops there (exit 1, its report
    says why, the scenes not finished are redone by the next run); a file-size limit says so, not "no
    space"; and a scene's error in batch no longer tells to run predict again with --overwrite."""
    import errno

    import geoseg.engine
    from geoseg.atomic import write_error
    from geoseg.errors import OutputError

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))  # scene0, scene3, d1/x/scene1, d2/x/scene2
    real, calls = geoseg.engine.segment_scene, []
    code = getattr(errno, errno_name)

    def filling_up(path, out_dir, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(Path(path).name)
        if Path(path).name == "scene3.tif":  # (as the engine says a failed write of the polygons)
            raise OutputError(f"cannot write {out_dir}/scene3_landcover.gpkg: Failed to commit transaction; the mask "
                              f"scene3_landcover.tif is complete: write its polygons with geoseg vectorize "
                              f"{out_dir}/scene3_landcover.tif, or run predict again with --overwrite")
        if Path(path).name == "scene1.tif":
            raise write_error(Path(out_dir) / "scene1_landcover.tif", OSError(code, os.strerror(code)))
        return real(path, out_dir, *args, **kwargs)

    monkeypatch.setattr(geoseg.engine, "segment_scene", filling_up)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == 1, r.output
    assert calls == ["scene0.tif", "scene3.tif", "scene1.tif"]  # scene2 never ran
    said = "file too large" if errno_name == "EFBIG" else "no space left on the device"
    assert f"scene1_landcover.tif: {said}" in r.output and "the run stopped" in r.output, r.output
    report = report_of(rep)
    assert report["stopped"]["not_finished"] == ["d1/x/scene1.tif", "d2/x/scene2.tif"]
    assert statuses(report) == {"scene0.tif": "ok", "scene3.tif": "failed"}
    error = next(s["error"] for s in report["scenes"] if s["key"] == "scene3.tif")
    assert error.endswith("Failed to commit transaction") and "--overwrite" not in error, error
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.stdout.count("\tnot finished by an interrupted run") == 2, r.output
    from geoseg.batch import BatchModel, run_batch  # a pipeline catching NoRoomError sees the stop as one
    from geoseg.engine import PredictOptions

    with pytest.raises(NoRoomError, match="the run stopped"):
        run_batch([arch], tmp_path / "out2", BatchModel(weights=str(tiny_unet[0])), PredictOptions(vector="none"))


def test_a_report_on_a_full_disk_is_named(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--report on a full disk after every scene went well: exit 1 with "no space left on the device: free
    some space or choose another --out" (not --out's fault, and no file named). The error names the report."""
    import errno

    import geoseg.batch as gb

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 2, size=(16, 16))
    real_write = gb.atomic_write_text

    def full(path, text, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == rep:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(gb, "atomic_write_text", full)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == 1, r.output
    assert (f"Error: cannot write {rep}: no space left on the device: free some space or choose another --report"
            in r.output and "--out" not in r.output), r.output
    assert "the run itself went through (2 ok, 0 skipped, 0 failed" in r.output


def test_a_log_file_on_a_full_disk_says_so_once_and_is_named(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--log-file on a full disk: a "--- Logging error ---" traceback on stderr per log line, and the run that
    did every scene ended with "no space left on the device: free some space or choose another --out"."""
    if not Path("/dev/full").exists():  # (a device whose every write fails with ENOSPC)
        pytest.skip("no /dev/full here")
    arch = tmp_path / "arch"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "out", "--vector", "none", "--log-file", "/dev/full")
    assert r.exit_code == 1 and "Logging error" not in r.output and "Traceback" not in r.output, r.output
    assert r.stderr.count("warning: --log-file /dev/full: cannot write it (no space left on the device)") == 1
    assert r.stderr.splitlines()[-1] == ("Error: --log-file /dev/full: cannot write it (no space left on the device): "
                                         "free some space or give another --log-file (the run itself went through: "
                                         "see its manifest)"), r.stderr
    assert r.stderr.count(" ok ") == 2  # the run itself went on


def test_a_dry_run_writes_nothing_and_reads_a_live_run_s_changes(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--dry-run opened the manifest so that SQLite created manifest.sqlite-shm and -wal beside it (on a
    read-only DIR: "unable to open database file", exit 1), though a dry run writes nothing."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == EXIT_OK, r.output
    state = out / ".geoseg"
    before = {p.name: p.stat().st_mtime_ns for p in state.iterdir()}
    assert "manifest.sqlite-wal" not in before
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
    assert r.exit_code == EXIT_OK and r.stdout.count("skip\t") == 2, r.output
    assert {p.name: p.stat().st_mtime_ns for p in state.iterdir()} == before
    # a run writing now (its changes in the WAL): the dry run sees them
    db = sqlite3.connect(state / "manifest.sqlite")
    try:
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.execute("UPDATE scenes SET status = 'failed' WHERE key = 'scene0.tif'")
        assert (state / "manifest.sqlite-wal").stat().st_size > 0
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")
        assert "run\tscene0.tif\tfailed before" in r.stdout, r.output
    finally:
        db.close()


def test_symlinked_folders_are_searched_once_each(tmp_path: Path) -> None:
    """A symlinked sub-folder of the archive was skipped without a word. Links are followed now; a folder
    reached twice (a second link to it, a link loop) is searched once, with a warning naming the link."""
    arch, ext = tmp_path / "arch", tmp_path / "ext"
    make_archive(arch, 1, size=(16, 16))
    (ext / "2024").mkdir(parents=True)
    _copy(arch / "scene0.tif", ext / "2024" / "b.tif")
    (arch / "2024").symlink_to(ext / "2024", target_is_directory=True)
    (arch / "again").symlink_to(ext / "2024", target_is_directory=True)  # the same folder a second time
    (ext / "2024" / "loop").symlink_to(arch, target_is_directory=True)  # back up to the archive
    (arch / "d0").mkdir()
    (arch / "d0" / "up").symlink_to(arch / "d0", target_is_directory=True)  # a folder holding a link to itself
    with pytest.warns(BatchWarning) as warned:
        keys = [s.key for s in discover_scenes([arch], tmp_path / "out")]
    assert keys == ["scene0.tif", "2024/b.tif"]
    said = sorted(str(w.message) for w in warned)
    assert len(said) == 3 and all("which is searched already" in m for m in said), said
    assert any(m.startswith(f"{arch / 'again'} leads to the folder {ext / '2024'}") for m in said), said


def test_a_fifo_named_like_a_scene_fails_alone(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A FIFO named pipe.tif in the archive hung the run forever (its fingerprint opened it), holding the
    lock: every later cron run exited 4. It now fails alone, saying what it is."""
    import contextlib
    import threading

    from geoseg.batch import input_fingerprint
    from geoseg.errors import SceneReadError

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 1, size=(16, 16))
    fifo = arch / "pipe.tif"
    os.mkfifo(fifo)

    def unblock() -> None:  # (the old code waited for a writer: give it one, so that this test ends)
        time.sleep(10)
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    with pytest.raises(SceneReadError, match="is not a regular file but a FIFO"):
        input_fingerprint(fifo)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == EXIT_PARTIAL, r.output
    assert statuses(report_of(rep)) == {"scene0.tif": "ok", "pipe.tif": "failed"}
    assert "pipe.tif is not a regular file but a FIFO (named pipe)" in r.output


def test_names_that_differ_in_case_clash_only_where_case_is_ignored(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Case.tif and case.tif both failed "would write the same outputs" also where the file system keeps
    their outputs apart (Linux): --out's file system is asked."""
    arch, out = tmp_path / "arch", tmp_path / "out"
    arch.mkdir()
    write_raster(arch / "Case.tif", np.zeros((3, 16, 16), np.uint8))
    try:
        write_raster(arch / "case.tif", np.full((3, 16, 16), 200, np.uint8))
    except rasterio.errors.RasterioIOError:
        pass
    folds = (arch / "CASE.tif").exists()  # this file system's own answer
    if not folds:
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
        assert r.exit_code == EXIT_OK, r.output
        assert sorted(read_masks(out)) == ["Case_landcover.tif", "case_landcover.tif"]
    from geoseg.batch import ignores_case

    assert ignores_case(arch) == folds and ignores_case(tmp_path / "not" / "yet") == folds
    found = {s.key: s.conflict for s in discover_scenes([arch], out, case_insensitive=False)}
    assert all(c is None for c in found.values()) and len(found) == (1 if folds else 2)
    if not folds:  # where case is ignored (a macOS or Windows --out): they clash, each of them
        found = {s.key: s.conflict for s in discover_scenes([arch], out, case_insensitive=True)}
        assert list(found) == ["Case.tif", "case.tif"] and all("same outputs" in (c or "") for c in found.values())


@pytest.mark.parametrize("refusal", ["weights", "input"])
def test_a_run_refused_before_it_starts_still_writes_its_report(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                refusal: str) -> None:
    """A missing --weights file or input folder (found before the lock) wrote no --report, though a run
    stopped by a fatal error does: a cron job watching the reports saw nothing at all."""
    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "reports" / "run.json"
    make_archive(arch, 2, size=(16, 16))
    if refusal == "weights":
        r = runner.invoke(cli, ["batch", str(arch), "--out", str(out), "--weights", str(tmp_path / "none.pdparams"),
                                "--report", str(rep)])
        said = "none.pdparams does not exist"
    else:
        r = run_cli(runner, tiny_unet, [arch, tmp_path / "nowhere"], out, "--report", rep)
        said = "nowhere does not exist"
    assert r.exit_code == 1 and said in r.output, r.output
    report = report_of(rep)
    assert report["exit_status"] == 1 and said in report["stopped"]["reason"] and report["scenes"] == []
    assert not out.exists()  # (still refused before anything was made)


def test_the_log_file_tells_runs_apart_and_a_locked_run_is_a_warning(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Overlapping runs appending to one --log-file could not be told apart (no pid, no start line); the
    exit-4 "is locked" line was an ERROR, though exit 4 is to be ignored; distributed's lines about
    workers that died reached stderr only."""
    import logging

    from geoseg_cli.batch import _batch_logging

    arch, out, logf = tmp_path / "arch", tmp_path / "out", tmp_path / "batch.log"
    make_archive(arch, 1, size=(16, 16))
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--log-file", logf)
    assert r.exit_code == EXIT_OK, r.output
    lines = logf.read_text().splitlines()
    assert "geoseg" in lines[0] and "batch run started" in lines[0] and f"--out {out}" in lines[0], lines
    assert all(f" [{os.getpid()}] " in line for line in lines), lines
    with BatchLock(out):
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--log-file", logf)
    assert r.exit_code == EXIT_LOCKED, r.output
    last = logf.read_text().splitlines()[-1]
    assert " WARNING warning: " in last and "is locked by another geoseg batch run" in last, last
    pytest.importorskip("distributed")
    with _batch_logging(logf, 0, dask=True):
        logging.getLogger("distributed.nanny").warning("Worker process 4242 was killed by signal 9")
        logging.getLogger("distributed.scheduler").info("Receive client connection")  # (chatter: not kept)
        logging.getLogger("geoseg.batch").info("[1/1] ok      a.tif")
    text = logf.read_text()
    assert "WARNING Worker process 4242 was killed by signal 9" in text and "Receive client" not in text
    assert text.rstrip().endswith("[1/1] ok      a.tif")


# ---- review of 4d1e038: one odd scene, shared schedulers, odd file systems ------------------------
def test_a_scene_raising_any_exception_fails_alone_also_under_an_aoi(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A scene raising an exception run_scene did not list (a ZeroDivisionError from a geotransform with a
    zero pixel height, affine's TransformNotInvertibleError, a KeyError) stopped the local run ("unexpected
    error", exit 1) every night, the scenes after it never done; under --aoi it stopped the planning, before
    any scene. It now fails that scene alone, in one line naming the exception; Ctrl-C still stops the run."""
    from affine import Affine, TransformNotInvertibleError

    import geoseg.aoi
    import geoseg.engine

    arch, rep = tmp_path / "arch", tmp_path / "report.json"
    make_archive(arch, 4, size=(16, 16))  # scene0, scene3, d1/x/scene1, d2/x/scene2
    # as a broken upstream tool writes it: pixel height 0 (the engine divides by it, the AOI inverts it)
    write_raster(arch / "flat.tif", np.ones((3, 16, 16), np.uint8), transform=Affine(10.0, 0.0, 500000.0, 0.0, 0.0,
                                                                                      4800000.0))
    real, real_aoi = geoseg.engine.segment_scene, geoseg.aoi.load_aoi

    def odd(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).name == "scene1.tif":
            raise ZeroDivisionError("float division by zero")
        if Path(path).name == "scene2.tif":
            raise KeyError("boom")
        return real(path, *args, **kwargs)

    def not_invertible(spec, meta):  # type: ignore[no-untyped-def]
        if meta.path.name == "scene3.tif":  # (the AOI test before the run: the run's own takes it)
            raise TransformNotInvertibleError("Cannot invert degenerate transform")
        return real_aoi(spec, meta)

    monkeypatch.setattr(geoseg.engine, "segment_scene", odd)
    monkeypatch.setattr(geoseg.aoi, "load_aoi", not_invertible)
    for extra in ((), ("--aoi", "499000,4790000,502000,4801000")):
        out = tmp_path / ("out_aoi" if extra else "out")
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep, *extra)
        assert r.exit_code == EXIT_PARTIAL and "unexpected" not in r.output, r.output
        scenes = {s["key"]: s for s in report_of(rep)["scenes"]}
        assert {k: s["status"] for k, s in scenes.items()} == {
            "flat.tif": "failed", "scene0.tif": "ok", "scene3.tif": "ok", "d1/x/scene1.tif": "failed",
            "d2/x/scene2.tif": "failed"}, r.output
        assert scenes["d1/x/scene1.tif"]["error"] == "ZeroDivisionError: float division by zero"
        assert scenes["d2/x/scene2.tif"]["error"] == "KeyError: 'boom'"
        assert len(scenes["flat.tif"]["error"].splitlines()) == 1, scenes["flat.tif"]["error"]
        assert "FAILED  d1/x/scene1.tif: ZeroDivisionError: float division by zero" in r.output
    # KeyboardInterrupt (and SystemExit) are no scene's failure: the run stops, as before
    def interrupted(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(geoseg.engine, "segment_scene", interrupted)
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "out_int", "--vector", "none", "--report", rep)
    report = report_of(rep)
    assert r.exit_code == report["exit_status"] == 130 and report["counts"]["failed"] == 0, r.output
    assert "interrupted" in report["stopped"]["reason"] and len(report["stopped"]["not_finished"]) == 5


def test_two_runs_sharing_a_scheduler_with_one_model_keep_their_own_plugins(tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two cron jobs (two archives and --out folders, the same weights) on one --scheduler: the worker
    plugin was named after the model only, so the first run to finish unregistered the other's plugin from
    every worker, and the other's later scenes failed ("KeyError: 'geoseg-model-…'"; exit 3). Each run now
    registers, looks up and unregisters a plugin of its own. Here run A runs whole between run B's
    registration and its first task, as a run finishing under another does."""
    distributed = pytest.importorskip("distributed")
    from geoseg.batch import PLUGIN_PREFIX, BatchModel, BatchOptions, run_batch
    from geoseg.engine import PredictOptions

    make_archive(tmp_path / "a", 2, size=(16, 16))
    make_archive(tmp_path / "b", 3, size=(16, 16), seed=1)
    model = BatchModel(weights=str(tiny_unet[0]), threads=1)
    opts, bo = PredictOptions(vector="none"), BatchOptions(mosaic=False)

    class Meanwhile:
        """Run B's client: once B registered its plugin, run A goes through on the same cluster."""

        def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
            self.client, self.results = client, []

        def register_plugin(self, plugin, name):  # type: ignore[no-untyped-def]
            # (register_worker_plugin before distributed 2023.9)
            (getattr(self.client, "register_plugin", None) or self.client.register_worker_plugin)(plugin, name=name)
            self.results.append(run_batch([tmp_path / "a"], tmp_path / "out_a", model, opts, bo, client=self.client))

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.client, name)

    def plugins(dask_worker):  # type: ignore[no-untyped-def]
        return sorted(n for n in dask_worker.plugins if n.startswith("geoseg-model-"))

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # the plugin of a run killed before it could remove it (its client is gone): removed by the next run
        orphan = f"{PLUGIN_PREFIX}{'0' * 12}-{'1' * 12}@Client-gone"
        (getattr(client, "register_plugin", None) or client.register_worker_plugin)(distributed.WorkerPlugin(),
                                                                                       name=orphan)
        assert list(client.run(plugins).values()) == [[orphan]]
        meanwhile = Meanwhile(client)
        b = run_batch([tmp_path / "b"], tmp_path / "out_b", model, opts, bo, client=meanwhile)
        left = list(client.run(plugins).values())
    (a,) = meanwhile.results
    assert (a.count("ok"), a.exit_status) == (2, 0)
    assert [s.error for s in b.scenes if s.error] == [] and (b.count("ok"), b.exit_status) == (3, 0)
    assert set(b.workers.values()) == {1}  # B's model was loaded once: A's registration did not replace it
    assert left == [[]]  # each run removed its own plugin, and only its own


@pytest.mark.parametrize("errno_name", ["ENOLCK", "EOPNOTSUPP", "EIO"])
def test_a_file_system_without_working_locks_is_not_taken_for_a_live_run(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         errno_name: str) -> None:
    """Every flock error was read as "locked by another geoseg batch run (unknown process)": exit 4, which
    cron users are told to ignore, so a --out on NFS without its lock service (ENOLCK) or a FUSE/SMB mount
    (EOPNOTSUPP) did nothing, silently, every night; a dry run warned about a live run that did not exist.
    Only "held by another" (EWOULDBLOCK, EAGAIN, EACCES) is exit 4 now; any other is exit 1 naming the
    lock file."""
    import errno
    import fcntl

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 1, size=(16, 16))
    real, code = fcntl.flock, getattr(errno, errno_name)
    raised = [code]

    def failing(fd, op):  # type: ignore[no-untyped-def]
        if op & fcntl.LOCK_UN:
            return real(fd, op)
        raise OSError(raised[0], os.strerror(raised[0]))

    monkeypatch.setattr(fcntl, "flock", failing)
    lock = out / ".geoseg" / "lock"
    said = f"Error: cannot lock {lock} ({os.strerror(code)}): the file system of {out} does not support locks"
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == 1 and said in r.output and "put --out on a local disk" in r.output, r.output
    assert "locked by another" not in r.output and _done_count(out) == 0
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--dry-run")  # (the lock file is there now)
    # a dry run only reads: it lists the scenes and warns what a run would meet
    assert r.exit_code == 0 and said[len("Error: "):] in r.output and "a run there stops at once" in r.output, r.output
    assert "another batch run holds" not in r.output and "run\tscene0.tif" in r.stdout, r.output
    # a lock held by another run still is one: exit 4, and the dry run's warning
    for held in ("EWOULDBLOCK", "EAGAIN", "EACCES"):
        raised[0] = getattr(errno, held)
        with pytest.raises(BatchLockedError, match="locked by another geoseg batch run"):
            BatchLock(out).acquire()
        assert BatchLock(out).held_by() == "unknown process"
    monkeypatch.setattr(fcntl, "flock", real)
    assert run_cli(runner, tiny_unet, [arch], out, "--vector", "none").exit_code == EXIT_OK


def _lock_fds(lock: Path) -> list[str]:
    """This process's open descriptors of the file ``lock``."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(lock):
                fds.append(fd)
        except OSError:
            continue
    return fds


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_lock_file_that_cannot_be_written_leaves_no_lock_held(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """flock taken, then writing the holder's line into the lock file failed (a full disk: ENOSPC; EIO on
    NFS): the descriptor was neither unlocked nor closed, so in a long-lived process (a pipeline worker, a
    notebook) every later run on DIR, from any process, was "locked by another run" (exit 4); and the error
    blamed the folder ("cannot create the output folder ... give a writable folder"). The lock is dropped
    now, and the error says the real reason."""
    import errno

    from geoseg.errors import NoRoomError, OutputError

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 1, size=(16, 16))
    lock = out / ".geoseg" / "lock"
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def full(fd, data, offset):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == 1, r.output
    assert f"Error: cannot write the lock file {lock}: no space left on the device: free some space" in r.output
    assert "cannot create the output folder" not in r.output and _lock_fds(lock) == []
    with pytest.raises(NoRoomError):
        BatchLock(out).acquire()
    monkeypatch.setattr(os, "pwrite", real_pwrite)

    def io_error(fd):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OutputError, match=r"cannot write the lock file .* \(Input/output error\): check the disk"):
        BatchLock(out).acquire()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _lock_fds(lock) == [] and BatchLock(out).held_by() is None
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")  # the space is back: the lock is free
    assert r.exit_code == EXIT_OK, r.output


def test_a_leftover_that_cannot_be_removed_is_a_warning_and_the_run_goes_on(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead writer's temp file in a folder of DIR this user may not write (another user's, a read-only
    bind mount) stopped every run before any scene ("unexpected error: PermissionError", exit 1); one
    appearing during a run turned the finished run into exit 1 while its report said exit_status 0.
    Housekeeping never fails the run now: a warning names the file."""
    import errno
    import subprocess

    import geoseg.batch as gb
    from geoseg.atomic import temp_name

    arch = tmp_path / "arch"
    make_archive(arch, 1, size=(16, 16))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def leftover(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        t = temp_name(folder / "x_landcover.tif")
        p = t.with_name(t.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
        p.write_bytes(b"half a file")
        return p

    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "/stuck/" in str(path):  # (chattr +i, or another user's folder: not even root may)
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)  # (Python 3.10's Path.unlink holds its own os.unlink)
    # at the start of the run
    out, rep = tmp_path / "out", tmp_path / "run.json"
    stuck = leftover(out / "stuck")
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep)
    assert r.exit_code == EXIT_OK == report_of(rep)["exit_status"], r.output
    assert f"cannot remove {stuck}, a temp file left by a killed run (Operation not permitted)" in r.output
    assert r.output.count(f"cannot remove {stuck}") == 1  # (at the start; not again at the end)
    assert stuck.exists() and report_of(rep)["counts"]["ok"] == 1
    # one that appears during the run (a writer that died meanwhile), found by the cleanup at its end
    out2, rep2 = tmp_path / "out2", tmp_path / "run2.json"
    planted: list[Path] = []
    run_scene = gb.run_scene

    def dying_writer(scene, out_dir, *args, **kwargs):  # type: ignore[no-untyped-def]
        planted.append(leftover(Path(out_dir) / "stuck"))
        return run_scene(scene, out_dir, *args, **kwargs)

    monkeypatch.setattr(gb, "run_scene", dying_writer)
    r = run_cli(runner, tiny_unet, [arch], out2, "--vector", "none", "--report", rep2)
    assert r.exit_code == EXIT_OK == report_of(rep2)["exit_status"], r.output
    assert f"cannot remove {planted[0]}" in r.output and "unexpected" not in r.output


def test_a_dry_run_says_a_scene_the_aoi_misses_is_skipped_as_outside_the_aoi(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--dry-run listed a scene recorded outside the --aoi as "skip ... done, unchanged" (as if its masks
    were there), and on a fresh DIR as "run ... new" (the run skips it from its header). It now says what
    the run does: "skip ... outside the AOI"."""
    from rasterio.transform import from_origin

    from geoseg.batch import BatchModel, BatchOptions, run_batch
    from geoseg.engine import PredictOptions

    arch, out = tmp_path / "arch", tmp_path / "out"
    arch.mkdir()
    rng = np.random.default_rng(4)
    write_raster(arch / "here.tif", rng.integers(1, 256, (3, 32, 32), dtype=np.uint8))
    write_raster(arch / "away.tif", rng.integers(1, 256, (3, 32, 32), dtype=np.uint8),
                 transform=from_origin(600000.0, 4700000.0, 10.0, 10.0))
    box = ("--vector", "none", "--aoi", "500001,4799701,500199,4799999")
    r = run_cli(runner, tiny_unet, [arch], out, *box, "--dry-run")  # a fresh DIR
    assert r.exit_code == EXIT_OK and r.stdout.splitlines() == ["skip\taway.tif\toutside the AOI", "run\there.tif\tnew"], \
        r.output
    assert run_cli(runner, tiny_unet, [arch], out, *box).exit_code == EXIT_OK
    r = run_cli(runner, tiny_unet, [arch], out, *box, "--dry-run")  # the next night
    assert r.stdout.splitlines() == ["skip\taway.tif\toutside the AOI", "skip\there.tif\tdone, unchanged"], r.output
    res = run_batch([arch], out, BatchModel(weights=str(tiny_unet[0]), threads=1),
                    PredictOptions(vector="none", aoi="500001,4799701,500199,4799999"), BatchOptions(dry_run=True))
    assert [(action, sc.key, why) for action, sc, why in res.plan()] == [
        ("skip", "away.tif", "outside the AOI"), ("skip", "here.tif", "done, unchanged")]


def test_a_stop_paddle_turned_into_another_error_stops_the_run(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM handler's exception raised inside paddle's C++ code comes out as another error
    (SystemError): batch took the scene for failed, went on with the next ones, and exited 3."""
    import geoseg.engine
    from geoseg.errors import note_stop
    from geoseg_cli.main import Terminated

    arch, out, rep = tmp_path / "arch", tmp_path / "out", tmp_path / "report.json"
    make_archive(arch, 3, size=(16, 16))
    real = geoseg.engine.segment_scene

    for error in (SystemError("(Fatal) Call static_op_arg_pre_cast_hook failed."),
                  ModelError("Paddle Inference cannot run the model: ...")):  # (geoseg wraps the predictor's errors)
        calls: list[str] = []

        def segment_scene(path, *args, error=error, calls=calls, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(Path(path).name)
            if len(calls) == 1:
                note_stop(Terminated())  # (the CLI's handler, as the signal came)
                raise error
            return real(path, *args, **kwargs)

        monkeypatch.setattr(geoseg.engine, "segment_scene", segment_scene)
        r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none", "--report", rep, "--force")
        assert r.exit_code == 143 and "terminated (SIGTERM)" in r.output, (error, r.output)
        assert len(calls) == 1, calls
        report = report_of(rep)
        assert report["stopped"]["reason"].startswith("terminated") and "failed" not in statuses(report).values()
        assert report["exit_status"] == 143, report


def test_a_lost_connection_s_tracebacks_are_kept_off_stderr() -> None:
    """A scheduler restarted under a run printed distributed.client's ~40-line ConnectionRefusedError /
    CommClosedError traceback before geoseg's one line; the group's SIGTERM on a --workers run printed the
    local scheduler's 'broadcast to ... failed: CommClosedError'. Other errors still show."""
    import logging

    from distributed.comm.core import CommClosedError

    from geoseg.batch import _StoppedRunNoise
    from geoseg_cli.batch import _NOISY, _batch_logging

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("distributed.client", logging.ERROR, __file__, 0, msg, (), info)

    noise = _StoppedRunNoise()
    assert not noise.filter(record("", CommClosedError("in <TCP ...>: Stream is closed")))
    assert not noise.filter(record("", ConnectionRefusedError(111, "Connection refused")))
    assert not noise.filter(record("broadcast to tcp://127.0.0.1:4242 failed: CommClosedError: in <TCP>"))
    assert noise.filter(record("Compute Failed", ValueError("bad scene")))
    assert noise.filter(record("Worker tcp://127.0.0.1:4242 (pid=7) exceeded 95% memory budget"))
    with _batch_logging(None, 0, dask=True):
        for name in _NOISY:
            assert any(isinstance(f, _StoppedRunNoise) for f in logging.getLogger(name).filters), name
    assert not any(isinstance(f, _StoppedRunNoise) for name in _NOISY for f in logging.getLogger(name).filters)


def test_absurd_worker_counts_are_refused(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """GEOSEG_BATCH_WORKERS=100000 on 2 cores started worker processes one by one, with no progress for minutes
    (and a traceback when stopped)."""
    arch = tmp_path / "arch"
    make_archive(arch, 1, size=(16, 16))
    n = 4 * (os.cpu_count() or 1) + 1
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "out", "--workers", str(n))
    assert r.exit_code == 1 and f"--workers {n}: use 0 (scenes here) to {n - 1} on this machine's" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_a_stop_right_after_a_scene_is_recorded_keeps_it_done(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal landing after a scene's record (while its line is logged) put its entry back to "running": the
    report said ok, the manifest said not finished, and the next run redid it."""
    import geoseg.batch as gb
    from geoseg_cli.main import Terminated

    arch, out = tmp_path / "arch", tmp_path / "out"
    make_archive(arch, 2, size=(16, 16))
    real = gb._log_outcome

    def stop_after_the_first(o, i, n):  # type: ignore[no-untyped-def]
        real(o, i, n)
        raise Terminated()

    monkeypatch.setattr(gb, "_log_outcome", stop_after_the_first)
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == 143, r.output
    assert _manifest_rows(out)["scene0.tif"] == ("done", 0)


def test_sighup_is_held_back_like_sigterm_during_an_export() -> None:
    """signals_deferred held back SIGINT and SIGTERM only: a SIGHUP (now a stop, as SIGTERM) raised inside
    paddle's program translation, which it exists to prevent (paddle's own error, or a segmentation fault)."""
    import signal

    from geoseg.errors import signals_deferred

    seen: list[int] = []

    def handler(signum, frame):  # type: ignore[no-untyped-def]
        seen.append(signum)

    old = signal.signal(signal.SIGHUP, handler)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            assert seen == []  # held back inside the block
        assert seen == [signal.SIGHUP]  # and handled when it ends
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_blank_log_file_name_is_refused(runner, tiny_unet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """GEOSEG_BATCH_LOG_FILE=" " appended the log to a file named " " wherever the job ran."""
    arch = tmp_path / "arch"
    make_archive(arch, 1, size=(16, 16))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEOSEG_BATCH_LOG_FILE", " ")
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "out")
    assert r.exit_code == 1 and "has a blank name" in r.output and not (tmp_path / " ").exists(), r.output


def test_an_unchanged_mosaic_is_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run opened every done mask again to rebuild the mosaic (about 2.5 ms a mask: 4 minutes a night for
    100,000), also when nothing had run. The same masks (names, sizes, times) and classes leave it standing; a
    mask redone, added, or a mosaic file removed rebuilds it."""
    import geoseg.mosaic as gm

    out = tmp_path / "out"
    out.mkdir()
    state = out / ".geoseg"
    state.mkdir()
    a = _mask(out / "a_landcover.tif", SEVEN)
    b = _mask(out / "b_landcover.tif", SEVEN, x0=500300.0)
    opened: list[str] = []
    real = gm.rasterio.open

    def counted(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(gm.rasterio, "open", counted)
    first = gm.write_mosaics(out, [a, b], [], state_dir=state)
    assert sorted(opened) == ["a_landcover.tif", "b_landcover.tif"]
    opened.clear()
    assert gm.write_mosaics(out, [a, b], [], state_dir=state) == first and opened == []  # nothing changed
    os.utime(b, ns=(time.time_ns(), time.time_ns() + 10**9))  # b redone
    gm.write_mosaics(out, [a, b], [], state_dir=state)
    assert sorted(opened) == ["a_landcover.tif", "b_landcover.tif"]
    opened.clear()
    (out / "landcover.qml").unlink()  # a mosaic file removed by hand
    gm.write_mosaics(out, [a, b], [], state_dir=state)
    assert opened and (out / "landcover.qml").exists()
    opened.clear()
    c = _mask(out / "c_landcover.tif", SEVEN, x0=500600.0)  # a new scene
    opened.clear()  # (rasterio.open is the one patched: writing c counted)
    gm.write_mosaics(out, [a, b, c], [], state_dir=state)
    assert sorted(opened) == ["a_landcover.tif", "b_landcover.tif", "c_landcover.tif"]
    assert _vrt_sources(out / "landcover.vrt") == ["a_landcover.tif", "b_landcover.tif", "c_landcover.tif"]


def test_the_manifest_and_lock_take_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """SQLite makes its files 0644 and the lock was made 0644, whatever the umask: under umask 002 (an
    archive's group) a second member of the group could not run batch on the same output folder."""
    import stat

    from geoseg.batch import BatchLock, Manifest, ManifestEntry

    old = os.umask(0o002)
    try:
        (tmp_path / ".geoseg").mkdir()
        (tmp_path / ".geoseg" / "lock").touch(mode=0o644)  # (as geoseg made it before)
        os.chmod(tmp_path / ".geoseg" / "lock", 0o644)
        with BatchLock(tmp_path):
            m = Manifest(tmp_path)
            m.put(ManifestEntry(key="a", input="a.tif", size=1, mtime_ns=1, head_hash="h", model="m", params="p",
                                status="done", outputs=[]))
            state = m.path.parent
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
            m.close()
    finally:
        os.umask(old)
    assert {"lock", "manifest.sqlite", "manifest.sqlite-wal", "manifest.sqlite-shm"} <= set(modes), modes
    assert set(modes.values()) == {0o664}, modes


def test_a_scene_named_with_a_control_character_fails_alone_on_one_line(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A tab or a newline in a scene's name or folder: the dry run's `run<TAB>scene<TAB>reason` line broke in two (or
    gained a column) and said "new"; the run then published the mask and failed on the polygons (GDAL drops the
    character from the names it writes), leaving the mask and its style behind."""
    arch = tmp_path / "arch"
    make_archive(arch, 1)
    (arch / "tab\tdir").mkdir()
    write_raster(arch / "tab\tdir" / "g.tif", np.full((3, 96, 128), 7, np.uint8))
    write_raster(arch / "new\nline.tif", np.full((3, 96, 128), 7, np.uint8))
    out = tmp_path / "out"
    r = run_cli(runner, tiny_unet, [arch], out, "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 3 for line in lines), lines
    plan = {line.split("\t")[1]: line.split("\t")[2] for line in lines}
    assert plan["scene0.tif"] == "new"
    for key in ("tab\\x09dir/g.tif", "new\\x0aline.tif"):
        assert plan[key] == (f"fails: input {key}: its name or its folder's holds a control character (a tab, a newline), "
                             "which GDAL drops from the names it writes: rename it"), plan
    r = run_cli(runner, tiny_unet, [arch], out, "--report", str(tmp_path / "r.json"))
    assert r.exit_code == 3, r.output
    rep = report_of(tmp_path / "r.json")
    assert statuses(rep) == {"scene0.tif": "ok", "tab\\x09dir/g.tif": "failed", "new\\x0aline.tif": "failed"}
    assert (out / "scene0_landcover.gpkg").is_file()
    assert not [p for p in out.rglob("*") if p.is_file() and ("line" in p.name or p.name.startswith("g_"))]


def test_an_input_list_is_utf8_whatever_the_locale_and_its_bom_is_not_a_name(tmp_path: Path) -> None:
    """A list saved by Notepad (a UTF-8 byte-order mark) failed its first scene ("cannot be read": the mark began
    its name); under an ASCII locale a non-ASCII line was "unexpected error: UnicodeDecodeError"."""
    from geoseg.batch import discover_scenes

    arch = tmp_path / "arch"
    make_archive(arch, 1)
    _copy(arch / "scene0.tif", arch / "forêt.tif")
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfarch/scene0.tif\r\narch/for\xc3\xaat.tif\r\n")
    scenes = discover_scenes([f"@{lst}"], tmp_path / "out")
    assert [(s.key, s.conflict) for s in scenes] == [("scene0.tif", None), ("forêt.tif", None)]
    assert [s.path for s in scenes] == [arch / "scene0.tif", arch / "forêt.tif"]


def test_an_input_list_keeps_a_name_s_own_surrounding_spaces(tmp_path: Path) -> None:
    """A scene named ' a.tif' was read as 'a.tif' (leading and trailing spaces were always cut); indented or
    trailing-space lines still name their trimmed file."""
    from geoseg.batch import discover_scenes

    arch = tmp_path / "arch"
    make_archive(arch, 1)
    _copy(arch / "scene0.tif", arch / " spaced .tif")
    lst = arch / "list.txt"
    lst.write_text(" spaced .tif\n   scene0.tif  \n")
    scenes = discover_scenes([f"@{lst}"], tmp_path / "out")
    assert [s.path for s in scenes] == [arch / " spaced .tif", arch / "scene0.tif"]


def test_a_dry_run_to_a_stdout_that_cannot_encode_a_name_escapes_it(tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A latin-1 stdout (a locale's, PYTHONIOENCODING's) ended a dry run over 'forêt_水域.tif' (and evaluate's
    table of such class names) in "unexpected error: UnicodeEncodeError"."""
    import os
    import subprocess

    arch = tmp_path / "arch"
    make_archive(arch, 1)
    _copy(arch / "scene0.tif", arch / "forêt_水域.tif")
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    r = subprocess.run([str(GEOSEG), *batch_args(tiny_unet, str(arch), "--out", str(tmp_path / "out"), "--dry-run")],
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode("latin-1")
    assert r.stdout.decode("latin-1").splitlines() == ["run\tforêt_\\u6c34\\u57df.tif\tnew", "run\tscene0.tif\tnew"]


def test_figures_recorded_in_the_card_do_not_redo_the_archive(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The manifest's model key hashed the whole card: `geoseg evaluate --record-card` (test figures) or a new
    description redid every scene of the archive the next night, as "model changed". Manifests written with the
    old key are read as the same model; a change that shapes the outputs (a class colour) still redoes them."""
    import shutil
    import sqlite3

    import yaml

    from geoseg.batch import MANIFEST_NAME, STATE_DIR

    weights = tmp_path / "w" / "m.pdparams"
    weights.parent.mkdir()
    shutil.copy(tiny_unet[0], weights)
    card_path = shutil.copy(tiny_unet[1], weights.with_suffix(".yaml"))
    arch = tmp_path / "arch"
    make_archive(arch, 2)
    out = tmp_path / "out"

    def dry() -> list[str]:
        r = runner.invoke(cli, ["batch", str(arch), "--weights", str(weights), "--out", str(out), "--vector", "none",
                                "--dry-run"])
        assert r.exit_code == 0, r.output
        return sorted(r.stdout.splitlines())

    r = runner.invoke(cli, ["-q", "batch", str(arch), "--weights", str(weights), "--out", str(out), "--vector", "none"])
    assert r.exit_code == 0, r.output
    card = yaml.safe_load(Path(card_path).read_text())
    card["metrics"] = {"test": {"miou": 0.5, "oa": 0.8}}
    card["description"] = "retitled"
    Path(card_path).write_text(yaml.safe_dump(card))
    unchanged = ["skip\td1/x/scene1.tif\tdone, unchanged", "skip\tscene0.tif\tdone, unchanged"]
    assert dry() == unchanged
    # a manifest of geoseg before session 29 (whole card digest + weights): the same model, not "model changed"
    from geoseg.batch import BatchModel

    key = BatchModel(weights=str(weights)).key()
    legacy = f"{key.partition('/')[2]}-{key.partition('/')[0].partition('-')[2]}"
    db = sqlite3.connect(out / STATE_DIR / MANIFEST_NAME)
    with db:
        db.execute("UPDATE scenes SET model = ?", (legacy,))
    db.close()
    assert dry() == unchanged
    # a run that skips them records today's key: the card's next edit (more figures) still redoes nothing
    r = runner.invoke(cli, ["-q", "batch", str(arch), "--weights", str(weights), "--out", str(out), "--vector", "none"])
    assert r.exit_code == 0, r.output
    db = sqlite3.connect(out / STATE_DIR / MANIFEST_NAME)
    assert {m for (m,) in db.execute("SELECT model FROM scenes")} == {key}
    db.close()
    card["metrics"]["val"] = {"miou": 0.4}
    Path(card_path).write_text(yaml.safe_dump(card))
    assert dry() == unchanged
    card["classes"][0]["color"] = [1, 2, 3]
    Path(card_path).write_text(yaml.safe_dump(card))
    assert dry() == ["run\td1/x/scene1.tif\tmodel changed", "run\tscene0.tif\tmodel changed"]
    # the run's own log says why it redoes them (it said "2 to run" only)
    (arch / "new.tif").write_bytes((arch / "scene0.tif").read_bytes())
    r = runner.invoke(cli, ["batch", str(arch), "--weights", str(weights), "--out", str(out), "--vector", "none"])
    assert r.exit_code == 0 and "3 scene(s): 3 to run (model changed: 2, new: 1), 0 skipped" in r.output, r.output


@pytest.mark.slow
def test_batch_s_own_cluster_listens_on_this_machine_only() -> None:
    """The scheduler's HTTP server listened on 0.0.0.0 (every network interface): a port open to the network, and
    a firewall prompt on Windows and macOS that a scheduled task cannot answer."""
    import psutil

    from geoseg.batch import BatchOptions, dask_client

    import tempfile

    import dask

    with dask.config.set({"temporary-directory": None}), dask_client(BatchOptions(workers=1)) as client:
        client.wait_for_workers(1)  # (their own HTTP servers listened on every interface with distributed 2023)
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = {(c.laddr.ip, c.laddr.port) for p in procs for c in getattr(p, "net_connections", p.connections)("inet")
                     if c.status == psutil.CONN_LISTEN}
        (scratch,) = {Path(d).parent for d in client.run(lambda dask_worker: dask_worker.local_directory).values()}
        private = scratch.parent.name.startswith("geoseg-dask-") and (scratch.parent.stat().st_mode & 0o777) == 0o700
    assert listening and all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening
    # the workers' scratch space: this run's own private folder (not the shared /tmp/dask-scratch-space), gone after
    assert private and scratch.parent.parent == Path(tempfile.gettempdir()) and not scratch.parent.exists(), scratch


def test_without_file_locks_batch_is_one_line_and_the_rest_imports(runner, tiny_unet, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows has no fcntl: `import geoseg.batch` failed there, and with it batch ("unexpected error:
    ModuleNotFoundError") and train (which hashes its inputs with batch's quick_hash)."""
    import subprocess
    import sys

    code = "import sys; sys.modules['fcntl'] = None; import geoseg.batch, geoseg.train; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    monkeypatch.setitem(sys.modules, "fcntl", None)
    arch = tmp_path / "arch"
    make_archive(arch, 1)
    for extra in ((), ("--dry-run",)):
        res = run_cli(runner, tiny_unet, [arch], tmp_path / "out", *extra)
        assert res.exit_code == 1 and res.stderr.strip().splitlines()[-1] == (
            "Error: geoseg batch keeps runs on one --out apart with file locks (fcntl's flock), which this system does "
            "not have (Windows): run batch under WSL, or geoseg predict for each scene"), res.output
    assert not (tmp_path / "out").exists()


def test_a_control_character_in_batch_s_out_is_refused_before_any_work(runner, tiny_unet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--out 'o<TAB>x'`: the folder was made, every scene failed saying to rename the input, exit 3."""
    arch = tmp_path / "arch"
    make_archive(arch, 1)
    r = run_cli(runner, tiny_unet, [arch], tmp_path / "o\tx")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "Error: --out '" + str(tmp_path) + "/o\\tx' holds a control character (a tab, a newline)"), r.output
    assert not (tmp_path / "o\tx").exists()


def test_the_mosaic_state_file_names_only_mosaics_in_its_folder(tmp_path: Path) -> None:
    """The run removes the mosaics of the last run it does not write again, as its state file names them: a state
    file naming '/any/file' or '../file' (anyone who can write DIR) had those files deleted, exit 0."""
    import json

    from geoseg.mosaic import write_mosaics

    out = tmp_path / "out"
    state = out / ".geoseg"
    state.mkdir(parents=True)
    a = _mask(out / "a_landcover.tif", SEVEN)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (out / "notes.qml").write_text("keep")
    (out / "landcover_old.vrt").write_text("<VRTDataset/>")  # a mosaic of the last run, not written again
    (state / "mosaics.json").write_text(json.dumps({"files": [str(precious), "../precious.txt", "notes.qml",
                                                              "landcover_old.vrt"], "styles": {}}))
    assert [p.name for p in write_mosaics(out, [a], [], state)] == ["landcover.vrt", "landcover.qml"]
    assert precious.read_text() == "keep" and (out / "notes.qml").read_text() == "keep"
    assert not (out / "landcover_old.vrt").exists()


@pytest.mark.parametrize("planted", ["lock", "manifest.sqlite", "manifest.sqlite-wal", ""])
def test_a_link_planted_in_the_state_folder_is_refused(runner, tiny_unet, tmp_path: Path, planted: str) -> None:  # type: ignore[no-untyped-def]
    """`ln -s ~/victim DIR/.geoseg/lock` (anyone who can write DIR): the victim was truncated, made 0644 and its
    first lines printed in the log ("taking over the lock of a batch run that died (<its lines>)"); a linked
    manifest got a database written into it. One line now, and the file it points at is left as it was."""
    import stat

    arch = tmp_path / "arch"
    make_archive(arch, 1)
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_text("SECRET LINE\n")
    victim.chmod(0o600)
    if planted:
        (out / ".geoseg").mkdir(parents=True)
        (out / ".geoseg" / planted).symlink_to(victim)
    else:  # the state folder itself
        out.mkdir()
        (tmp_path / "elsewhere").mkdir()
        (out / ".geoseg").symlink_to(tmp_path / "elsewhere")
    r = run_cli(runner, tiny_unet, [arch], out, "--vector", "none")
    assert r.exit_code == 1 and "is a symbolic link: geoseg keeps its own state there" in r.stderr, r.output
    assert "SECRET" not in r.output
    assert victim.read_text() == "SECRET LINE\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    if not planted:
        assert not list((tmp_path / "elsewhere").iterdir())


def test_the_nightly_fingerprint_reads_a_file_named_tif_as_a_geotiff_only(tmp_path: Path) -> None:
    """Each night batch fingerprints every scene, its band names too, before the scene is opened: a 'w.tif' that was
    a WMS description fetched its URL there (a VRT, as here, read its sources)."""
    from geoseg.batch import _own_descriptions

    src = write_raster(tmp_path / "src.tif", np.ones((1, 8, 8), np.uint8))
    vrt = ('<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
           f'<Description>fetched</Description><SimpleSource><SourceFilename relativeToVRT="0">{src}</SourceFilename>'
           '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    (tmp_path / "w.vrt").write_text(vrt)
    (tmp_path / "w.tif").write_text(vrt)
    assert _own_descriptions(tmp_path / "w.vrt") == ("fetched",)  # (GDAL reads a VRT named as one)
    assert _own_descriptions(tmp_path / "w.tif") == ()


@pytest.mark.slow
def test_dask_s_temporary_directory_holds_the_scratch_and_is_made_if_missing(tmp_path: Path) -> None:
    """DASK_TEMPORARY_DIRECTORY (a scratch disk) took the workers' spill space; the private folder took it over,
    and a setting naming a folder not made yet ended batch --workers in "unexpected error: FileNotFoundError"."""
    import dask

    from geoseg.batch import BatchOptions, dask_client

    base = tmp_path / "scratch" / "dask"
    with dask.config.set({"temporary-directory": str(base)}), dask_client(BatchOptions(workers=1)) as client:
        client.wait_for_workers(1)
        dirs = list(client.run(lambda dask_worker: dask_worker.local_directory).values())
    assert dirs and all(Path(d).is_relative_to(base) for d in dirs), dirs
