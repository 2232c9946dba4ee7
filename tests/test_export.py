"""geoseg export: Paddle Inference folders (geoseg's and PaddleSeg-style) run through predict."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from tests.conftest import write_raster

paddle = pytest.importorskip("paddle")

from geoseg.card import ModelCard
from geoseg.engine import ModelSource, PredictOptions, build_layer, segment_scene
from geoseg.errors import ModelError, ParameterError
from geoseg.exported import export_model_dir, load_exported, parse_classes


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    base = rng.integers(20, 230, size=(3, 12, 16)).astype(np.float64)
    img = np.kron(base, np.ones((1, 8, 8)))[:, :96, :128] + rng.normal(0, 6, (3, 96, 128))
    img = np.clip(img, 1, 255).astype(np.uint8)
    img[:, :5, :7] = 0
    return write_raster(tmp_path / "scene.tif", img, nodata=0)


def _mask(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_export_then_inference_matches_dygraph(tiny_unet: tuple[Path, Path], scene: Path, tmp_path: Path) -> None:
    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    folder = export_model_dir(card, weights, tmp_path / "exp")
    deploy = yaml.safe_load((folder / "deploy.yaml").read_text())
    dep = deploy["Deploy"]
    assert (folder / dep["model"]).is_file() and (folder / dep["params"]).is_file()
    assert dep["transforms"][0] == {"type": "Normalize", "mean": [0.5] * 3, "std": [0.25] * 3}
    assert dep["input_shape"] == [-1, 3, -1, -1] and dep["output_op"] == "none"
    assert ModelCard.from_dict({**deploy["geoseg"], "weights": None}).classes == card.classes

    src = load_exported(folder)
    assert src.export_dir == folder and src.output == "logits" and src.card.classes == card.classes
    a = segment_scene(scene, tmp_path / "a.tif", model=folder, options=PredictOptions(device="cpu"))
    assert a.device.startswith("cpu/inference")
    b = segment_scene(scene, tmp_path / "b.tif", weights=weights, card=card_path,
                      options=PredictOptions(device="cpu", runtime="dygraph"))
    ma, mb = _mask(a.mask), _mask(b.mask)
    assert (ma == mb).mean() >= 0.999
    assert (ma[:5, :7] == 255).all()


def test_cli_export_and_predict_folder(tiny_unet: tuple[Path, Path], scene: Path, tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    weights, _card_path = tiny_unet
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "e"),
                            "--output-op", "softmax"])
    assert r.exit_code == 0, r.output
    assert load_exported(tmp_path / "e").output == "probs"
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "not empty" in r.output
    # missing parent folders are made, as train and ensemble make theirs; a file in the way is one line
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "new" / "deep" / "e")])
    assert r.exit_code == 0 and (tmp_path / "new" / "deep" / "e" / "deploy.yaml").is_file(), r.output
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "afile" / "e")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "cannot create export folder" in r.output, \
        r.output
    r = runner.invoke(cli, ["-q", "predict", str(scene), "--model", str(tmp_path / "e"), "--out", str(tmp_path / "p.tif"),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = _mask(tmp_path / "p.tif")
    assert set(np.unique(m)) <= {0, 1, 2, 3, 255}


def _paddleseg_export(tiny_unet: tuple[Path, Path], folder: Path, output_op: str = "argmax") -> None:
    """An export laid out as PaddleSeg's export.py writes it (model + params + deploy.yaml)."""
    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    net = build_layer(ModelSource(card=card, weights=weights))

    class Wrapped(paddle.nn.Layer):  # PaddleSeg appends argmax/softmax after the logits
        def __init__(self, inner: paddle.nn.Layer, argmax: bool) -> None:
            super().__init__()
            self.inner = inner
            self.argmax = argmax  # an attribute: Paddle 2.6's dy2static cannot see a closure's variables

        def forward(self, x: paddle.Tensor) -> paddle.Tensor:
            y = self.inner(x)[0]
            if self.argmax:
                return paddle.argmax(y, axis=1, keepdim=True, dtype="int32")
            return paddle.nn.functional.softmax(y, axis=1)

    model = Wrapped(net, output_op == "argmax")
    model.eval()
    spec = paddle.static.InputSpec([None, 3, None, None], "float32", name="x")
    paddle.jit.save(model, str(folder / "model"), input_spec=[spec])
    program = next(p.name for p in folder.iterdir() if p.suffix in (".json", ".pdmodel"))
    deploy = {"Deploy": {
        "model": program, "params": "model.pdiparams",
        "transforms": [{"type": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}],
        "input_shape": [-1, 3, -1, -1], "output_op": output_op, "output_dtype": "int32",
    }}
    (folder / "deploy.yaml").write_text(yaml.safe_dump(deploy))


