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
