"""Temp files: named after their writer, so a cleanup removes a killed run's and never a live one's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from geoseg.atomic import STALE_TEMP_S, clean_temp_files, is_leftover, temp_name
from tests.conftest import write_raster


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _as_written_by(name: str, pid: int, host: str | None = None) -> str:
    """``name`` (of :func:`temp_name`) as if process ``pid`` (on machine ``host``) had written it."""
    return re.sub(r"\.([0-9a-f]{8})-\d+-([0-9a-f]{8})\.", lambda m: f".{host or m[1]}-{pid}-{m[2]}.", name, count=1)


def test_a_live_writer_s_temp_files_are_kept_and_a_dead_one_s_removed(tmp_path: Path) -> None:
    """A batch starting on a folder removed the temp files of a predict (or another batch) writing
    below it, which then failed ("No such file or directory" on its staging file)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sub = tmp_path / "inner"
        sub.mkdir()
        mine = temp_name(sub / "a_landcover.tif")  # this process: alive
        staging = mine.with_suffix(".staging.tif")  # (as the COG writer names its staging file)
        other_live = sub / _as_written_by(temp_name(sub / "b_landcover.tif").name, live.pid)
        dead = sub / _as_written_by(temp_name(sub / "c_landcover.tif").name, _dead_pid())
        dead_staging = dead.with_suffix(".staging.tif")
        legacy = tmp_path / ".geoseg-d_landcover.tif.0a1b2c3d.tmp"  # a geoseg before writers were named
        far_new = tmp_path / _as_written_by(temp_name(tmp_path / "e.tif").name, 4242, host="00000000")
        far_old = tmp_path / _as_written_by(temp_name(tmp_path / "f.tif").name, 4242, host="00000000")
        files = [mine, staging, other_live, dead, dead_staging, legacy, far_new, far_old]
        for p in files:
            p.write_bytes(b"half a file")
        old = time.time() - STALE_TEMP_S - 60
        os.utime(far_old, (old, old))
        assert [is_leftover(p) for p in files] == [False, False, False, True, True, True, False, True]
        removed = clean_temp_files(tmp_path)
        assert sorted(removed) == sorted([dead, dead_staging, legacy, far_old])
        assert all(p.exists() for p in (mine, staging, other_live, far_new))
        # not recursive: only the folder itself
        dead2 = sub / _as_written_by(temp_name(sub / "g.tif").name, _dead_pid())
        dead2.write_bytes(b"x")
        assert clean_temp_files(tmp_path, recursive=False) == [] and dead2.exists()
        assert clean_temp_files(sub, recursive=False) == [dead2]
    finally:
        live.kill()
        live.wait()


def test_predict_removes_a_killed_run_s_leftovers_beside_its_outputs(tmp_path: Path) -> None:
    """A SIGKILLed predict left a scene-sized hidden staging file that no later run removed."""
    from geoseg.engine import ModelSource, PredictOptions, segment_scene
    from tests.test_engine import identity_card, one_hot_predictor

    src = write_raster(tmp_path / "s.tif", np.ones((1, 40, 40), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    dead = out / _as_written_by(temp_name(out / "s_landcover.tif").with_suffix(".staging.tif").name, _dead_pid())
    dead.write_bytes(b"half a file")
    segment_scene(src, out, source=ModelSource(identity_card(1, 2)), predictor=one_hot_predictor(2),
                  options=PredictOptions(vector="none"))
    assert not dead.exists()
    # vectorize too (a killed one left an 8 MB .tmp.gpkg that no later run removed)
    from geoseg.vectorize import vectorize_mask

    dead = out / _as_written_by(temp_name(out / "p.gpkg").name + ".gpkg", _dead_pid())
    dead.write_bytes(b"half a file")
    vectorize_mask(out / "s_landcover.tif", out / "p.gpkg")
    assert not dead.exists()


@pytest.mark.parametrize("pid_alive", [False, True])
def test_an_unfinished_export_of_a_dead_process_leaves_the_cache(tmp_path: Path, pid_alive: bool) -> None:
    """A killed first predict left its half export in the cache for good."""
    import geoseg.engine as engine

    name = temp_name(tmp_path / "0123456789abcdef0123").name
    left = tmp_path / (name if pid_alive else _as_written_by(name, _dead_pid()))
    left.mkdir()
    (left / "model.json").write_text("{")
    done = tmp_path / "0123456789abcdef0123"  # a finished export is never touched
    done.mkdir()
    engine._remove_dead_exports(tmp_path)
    assert left.exists() == pid_alive and done.exists()
