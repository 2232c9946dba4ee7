"""The CLI's option plumbing: GEOSEG_<COMMAND>_<OPTION> variables, a closed stdout pipe, batch's output
paths (--out, --report, --log-file) and the help texts that describe them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from geoseg_cli.main import EXIT_BROKEN_PIPE, cli
from tests.conftest import write_band_vrt, write_raster

GEOSEG = Path(sys.executable).parent / "geoseg"


def scene(tmp_path: Path, name: str = "scene.tif") -> Path:
    data = (np.random.default_rng(0).random((3, 40, 48)) * 200 + 20).astype(np.uint8)
    return write_raster(tmp_path / name, data, nodata=0)


def one_line_error(res: click.testing.Result, *words: str) -> str:
    """The single stderr line of a failed command (exit 1), after checking it holds ``words``."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output and "unexpected error" not in res.output, res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def batch_args(tiny_unet: tuple[Path, Path], *extra: str) -> list[str]:
    return ["batch", *extra, "--weights", str(tiny_unet[0]), "--threads", "1"]


# ---- GEOSEG_<COMMAND>_<OPTION> ------------------------------------------------------------------
def documented_names(cmd_name: str, param: click.Option) -> list[str]:
    """The README's rule: GEOSEG_<COMMAND>_<long option name, dashes as underscores, upper case>."""
    return [f"GEOSEG_{cmd_name.upper()}_{opt[2:].replace('-', '_').upper()}" for opt in param.opts if opt.startswith("--")]


def test_every_long_option_is_read_from_its_documented_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """--json read GEOSEG_INFO_AS_JSON, --co GEOSEG_PREDICT_CREATION_OPTIONS ... (the Python parameter
    name): a variable spelled as documented was silently ignored. The old names keep working."""
    root = click.Context(cli, info_name="geoseg", **cli.context_settings)
    checked = 0
    for cmd_name, cmd in cli.commands.items():
        ctx = click.Context(cmd, parent=root, info_name=cmd_name)
        assert ctx.auto_envvar_prefix == f"GEOSEG_{cmd_name.upper()}"
        for param in cmd.params:
            if not isinstance(param, click.Option) or not any(o.startswith("--") for o in param.opts):
                continue
            # (a value is read when Click resolves one; flags come back converted in some Click versions)
            for var in documented_names(cmd_name, param):
                monkeypatch.setenv(var, "1")
                assert param.resolve_envvar_value(ctx) is not None, f"{cmd_name} {param.opts}: {var} is ignored"
                monkeypatch.delenv(var)
                checked += 1
            old = f"GEOSEG_{cmd_name.upper()}_{param.name.upper()}"
            monkeypatch.setenv(old, "1")
            assert param.resolve_envvar_value(ctx) is not None, f"{cmd_name} {param.opts}: {old} no longer read"
            monkeypatch.delenv(old)
    assert checked > 80  # every command was walked


def test_documented_variables_reach_the_commands(runner: CliRunner, tmp_path: Path) -> None:
    src = scene(tmp_path)
    for var in ("GEOSEG_INFO_JSON", "GEOSEG_INFO_AS_JSON"):  # the documented name, and the old one
        res = runner.invoke(cli, ["info", str(src), "--no-model"], env={var: "1"})
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["width"] == 48
    # a bad value names the variable it came from (the user never typed --classes)
    for var in ("GEOSEG_INFO_CLASSES", "GEOSEG_INFO_NUM_CLASSES"):
        res = runner.invoke(cli, ["info", str(src), "--no-model"], env={var: "0"})
        assert res.exit_code == 2 and f"environment variable {var})" in res.output, res.output


