"""Seed ensembles: the averaging layer, float16 weights, `geoseg ensemble`, and predict/export of the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.conftest import write_raster

paddle = pytest.importorskip("paddle")

from geoseg.card import ModelCard, default_card
from geoseg.engine import ModelSource, PredictOptions, build_layer, segment_scene
from geoseg.ensemble import combine_models, member_source
from geoseg.errors import ModelError, OutputExistsError
from geoseg.models import build_model
from geoseg.models.checkpoints import load_weights, read_state_dict, save_weights


def _run(folder: Path, seed: int, *, classes: int = 4, prior: tuple[float, ...] | None = None, **card_changes) -> Path:  # type: ignore[no-untyped-def]
    """A 'geoseg train'-like output folder: a seeded random tiny UNet + its card."""
    paddle.seed(seed)
    card = default_card("unet", 3, classes, params={"width": 0.125}, tile_size=64, overlap=16)
    card = card.replace(weights="weights.pdparams", training={"seed": seed}, metrics={"validation": {"miou": 0.5}},
                        class_prior=prior, adapt_prior=prior is not None, **card_changes)
    folder.mkdir(parents=True)
    save_weights(build_model("unet", **card.model_kwargs()), folder / "weights.pdparams")
    card.save(folder / "weights.yaml")
    return folder


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(11)
    img = np.kron(rng.integers(20, 230, size=(3, 10, 12)), np.ones((1, 8, 8)))[:, :72, :90]
    img = np.clip(img + rng.normal(0, 6, img.shape), 1, 255).astype(np.uint8)
    img[:, :4, :6] = 0
    return write_raster(tmp_path / "scene.tif", img, nodata=0)


def test_ensemble_layer_averages_member_probabilities() -> None:
    paddle.seed(3)
    net = build_model("unet", in_channels=3, num_classes=5, width=0.125, members=3)
    net.eval()
    x = paddle.randn([2, 3, 32, 32])
    out = net(x)
    assert len(out) == 1 and out[0].shape == [2, 5, 32, 32]
    by_hand = np.mean([paddle.nn.functional.softmax(m(x)[0], axis=1).numpy() for m in net.members], axis=0)
    np.testing.assert_allclose(np.exp(out[0].numpy()), by_hand, rtol=1e-5, atol=1e-7)
    # members are independent networks (different initialisations), so the average is not one of them
    single = paddle.nn.functional.softmax(net.members[0](x)[0], axis=1).numpy()
    assert np.abs(single - by_hand).max() > 1e-3
    assert sorted({k.split(".")[1] for k in net.state_dict()}) == ["0", "1", "2"]


@pytest.mark.parametrize("members", [0, -1, 1.5, True, "2"])
def test_invalid_members_refused(members: object) -> None:
    with pytest.raises(ModelError, match="members must be a positive integer"):
        build_model("unet", in_channels=3, num_classes=2, width=0.125, members=members)


def test_members_1_is_the_plain_network() -> None:
    net = build_model("unet", in_channels=3, num_classes=2, width=0.125, members=1)
    assert not hasattr(net, "members") and not any(k.startswith("members.") for k in net.state_dict())


def test_float16_weights_load_back_as_float32(tmp_path: Path) -> None:
    paddle.seed(1)
    net = build_model("unet", in_channels=3, num_classes=4, width=0.125)
    net.eval()
    full = save_weights(net, tmp_path / "f.pdparams")
    half = save_weights(net, tmp_path / "h.pdparams", dtype="float16")
    assert {str(v.dtype) for v in read_state_dict(half).values()} == {"paddle.float16"}
    assert half.stat().st_size < 0.6 * full.stat().st_size
    again = build_model("unet", in_channels=3, num_classes=4, width=0.125)
    load_weights(again, half)
    again.eval()
    assert all(str(v.dtype) == "paddle.float32" for v in again.state_dict().values())
    x = paddle.randn([1, 3, 32, 32])
    a, b = net(x)[0].numpy(), again(x)[0].numpy()
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()  # rounded, not lost
    with pytest.raises(ValueError, match="float16"):
        save_weights(net, tmp_path / "x.pdparams", dtype="int8")
    # a value past float16's range (a batch-norm variance of raw 16-bit inputs) became inf: NaN outputs
    name = next(k for k in net.state_dict() if k.endswith("_variance"))
    big = net.state_dict()[name].numpy().copy()
    big[0] = 4.0e6
    net.set_state_dict({name: paddle.to_tensor(big)})
    stored = read_state_dict(save_weights(net, tmp_path / "big.pdparams", dtype="float16"))
    assert str(stored[name].dtype) == "paddle.float32" and stored[name].numpy()[0] == 4.0e6
    assert sum(str(v.dtype) == "paddle.float16" for v in stored.values()) == len(stored) - 1  # the others halved
    load_weights(again, tmp_path / "big.pdparams")
    assert np.isfinite(again(x)[0].numpy()).all()


def test_combine_writes_card_and_weights_that_predict_and_export(tmp_path: Path, scene: Path) -> None:
    runs = [_run(tmp_path / f"s{s}", s, prior=p) for s, p in ((0, (0.1, 0.2, 0.3, 0.4)), (1, (0.3, 0.3, 0.2, 0.2)))]
    card_path = combine_models([member_source(r) for r in runs], tmp_path / "ens")
    src = member_source(tmp_path / "ens")
    card = src.card
    assert card_path == tmp_path / "ens" / "weights.yaml" and card.weights == "weights.pdparams"
    assert card.params == {"width": 0.125, "members": 2}
    assert card.training["seeds"] == [0, 1] and card.metrics == {}
    np.testing.assert_allclose(card.class_prior, (0.2, 0.25, 0.25, 0.3), atol=1e-6)
    assert card.adapt_prior is True
    assert card.name.endswith("-ensemble") and "seeds 0, 1" in card.description
    # the run folders themselves, as geoseg ensemble takes them (was AttributeError: 'str' ... 'card')
    again = combine_models([str(r) for r in runs], tmp_path / "ens_paths")
    got, want_sd = paddle.load(str(again.parent / "weights.pdparams")), paddle.load(str(tmp_path / "ens" / "weights.pdparams"))
    assert sorted(got) == sorted(want_sd) and all(np.array_equal(np.asarray(got[k]), np.asarray(want_sd[k])) for k in got)

    # the combined model is exactly the average of the members (float16-rounded weights)
    ens = build_layer(src)
    members = [build_layer(member_source(r)) for r in runs]
    for m in members:  # the members' weights rounded to float16 as the ensemble stores them
        m.set_state_dict({k: paddle.to_tensor(v.numpy().astype(np.float16).astype(v.numpy().dtype))
                          for k, v in m.state_dict().items()})
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    want = np.mean([paddle.nn.functional.softmax(m(x)[0], axis=1).numpy() for m in members], axis=0)
    np.testing.assert_allclose(np.exp(ens(x)[0].numpy()), want, atol=2e-5)

    # predict: dygraph and Paddle Inference (the cached export) agree; nodata stays nodata
    opts = {"device": "cpu", "adapt_prior": False}
    a = segment_scene(scene, tmp_path / "a.tif", weights=tmp_path / "ens" / "weights.pdparams",
                      options=PredictOptions(runtime="inference", **opts))
    b = segment_scene(scene, tmp_path / "b.tif", source=src, options=PredictOptions(runtime="dygraph", **opts))
    with rasterio.open(a.mask) as da, rasterio.open(b.mask) as db:
        ma, mb = da.read(1), db.read(1)
    assert (ma == mb).mean() >= 0.999 and (ma[:4, :6] == 255).all()
    assert len(np.unique(ma[ma != 255])) >= 2


def test_combine_refuses_bad_members(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    with pytest.raises(ModelError, match="at least 2 members"):
        combine_models([member_source(a)], tmp_path / "e1")
    with pytest.raises(ModelError, match="same weights"):
        combine_models([member_source(a), member_source(a)], tmp_path / "e2")
    other = _run(tmp_path / "c", 2, classes=5)
    with pytest.raises(ModelError, match="differs from member 1 .* classes"):
        combine_models([member_source(a), member_source(other)], tmp_path / "e3")
    combine_models([member_source(a), member_source(b)], tmp_path / "e4")
    with pytest.raises(ModelError, match="already an ensemble"):
        combine_models([member_source(tmp_path / "e4"), member_source(a)], tmp_path / "e5")
    with pytest.raises(OutputExistsError):
        combine_models([member_source(b), member_source(a)], tmp_path / "e4")
    for name in ("e1", "e2", "e3", "e5"):  # refused before anything is written
        assert not (tmp_path / name).exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weights.pdparams"):
        member_source(tmp_path / "empty")
    # a model source without weights (an exported folder) cannot be combined
    with pytest.raises(ModelError, match="no weights file"):
        combine_models([ModelSource(card=member_source(a).card), member_source(b)], tmp_path / "e6")
    # the shipped models (ensembles) are not offered as members, which they cannot be; teachers may be one
    with pytest.raises(ModelError, match=r"^member /nonexist does not exist: give a 'geoseg train' output folder or a "
                                         r"\.pdparams file$"):
        member_source("/nonexist")
    with pytest.raises(ModelError, match=r"teacher /nonexist .* or a shipped model name \(deeplabv3p, unet\)$"):
        member_source("/nonexist", "teacher")


def test_a_shipped_name_beside_a_folder_of_that_name_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`geoseg ensemble unet runs/s1` beside a run trained with --out unet took the folder without a word (predict's
    --model refuses the same); ./unet is the folder, and the name alone elsewhere is the shipped model."""
    run = _run(tmp_path / "unet", 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"names geoseg's shipped unet.*\./unet"):
        member_source("unet")
    assert Path(member_source("./unet").weights).resolve() == run / "weights.pdparams"
    monkeypatch.chdir(run)
    assert member_source("unet").card.in_channels == 5  # (the shipped UNet; the run's takes 3 bands)


