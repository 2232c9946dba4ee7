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


def test_the_classes_advice_for_a_paddleseg_export_works_in_every_command(  # type: ignore[no-untyped-def]
        tiny_unet: tuple[Path, Path], scene: Path, tmp_path: Path, runner) -> None:
    """An export without class names: "pass --classes" was the advice of batch, info and export too, and
    batch and export had no --classes ("No such option"), info's took only a number."""
    from geoseg_cli.main import cli

    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder)
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "s.tif").write_bytes(scene.read_bytes())
    classes = tmp_path / "classes.yaml"
    classes.write_text("[a, b, c, d]\n")
    args = ["--model", str(folder), "--tile-size", "32", "--overlap", "0"]
    r = runner.invoke(cli, ["batch", str(arch), "--out", str(tmp_path / "b0"), *args])
    assert r.exit_code == 1 and "pass --classes" in r.output, r.output
    for spec, out in (("a,b,c,d", "b1"), (str(classes), "b2")):
        r = runner.invoke(cli, ["-q", "batch", str(arch), "--out", str(tmp_path / out), *args, "--classes", spec,
                                "--vector", "none"])
        assert r.exit_code == 0, r.output
        with rasterio.open(tmp_path / out / "s_landcover.tif") as ds:
            assert "\"name\": \"c\"" in ds.tags()["GEOSEG_CLASSES"]
    r = runner.invoke(cli, ["info", str(scene), "--model", str(folder)])
    assert r.exit_code == 1 and "pass --classes" in r.output, r.output
    r = runner.invoke(cli, ["info", str(scene), "--model", str(folder), "--classes", "a,b,c,d", "--json"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(cli, ["info", str(scene), "--no-model", "--classes", "9"]).exit_code == 0
    r = runner.invoke(cli, ["info", str(scene), "--no-model", "--classes", "-3"])  # (told to "drop --classes")
    assert r.exit_code == 2 and "-3 is not allowed: use a number >= 1" in r.output, r.output
    r = runner.invoke(cli, ["export", "--model", str(folder), "--out", str(tmp_path / "again")])
    assert r.exit_code == 2 and "is already an exported folder" in r.output and "--classes" not in r.output, r.output


def test_an_older_paddleseg_export_of_scores_is_not_read_as_labels(tiny_unet: tuple[Path, Path], scene: Path,
                                                                    tmp_path: Path) -> None:
    """PaddleSeg 2.0-2.7 wrote no output_op: geoseg takes labels then, and a graph exported with
    --with_softmax (or --without_argmax) returned 4 channels of scores, read as labels: the whole map
    the first class, exit 0. And the dygraph runtime on an export built the card's network untrained."""
    folder = tmp_path / "old"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder, output_op="softmax")
    deploy = yaml.safe_load((folder / "deploy.yaml").read_text())
    del deploy["Deploy"]["output_op"]
    (folder / "deploy.yaml").write_text(yaml.safe_dump(deploy))
    with pytest.raises(ModelError, match="returned 4-channel scores, not class labels: set Deploy.output_op"):
        segment_scene(scene, tmp_path / "o", model=str(folder), classes=["a", "b", "c", "d"],
                      options=PredictOptions(device="cpu", vector="none"))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*landcover*"))
    ours = tmp_path / "ours"
    weights, card_path = tiny_unet
    export_model_dir(ModelCard.load(card_path), weights, ours)
    with pytest.raises(ParameterError, match="an exported model runs through Paddle Inference only"):
        segment_scene(scene, tmp_path / "d", model=str(ours), options=PredictOptions(runtime="dygraph", vector="none"))


def test_a_malformed_paddleseg_deploy_yaml_is_named(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """A bad input_shape or mean was "unexpected error: ValueError: invalid literal for int()", and
    transforms written as a mapping were ignored (the model then took raw pixel values)."""
    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder, output_op="softmax")
    good = yaml.safe_load((folder / "deploy.yaml").read_text())
    for key, value, said in (("input_shape", [-1, "three", -1, -1], "its input_shape or Normalize cannot be read"),
                             ("transforms", [{"type": "Normalize", "mean": "0.5", "std": [0.25] * 3}],
                              "its input_shape or Normalize cannot be read"),
                             ("transforms", {"type": "Normalize", "mean": [0.5] * 3}, "must be a list of transforms")):
        bad = {"Deploy": {**good["Deploy"], key: value}}
        (folder / "deploy.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ModelError, match=said):
            load_exported(folder, classes=parse_classes("a,b,c,d"))


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
    with pytest.raises(ModelError, match="--classes") as err:
        load_exported(folder)
    # the reason alone: it was wrapped in "its input_shape or Normalize cannot be read (...): give input_shape as
    # [-1, C, H, W] ...", about a yaml that was fine (a ModelError is a ValueError)
    assert str(err.value).startswith(f"{folder} is a PaddleSeg export without class names: pass --classes")
    assert "cannot be read" not in str(err.value) and "input_shape" not in str(err.value)
    assert [c.name for c in parse_classes("a, b")] == ["a", "b"]  # type: ignore[union-attr]


def test_an_export_folder_without_its_deploy_file_says_so(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """Without deploy.yaml (or with one of neither section), an export was taken for a PaddleSeg export of 3
    bands: "pass --classes", then a Paddle crash ("input's channels is 3 ... filter's channels is 5")."""
    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder)
    (folder / "deploy.yaml").unlink()
    with pytest.raises(ModelError, match=f"^exported model folder {folder} has no deploy.yaml .*export it again"):
        load_exported(folder, classes=parse_classes("a,b,c,d"))
    (folder / "deploy.yaml").write_text("::: not yaml\n")
    with pytest.raises(ModelError, match="has neither a Deploy nor a geoseg section"):
        load_exported(folder, classes=parse_classes("a,b,c,d"))


def test_a_truncated_export_is_one_line_that_says_so(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """A cut-off model.pdiparams was Paddle's two lines: "(Unavailable) Cannot read tensor desc size" and a
    C++ hint with its source path, and no advice."""
    from geoseg.models.inference import InferencePredictor, find_model_files

    folder = tmp_path / "pseg"
    folder.mkdir()
    _paddleseg_export(tiny_unet, folder)
    model_file, params_file = find_model_files(folder)
    params_file.write_bytes(params_file.read_bytes()[: params_file.stat().st_size // 3])
    with pytest.raises(ModelError) as err:
        InferencePredictor(model_file, params_file, device="cpu")
    said = str(err.value)
    assert "\n" not in said and said.startswith(f"Paddle Inference cannot load {model_file} with {params_file.name}: ")
    assert said.endswith("the export may be truncated or corrupt, or from a newer Paddle; export it again (geoseg "
                         "export)")


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


def test_an_out_below_a_file_is_named(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """--out under a file said only "cannot create export folder ...: File exists"."""
    weights, card_path = tiny_unet
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ParameterError, match=r"afile is a file, not a folder: choose another --out"):
        export_model_dir(ModelCard.load(card_path), weights, tmp_path / "afile" / "sub" / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_export_without_weights_is_refused(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """export_model_dir(card, None, out) exported a randomly initialised network without a word."""
    with pytest.raises(ParameterError, match="give its weights .*exported untrained"):
        export_model_dir(ModelCard.load(tiny_unet[1]), None, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


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


@pytest.fixture
def uint16_model(tiny_unet: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny model as ``geoseg train`` leaves one for a uint16 scene: its card's statistics are of
    ``x * 0.0001`` and its ``training.image`` is that scene. Returns (weights, card, scene)."""
    import shutil

    from geoseg.card import Normalization

    rng = np.random.default_rng(23)
    base = rng.integers(300, 4000, size=(3, 12, 16)).astype(np.float64)
    img = np.kron(base, np.ones((1, 8, 8)))[:, :96, :128] + rng.normal(0, 150, (3, 96, 128))
    img = np.clip(img, 1, 9000).astype(np.uint16)
    img[:, :5, :7] = 0
    scene = write_raster(tmp_path / "u16.tif", img, nodata=0)
    valid = img[:, 5:, 7:].reshape(3, -1) * 1e-4
    weights, card_path = tiny_unet
    card = ModelCard.load(card_path).replace(
        name="tiny-u16", normalization=Normalization(mean=tuple(valid.mean(1)), std=tuple(valid.std(1))),
        training={"image": str(scene), "bands": [1, 2, 3], "seed": 0}, tile_size=32, overlap=8,
        weights="weights.pdparams")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(weights, run / "weights.pdparams")
    card.save(run / "weights.yaml")
    return run / "weights.pdparams", run / "weights.yaml", scene


def test_paddleseg_normalize_is_exact_for_the_training_dtype(uint16_model: tuple[Path, Path, Path],
                                                             tmp_path: Path) -> None:
    # PaddleSeg's Normalize is (x / 255 - mean) / std for every dtype; the card's mean/std used to be
    # written as they are, right for uint8 only: a uint16 model's PaddleSeg section normalised
    # x * 0.0001 as if it were x / 255, and a PaddleSeg user (or geoseg reading the export without
    # its geoseg: section) got another map (0.9 % of pixels agreed on a Landsat-8 run).
    import shutil

    weights, card_path, scene = uint16_model
    card = ModelCard.load(card_path)
    folder = export_model_dir(card, weights, tmp_path / "exp")
    text = (folder / "deploy.yaml").read_text()
    deploy = yaml.safe_load(text)
    assert deploy["normalize_for"]["dtype"] == "uint16" and deploy["normalize_for"]["scale"] == pytest.approx(1e-4)
    assert str(scene) in deploy["normalize_for"]["source"] and "exact for uint16 input only" in text
    assert "divided by\n# 255 * 0.0001" in text
    (norm,) = deploy["Deploy"]["transforms"]
    assert set(norm) == {"type", "mean", "std"}  # PaddleSeg passes a transform's keys to its class
    x = np.random.default_rng(1).integers(0, 65535, size=(3, 20, 30)).astype(np.uint16)
    mean = np.asarray(norm["mean"], np.float64).reshape(-1, 1, 1)
    std = np.asarray(norm["std"], np.float64).reshape(-1, 1, 1)
    paddleseg = (x.astype(np.float64) / 255.0 - mean) / std  # paddleseg.transforms.functional.normalize
    np.testing.assert_allclose(paddleseg, card.normalization.apply(x, "uint16"), rtol=1e-5, atol=1e-4)

    # predict through the export read the PaddleSeg way (no geoseg: section) = predict --weights
    pseg = tmp_path / "pseg"
    pseg.mkdir()
    for p in folder.glob("model.*"):
        shutil.copy(p, pseg / p.name)
    (pseg / "deploy.yaml").write_text(yaml.safe_dump({k: v for k, v in deploy.items() if k != "geoseg"}))
    opts = PredictOptions(device="cpu", tile_size=32, overlap=8)  # the PaddleSeg section has no windows
    ref = _mask(segment_scene(scene, tmp_path / "w.tif", weights=weights, options=opts).mask)
    ps = _mask(segment_scene(scene, tmp_path / "ps.tif", model=pseg, classes=[c.name for c in card.classes],
                             options=opts).mask)
    own = _mask(segment_scene(scene, tmp_path / "own.tif", model=folder, options=opts).mask)
    assert len(np.unique(ref[ref != 255])) > 1  # a map, not one class everywhere
    valid = ref != 255
    assert (ps[valid] == ref[valid]).mean() >= 0.999 and (own == ref).mean() >= 0.999


def test_export_input_dtype_sources(tiny_unet: tuple[Path, Path], uint16_model: tuple[Path, Path, Path],
                                    tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from geoseg.errors import GeosegWarning
    from geoseg.exported import paddleseg_normalize, training_dtype
    from geoseg_cli.main import cli

    weights, card_path, scene = uint16_model
    card = ModelCard.load(card_path)
    assert training_dtype(card, weights)[0] == "uint16"
    assert training_dtype(card.replace(training={**card.training, "dtype": "int16"}))[0] == "int16"
    # a relative training path is looked up from the weights' folders too (the shipped models' sample scene)
    rel = card.replace(training={"image": scene.name})
    assert training_dtype(rel, weights)[0] == "uint16"
    # installed from a wheel (no sample_data, weights outside a checkout): the shipped cards' sample scene is
    # known (export warned "cannot be read ... pass --input-dtype", which its user could not know)
    sample = card.replace(training={"image": "sample_data/nc_landsat7/image_6band_uint8.tif"})
    monkeypatch.chdir(tmp_path)
    assert training_dtype(sample, tmp_path / "site-packages" / "geoseg" / "weights" / "unet.pdparams") == (
        "uint8", "training image sample_data/nc_landsat7/image_6band_uint8.tif (geoseg's sample scene)")
    # float input (scale 1) is exact by the same formula: mean / 255
    mean, std, scale = paddleseg_normalize(card, "float32")
    assert scale == 1.0 and mean[0] == pytest.approx(card.normalization.mean[0] / 255)
    with pytest.raises(ParameterError, match="input dtype 'int8'"):
        paddleseg_normalize(card, "int8")
    # a trained card whose training image is gone: uint8 (the card's own mean/std), warned and said in the yaml
    gone = card.replace(training={"image": str(tmp_path / "moved.tif")})
    with pytest.warns(GeosegWarning, match="cannot be read.*--input-dtype"):
        export_model_dir(gone, weights, tmp_path / "gone")
    d = yaml.safe_load((tmp_path / "gone" / "deploy.yaml").read_text())
    assert d["normalize_for"]["dtype"] == "uint8" and d["normalize_for"]["source"].startswith("assumed uint8")
    assert d["Deploy"]["transforms"][0]["mean"] == pytest.approx(list(card.normalization.mean))
    # --input-dtype chooses
    r = runner.invoke(cli, ["-q", "export", "--weights", str(weights), "--out", str(tmp_path / "f"),
                            "--input-dtype", "float32"])
    assert r.exit_code == 0, r.output
    d = yaml.safe_load((tmp_path / "f" / "deploy.yaml").read_text())
    assert d["normalize_for"] == {"dtype": "float32", "scale": 1.0, "source": "given (--input-dtype)"}
    assert d["Deploy"]["transforms"][0]["std"] == pytest.approx([s / 255 for s in card.normalization.std])


def test_deploy_yaml_says_which_class_id_each_output_index_is(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """A PaddleSeg consumer of the export gets argmax indices 0..N-1: where the class ids differ (the NC
    models' 1..7, a cloud model's 0, 1, 4), deploy.yaml's header says which id each index is."""
    from geoseg.card import ClassInfo

    weights, card_path = tiny_unet
    card = ModelCard.load(card_path)
    plain = (export_model_dir(card, weights, tmp_path / "plain") / "deploy.yaml").read_text()
    assert "class index" not in plain  # ids 0..3: nothing to say
    cloud = card.replace(classes=(ClassInfo(0, "cloud", (255, 255, 255)), ClassInfo(1, "shadow", (60, 60, 60)),
                                  ClassInfo(4, "clear", (40, 160, 40)), ClassInfo(7, "snow", (200, 200, 255))))
    text = (export_model_dir(cloud, weights, tmp_path / "cloud") / "deploy.yaml").read_text()
    assert ("# PaddleSeg's prediction is the class index k, not the class id: 0 -> 0 (cloud), 1 -> 1 (shadow), "
            "2 -> 4 (clear), 3 -> 7 (snow).\n") in text
    assert yaml.safe_load(text)["Deploy"]["output_op"] == "none"  # (still a YAML file)


def test_an_interrupted_export_is_an_interrupt_and_a_failed_one_one_line(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the first export (Paddle's program translation) came back as a 34-line ModelError: Paddle
    turns the pending interrupt into a SystemError, or its own error quoting the traceback. A host's Ctrl-C
    handling needs the KeyboardInterrupt; a real failure is one line."""
    import paddle

    from geoseg.models.inference import export_model

    weights, card_path = tiny_unet
    layer = build_layer(ModelSource(ModelCard.load(card_path), weights=weights))

    def interrupted(*a, **k):  # type: ignore[no-untyped-def]
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise SystemError("<class 'UnicodeDecodeError'> returned a result with an exception set") from exc

    monkeypatch.setattr(paddle.jit, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(layer, tmp_path / "a" / "model", 3)

    def quoted(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("In transformed code:\n\n    File \"x.py\", line 3, in forward\n\tKeyboardInterrupt")

    monkeypatch.setattr(paddle.jit, "save", quoted)
    with pytest.raises(KeyboardInterrupt):
        export_model(layer, tmp_path / "b" / "model", 3)

    def failing(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("In transformed code:\n\n    File \"x.py\", line 3, in forward\n\tValueError: bad shape")

    monkeypatch.setattr(paddle.jit, "save", failing)
    with pytest.raises(ModelError) as info:
        export_model(layer, tmp_path / "c" / "model", 3)
    assert str(info.value).endswith("RuntimeError: ValueError: bad shape") and "\n" not in str(info.value)


def test_cached_exports_unused_for_a_month_are_removed(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model predicted with on CPU left its 12-24 MB export in ~/.cache/geoseg for good (52 entries in a
    service's walkthrough): an export unused for EXPORT_CACHE_DAYS goes when another is made; each use renews."""
    import time

    import geoseg.engine as engine

    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(tmp_path / "cache"))
    exports = tmp_path / "cache" / "exports"
    old, recent = exports / "0", exports / "1"
    month = engine.EXPORT_CACHE_DAYS * 86400
    for d, age in ((old, month + 3600), (recent, month - 3600)):
        d.mkdir(parents=True)
        (d / "DONE").write_text("ok\n")
        os.utime(d / "DONE", (time.time() - age, time.time() - age))
    weights, card_path = tiny_unet
    source = ModelSource(ModelCard.load(card_path), weights=weights)
    target = engine.exported_for_inference(source)
    assert not old.exists() and recent.exists() and (target / "DONE").exists()
    os.utime(target / "DONE", (time.time() - month - 3600,) * 2)
    assert engine.exported_for_inference(source) == target  # used again: renewed, not removed by the next export
    assert time.time() - (target / "DONE").stat().st_mtime < 600


def test_a_signal_during_the_export_is_handled_once_it_is_over(tiny_unet: tuple[Path, Path], tmp_path: Path) -> None:
    """A SIGTERM handler's exception raised inside paddle's program translation came back as paddle's own
    error (exit 1, or 130 for a SIGTERM) or killed the process with a segmentation fault (a SIGTERM a
    second into a first predict). The export holds the handlers back and calls them once it is over."""
    import os
    import signal

    from geoseg.card import ModelCard
    from geoseg.models import build_model
    from geoseg.models.checkpoints import load_weights
    from geoseg.models.inference import export_model

    card = ModelCard.load(tiny_unet[1])
    model = build_model(card.architecture, **card.model_kwargs())
    load_weights(model, tiny_unet[0])
    calls: list[bool] = []

    class Stop(KeyboardInterrupt):
        pass

    def handler(signum, frame):  # type: ignore[no-untyped-def]
        calls.append(True)
        raise Stop

    real_save = __import__("paddle").jit.save

    def save(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGTERM)  # in the middle of the translation
        for _ in range(1000):  # (bytecodes for a pending handler to run at)
            pass
        assert not calls  # held back
        return real_save(*args, **kwargs)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("paddle.jit.save", save)
            with pytest.raises(Stop):
                export_model(model, tmp_path / "x" / "model", card.in_channels)
        assert calls == [True] and signal.getsignal(signal.SIGTERM) is handler
        assert (tmp_path / "x" / "model.pdiparams").exists()  # the export itself finished first
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_export_told_a_run_folder_names_the_option_that_takes_it(tiny_unet: tuple[Path, Path], tmp_path: Path,
                                                                 runner) -> None:  # type: ignore[no-untyped-def]
    """export --model RUN said to give an exported folder, which export refuses."""
    import shutil

    from geoseg_cli.main import cli

    run = tmp_path / "run1"
    run.mkdir()
    shutil.copy(tiny_unet[0], run / "weights.pdparams")
    shutil.copy(tiny_unet[1], run / "weights.yaml")
    r = runner.invoke(cli, ["export", "--model", str(run), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and f"--model {run} is a training run's folder: pass --weights {run}" in r.output, r.output
    r = runner.invoke(cli, ["export", "--model", "nonet", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "unknown model 'nonet'" in r.output and "exported model folder" not in r.output