def test_a_variable_that_sets_no_option_is_warned_about(runner: CliRunner, tmp_path: Path) -> None:
    """GEOSEG_BATCH_NO_MOSAIC=1 (the off side of --mosaic/--no-mosaic), GEOSEG_ENSEMBLE_FLOAT32=1 and a
    misspelt GEOSEG_INFO_JSOM=1 changed nothing, and nothing said so: each is now a warning naming the
    variable that does it (flags are set by their on-side name, =0 or =1)."""
    src = scene(tmp_path)
    res = runner.invoke(cli, ["info", str(src), "--no-model"],
                        env={"GEOSEG_INFO_JSOM": "1", "GEOSEG_PREDICT_NO_ADAPT_PRIOR": "1", "GEOSEG_CACHE_DIR": "x"})
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["warning: the environment variable GEOSEG_INFO_JSOM sets no option of geoseg info "
                                       "and is not read: did you mean GEOSEG_INFO_JSON?"]  # (another command's: not info's)
    res = runner.invoke(cli, ["info", str(src), "--no-model"], env={"GEOSEG_INFO_JSON": "1", "GEOSEG_INFO_AS_JSON": "1"})
    assert res.exit_code == 0 and not res.stderr, res.output  # both names are read
    for cmd, var, hint in (("batch", "GEOSEG_BATCH_NO_MOSAIC", "--no-mosaic is set by GEOSEG_BATCH_MOSAIC=0"),
                           ("predict", "GEOSEG_PREDICT_NO_ADAPT_PRIOR",
                            "--no-adapt-prior is set by GEOSEG_PREDICT_ADAPT_PRIOR=0"),
                           ("ensemble", "GEOSEG_ENSEMBLE_FLOAT32", "--float32 is set by GEOSEG_ENSEMBLE_HALF=0")):
        res = runner.invoke(cli, [cmd, "--help"], env={var: "1"})
        assert res.exit_code == 0, res.output
        assert f"warning: the environment variable {var} sets no option of geoseg {cmd} and is not read: {hint}" \
            in res.stderr.splitlines(), res.stderr


def test_documented_variables_reach_predict_and_batch(runner: CliRunner, tmp_path: Path,
                                                      tiny_unet: tuple[Path, Path]) -> None:
    src = scene(tmp_path)
    out = tmp_path / "p"
    res = runner.invoke(cli, ["predict", str(src), "--weights", str(tiny_unet[0]), "--out", str(out)],
                        env={"GEOSEG_PREDICT_CO": "COMPRESS=BOGUS"})
    one_line_error(res, "BOGUS")
    assert not out.exists() or not list(out.glob("*.tif"))
    arch = tmp_path / "arch"
    arch.mkdir()
    scene(arch, "a.tif")
    write_band_vrt(src, arch / "b.vrt")
    res = runner.invoke(cli, batch_args(tiny_unet, str(arch), "--out", str(tmp_path / "b"), "--dry-run"),
                        env={"GEOSEG_BATCH_PATTERN": "*.vrt"})
    assert res.exit_code == 0, res.output
    assert [ln.split("\t")[1] for ln in res.stdout.splitlines()] == ["b.vrt"]


