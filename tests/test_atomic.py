"""Temp files: named after their writer, so a cleanup removes a killed run's and never a live one's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from geoseg.atomic import STALE_TEMP_S, check_output, clean_temp_files, is_leftover, temp_name
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


def test_a_writer_in_another_pid_namespace_of_the_same_host_is_not_taken_for_dead(tmp_path: Path) -> None:
    """Containers sharing a host name (Docker's --network host) do not see each other's processes: a batch
    in one removed a live predict's staging file in the other (its pid did not exist there)."""
    import shutil

    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        pytest.skip("needs Linux PID namespaces (unshare)")
    mine = temp_name(tmp_path / "a_landcover.tif")  # this process (alive) in this namespace
    mine.write_bytes(b"half a file")
    script = "import sys; from pathlib import Path; from geoseg.atomic import is_leftover; print(is_leftover(Path(sys.argv[1])))"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script, str(mine)],
                       capture_output=True, text=True)
    if r.returncode and r.stderr.startswith("unshare:"):  # (not permitted in this container, ...)
        pytest.skip(f"no PID namespace here: {r.stderr.strip()}")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
    assert not is_leftover(mine)


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
    engine._tidy_exports(tmp_path)
    assert left.exists() == pid_alive and done.exists()


def test_an_output_is_flushed_to_disk_before_its_rename_and_its_folder_after(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs were renamed into place without fsync: after a power cut the new name could point at a
    file whose data never reached the disk (the README promises only complete files)."""
    import geoseg.atomic as atomic

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else "?"))
        real_fsync(fd)

    def replace(src, dst) -> None:  # type: ignore[no-untyped-def]
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "a_landcover.qml"
    atomic.atomic_write_text(out, "<qgis/>")
    assert out.read_text() == "<qgis/>"
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    if Path("/proc/self/fd").exists():
        assert Path(events[0][1]).name.startswith(".geoseg-a_landcover.qml.")  # the temp file, before the rename
        assert events[2][1] == str(tmp_path)  # the folder, after it


def test_a_file_system_without_fsync_still_gets_its_outputs_and_a_failed_one_leaves_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync's EINVAL says the file system does not do it (some special or network file systems): the
    output is written as before. A real error (EIO: the data did not reach the disk) fails the write."""
    import errno

    from geoseg.atomic import atomic_write_text

    def no_fsync(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", no_fsync)
    assert atomic_write_text(tmp_path / "a.txt", "x").read_text() == "x"

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_text(tmp_path / "b.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no b.txt, no temp file


@pytest.mark.parametrize("char", ["x", "\u00e9"])
def test_a_long_legal_name_gets_a_temp_name_within_the_limit(tmp_path: Path, char: str) -> None:
    """A scene named with about 205 characters failed "[Errno 36] File name too long: '.../.geoseg-S2A_..."
    although its outputs' names are legal: the temp name added some 40 characters to the final name. The
    part taken from the final name is now shortened (whole characters) to keep it within the limit."""
    from geoseg.atomic import atomic_write_text

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    stem = "S2A_MSIL2A_" + char * ((limit - 40) // len(char.encode()))
    name = stem + "_landcover.tif.aux.xml"
    assert len(os.fsencode(name)) <= limit
    atomic_write_text(tmp_path / name, "<PAMDataset/>")
    assert (tmp_path / name).read_text() == "<PAMDataset/>"

    from geoseg.atomic import DERIVED_NAME_BYTES

    tmp = temp_name(tmp_path / name)
    assert len(os.fsencode(tmp.name)) + DERIVED_NAME_BYTES <= limit and tmp.name.startswith(".geoseg-S2A_MSIL2A_")
    tmp.name.encode("utf-8")  # (cut between characters, never inside one)
    staging = tmp.with_suffix(".staging.tif")  # as the raster writer names its staging file
    staging.write_bytes(b"x")
    Path(f"{staging}.aux.xml").write_bytes(b"x")  # and GDAL its side file
    assert not is_leftover(staging) and clean_temp_files(tmp_path) == []  # still names its writer


def test_a_write_past_the_file_size_limit_says_so(tmp_path: Path) -> None:
    """Past ``ulimit -f`` (EFBIG) a write failed with a message about something else (GDAL's "Failed to
    commit transaction", or "no space left" on a disk with room). The error now names the limit."""
    resource = pytest.importorskip("resource")
    import errno

    from geoseg.atomic import write_error
    from geoseg.batch import BatchResult, write_report

    report = tmp_path / "run.json"
    result = BatchResult(out_dir=tmp_path, scenes=[], seconds=0.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # (Python ignores SIGXFSZ: the write gets EFBIG)
    try:
        with pytest.raises(OSError) as caught:
            write_report(result, report)
        said = str(write_error(tmp_path / "a.gpkg", OSError("Failed to commit transaction")))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (f"cannot write {report}: file too large: this process may not write files over 64 bytes (ulimit -f): "
            "raise the limit or choose another --report") in str(caught.value)
    assert said.endswith("Failed to commit transaction (this process may not write files over 64 bytes: ulimit -f)")
    assert not report.exists() and not list(tmp_path.glob(".geoseg-*"))
    assert "file too large" in str(write_error(tmp_path / "b.tif", OSError(errno.EFBIG, "File too large")))


@pytest.mark.parametrize("name", ["a\tb.gpkg", "a\nb_landcover.tif", "a\nfolder/b.gpkg"])
def test_an_output_name_with_a_control_character_is_refused_before_writing(tmp_path: Path, name: str) -> None:
    """GDAL drops a tab or newline from the names it creates: the GeoPackage landed as ``ab.gpkg``, its
    style then failed on "no such table: gpkg_contents", and a temp file was left behind."""
    import rasterio
    from rasterio.transform import from_origin

    from geoseg.errors import OutputError
    from geoseg.vectorize import vectorize_mask

    mask = tmp_path / "m.tif"
    with rasterio.open(mask, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(0, 80, 10, 10), nodata=0) as ds:
        ds.write(np.ones((1, 8, 8), np.uint8))
    (tmp_path / name).parent.mkdir(exist_ok=True)  # (a folder of that name: the mask landed, the polygons failed)
    with pytest.raises(OutputError, match="holds a control character"):
        check_output(tmp_path / name, overwrite=False)
    if name.endswith(".gpkg"):
        with pytest.raises(OutputError, match="holds a control character"):
            vectorize_mask(mask, tmp_path / name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted({"m.tif", (tmp_path / name).parent.name} - {tmp_path.name})


def test_a_leftover_that_cannot_be_removed_is_a_warning_naming_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead writer's temp file in a folder this user may not write raised PermissionError out of the
    cleanup, which stopped the batch (or predict) that only meant to tidy up before its work. It is now a
    warning naming the file; the other leftovers are still removed, and only they are returned."""
    import errno

    from geoseg.errors import GeosegWarning

    dead_pid = _dead_pid()
    stuck_dir, free_dir = tmp_path / "stuck", tmp_path / "free"
    stuck_dir.mkdir()
    free_dir.mkdir()
    stuck = stuck_dir / _as_written_by(temp_name(stuck_dir / "a_landcover.tif").name, dead_pid)
    free = free_dir / _as_written_by(temp_name(free_dir / "b_landcover.tif").name, dead_pid)
    busy = free_dir / _as_written_by(temp_name(free_dir / "c_landcover.tif").name, dead_pid)
    for p in (stuck, free, busy):
        p.write_bytes(b"half a file")
    real_unlink = Path.unlink
    refusals = {str(stuck): errno.EACCES, str(busy): errno.EBUSY}

    def unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path) in refusals:
            code = refusals[str(path)]
            raise OSError(code, os.strerror(code), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)  # (Python 3.10's Path.unlink holds its own os.unlink)
    with pytest.warns(GeosegWarning) as seen:
        assert clean_temp_files(tmp_path) == [free]
    said = [str(w.message) for w in seen]
    assert len(said) == 2, said
    assert any(m.startswith(f"cannot remove {stuck}, a temp file left by a killed run ({os.strerror(errno.EACCES)}): "
                            "remove it by hand") for m in said), said
    assert any(m.startswith(f"cannot remove {busy}, ") and os.strerror(errno.EBUSY) in m for m in said), said
    assert stuck.exists() and busy.exists() and not free.exists()
    # a run's second cleanup (at its end) says nothing more of the leftovers its first could not remove
    held: set[Path] = set()
    with pytest.warns(GeosegWarning):
        assert clean_temp_files(tmp_path, stuck=held) == []
    assert held == {stuck, busy}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_temp_files(tmp_path, stuck=held) == [] and stuck.exists()


def test_outputs_take_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """SQLite creates its files 0644 whatever the umask: under umask 002 (a group's shared folder) the
    GeoPackage was the only output the group could not edit."""
    import sqlite3
    import stat

    from geoseg.atomic import atomic_output

    old = os.umask(0o002)
    try:
        with atomic_output(tmp_path / "a.gpkg") as tmp:
            sqlite3.connect(tmp).close()
            os.chmod(tmp, 0o644)  # (as SQLite leaves it)
            sqlite3.connect(tmp).execute("CREATE TABLE t (x)").connection.close()
        assert stat.S_IMODE(os.stat(tmp_path / "a.gpkg").st_mode) == 0o664
    finally:
        os.umask(old)


def test_a_link_to_nothing_at_the_output_path_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    """A live link there was refused as existing; a link to nothing was replaced without a word."""
    from geoseg.errors import OutputExistsError

    (tmp_path / "out.tif").symlink_to(tmp_path / "gone.tif")
    with pytest.raises(OutputExistsError, match="already exists: pass --overwrite"):
        check_output(tmp_path / "out.tif", overwrite=False)
    assert check_output(tmp_path / "out.tif", overwrite=True) == tmp_path / "out.tif"


def test_windows_asks_psutil_whether_a_writer_lives_and_names_a_file_in_use(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    """Off POSIX every writer was taken for alive (its temp files were kept for good); a mask open in QGIS on
    Windows (WinError 32 on the rename) was "cannot write ...: [WinError 32] ..."."""
    from geoseg.atomic import is_alive, write_error

    dead = 2**22 + 12345
    assert is_alive(os.getpid()) and not is_alive(dead)
    with monkeypatch.context() as m:  # (only around the calls: pathlib takes os.name too)
        m.setattr(os, "name", "nt")
        alive, gone = is_alive(os.getpid()), is_alive(dead)
    assert alive and not gone
    exc = PermissionError(13, "The process cannot access the file because it is being used by another process")
    exc.winerror = 32  # type: ignore[attr-defined]
    assert str(write_error(tmp_path / "a.tif", exc)) == (
        f"cannot write {tmp_path / 'a.tif'}: it is open in another program (QGIS, a viewer of its mosaic): close it "
        "there and run again; Windows cannot replace a file in use")
