"""The README's Python example runs as written (from a copy of the repository's sample data)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("paddle")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    monkeypatch.chdir(tmp_path)  # the example writes out/ beside its sample_data
    exec(compile(code, "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("out/image_6band_uint8_landcover.tif out/image_6band_uint8_probabilities.tif ")
    assert out[1].startswith("{'developed': ") and "'forest': " in out[1]
    assert (tmp_path / "out" / "landcover.gpkg").exists() and "polygons {" in out[2]
    assert out[3].startswith("OA ") and "'polygons': 34" in out[3]


def test_the_exit_codes_of_geoseg_help_are_the_readme_s() -> None:
    """`geoseg --help` left out 129 (SIGHUP), which the README's exit codes list."""
    from click.testing import CliRunner

    from geoseg_cli.main import cli

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = text.split("**Exit codes** (all commands):", 1)[1].split("all\nof these stop", 1)[0]
    readme_codes = set(re.findall(r"(?<![\w.])(\d{1,3})\s+(?=[a-z(])", listed))
    help_text = CliRunner().invoke(cli, ["--help"]).output.split("Exit codes:", 1)[1].split("Options:", 1)[0]
    help_codes = set(re.findall(r"(?<![\w.])(\d{1,3})\s+(?=[a-z(])", help_text))
    assert readme_codes == help_codes == {"0", "1", "2", "3", "4", "129", "130", "141", "143"}, (readme_codes, help_codes)


def test_every_train_config_key_is_in_the_readme() -> None:
    """min_labelled, power, grad_clip, ... were named only in the error that lists a misspelt key's choices."""
    import dataclasses

    from geoseg.train import TrainConfig

    text = (ROOT / "README.md").read_text(encoding="utf-8").split("**Every config key**", 1)[1].split("\n* ", 1)[0]
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "progress" and f"`{f.name}`" not in text]
    assert missing == []