# ---- a closed stdout pipe -----------------------------------------------------------------------
@pytest.mark.skipif(not GEOSEG.exists(), reason="the geoseg console script is not installed")
def test_a_closed_stdout_pipe_ends_quietly(tmp_path: Path) -> None:
    """``geoseg info scene.tif | head -3`` said "Error: unexpected error: BrokenPipeError", exit 1."""
    src = scene(tmp_path)
    for args, read in [(["info", str(src), "--no-model"], 0)] * 2 + [(["info", str(src), "--no-model", "--json"], 1)] * 2:
        with subprocess.Popen([str(GEOSEG), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            if read:
                proc.stdout.read(read)
            proc.stdout.close()  # the reader goes away (at once: deterministic; after one byte: as head does)
            err = proc.stderr.read().decode()
            rc = proc.wait(timeout=120)
        assert err == "", err
        assert rc == EXIT_BROKEN_PIPE if not read else rc in (0, EXIT_BROKEN_PIPE), rc


def test_broken_pipe_in_process_is_the_sigpipe_code(runner: CliRunner, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def echo(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("click.echo", echo)
    for args in (["info", str(scene(tmp_path)), "--no-model"], ["--version"]):  # --version: before invoke
        res = runner.invoke(cli, args)
        assert res.exit_code == EXIT_BROKEN_PIPE and res.output == "", (args, res.output)


# ---- batch's output paths -----------------------------------------------------------------------
def test_log_file_folder_is_created(runner: CliRunner, tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """--log-file logs/batch.log without logs/ was a usage error that a cron job (stderr hidden) never saw."""
    src = scene(tmp_path)
    engine_level = logging.getLogger("geoseg.engine").level
    log = tmp_path / "logs" / "geoseg" / "batch.log"
    res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(tmp_path / "out"), "--vector", "none",
                                        "--log-file", str(log)))
    assert res.exit_code == 0, res.output
    assert "scene.tif" in log.read_text()
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(tmp_path / "out2"),
                                        "--log-file", str(tmp_path / "afile" / "batch.log")))
    one_line_error(res, "--log-file", "afile is a file, not a folder")
    res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(tmp_path / "out2"),
                                        "--log-file", str(tmp_path / "logs")))
    one_line_error(res, "--log-file", "is a folder")
    assert logging.getLogger("geoseg.engine").level == engine_level  # a refused --log-file left it muted
    # a run refused after the log opened says why in the log file too (a cron job's stderr goes nowhere),
    # and once on stderr
    res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(tmp_path / "out3"), "--log-file", str(log),
                                        "--report", str(tmp_path / "afile" / "run.json")))
    one_line_error(res, "--report", "afile is a file, not a folder")
    last = log.read_text().splitlines()[-1]
    assert "ERROR Error: --report" in last and "afile is a file, not a folder" in last, last


def test_out_that_is_a_file_and_report_that_is_a_folder_exit_1(runner: CliRunner, tmp_path: Path,
                                                               tiny_unet: tuple[Path, Path]) -> None:
    """Click's own checks made these usage errors (exit 2); the exit-code table says 1."""
    src = scene(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra in ((), ("--dry-run",)):
        res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(afile), *extra))
        one_line_error(res, f"--out {afile} is a file, not a folder")
    out = tmp_path / "out"
    res = runner.invoke(cli, batch_args(tiny_unet, str(src), "--out", str(out), "--report", str(tmp_path)))
    one_line_error(res, f"--report {tmp_path} is a folder")
    assert not out.exists()


# ---- help texts ---------------------------------------------------------------------------------
def test_help_texts_say_what_the_commands_take(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["--help"])
    train_line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("train "))
    assert "polygons" in train_line, train_line
    res = runner.invoke(cli, ["train", "--help"], terminal_width=200)
    assert "without a validation region, the last weights" in " ".join(res.output.split()), res.output
    batch_model = next(p for p in cli.commands["batch"].params if p.name == "model")
    predict_model = next(p for p in cli.commands["predict"].params if p.name == "model")
    assert "exported model folder" in (batch_model.help or "")
    assert batch_model.help == predict_model.help


def test_every_path_option_set_by_a_variable_takes_tilde_as_home(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """cron expands no '~': a path option's variable (GEOSEG_PREDICT_CLASSES=~/c.yaml, GEOSEG_BATCH_OUT=~/r) took
    it literally; a text option that is no path (--bands) keeps it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    checked = set()
    for name, cmd in cli.commands.items():
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.name is None:
                continue
            ctx = click.Context(cmd, info_name=name, parent=click.Context(cli, auto_envvar_prefix="GEOSEG"),
                                auto_envvar_prefix=f"GEOSEG_{name.upper()}")
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            var = names[0] if names else f"GEOSEG_{name.upper()}_{param.name.upper()}"
            monkeypatch.setenv(var, "~/x")
            value = param.resolve_envvar_value(ctx)
            monkeypatch.delenv(var)
            if isinstance(param.type, click.Path) or param.name in ("model", "aoi", "classes", "num_classes"):
                assert value == str(tmp_path / "x"), (name, param.name, value)
                checked.add(param.name)
            elif param.name == "bands":
                assert value == "~/x"
    assert {"out", "weights", "classes", "num_classes", "aoi", "reference", "log_file", "config"} <= checked