def test_cli_ensemble(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)
    r = runner.invoke(cli, ["-q", "ensemble", str(a), str(b / "weights.pdparams"), "--out", str(tmp_path / "e"),
                            "--float32", "--name", "two"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(tmp_path / "e" / "weights.yaml")
    card = member_source(tmp_path / "e").card
    assert card.name == "two" and card.params["members"] == 2
    assert {str(v.dtype) for v in read_state_dict(tmp_path / "e" / "weights.pdparams").values()} == {"paddle.float32"}
    r = runner.invoke(cli, ["-q", "ensemble", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "f")])
    assert r.exit_code != 0 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["-q", "ensemble", str(a), str(b), "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "--overwrite" in r.output
    # a member's own folder: --overwrite replaced that member's weights and card with the ensemble
    before = (a / "weights.pdparams").read_bytes()
    r = runner.invoke(cli, ["-q", "ensemble", str(a), str(b), "--out", str(a), "--overwrite"])
    assert r.exit_code == 1 and "is member 1's run folder" in r.output, r.output
    assert (a / "weights.pdparams").read_bytes() == before


def test_train_refuses_members(tmp_path: Path) -> None:
    from geoseg.errors import ParameterError
    from geoseg.train import TrainConfig

    with pytest.raises(ParameterError, match="geoseg ensemble"):
        TrainConfig.from_mapping({"image": "x.tif", "labels": "y.tif", "model": "unet", "params": {"members": 3}})


def test_a_stopped_overwrite_never_leaves_new_weights_beside_the_old_card(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The weights and the card were replaced one by one: a kill right after the new weights landed left
    # them beside the old card (the old members' list and prior), loaded silently with the same member count.
    import os

    from geoseg.engine import resolve_model

    a, b, c = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1), _run(tmp_path / "c", 2)
    combine_models([a, b], tmp_path / "e")
    real_replace = os.replace

    def killed_after_the_weights(src: object, dst: object) -> None:
        real_replace(src, dst)
        if Path(str(dst)).name == "weights.pdparams":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            combine_models([a, c], tmp_path / "e", overwrite=True)
    assert not (tmp_path / "e" / "weights.yaml").exists()
    with pytest.raises(ModelError, match="no model card for weights.pdparams"):
        resolve_model(None, tmp_path / "e" / "weights.pdparams")
    card = ModelCard.load(combine_models([a, c], tmp_path / "e", overwrite=True))
    assert card.training["members"] == [str(a / "weights.pdparams"), str(c / "weights.pdparams")]


def test_an_ensemble_that_cannot_be_written_says_so_in_one_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only parent was "unexpected error: OSError: [Errno 30]"; a full disk named no file, and the run
    left the empty folder it had made."""
    import errno

    from geoseg.errors import NoRoomError, OutputError

    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1)

    def refused(self: Path, *args: object, **kw: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", refused)
        with pytest.raises(OutputError, match=r"^cannot create output folder .*e: Read-only file system: choose "
                                              "another --out$"):
            combine_models([a, b], tmp_path / "ro" / "e")
    import geoseg.models.checkpoints

    def full(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(geoseg.models.checkpoints, "atomic_output", full)
        with pytest.raises(NoRoomError, match=r"^cannot write .*weights.pdparams: no space left on the device"):
            combine_models([a, b], tmp_path / "new" / "e")
    assert not (tmp_path / "new" / "e").exists()  # the folder it made is gone


def _configured(folder: Path, seed: int, *, adapt: bool = False, tile: int = 64, **training) -> Path:  # type: ignore[no-untyped-def]
    """A run whose card records a training config, as 'geoseg train' writes it."""
    run = _run(folder, seed, prior=(0.25, 0.25, 0.25, 0.25))
    card = ModelCard.load(run / "weights.yaml")
    config = {"image": "scene.tif", "window": 64, "iterations": 100, "best_iteration": 50 + seed, "lr": 0.001,
              "loss": "ce+dice", "augment": {"flips": True, "brightness": 0.1}, "seed": seed, "device": "cpu"}
    card.replace(training={**config, **training}, adapt_prior=adapt, tile_size=tile, overlap=tile // 4).save(
        run / "weights.yaml")
    return run


def test_members_of_other_configs_are_warned_about_and_recorded(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    # geoseg ensemble took runs of other configs silently, and its card's training section described
    # member 1 only (member 2's window, loss, iterations and adapt_prior were dropped).
    import warnings

    from geoseg.errors import GeosegWarning
    from geoseg_cli.main import cli

    a = _configured(tmp_path / "a", 0)
    b = _configured(tmp_path / "b", 4, adapt=True, tile=128, window=128, iterations=30, loss="ce",
                    augment={"flips": True, "brightness": 0.2}, device="gpu")
    with pytest.warns(GeosegWarning) as got:
        card = ModelCard.load(combine_models([a, b], tmp_path / "e"))
    (w,) = [str(x.message) for x in got if issubclass(x.category, GeosegWarning)]
    assert "\n" not in w
    for part in ("window: 64 | 128", "iterations: 100 | 30", "loss: ce+dice | ce", "augment.brightness: 0.1 | 0.2",
                 "tile_size: 64 | 128", "adapt_prior: false | true", "training.member_settings",
                 "keeps member 1's tile_size/overlap", "predict --adapt-prior"):
        assert part in w, w
    for expected in ("seed", "best_iteration", "device"):  # runs of one config differ in these
        assert f"{expected}:" not in w, w
    settings = card.training["member_settings"]
    assert settings == {"window": [64, 128], "iterations": [100, 30], "best_iteration": [50, 54],
                        "loss": ["ce+dice", "ce"], "augment.brightness": [0.1, 0.2], "device": ["cpu", "gpu"],
                        "tile_size": [64, 128], "overlap": [16, 32], "adapt_prior": [False, True]}
    t = card.training
    assert t["seeds"] == [0, 4] and "seed" not in t and "window" not in t and "loss" not in t
    assert t["lr"] == 0.001 and t["augment"] == {"flips": True} and t["image"] == "scene.tif"
    assert card.tile_size == 64 and card.overlap == 16 and card.adapt_prior is False
    assert "with different window, iterations, loss" in card.description
    # every member adapting: so does the ensemble (three members, one value each)
    c = _configured(tmp_path / "c", 5, adapt=True, window=96)
    d = _configured(tmp_path / "d", 6, adapt=True)
    with pytest.warns(GeosegWarning, match=r"window: 96 \| 64 \| 128;") as got:
        assert ModelCard.load(combine_models([c, d, b], tmp_path / "e2")).adapt_prior is True
    assert "adapt_prior" not in str(got[0].message)
    # one line on stderr from the CLI, and the ensemble is written
    r = runner.invoke(cli, ["ensemble", str(a), str(b), "--out", str(tmp_path / "e3")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "differ in more than their seeds" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and (tmp_path / "e3" / "weights.yaml").is_file()

    # runs of one config with other seeds: nothing to warn about; what differs per run is recorded
    e = _configured(tmp_path / "s1", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeosegWarning)
        card = ModelCard.load(combine_models([a, e], tmp_path / "seeds"))
    assert card.training["member_settings"] == {"best_iteration": [50, 51]}
    assert card.training["window"] == 64 and card.training["seeds"] == [0, 1] and "seed" not in card.training
    assert card.description.endswith("Seed ensemble of 2 runs (seeds 0, 1): their class probabilities are averaged.")