def test_paddleseg_export_is_accepted_by_predict(tiny_unet: tuple[Path, Path], scene: Path, tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder)
    r = runner.invoke(cli, ["predict", str(scene), "--model", str(folder), "--out", str(tmp_path / "x.tif")])
    assert r.exit_code == 1 and "--classes" in r.output
    r = runner.invoke(cli, ["-q", "predict", str(scene), "--model", str(folder), "--classes", "a,b,c,d",
                            "--out", str(tmp_path / "ps.tif"), "--overlap", "0", "--tile-size", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    weights, card_path = tiny_unet
    ref = segment_scene(scene, tmp_path / "ref.tif", weights=weights, card=card_path,
                        options=PredictOptions(device="cpu", runtime="inference", overlap=0, tile_size=32))
    m, mr = _mask(tmp_path / "ps.tif"), _mask(ref.mask)
    # Windows do not overlap (96x128 in 32-pixel windows), so argmax labels blend exactly.
    assert (m == mr).mean() >= 0.999
    with rasterio.open(tmp_path / "ps.tif") as ds:
        assert "\"name\": \"c\"" in ds.tags()["GEOSEG_CLASSES"]
    # too few names for the model's classes: said, with what to do (argmax labels and logits alike)
    for op in ("argmax", "none"):
        _paddleseg_export(tiny_unet, folder, output_op=op)
        r = runner.invoke(cli, ["predict", str(scene), "--model", str(folder), "--classes", "a,b",
                                "--out", str(tmp_path / f"few_{op}.tif"), "--tile-size", "32", "--overlap", "0",
                                "--device", "cpu"])
        assert r.exit_code == 1 and "give one class per output" in r.output, r.output
        assert not (tmp_path / f"few_{op}.tif").exists()
    # an argmax export returns labels: nothing to adapt or to write as probabilities (the card's
    # adapt_prior default is dropped; asking for them is refused before any output)
    _paddleseg_export(tiny_unet, folder, output_op="argmax")
    for opt in (["--adapt-prior"], ["--probabilities", "uint8"], ["--confidence", "uint8"]):
        r = runner.invoke(cli, ["predict", str(scene), "--model", str(folder), "--classes", "a,b,c,d", *opt,
                                "--out", str(tmp_path / "lab.tif")])
        assert r.exit_code == 1 and f"{opt[0]}: " in r.output and "returns class labels" in r.output, r.output
        assert not (tmp_path / "lab.tif").exists()
    r = runner.invoke(cli, ["predict", str(scene), "--model", str(folder), "--classes", "a,b,A,c",
                            "--out", str(tmp_path / "dup.tif")])
    assert r.exit_code == 1 and "--classes gives the names a twice" in r.output, r.output
    # --classes is for exported folders without class names: not silently ignored for a model with a card
    r = runner.invoke(cli, ["predict", str(scene), "--weights", str(weights), "--classes", "a,b,c,d",
                            "--out", str(tmp_path / "card.tif")])
    assert r.exit_code == 1 and "this model's card names them: drop --classes" in r.output, r.output


def test_load_exported_paddleseg_card_and_classes(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder, output_op="softmax")
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml.safe_dump([{"id": 7, "name": "w", "color": [0, 0, 255]}, "x", "y", "z"]))
    src = load_exported(folder, classes=classes)
    assert src.output == "probs" and src.card.in_channels == 3
    assert [c.id for c in src.card.classes] == [7, 1, 2, 3]
    assert src.card.normalization.scale_for("uint16") == pytest.approx(1 / 255)
    with pytest.raises(ModelError, match="--classes"):
        load_exported(folder)
    assert [c.name for c in parse_classes("a, b")] == ["a", "b"]  # type: ignore[union-attr]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid



def _export_files(folder: Path) -> bool:
    """``folder`` holds one whole export and nothing else: deploy.yaml, the program (model.json with
    Paddle 3.x, model.pdmodel with 2.6) and its parameters (2.6 adds model.pdiparams.info)."""
    from geoseg.exported import EXPORT_FILES

    names = {p.name for p in folder.iterdir()}
    return "deploy.yaml" in names and "model.pdiparams" in names and bool({"model.json", "model.pdmodel"} & names) \
        and names <= set(EXPORT_FILES)


def test_a_stopped_export_leaves_nothing_under_the_target_name(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, runner) -> None:  # type: ignore[no-untyped-def]
    # The export used to be written straight into --out: a kill after model.json left a folder that
    # predict took for a PaddleSeg export and a new export refused as not empty.
    import geoseg.models.inference as inference
    from geoseg.atomic import TMP_PREFIX, _host_tag
    from geoseg_cli.main import cli

    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    real = inference.export_model

    def killed(net: object, prefix: Path, channels: int) -> Path:
        real(net, prefix, channels)
        Path(f"{prefix}.pdiparams").write_bytes(b"trunc")
        raise KeyboardInterrupt  # as SIGTERM/Ctrl-C arrive, mid-write

    with monkeypatch.context() as m:
        m.setattr(inference, "export_model", killed)
        with pytest.raises(KeyboardInterrupt):
            export_model_dir(card, weights, tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a SIGKILL leaves the hidden folder: the next export to that target removes it (not another target's,
    # nor one a running export is writing)
    dead, live = _dead_pid(), os.getppid()
    host = _host_tag()  # (temp names say which machine's process writes them)
    left = [tmp_path / f"{TMP_PREFIX}e.{host}-{dead}-0123abcd.tmp", tmp_path / f"{TMP_PREFIX}e2.{host}-{dead}-0123abcd.tmp",
            tmp_path / f"{TMP_PREFIX}e.{host}-{live}-89abcdef.tmp"]
    for d in left:
        d.mkdir()
        (d / "model.json").write_text("{")
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["e", left[1].name, left[2].name])
    assert _export_files(tmp_path / "e")
    assert load_exported(tmp_path / "e").card.classes == card.classes


def test_overwrite_replaces_an_export_whole_or_not_at_all(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.models.inference as inference
    from geoseg.atomic import TMP_PREFIX, _host_tag

    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    out = tmp_path / "e"
    out.mkdir()  # an existing empty folder is an export target like an absent one
    assert export_model_dir(card, weights, out) == out and load_exported(out).output == "logits"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(inference, "export_model", stopped)
        with pytest.raises(KeyboardInterrupt):
            export_model_dir(card, weights, out, output_op="softmax", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    export_model_dir(card, weights, out, output_op="softmax", overwrite=True)
    assert load_exported(out).output == "probs" and sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    # a previous export moved aside by a killed --overwrite, the new one not yet in: put back
    aside = tmp_path / f"{TMP_PREFIX}e.{_host_tag()}-{_dead_pid()}-0123abcd.old.tmp"
    out.rename(aside)
    with pytest.raises(ParameterError, match="is not empty"):
        export_model_dir(card, weights, out)
    assert load_exported(out).output == "probs" and sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    # --overwrite replaces the whole folder: one holding other files is refused, nothing removed
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ParameterError, match=r"holds more than an export \(notes.txt\)") as e:
        export_model_dir(card, weights, out, overwrite=True)
    assert "\n" not in str(e.value) and (out / "notes.txt").read_text() == "mine"


def test_overwrite_of_the_working_folder_keeps_it(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Swapping folders would leave the process (and the user's shell) in a deleted folder: `--out .`
    # gets its files replaced in place instead, deploy.yaml last.
    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    export_model_dir(card, weights, ".")
    ino = here.stat().st_ino
    export_model_dir(card, weights, ".", output_op="argmax", overwrite=True)
    assert here.stat().st_ino == ino and Path.cwd() == here and load_exported(here).output == "labels"
    assert _export_files(here)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
