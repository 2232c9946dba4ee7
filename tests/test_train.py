"""geoseg train: dataset, losses, one training step, fit/resume, card round trip, CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from tests.conftest import class_image, write_raster

paddle = pytest.importorskip("paddle")

from geoseg.card import ModelCard
from geoseg.errors import GeosegWarning, GridMismatchError, ParameterError, PerformanceWarning, TrainingWarning
from geoseg.train import (
    IGNORE_INDEX,
    TrainConfig,
    Trainer,
    WindowDataset,
    augment,
    auto_class_weights,
    learning_rate,
    make_loss,
    train,
)

H, W = 48, 64


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-band uint8 scene whose pixel values depend on the class (1..3), nodata corner."""
    rng = np.random.default_rng(0)
    cls = class_image(H, W, 3, seed=1) + 1
    means = np.array([[40, 90, 160], [200, 60, 100], [120, 180, 30]], np.float64)  # class x band
    img = means[cls - 1].transpose(2, 0, 1) + rng.normal(0, 8, (3, H, W))
    img = np.clip(img, 1, 255).astype(np.uint8)
    img[:, :6, :6] = 0
    labels = cls.astype(np.uint8)
    labels[:6, :6] = 0
    labels[40:, 50:] = 0  # unlabelled patch
    return (write_raster(tmp_path / "img.tif", img, nodata=0),
            write_raster(tmp_path / "lab.tif", labels, nodata=0))


def _cfg(scene: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    base = {
        "image": str(scene[0]), "labels": str(scene[1]), "out": str(out), "model": "unet", "params": {"width": 0.125},
        "train_region": [0, 0, 48, 48], "val_region": [48, 0, 16, 48], "window": 32, "batch_size": 2, "iterations": 4,
        "val_every": 2, "log_every": 1, "lr": 0.01, "warmup": 1, "device": "cpu", "seed": 3,
        "classes": [{"id": 1, "name": "a", "color": [1, 2, 3]}, {"id": 2, "name": "b", "color": [4, 5, 6]},
                 {"id": 3, "name": "c", "color": [7, 8, 9]}],
    }
    base.update(kw)
    return TrainConfig.from_mapping(base)


def test_dataset_is_deterministic_and_augments(scene: tuple[Path, Path], tmp_path: Path) -> None:
    t = Trainer(_cfg(scene, tmp_path / "o"))
    ds = WindowDataset(t.train_data, 32, 5, seed=1, brightness=0.1, contrast=0.1)
    x1, y1 = ds[3]
    x2, y2 = ds[3]
    assert x1.shape == (3, 32, 32) and x1.dtype == np.float32 and y1.dtype == np.int64
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert set(np.unique(y1)) <= {0, 1, 2, IGNORE_INDEX}
    # Index i of a dataset starting at s is item s + i of one starting at 0 (resume).
    np.testing.assert_array_equal(WindowDataset(t.train_data, 32, 5, seed=1, start=2, brightness=0.1, contrast=0.1)[1][0], ds[3][0])


def test_band_dropout_blanks_one_band_of_some_windows(scene: tuple[Path, Path], tmp_path: Path) -> None:
    t = Trainer(_cfg(scene, tmp_path / "o"))
    plain = WindowDataset(t.train_data, 32, 40, seed=2, flips=False, rot90=False)
    dropped = WindowDataset(t.train_data, 32, 40, seed=2, flips=False, rot90=False, band_dropout=0.5)
    blanked = 0
    for i in range(40):
        a, b = plain[i][0], dropped[i][0]
        zero = [c for c in range(3) if (b[c] == 0).all() and not (a[c] == 0).all()]
        assert len(zero) <= 1
        same = [c for c in range(3) if np.array_equal(a[c], b[c])]
        assert len(same) == 3 - len(zero)  # the other bands are untouched
        blanked += len(zero)
    assert 8 <= blanked <= 32
    with pytest.raises(ParameterError, match="band_dropout"):
        _cfg(scene, tmp_path / "o", band_dropout=1.5)


def test_normalisation_statistics_come_from_the_training_region(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import rasterio

    t = Trainer(_cfg(scene, tmp_path / "o"))
    with rasterio.open(scene[0]) as ds:
        img = ds.read()[:, :48, :48].astype(np.float64) / 255.0
    valid = (img > 0).any(axis=0)
    np.testing.assert_allclose(t.normalization.mean, img[:, valid].mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(t.normalization.std, img[:, valid].std(axis=1), atol=1e-5)


def test_a_band_gap_is_left_out_of_statistics_and_trains_as_the_mean(tmp_path: Path) -> None:
    import rasterio

    rng = np.random.default_rng(1)
    img = rng.integers(50, 200, (3, H, W)).astype(np.uint8)
    img[2, :, :12] = 0  # band 3 has no data in the first 12 columns (the other bands have)
    labels = (class_image(H, W, 3, seed=1) + 1).astype(np.uint8)
    scene = (write_raster(tmp_path / "img.tif", img, nodata=0), write_raster(tmp_path / "lab.tif", labels, nodata=0))
    t = Trainer(_cfg(scene, tmp_path / "o"))
    with rasterio.open(scene[0]) as ds:
        raw = ds.read()[:, :48, :48].astype(np.float64) / 255.0
    assert t.normalization.mean[2] == pytest.approx(raw[2, :, 12:].mean(), abs=1e-5)
    assert t.normalization.std[2] == pytest.approx(raw[2, :, 12:].std(), abs=1e-5)
    assert t.normalization.mean[0] == pytest.approx(raw[0].mean(), abs=1e-5)
    x = t.train_data.image
    assert (x[2, :, :12] == 0).all() and (x[2, :, 12:] != 0).mean() > 0.99
    # Pixels with a band missing are training targets unless train_on_gaps: false.
    assert (t.train_data.labels != IGNORE_INDEX).all()
    t2 = Trainer(_cfg(scene, tmp_path / "o2", train_on_gaps=False))
    assert (t2.train_data.labels[:, :12] == IGNORE_INDEX).all()
    assert (t2.train_data.labels[:, 12:] != IGNORE_INDEX).all()
    np.testing.assert_array_equal(t2.train_data.image, x)


def test_label_shift_moves_the_labels_onto_the_image(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import rasterio

    with rasterio.open(scene[1]) as ds:
        lab = ds.read(1).astype(np.int64)
    plain = Trainer(_cfg(scene, tmp_path / "o"))
    moved = Trainer(_cfg(scene, tmp_path / "o2", label_shift=[1, 2]))
    a, b = plain.train_data.labels, moved.train_data.labels
    # The label of pixel (r, c) is the one read at (r - 1, c - 2); the first row and two
    # columns have no label to come from and are ignored.
    assert (b[0, :] == IGNORE_INDEX).all() and (b[:, :2] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(b[1:, 2:], a[:-1, :-2])
    assert not np.array_equal(a, b)
    # The validation labels move too; the image does not.
    np.testing.assert_array_equal(moved.train_data.image, plain.train_data.image)
    assert moved.val_data is not None and plain.val_data is not None
    va, vb = plain.val_data.labels, moved.val_data.labels
    both = (vb[1:, 2:] != IGNORE_INDEX) & (va[:-1, :-2] != IGNORE_INDEX)
    assert both.sum() > 200
    np.testing.assert_array_equal(vb[1:, 2:][both], va[:-1, :-2][both])
    # And the moved labels are the raster's, read one row up and two columns left.
    lut = {1: 0, 2: 1, 3: 2}
    r, c = 20, 30
    assert b[r, c] == lut[int(lab[r - 1, c - 2])]
    assert moved.card({}, 0).training["label_shift"] == [1, 2]
    assert "label_shift" not in plain.card({}, 0).training
    with pytest.raises(ParameterError, match="label_shift"):
        _cfg(scene, tmp_path / "o3", label_shift=[1])


def test_schedule_warmup_poly_cosine() -> None:
    cfg = TrainConfig(image="i", labels="l", lr=1.0, warmup=10, iterations=110, schedule="poly", power=1.0)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.5)
    cos = TrainConfig(image="i", labels="l", lr=1.0, warmup=0, iterations=100, schedule="cosine")
    assert learning_rate(50, cos) == pytest.approx(0.5)
    assert learning_rate(100, cos) == pytest.approx(0.0, abs=1e-9)


def test_lovasz_loss_is_one_minus_miou_on_hard_predictions_and_trains() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=(2, 8, 8)).astype(np.int64)
    y[0, :2] = IGNORE_INDEX
    pred = np.where(rng.random((2, 8, 8)) < 0.6, y, rng.integers(0, 4, size=(2, 8, 8)))  # class 3 never in the labels
    pred[y == IGNORE_INDEX] = rng.integers(0, 4, size=int((y == IGNORE_INDEX).sum()))
    logits = np.moveaxis(np.eye(4, dtype=np.float32)[np.where(pred == IGNORE_INDEX, 0, pred)] * 60.0, -1, 1)
    ok = y != IGNORE_INDEX
    ious = [((pred == c) & (y == c) & ok).sum() / (((pred == c) | (y == c)) & ok).sum() for c in range(3)]
    loss, parts = make_loss("lovasz", 4)(paddle.to_tensor(logits), paddle.to_tensor(y))
    assert float(loss) == pytest.approx(1.0 - np.mean(ious), abs=1e-5) and set(parts) == {"lovasz"}
    # Class weights give a weighted mean over the present classes.
    cw = np.array([1.0, 2.0, 3.0, 9.0], np.float32)
    wl, _ = make_loss("lovasz", 4, cw)(paddle.to_tensor(logits), paddle.to_tensor(y))
    assert float(wl) == pytest.approx(np.dot(cw[:3], 1.0 - np.array(ious)) / cw[:3].sum(), abs=1e-5)
    # Soft predictions: gradient steps on free logits lower it (its gradient is spread over the
    # batch's pixels, hence the large step).
    free = paddle.to_tensor(rng.normal(size=(2, 4, 8, 8)).astype(np.float32), stop_gradient=False)
    first = None
    for _ in range(20):
        total, _ = make_loss("lovasz", 4)(free, paddle.to_tensor(y))
        total.backward()
        with paddle.no_grad():
            free.set_value(free - 50.0 * free.grad)
        free.clear_gradient()
        first = float(total) if first is None else first
    assert float(total) < first - 0.2
    _, parts = make_loss("ce+lovasz", 4)(free, paddle.to_tensor(y))
    assert set(parts) == {"ce", "lovasz"}


def test_losses_ignore_index_and_weights() -> None:
    logits = paddle.to_tensor(np.random.default_rng(0).normal(size=(1, 3, 4, 4)).astype(np.float32))
    y = np.full((1, 4, 4), IGNORE_INDEX, np.int64)
    y[0, :2] = 1
    for kind in ("ce", "dice", "ce+dice", "lovasz", "ce+lovasz"):
        loss, parts = make_loss(kind, 3)(logits, paddle.to_tensor(y))
        assert np.isfinite(float(loss)) and parts
    # Ignored pixels do not change the loss.
    y2 = y.copy()
    l1, _ = make_loss("ce", 3)(logits, paddle.to_tensor(y))
    logits2 = logits.numpy().copy()
    logits2[0, :, 2:] = 50.0
    l2, _ = make_loss("ce", 3)(paddle.to_tensor(logits2), paddle.to_tensor(y2))
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    w = auto_class_weights(np.array([0, 0, 0, 1, IGNORE_INDEX]), 3)
    assert w[1] > w[0] and w[2] == 1.0
    # auto: 1/sqrt(frequency), frequency-weighted mean 1; a very rare class is capped at 10
    # and does not change the ratios of the common ones.
    lab = np.array([0] * 6000 + [1] * 1500 + [2] * 2)
    a = auto_class_weights(lab, 3)
    f = np.array([6000, 1500]) / 7502
    assert a[1] / a[0] == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(a[:2], 1 / np.sqrt(f) / (np.sqrt(f).sum() + np.sqrt(2 / 7502)), rtol=1e-5)
    assert a[2] == 10.0
    assert a[1] / a[0] == pytest.approx(auto_class_weights(lab[:7500], 3)[1] / auto_class_weights(lab[:7500], 3)[0])
    # balanced: each present class carries the same total weight; the loss keeps its scale.
    lab = np.array([0] * 60 + [1] * 30 + [2] * 10 + [IGNORE_INDEX] * 5)
    b = auto_class_weights(lab, 4, "balanced")
    np.testing.assert_allclose(b[:3], [1 / 1.8, 1 / 0.9, 1 / 0.3], rtol=1e-5)
    assert b[3] == 1.0
    np.testing.assert_allclose((b[:3] * [0.6, 0.3, 0.1]).sum(), 1.0, rtol=1e-5)
    assert auto_class_weights(np.array([0] * 10000 + [1]), 2, "balanced")[1] == 10.0  # clipped


def test_photometric_augmentations_are_off_by_default_and_shift_values() -> None:
    x = np.random.default_rng(1).normal(size=(3, 8, 8)).astype(np.float32)
    y = np.zeros((8, 8), np.int64)
    # Off: geometry off gives the input back unchanged.
    x0, _ = augment(x, y, np.random.default_rng(0), False, False, 0.0, 0.0)
    np.testing.assert_array_equal(x0, x)
    # Global brightness/contrast: one affine change shared by all bands.
    xg, _ = augment(x, y, np.random.default_rng(0), False, False, 0.0, 0.0, global_brightness=0.5, global_contrast=0.3)
    gains = [np.polyfit(x[b].ravel(), xg[b].ravel(), 1) for b in range(3)]
    np.testing.assert_allclose([g[0] for g in gains], gains[0][0], rtol=1e-4)
    np.testing.assert_allclose([g[1] for g in gains], gains[0][1], atol=1e-4)
    assert not np.allclose(xg, x)
    # Noise: zero-mean per-pixel perturbation of about the given size.
    xn, _ = augment(np.zeros((3, 64, 64), np.float32), np.zeros((64, 64), np.int64), np.random.default_rng(0),
                    False, False, 0.0, 0.0, noise=0.1)
    assert xn.dtype == np.float32 and abs(float(xn.std()) - 0.1) < 0.01 and abs(float(xn.mean())) < 0.01
    with pytest.raises(ParameterError):
        TrainConfig(image="i", labels="l", noise=-0.1).check()


def test_label_smoothing_matches_plain_ce_at_zero_and_ignores_pixels() -> None:
    rng = np.random.default_rng(0)
    logits = paddle.to_tensor(rng.normal(size=(2, 3, 4, 4)).astype(np.float32))
    y = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int64)
    y[0, 0] = IGNORE_INDEX
    yt = paddle.to_tensor(y)
    w = np.array([0.5, 1.0, 2.0], np.float32)
    for cw in (None, w):
        plain, _ = make_loss("ce", 3, cw)(logits, yt)
        tiny, _ = make_loss("ce", 3, cw, label_smoothing=1e-9)(logits, yt)
        assert float(tiny) == pytest.approx(float(plain), rel=1e-5)
    smooth, _ = make_loss("ce", 3, label_smoothing=0.2)(logits, yt)
    assert np.isfinite(float(smooth)) and float(smooth) != pytest.approx(float(make_loss("ce", 3)(logits, yt)[0]))
    logits2 = logits.numpy().copy()
    logits2[0, :, 0] = 50.0  # ignored row
    s2, _ = make_loss("ce", 3, label_smoothing=0.2)(paddle.to_tensor(logits2), yt)
    assert float(s2) == pytest.approx(float(smooth), rel=1e-6)


def test_training_steps_lower_the_loss(scene: tuple[Path, Path], tmp_path: Path) -> None:
    t = Trainer(_cfg(scene, tmp_path / "o", loss="ce"))
    paddle.seed(0)
    model, loss_fn = t.configure_model(), t.configure_loss()
    opt = t.configure_optimizer(model)
    model.train()
    x = paddle.to_tensor(np.stack([t.train_data.image[:, :32, :32], t.train_data.image[:, 16:48, 16:48]]))
    y = paddle.to_tensor(np.stack([t.train_data.labels[:32, :32], t.train_data.labels[16:48, 16:48]]))
    losses = [t.step(model, opt, loss_fn, x, y, 0.01)[0] for _ in range(4)]
    assert losses[-1] < losses[0]
    _, _, gnorm = t.step(model, opt, loss_fn, x, y, 0.01)
    assert gnorm > 0


class _AmpScaler:
    """What geoseg uses of ``paddle.amp.GradScaler``, which Paddle disables off the GPU: a stand-in that
    prints on update as Paddle's does after an overflow step, and keeps a state to checkpoint."""

    def __init__(self, scale: float = 512.0, incr_count: int = 3) -> None:
        self.state = {"scale": np.array([scale], np.float32), "incr_ratio": 2.0, "decr_ratio": 0.5,
                      "incr_every_n_steps": 1000, "decr_every_n_nan_or_inf": 2, "incr_count": incr_count,
                      "decr_count": 0, "use_dynamic_loss_scaling": True}
        self.loaded: dict | None = None

    def scale(self, loss):  # type: ignore[no-untyped-def]
        return loss

    def unscale_(self, opt) -> None:  # type: ignore[no-untyped-def]
        pass

    def step(self, opt) -> None:  # type: ignore[no-untyped-def]
        opt.step()

    def update(self) -> None:
        print("Found inf or nan, current scale is: 1024.0, decrease to: 1024.0*0.5")

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def test_amp_steps_print_nothing_on_stdout(scene: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Paddle's GradScaler prints "Found inf or nan ..." on stdout at each overflow step of AMP training (GPU),
    where geoseg train prints only the weights path for scripts (W=$(geoseg train ...))."""
    t = Trainer(_cfg(scene, tmp_path / "o", loss="ce"))
    model, loss_fn = t.configure_model(), t.configure_loss()
    opt = t.configure_optimizer(model)
    x = paddle.to_tensor(t.train_data.image[None, :, :32, :32].copy())
    y = paddle.to_tensor(t.train_data.labels[None, :32, :32].copy())
    capsys.readouterr()
    loss, _, gnorm = t.step(model, opt, loss_fn, x, y, 0.01, scaler=_AmpScaler())
    assert capsys.readouterr().out == "" and loss > 0 and gnorm > 0


def test_the_amp_loss_scale_is_checkpointed_and_resumed(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """--resume of an AMP run started again from the initial loss scale 2**14 (more skipped steps than the
    uninterrupted run): the scaler's state is saved in last.json and put back."""
    t = Trainer(_cfg(scene, tmp_path / "o"))
    model = t.configure_model()
    opt = t.configure_optimizer(model)
    t.scaler, t.ema, t._ckpt_files, t._best = _AmpScaler(scale=256.0, incr_count=7), None, {}, None
    d = tmp_path / "o" / "checkpoints"
    t._save_checkpoint(d, model, opt, 2, -1.0, -1, [], {})
    saved = json.loads((d / "last.json").read_text())["amp_scaler"]
    assert saved["scale"] == 256.0 and saved["incr_count"] == 7
    t.scaler = _AmpScaler()
    assert t._resume(d, model, opt)[0] == 2
    assert t.scaler.loaded is not None and t.scaler.loaded["scale"].tolist() == [256.0]
    assert {k: v for k, v in t.scaler.loaded.items() if k != "scale"} == {
        k: v for k, v in _AmpScaler(incr_count=7).state.items() if k != "scale"}
    t.scaler = None  # a CPU run (no scaler) writes none
    t._save_checkpoint(d, model, opt, 3, -1.0, -1, [], {})
    assert "amp_scaler" not in json.loads((d / "last.json").read_text())


@pytest.mark.gpu
def test_amp_training_on_the_gpu(scene: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """AMP (auto_cast O1 + GradScaler) on the GPU: the loss goes down, stdout stays empty (Paddle prints
    its overflow lines there), the loss scale is checkpointed and a resumed run ends as a straight one."""
    kw = {"device": "gpu", "amp": True, "schedule": "constant", "warmup": 0, "val_every": 2, "loss": "ce"}
    capsys.readouterr()
    straight = train(_cfg(scene, tmp_path / "b", iterations=8, **kw))
    assert capsys.readouterr().out == ""
    losses = [r["loss"] for r in straight.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    train(_cfg(scene, tmp_path / "a", iterations=4, **kw))
    assert json.loads((tmp_path / "a" / "checkpoints" / "last.json").read_text())["amp_scaler"]["scale"] > 0
    res = train(_cfg(scene, tmp_path / "a", iterations=8, resume=str(tmp_path / "a" / "checkpoints"), **kw))
    assert res.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-2)


def test_label_value_0_ignored_by_default_is_said(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """A cloud mask (0 cloud, 1 shadow, 4 clear) without a classes list trained a model without its cloud
    class, silently: 0 is 'unlabelled' by default. Said when 0 is not the raster's nodata."""
    import warnings

    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    plain = write_raster(tmp_path / "lab0.tif", labels, nodata=None)  # 0 as a value, not nodata
    cfg = {k: v for k, v in _cfg(scene, tmp_path / "o").to_dict().items() if k != "classes"}
    with pytest.warns(TrainingWarning, match=r"^label value 0 \(.* set ignore: \[\]") as warned:
        t = Trainer(TrainConfig.from_mapping({**cfg, "labels": str(plain)}))
    assert [c.id for c in t.classes] == [1, 2, 3]
    assert [w.filename for w in warned if w.category is TrainingWarning] == [__file__]  # the caller's line
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(TrainConfig.from_mapping(cfg))  # 0 is the labels' nodata: nothing to say
        t = Trainer(TrainConfig.from_mapping({**cfg, "labels": str(plain), "ignore": []}))
    assert not [w for w in seen if "label value 0" in str(w.message)] and [c.id for c in t.classes] == [0, 1, 2, 3]


def test_a_class_without_training_pixels_is_warned_about_or_refused(scene: tuple[Path, Path], tmp_path: Path,
                                                                    runner) -> None:  # type: ignore[no-untyped-def]
    """A listed class absent from the training region, or whose id is the label raster's nodata (all its
    pixels unlabelled), trained silently and was listed in the card as if learned."""
    from geoseg_cli.main import cli

    classes = [{"id": i, "name": n} for i, n in ((1, "a"), (2, "b"), (3, "c"), (9, "snow"))]
    said = ("class 9 (snow) has no labelled pixel in the training region: the model cannot learn it (check the class "
            "ids and train_region)")
    with pytest.warns(TrainingWarning) as warned:
        Trainer(_cfg(scene, tmp_path / "o", classes=classes))
    assert [str(w.message) for w in warned if issubclass(w.category, GeosegWarning)] == [said]
    # the CLI: the same words, one "warning:" line on stderr
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, tmp_path / "cli", classes=classes, iterations=1).to_dict()))
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml")])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines().count(f"warning: {said}") == 1 and "TrainingWarning" not in r.stderr, r.stderr
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    nodata2 = write_raster(tmp_path / "lab_nd2.tif", labels, nodata=2)
    with pytest.raises(ParameterError, match=r"class 2 \(b\) is also the label raster's nodata value"):
        Trainer(_cfg((scene[0], nodata2), tmp_path / "o2"))


def test_float_labels_must_be_whole_class_ids(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """A float label raster of whole ids (NaN unlabelled) trains as the integer one; 1.5 was cut to class 1
    and NaN became a huge negative id, silently."""
    from geoseg.errors import SceneError

    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1).astype(np.float32)
    labels[labels == 0] = np.nan
    whole = write_raster(tmp_path / "lab_f.tif", labels, nodata=float("nan"))
    a, b = Trainer(_cfg(scene, tmp_path / "a")), Trainer(_cfg((scene[0], whole), tmp_path / "b"))
    np.testing.assert_array_equal(a.train_data.labels, b.train_data.labels)
    labels[10, 10] = 1.5
    half = write_raster(tmp_path / "lab_half.tif", labels, nodata=float("nan"))
    with pytest.raises(SceneError, match=r"lab_half.tif hold float32 values that are not whole class ids \(e.g. 1.5\)"):
        Trainer(_cfg((scene[0], half), tmp_path / "c"))


def test_config_paths_and_option_clashes_are_explained(scene: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe run from another folder said only "input sample_data/... does not exist"; --window 32 with
    --set window=64 silently took the --set."""
    import yaml

    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "data").mkdir()
    for p in scene:
        (project / "data" / p.name).write_bytes(p.read_bytes())
    cfg = project / "recipes" / "c.yaml"
    cfg.write_text(yaml.safe_dump({"image": "data/img.tif", "labels": "data/lab.tif", "model": "unet"}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParameterError, match=r"image data/img.tif of .*c.yaml does not exist in the working folder "
                                             r".*: relative paths in a config are taken from the working folder"):
        TrainConfig.load(cfg)
    monkeypatch.chdir(project / "recipes")  # a config named relative to the working folder ("c.yaml") too
    with pytest.raises(ParameterError, match=r"relative paths in a config are taken from the working folder"):
        TrainConfig.load(Path("c.yaml"))
    monkeypatch.chdir(tmp_path)
    # the paths an override replaces are not the config's any more: not checked (a shared recipe with
    # today's scene, from another folder, was refused for the recipe's own image)
    today = {"image": project / "data" / "img.tif", "labels": str(project / "data" / "lab.tif")}
    assert TrainConfig.load(cfg, today).image == str(project / "data" / "img.tif")  # (a Path taken as its text)
    monkeypatch.chdir(project)
    assert TrainConfig.load(cfg).image == "data/img.tif"  # from the folder they are relative to
    with pytest.raises(ParameterError, match=r"--window 32 and --set window=64 disagree: give one"):
        TrainConfig.load(cfg, {"window": 32}, explicit={"window": 64})
    # one number written two ways (YAML 1.1 reads --set lr=1e-3 as text) agrees
    assert TrainConfig.load(cfg, {"lr": 0.001}, explicit={"lr": "1e-3"}).lr == pytest.approx(0.001)
    assert TrainConfig.load(cfg, {"window": 64}, explicit={"window": 64}).window == 64
    with pytest.raises(ParameterError, match=r"no checkpoint at runs/nope/checkpoints/last.pdparams"):
        train(TrainConfig.load(cfg, {"resume": "runs/nope/checkpoints", "out": str(tmp_path / "r")}))


def test_a_config_built_in_code_is_checked_as_a_yaml_one(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """TrainConfig(iterations=0) from Python trained nothing into a finished-looking card; loss="bogus"
    was recorded as is; lr="fast" failed with a bare TypeError."""
    base = {k: v for k, v in _cfg(scene, tmp_path / "o").to_dict().items() if k != "scenes"}
    for bad, message in (({"iterations": 0}, "iterations 0: use a number >= 1"), ({"loss": "bogus"}, "loss 'bogus'"),
                         ({"lr": "fast"}, "lr 'fast': give a number")):
        cfg = TrainConfig(**{**base, **bad})  # (no check here: a dataclass)
        for run in (train, Trainer):
            with pytest.raises(ParameterError, match=message):
                run(cfg)
    assert not (tmp_path / "o").exists()


def test_library_training_does_not_pass_on_paddle_s_batchnorm_warning(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """Every train() from Python showed Paddle's "When training, we now always track global mean and
    variance" UserWarning (twice); the CLI filtered it for its process only."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(_cfg(scene, tmp_path / "o", iterations=2))
    assert not [w for w in seen if "always track global mean" in str(w.message)], [str(w.message) for w in seen]


def test_reading_the_regions_leaves_no_file_open(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """The regions are in memory once the trainer is made: no cached dataset handle of the image stays
    open through training (or until the interpreter exits, where Python 3.13 complains about it)."""
    import geoseg.io as gio
    from geoseg.train import Trainer

    Trainer(_cfg(scene, tmp_path / "run"))
    assert not [k for k in gio._handles if k[2] == str(scene[0])]


def test_fit_writes_weights_card_and_logs(scene: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(_cfg(scene, out))
    assert res.weights == out / "weights.pdparams" and res.weights.is_file()
    card = ModelCard.load(out / "weights.yaml")
    assert ModelCard.from_dict(card.to_dict()) == card  # round trip
    assert [c.name for c in card.classes] == ["a", "b", "c"] and card.classes[2].color == (7, 8, 9)
    assert card.tile_size == 32 and card.architecture == "unet" and dict(card.params) == {"width": 0.125}
    assert 0.0 <= card.metrics["validation"]["miou"] <= 1.0
    assert card.training["train_region"] == [0, 0, 48, 48]
    assert card.pixel_size == 10.0  # the scene's 10 m UTM pixels: predict compares scenes with it
    assert card.training["dtype"] == "uint8"  # what its statistics were computed on (an export's Normalize is for it)
    from geoseg.exported import training_dtype

    assert training_dtype(card) == ("uint8", "the card's training.dtype")
    # class_prior: the saved weights' mean probabilities over the training region, one per class.
    assert card.class_prior is not None and len(card.class_prior) == 3 and not card.adapt_prior
    assert sum(card.class_prior) == pytest.approx(1.0, abs=1e-4) and min(card.class_prior) >= 0
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,lr,loss") and len(rows) == 5
    assert (out / "train_log.json").is_file() and (out / "checkpoints" / "last.pdparams").is_file()
    # The card and weights load through predict's resolver.
    from geoseg.engine import resolve_model

    assert resolve_model(None, out / "weights.pdparams").card == card


def test_resume_continues_from_the_saved_iteration(scene: tuple[Path, Path], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from geoseg.models.checkpoints import read_state_dict

    import logging

    kw = {"schedule": "constant", "warmup": 0, "val_every": 2}
    train(_cfg(scene, tmp_path / "a", iterations=2, **kw))
    with caplog.at_level(logging.INFO, logger="geoseg"):
        res = train(_cfg(scene, tmp_path / "a", iterations=4, resume=str(tmp_path / "a" / "checkpoints"), **kw))
    assert [r["iteration"] for r in res.history] == [1, 2, 3, 4]
    assert "resuming at iteration 2 (best validation mIoU" in caplog.text
    # without validation the log says so (it said "best validation mIoU -1.0000 at -1")
    train(_cfg(scene, tmp_path / "c", iterations=2, schedule="constant", warmup=0, val_region=None))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geoseg"):
        train(_cfg(scene, tmp_path / "c", iterations=3, resume=str(tmp_path / "c" / "checkpoints"), schedule="constant",
                   warmup=0, val_region=None))
    assert "resuming at iteration 2 (no validation so far)" in caplog.text and "-1.0000" not in caplog.text
    straight = train(_cfg(scene, tmp_path / "b", iterations=4, **kw))
    assert straight.history[-1]["loss"] == pytest.approx(res.history[-1]["loss"], rel=1e-4)
    a = read_state_dict(tmp_path / "a" / "checkpoints" / "last.pdparams")
    b = read_state_dict(tmp_path / "b" / "checkpoints" / "last.pdparams")
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-5)


def test_resume_refuses_changed_settings_and_finds_its_run_folder(scene: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume took --set window=32 lr=0.05 seed=5: the weights went on as before while the card said 32 px
    (predict's default windows then 32). And without --out it finished in ./runs/train, split from its
    first part."""
    run = tmp_path / "a"
    train(_cfg(scene, run, iterations=2, window=32))
    ckpt = str(run / "checkpoints")
    with pytest.raises(ParameterError, match=r"--resume: the run was started with other settings: lr \(0.01 -> 0.05\), "
                                             r"seed \(3 -> 5\), window \(32 -> 16\): resume with its own config") as e:
        train(_cfg(scene, run, iterations=4, resume=ckpt, window=16, lr=0.05, seed=5))
    assert "\n" not in str(e.value) and not (run / "weights.yaml").read_text().count("window: 16")
    # what may change: length, device, workers, logging, validation frequency
    monkeypatch.chdir(tmp_path)
    cfg = {k: v for k, v in _cfg(scene, run).to_dict().items() if k != "out"}  # no out: the default
    res = train(TrainConfig.from_mapping({**cfg, "window": 32, "iterations": 3, "resume": ckpt, "val_every": 1,
                                          "log_every": 2}))
    assert res.weights == run / "weights.pdparams" and not (tmp_path / "runs").exists()
    assert [r["iteration"] for r in res.history] == [1, 2, 3]


def test_resume_on_the_command_line_finishes_in_the_run_folder_not_the_configs_out(
        scene: tuple[Path, Path], tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    """Every shipped recipe has an out: of its own; a run trained with --out runs/stop and resumed
    with the recipe and --resume runs/stop/checkpoints finished in the recipe's out:, leaving
    runs/stop without a card."""
    from geoseg_cli.main import cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, tmp_path / "recipe_out").to_dict()))
    stop = tmp_path / "stop"
    train(_cfg(scene, stop, iterations=2))
    (stop / "weights.yaml").unlink()  # (as a stopped run leaves it: checkpoints, no card)
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "3",
                            "--resume", str(stop / "checkpoints")])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(stop / "weights.pdparams") and (stop / "weights.yaml").exists()
    assert not (tmp_path / "recipe_out").exists()
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "4",
                            "--resume", str(stop / "checkpoints"), "--out", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0 and r.output.strip() == str(tmp_path / "elsewhere" / "weights.pdparams"), r.output


def test_scene_inside_a_zip_archive_trains(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """Image and labels read through GDAL's /vsizip/ (absolute archive path) train as the plain files do."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.write(scene[0], "img.tif")
        z.write(scene[1], "lab.tif")
    zipped = (f"/vsizip/{tmp_path / 'data.zip'}/img.tif", f"/vsizip/{tmp_path / 'data.zip'}/lab.tif")
    a = train(_cfg(scene, tmp_path / "plain", iterations=2))
    b = train(_cfg(zipped, tmp_path / "zipped", iterations=2))  # type: ignore[arg-type]
    assert b.history[-1]["loss"] == pytest.approx(a.history[-1]["loss"], rel=1e-5)


def test_labels_on_another_grid_are_refused(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """Each refusal says how to put the labels on the image grid: labels in another CRS were told to use
    'gdalwarp -tr/-te' (no -t_srs), labels without a CRS to 'reproject' (nothing to reproject from)."""
    with rasterio.open(scene[0]) as ds:
        t, crs = ds.transform, ds.crs
    bad = write_raster(tmp_path / "small.tif", np.ones((H, W - 1), np.uint8), nodata=0, transform=t)
    west, north = t.c, t.f
    south, east = north + H * t.e, west + W * t.a
    te = " ".join(f"{v:.15g}" for v in (west, south, east, north))  # (all the digits: ':g' rounded a northing)
    with pytest.raises(GridMismatchError, match=r"are 63x48 but the image .*: warp the labels onto the image grid "
                                                r"first: gdalwarp -r near -t_srs EPSG:\d+ -te " + re.escape(te) +
                                                r" -tr .* small.tif"):
        Trainer(_cfg((scene[0], bad), tmp_path / "o"))
    with rasterio.open(scene[1]) as ds:
        labels = ds.read()
    other = write_raster(tmp_path / "other.tif", labels, crs="EPSG:32617", transform=t, nodata=0)
    with pytest.raises(GridMismatchError, match=r"differ in CRS: warp .* -t_srs " + crs.to_string()):
        Trainer(_cfg((scene[0], other), tmp_path / "o"))
    none = write_raster(tmp_path / "none.tif", labels, crs=None, transform=t, nodata=0)
    with pytest.raises(GridMismatchError, match=r"have no CRS .*: assign the image's CRS \(gdal_edit.py -a_srs "
                                                + crs.to_string() + " none.tif"):
        Trainer(_cfg((scene[0], none), tmp_path / "o"))


def test_config_errors_name_the_key(scene: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="unknown key"):
        _cfg(scene, tmp_path, learning_rate=1)
    with pytest.raises(ParameterError, match="multiple of 16"):
        _cfg(scene, tmp_path, window=30)
    with pytest.raises(ParameterError, match="balanced"):
        _cfg(scene, tmp_path, class_weights="inverse")
    with pytest.raises(ParameterError, match="share"):
        Trainer(_cfg(scene, tmp_path, val_region=[40, 0, 24, 48]))
    with pytest.raises(ParameterError, match=r"itertions \(did you mean iterations\?\)"):
        _cfg(scene, tmp_path, itertions=5)
    # a value of the wrong kind is named with its key (it used to surface as a TypeError mid-run)
    for key, value, words in [("iterations", "abc", "give a whole number"), ("window", 64.5, "give a whole number"),
                              ("lr", "fast", "give a number"), ("flips", "maybe", "true or false"),
                              ("schedule", "linear", "poly, cosine or constant"), ("teacher", 5, "give a string"),
                              ("bands", [1, "x"], "list of whole numbers"), ("classes", [1, 2], "list of mappings")]:
        with pytest.raises(ParameterError, match=f"{key} .*{words}"):
            _cfg(scene, tmp_path, **{key: value})
    # a list of band numbers may come as predict's comma text (--set bands=3,1,2) or one number
    assert _cfg(scene, tmp_path, bands="3, 1,2").bands == (3, 1, 2)
    assert _cfg(scene, tmp_path, **yaml.safe_load("lr: 1e-3")).lr == 0.001  # YAML 1.1 reads that as text
    assert _cfg(scene, tmp_path, bands=2, ignore=0).bands == (2,)
    with pytest.warns(TrainingWarning, match=r"bands \[1, 1, 2\] feed the model band 1 twice: check"):
        Trainer(_cfg(scene, tmp_path, bands=[1, 1, 2]))
    assert _cfg(scene, tmp_path, band_names="red,green").band_names == ("red", "green")
    with pytest.raises(ParameterError, match="band_names lists 1 name.*reads 3 band"):
        Trainer(_cfg(scene, tmp_path, band_names=["red"]))
    # params and the regions of a wrong kind: named, not a bare TypeError ("'int' object is not iterable")
    for value in (5, [1]):
        with pytest.raises(ParameterError, match=r"params .*: give a mapping"):
            _cfg(scene, tmp_path, params=value)
    for key, value in (("train_region", 5), ("train_region", {"a": 1}), ("val_region", True)):
        with pytest.raises(ParameterError, match=f"{key} .*: give \\[col_off, row_off, width, height\\]"):
            Trainer(_cfg(scene, tmp_path, **{key: value}))
    # an overlap as wide as the window trained a card predict refused ("overlap 40 must be smaller ...")
    with pytest.raises(ParameterError, match="tile_overlap 32: must be smaller than window 32"):
        _cfg(scene, tmp_path, tile_overlap=32)
    assert Trainer(_cfg(scene, tmp_path, tile_overlap=20)).overlap == 20
    # the window shrinks to a 16-pixel training region: the overlap shrinks with it, to a quarter window
    small = Trainer(_cfg(scene, tmp_path, tile_overlap=20, train_region=[0, 0, 16, 48]))
    assert (small.window, small.overlap) == (16, 4)


def test_cli_train(scene: tuple[Path, Path], tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    cfg = _cfg(scene, tmp_path / "cli").to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "2",
                            "--set", "loss=dice"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("weights.pdparams")
    assert ModelCard.load(tmp_path / "cli" / "weights.yaml").training["loss"] == "dice"
    # a folder that holds a run is not trained over by accident: refused before reading, kept as it was
    weights = tmp_path / "cli" / "weights.pdparams"
    before = (weights.read_bytes(), weights.stat().st_mtime_ns)
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--iterations", "2"])
    assert r.exit_code == 1 and "already holds a trained run" in r.output and "--overwrite" in r.output
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == before
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert ModelCard.load(tmp_path / "cli" / "weights.yaml").training["loss"] != "dice"  # the new run's card
    # off a terminal (a log file, cron's mail) the loss is said every log_every iterations, not only at validations
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--iterations", "3", "--out",
                            str(tmp_path / "logged")])
    assert r.exit_code == 0 and "iteration 1: loss" in r.output and "iteration 3: loss" in r.output, r.output
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "3",
                            "--resume", str(tmp_path / "cli" / "checkpoints")])
    assert r.exit_code == 0, r.output  # resuming into its own folder is what --resume is for
    bad = write_raster(tmp_path / "bad.tif", np.ones((10, 10), np.uint8))
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--labels", str(bad), "--out",
                            str(tmp_path / "other")])
    assert r.exit_code == 1 and "10x10" in r.output


def test_classes_are_checked_as_the_card_checks_them_when_the_config_is_read(scene: tuple[Path, Path], tmp_path: Path,
                                                                             runner) -> None:  # type: ignore[no-untyped-def]
    # Each used to pass the config and fail only once training was over (the card is built after
    # validation): duplicate ids trained the full schedule and left weights without their card.
    for classes, words in [
        ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], r"classes: duplicate class id 1 \(a, b\): give each"),
        ([{"id": 1, "name": "a"}, {"id": 2, "name": "A"}], r"classes: duplicate class name 'a' \(ids 1, 2\)"),
        ([{"id": 1, "name": "a"}, {"id": 300, "name": "b"}], r"classes: class id 300 is out of range: use 0..254"),
        ([{"id": 1, "name": "a"}, {"id": 255, "name": "b"}], r"classes: class id 255 is out of range"),
        ([{"id": 1, "name": "a", "color": [1, 2]}, {"id": 2}], r"classes: class 'a' has colour \(1, 2\): give three"),
        ([{"id": 1, "name": "a", "color": [1, 2, 300]}, {"id": 2}], r"classes: class 'a' has colour"),
        ([{"id": 1, "name": "a", "color": "red"}, {"id": 2}], r"classes: class 1 .*give id \(a whole number\)"),
        ([{"name": "a"}, {"id": 2}], r"classes: class 1 .*has no id"),
        ([{"id": "x", "name": "a"}, {"id": 2}], r"classes: class 1 .*give id \(a whole number\)"),
    ]:
        with pytest.raises(ParameterError, match=words) as e:
            _cfg(scene, tmp_path / "o", classes=classes)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    # Through the CLI: one line, exit 1, and the output folder is never started.
    cfg = _cfg(scene, tmp_path / "dup").to_dict()
    cfg["classes"] = [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from geoseg_cli.main import cli

    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml")])
    assert r.exit_code == 1 and "duplicate class id 1" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "dup").exists()


def test_a_run_whose_card_fails_writes_nothing(scene: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The card is built (and so checked) before training and before each weights file: a card that
    # cannot be made never leaves weights.pdparams without its weights.yaml.
    from geoseg.errors import ModelError

    def broken(self: Trainer, metrics: object, best_iteration: int) -> ModelCard:
        raise ModelError("model card has duplicate class ids: [1, 1]")

    monkeypatch.setattr(Trainer, "card", broken)
    out = tmp_path / "run"
    with pytest.raises(ModelError, match="duplicate class ids"):
        train(_cfg(scene, out, iterations=2))
    assert not (out / "weights.pdparams").exists() and not (out / "train_log.csv").exists()


def test_a_failed_run_s_folder_is_described_as_it_is(scene: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A run that fails after its best weights but before any checkpoint: --resume would find nothing,
    # so it is not suggested (it used to be: "continue it with --resume run/checkpoints").
    out = tmp_path / "run"

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_checkpoint", no_space)
        with pytest.raises(OSError):
            train(_cfg(scene, out, iterations=2))
    # the best weights so far wait under checkpoints/ (only a finished run has weights and a card in OUT)
    assert (out / "checkpoints" / "best.pdparams").is_file() and not (out / "weights.pdparams").exists()
    assert not (out / "checkpoints" / "last.json").exists()
    with pytest.raises(ParameterError) as e:
        train(_cfg(scene, out, iterations=2))
    msg = str(e.value)
    assert "an unfinished run (checkpoints/best.pdparams)" in msg and "another --out" in msg and "--overwrite" in msg, msg
    assert "--resume" not in msg and "\n" not in msg
    # weights without their card (a run killed between the two writes): unfinished, said so
    (out / "weights.pdparams").write_bytes((out / "checkpoints" / "best.pdparams").read_bytes())
    with pytest.raises(ParameterError, match=r"unfinished run \(weights.pdparams without weights.yaml, "
                                             r"checkpoints/best.pdparams\): choose "
                                             r"another --out, or pass --overwrite") as e:
        train(_cfg(scene, out, iterations=2))
    assert "--resume" not in str(e.value)
    # A run that fails after a checkpoint: --resume is suggested, and it finishes the run.
    other = tmp_path / "run2"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "write_class_prior", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(scene, other, iterations=2))
    with pytest.raises(ParameterError, match=f"unfinished run .*: choose another --out, continue it with --resume "
                                             f"{re.escape(str(other / 'checkpoints'))}, or pass --overwrite"):
        train(_cfg(scene, other, iterations=2))
    res = train(_cfg(scene, other, iterations=2, resume=str(other / "checkpoints")))
    assert ModelCard.load(res.card).class_prior is not None and (other / "train_log.json").is_file()
    with pytest.raises(ParameterError, match="already holds a trained run .*--resume"):
        train(_cfg(scene, other, iterations=2))


def test_a_region_not_inside_the_scene_is_refused_with_the_scene_s_size(scene: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    # The scene is 64x48 (width x height). A region reaching past it used to be clipped silently
    # (and recorded in the card as given); one lying wholly outside was already refused.
    for key, region, words in [
        ("train_region", [0, 0, 500, 500], r"train_region \[0, 0, 500, 500\] reaches outside the 64x48 scene "
                                           r"\(width x height\): give \[0, 0, 64, 48\]"),
        ("train_region", "0,0,500,500", r"train_region \[0, 0, 500, 500\] reaches outside the 64x48 scene"),
        ("train_region", [-8, 0, 40, 48], r"train_region \[-8, 0, 40, 48\] reaches outside .*give \[0, 0, 32, 48\]"),
        ("val_region", [48, 0, 32, 48], r"val_region \[48, 0, 32, 48\] reaches outside the 64x48 scene .*"
                                        r"give \[48, 0, 16, 48\]"),
        ("val_region", [48, 0, 16, 49], r"val_region \[48, 0, 16, 49\] reaches outside .*give \[48, 0, 16, 48\]"),
        ("train_region", [500, 500, 10, 10], r"train_region \[500, 500, 10, 10\] lies outside the 64x48 scene"),
        ("train_region", [0, 0, 0, 10], r"train_region \[0, 0, 0, 10\]: give a positive width and height"),
    ]:
        with pytest.raises(ParameterError, match=words) as e:
            Trainer(_cfg(scene, tmp_path / "o", **{"val_region": None, key: region}))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    # a scene of a list names itself; a region that ends at the scene's edge is fine
    second = _second_scene(tmp_path)
    with pytest.raises(ParameterError, match=r"scene 2 \(img2.tif\) val_region \[40, 0, 16, 48\] reaches outside "
                                             r"the 56x40 scene .*give \[40, 0, 16, 40\]"):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(scene[0]), "labels": str(scene[1])},
            {"image": str(second[0]), "labels": str(second[1]), "train_region": [0, 0, 40, 40],
             "val_region": [40, 0, 16, 48]}]))
    t = Trainer(_cfg(scene, tmp_path / "o", train_region=[16, 0, 48, 48], val_region=[0, 0, 16, 48]))
    assert (t.train_region.col, t.train_region.width, t.train_region.height) == (16, 48, 48)


def test_vector_aoi_region(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    # Pixel columns 0-39, rows 0-47 of the scene grid (origin 500000, 4800000; 10 m pixels).
    ring = [[500000, 4800000], [500400, 4800000], [500400, 4799520], [500000, 4799520], [500000, 4800000]]
    aoi = tmp_path / "aoi.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
                               "features": [{"type": "Feature", "properties": {},
                                             "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    t = Trainer(_cfg(scene, tmp_path / "o", train_region=str(aoi)))
    r = t.train_region
    assert (r.row, r.col, r.height, r.width) == (0, 0, 48, 40) and r.mask.all()
    # a line (or points) covers no area: refused as predict's --aoi refuses it (it trained on the line's pixels)
    line = tmp_path / "line.geojson"
    line.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32633"}},
                                "features": [{"type": "Feature", "properties": {}, "geometry": {
                                    "type": "LineString", "coordinates": [[500000, 4800000], [500400, 4799600]]}}]}))
    with pytest.raises(ParameterError, match=r"line.geojson has no polygons \(lines and points cover no area\)"):
        Trainer(_cfg(scene, tmp_path / "o", train_region=str(line)))


def test_mosaic_tiles_four_independent_windows_of_the_region(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from geoseg.train import RegionData

    t = Trainer(_cfg(scene, tmp_path / "o"))
    # A label "image" whose value encodes its position: every quadrant must be a crop of it.
    h, w = t.train_data.labels.shape
    pos = np.arange(h * w, dtype=np.int64).reshape(h, w)
    data = RegionData(t.train_data.image, pos, t.train_data.region)
    plain = WindowDataset(data, 32, 4, seed=2, flips=False, rot90=False)
    mixed = WindowDataset(data, 32, 4, seed=2, flips=False, rot90=False, mosaic=1.0)
    _, y0 = plain[0]
    assert np.array_equal(y0, pos[y0[0, 0] // w : y0[0, 0] // w + 32, y0[0, 0] % w : y0[0, 0] % w + 32])
    x, y = mixed[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    corners = []
    for r0 in (0, 16):
        for c0 in (0, 16):
            q = y[r0 : r0 + 16, c0 : c0 + 16]
            r, c = divmod(int(q[0, 0]), w)
            assert np.array_equal(q, pos[r : r + 16, c : c + 16])  # a contiguous crop of the region
            np.testing.assert_array_equal(x[:, r0 : r0 + 16, c0 : c0 + 16], data.image[:, r : r + 16, c : c + 16])
            corners.append((r, c))
    assert len(set(corners)) == 4  # drawn independently
    assert not np.array_equal(y, y0)
    # mosaic 0 draws no extra random numbers: older configs give the same windows.
    np.testing.assert_array_equal(WindowDataset(data, 32, 4, seed=2, flips=False, rot90=False, mosaic=0.0)[0][1], y0)


def test_scale_resizes_windows_image_bilinear_labels_nearest(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from geoseg.train import Region, RegionData

    t = Trainer(_cfg(scene, tmp_path / "o", scale=[0.5, 0.5]))
    assert t.cfg.scale == (0.5, 0.5)
    assert t.card({}, 0).training["augment"]["scale"] == [0.5, 0.5]
    assert "scale" not in Trainer(_cfg(scene, tmp_path / "o")).card({}, 0).training["augment"]
    # A 64x64 region read with zoom 0.5 into 32-pixel windows: the whole region, halved.
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 64, 64)).astype(np.float32)
    lab = rng.integers(0, 3, size=(64, 64)).astype(np.int64)
    data = RegionData(img, lab, Region(0, 0, 64, 64, np.ones((64, 64), bool)))
    x, y = WindowDataset(data, 32, 1, seed=0, flips=False, rot90=False, scale=t.cfg.scale)[0]
    assert x.shape == (2, 32, 32) and y.shape == (32, 32)
    # Bilinear at pixel-centre alignment halves to the mean of each 2x2 block; labels are
    # nearest (one source pixel each, no value invented).
    np.testing.assert_allclose(x, img.reshape(2, 32, 2, 32, 2).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_array_equal(y, lab[1::2, 1::2])
    # Zoom 2: a 16-pixel source window doubled; each label repeats in a 2x2 block, and a ramp
    # stays a ramp with half the slope inside the window.
    ramp = np.broadcast_to(np.arange(64, dtype=np.float32), (2, 64, 64)).copy()
    pos = np.arange(64 * 64, dtype=np.int64).reshape(64, 64)
    x, y = WindowDataset(RegionData(ramp, pos, data.region), 32, 1, seed=3, flips=False, rot90=False, scale=(2.0, 2.0))[0]
    r, c = divmod(int(y[0, 0]), 64)
    np.testing.assert_array_equal(y, np.repeat(np.repeat(pos[r : r + 16, c : c + 16], 2, axis=0), 2, axis=1))
    np.testing.assert_allclose(np.diff(x[:, :, 1:-1], axis=2), 0.5, atol=1e-5)
    np.testing.assert_allclose(x[:, :, 1], c + 0.25, atol=1e-5)
    # A range draws a different zoom per window; off draws nothing (older configs reproduce).
    spans = set()
    for i in range(8):  # the source columns a window's first row covers
        y = WindowDataset(RegionData(ramp, pos, data.region), 32, 8, seed=1, flips=False, rot90=False, scale=(0.5, 2.0))[i][1]
        spans.add(int(y[0, -1] - y[0, 0]))
    assert len(spans) > 1 and min(spans) >= 15 and max(spans) <= 63
    plain = WindowDataset(t.train_data, 32, 2, seed=5, brightness=0.1)
    off = WindowDataset(t.train_data, 32, 2, seed=5, brightness=0.1, scale=None)
    np.testing.assert_array_equal(plain[1][0], off[1][0])
    for bad in ([0.1, 1.0], [1.5, 1.2], "big", [1.0]):
        with pytest.raises(ParameterError, match="scale"):
            _cfg(scene, tmp_path / "o", scale=bad)
    assert _cfg(scene, tmp_path / "o", scale=[1, 1]).scale is None


def test_ema_weights_are_validated_saved_and_resumed(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from geoseg.models.checkpoints import read_state_dict

    kw = {"schedule": "constant", "warmup": 0, "val_every": 2, "ema": 0.5, "val_region": None}
    train(_cfg(scene, tmp_path / "a", iterations=2, **kw))
    res = train(_cfg(scene, tmp_path / "a", iterations=4, resume=str(tmp_path / "a" / "checkpoints"), **kw))
    assert res.best_iteration == 4
    straight = train(_cfg(scene, tmp_path / "b", iterations=4, **kw))
    shipped = read_state_dict(tmp_path / "b" / "weights.pdparams")
    raw = read_state_dict(tmp_path / "b" / "checkpoints" / "last.pdparams")
    ema = paddle.load(str(tmp_path / "b" / "checkpoints" / "last.ema.pdparams"))
    key = next(k for k in raw if k.endswith("weight"))
    np.testing.assert_allclose(np.asarray(shipped[key]), np.asarray(ema[key]), rtol=1e-6)
    assert np.abs(np.asarray(shipped[key]) - np.asarray(raw[key])).max() > 1e-6  # the average, not the last step
    resumed = read_state_dict(tmp_path / "a" / "weights.pdparams")
    for k in shipped:  # resuming restores the average too
        np.testing.assert_allclose(np.asarray(resumed[k]), np.asarray(shipped[k]), rtol=1e-4, atol=1e-5)
    assert straight.history[-1]["loss"] == pytest.approx(res.history[-1]["loss"], rel=1e-4)
    assert ModelCard.load(tmp_path / "b" / "weights.yaml").training["ema"] == 0.5
    with pytest.raises(ParameterError, match="ema"):
        _cfg(scene, tmp_path, ema=1.0)


def test_cli_set_null_clears_a_config_key(scene: tuple[Path, Path], tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, tmp_path / "cli").to_dict()))
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "c.yaml"), "--iterations", "2",
                            "--set", "val_region=null", "--set", "train_region=[0,0,64,48]"])
    assert r.exit_code == 0, r.output
    log = (tmp_path / "cli" / "train_log.csv").read_text()
    assert "val_miou" in log.splitlines()[0] and all(row.split(",")[6] == "" for row in log.splitlines()[1:])


def test_class_prior_matches_what_predict_sees(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # The card's class_prior (computed by train on its in-memory region) and the mean of the
    # posteriors predict samples from the same pixels agree: same normalisation, bands, windows.
    from geoseg.engine import build_predictor, resolve_model, sample_posteriors
    from geoseg.io import open_scene
    from geoseg.tiling import make_grid

    out = tmp_path / "whole"
    train(_cfg(scene, out, train_region=None, val_region=None, iterations=6, adapt_prior=True))
    src = resolve_model(None, out / "weights.pdparams")
    assert src.card.class_prior is not None and src.card.adapt_prior  # the config's adapt_prior reaches the card
    meta = open_scene(scene[0])
    predictor, _ = build_predictor(src, "cpu")
    grid = make_grid(meta.height, meta.width, src.card.tile_size, src.card.overlap)
    post = sample_posteriors(meta, (1, 2, 3), grid, src.card, predictor, max_pixels=10**9)
    assert post.shape[0] == (meta.height * meta.width - 36)  # every valid pixel once
    np.testing.assert_allclose(post.mean(axis=0), src.card.class_prior, atol=0.01)


def test_gap_channels_train_on_nan_gaps_as_predict_feeds_them(tmp_path: Path) -> None:
    # With params.gap_channels, band gaps reach the network as NaN in training (and band_dropout
    # writes NaN), the run trains with finite losses, and the card's class prior equals what
    # predict's engine samples: both feed the model the same NaN-marked inputs.
    import csv

    from geoseg.engine import build_predictor, resolve_model, sample_posteriors
    from geoseg.io import open_scene
    from geoseg.tiling import make_grid

    rng = np.random.default_rng(1)
    cls = class_image(H, W, 3, seed=1) + 1
    img = (np.array([[40, 90, 160], [200, 60, 100], [120, 180, 30]])[cls - 1].transpose(2, 0, 1)
           + rng.normal(0, 8, (3, H, W))).clip(1, 255).astype(np.uint8)
    img[2, :, :12] = 0  # band 3's frame
    scene = (write_raster(tmp_path / "img.tif", img, nodata=0),
             write_raster(tmp_path / "lab.tif", cls.astype(np.uint8), nodata=0))
    settings = {"params": {"width": 0.125, "gap_channels": True}, "train_region": None, "val_region": None,
                "iterations": 6, "band_dropout": 0.5}
    t = Trainer(_cfg(scene, tmp_path / "o", **settings))
    x = t.train_data.image
    assert np.isnan(x[2, :, :12]).all() and np.isfinite(x[2, :, 12:]).all() and np.isfinite(x[:2]).all()
    ds = WindowDataset(t.train_data, 32, 20, seed=2, band_dropout=0.5, gap_fill=t.gap_fill)
    assert any(np.isnan(ds[i][0]).all(axis=(1, 2)).any() for i in range(20))  # a whole band dropped as NaN
    out = tmp_path / "run"
    train(_cfg(scene, out, **settings))
    with open(out / "train_log.csv") as f:
        assert all(np.isfinite(float(r["loss"])) for r in csv.DictReader(f))
    src = resolve_model(None, out / "weights.pdparams")
    assert src.card.params["gap_channels"] is True and np.isnan(src.card.gap_fill)
    meta = open_scene(scene[0])
    predictor, _ = build_predictor(src, "cpu")
    grid = make_grid(meta.height, meta.width, src.card.tile_size, src.card.overlap)
    post = sample_posteriors(meta, (1, 2, 3), grid, src.card, predictor, max_pixels=10**9)
    assert post.shape[0] == meta.height * meta.width and np.isfinite(post).all()
    np.testing.assert_allclose(post.mean(axis=0), src.card.class_prior, atol=0.01)


def test_indices_model_trains_and_predicts_from_its_card(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # params.indices: the trainer hands the network its normalisation (band_stats), the card keeps
    # only the pairs, and predict rebuilds the same network from the card: the class prior the
    # run measured is what predict's engine samples with the weights and card it wrote.
    from geoseg.engine import build_predictor, resolve_model, sample_posteriors
    from geoseg.io import open_scene
    from geoseg.tiling import make_grid

    out = tmp_path / "run"
    settings = {"params": {"width": 0.125, "indices": [[3, 1], [2, 3]]}, "train_region": None, "val_region": None,
                "iterations": 6}
    t = Trainer(_cfg(scene, tmp_path / "o", **settings))
    net = t.configure_model()
    assert net.indices == ((2, 0), (1, 2))
    assert net.band_stats == (tuple(t.normalization.mean), tuple(t.normalization.std))
    train(_cfg(scene, out, **settings))
    src = resolve_model(None, out / "weights.pdparams")
    assert src.card.params["indices"] == [[3, 1], [2, 3]] and "band_stats" not in src.card.params
    assert src.card.model_kwargs()["band_stats"] == net.band_stats
    meta = open_scene(scene[0])
    predictor, _ = build_predictor(src, "cpu")
    grid = make_grid(meta.height, meta.width, src.card.tile_size, src.card.overlap)
    post = sample_posteriors(meta, (1, 2, 3), grid, src.card, predictor, max_pixels=10**9)
    np.testing.assert_allclose(post.mean(axis=0), src.card.class_prior, atol=0.01)


class _Softmaxed(paddle.nn.Layer):
    """A 'model' whose logits are its input: each pixel's probabilities depend on that pixel only."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return [x * 1.0]


def test_sampled_class_prior_counts_each_core_pixel_once() -> None:
    from geoseg.tiling import core_bounds, make_grid, spread_tiles
    from geoseg.train import sampled_mean_probs

    rng = np.random.default_rng(4)
    image = rng.normal(0, 2, (3, 40, 50)).astype(np.float32)
    valid = rng.random((40, 50)) > 0.3
    probs = np.exp(image) / np.exp(image).sum(axis=0)
    grid = make_grid(40, 50, 16, 4)
    # Every window: every valid pixel exactly once, i.e. the plain mean over the valid pixels.
    whole = sampled_mean_probs(_Softmaxed(), image, valid, grid, 3, len(grid))
    np.testing.assert_allclose(whole, probs[:, valid].mean(axis=1), atol=1e-6)
    # A spread of 5 windows: the mean over the valid pixels of those windows' cores only.
    part = sampled_mean_probs(_Softmaxed(), image, valid, grid, 3, 5)
    rb, cb = core_bounds(grid.row_offsets, 16, 40), core_bounds(grid.col_offsets, 16, 50)
    chosen = np.zeros_like(valid)
    for t in spread_tiles(grid, 5):
        i, j = t.index
        chosen[rb[i] : rb[i + 1], cb[j] : cb[j + 1]] = True
    assert chosen.sum() < valid.size / 2
    np.testing.assert_allclose(part, probs[:, valid & chosen].mean(axis=1), atol=1e-6)
    assert not np.allclose(part, whole, atol=1e-3)


def test_a_large_training_region_samples_its_class_prior(scene: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.train as T

    tr = Trainer(_cfg(scene, tmp_path / "o", window=16, val_region=None))
    paddle.seed(0)
    model = tr.configure_model()
    exact = np.array(tr.class_prior(model))
    calls = []
    real = T.sampled_mean_probs
    monkeypatch.setattr(T, "PRIOR_WINDOWS", 6)
    monkeypatch.setattr(T, "sampled_mean_probs", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    sampled = np.array(tr.class_prior(model))
    assert calls == [6]  # more windows than PRIOR_WINDOWS: sampled, that many windows
    assert sampled.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(sampled, exact, atol=0.05)


def test_labels_are_held_compactly_and_served_as_int64(scene: tuple[Path, Path], tmp_path: Path) -> None:
    tr = Trainer(_cfg(scene, tmp_path / "o"))
    assert tr.train_data.labels.dtype == np.uint8 and tr.val_data is not None and tr.val_data.labels.dtype == np.uint8
    ds = WindowDataset(tr.train_data, 16, 3, seed=0)
    x, y = ds[0]
    assert y.dtype == np.int64 and x.dtype == np.float32
    assert set(np.unique(y)) <= {0, 1, 2, IGNORE_INDEX}


def test_label_zero_is_learned_when_it_is_a_class(tmp_path: Path) -> None:
    """A cloud mask's labels 0 (cloud), 1, 2: with class 0 in the config nothing is ignored by default."""
    rng = np.random.default_rng(0)
    cls = class_image(H, W, 3, seed=1)  # 0..2
    img = (np.array([[40, 90, 160], [200, 60, 100], [120, 180, 30]], np.float64)[cls].transpose(2, 0, 1)
           + rng.normal(0, 8, (3, H, W)))
    pair = (write_raster(tmp_path / "img.tif", np.clip(img, 1, 255).astype(np.uint8)),
            write_raster(tmp_path / "lab.tif", cls.astype(np.uint8)))
    classes = [{"id": 0, "name": "cloud", "color": [255, 255, 255]}, {"id": 1, "name": "shadow", "color": [9, 9, 9]},
               {"id": 2, "name": "clear", "color": [0, 200, 0]}]
    cfg = _cfg(pair, tmp_path / "o", classes=classes)
    assert cfg.ignore == ()
    tr = Trainer(cfg)
    labels = tr.train_data.labels[:, :48]  # the training region's labels as class indexes
    np.testing.assert_array_equal(labels, cls[:, :48])
    with pytest.raises(ParameterError, match=r"0 are both classes and ignore values.*ignore: \[\]"):
        _cfg(pair, tmp_path / "o", classes=classes, ignore=[0, 255])
    assert _cfg(pair, tmp_path / "o").ignore == (0,)  # classes 1..3: 0 still means unlabelled


def test_a_binary_mask_with_background_zero_is_not_trained_as_one_class(tmp_path: Path) -> None:
    """A building mask (0 background, 1 building, no nodata): the default ignore [0] would leave one
    class, and a one-class model predicts that class everywhere: refused, saying how to keep 0."""
    cls = class_image(H, W, 2, seed=3).astype(np.uint8)  # 0..1
    img = np.stack([cls * 90 + 40, cls * 50 + 60, 200 - cls * 70]).astype(np.uint8)
    pair = (write_raster(tmp_path / "img.tif", img), write_raster(tmp_path / "lab.tif", cls))
    with pytest.raises(ParameterError, match=r"labels hold one class only \(1\) in the training region; label value 0 "
                                             r"\(ignore\) is not a class: .*set ignore: \[\]"):
        Trainer(_cfg(pair, tmp_path / "o", classes=None))
    tr = Trainer(_cfg(pair, tmp_path / "o", classes=None, ignore=[]))
    assert [c.id for c in tr.classes] == [0, 1]
    # 0 as the label raster's nodata: the hint names it
    nod = (pair[0], write_raster(tmp_path / "lab0.tif", cls, nodata=0))
    with pytest.raises(ParameterError, match=r"value 0 \(the label raster's nodata\) is not a class"):
        Trainer(_cfg(nod, tmp_path / "o", classes=None, ignore=[]))
    with pytest.raises(ParameterError, match=r"the config's classes list one class only \(1\)"):
        Trainer(_cfg(pair, tmp_path / "o", classes=[{"id": 1, "name": "building"}]))
    # a 0/255 mask: 255 cannot be a class id (the masks' nodata): say how to recode it
    m255 = (pair[0], write_raster(tmp_path / "lab255.tif", cls * 255))
    with pytest.raises(ParameterError, match=r"label value\(s\) 255 in lab255.tif cannot be class ids .*gdal_calc.py"):
        Trainer(_cfg(m255, tmp_path / "o", classes=None, ignore=[]))


def test_a_region_too_large_for_memory_is_refused_before_reading(scene: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import collections

    import psutil

    import geoseg.train as T

    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("vm", "available")(10_000))
    read = []
    monkeypatch.setattr(T, "load_region", lambda *a, **k: read.append(1))
    with pytest.raises(ParameterError, match=r"train_region \(48x48 pixels, 3 bands\): about .* GB of memory needed, .* available: .*smaller train_region"):
        Trainer(_cfg(scene, tmp_path / "o", read_from="memory"))
    second = _second_scene(tmp_path)
    with pytest.raises(ParameterError, match=r"the 2 training regions: about .* GB of memory needed.* smaller train_region"):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", read_from="memory"))
    # read_from: auto reads such regions from disk, but their labels must still fit.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("vm", "available")(4_000))
    with pytest.raises(ParameterError, match=r"training regions' labels: about .* GB of memory needed"):
        Trainer(_cfg(scene, tmp_path / "o"))
    assert not read
    with pytest.raises(ParameterError, match="read_from 'ram': choose auto"):
        _cfg(scene, tmp_path / "o", read_from="ram")


def test_reading_a_striped_image_from_disk_suggests_a_tiled_copy(tmp_path: Path) -> None:
    import warnings

    cls = (class_image(48, 100, 3, seed=2) + 1).astype(np.uint8)
    img = np.stack([cls * 40, cls * 30, cls * 20]).astype(np.uint8)
    labels = write_raster(tmp_path / "lab.tif", cls, nodata=0)
    for name, profile, warns in (("striped", {}, True),
                                 ("tiled", {"tiled": True, "blockxsize": 16, "blockysize": 16}, False)):
        scene = (write_raster(tmp_path / f"{name}.tif", img, nodata=0, **profile), labels)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Trainer(_cfg(scene, tmp_path / name, read_from="disk", train_region=[0, 0, 100, 40], val_region=None))
        said = [str(w.message) for w in seen if w.category is PerformanceWarning]
        assert bool(said) is warns, name
        assert any(m.startswith(f"{name}.tif is stored in strips, not tiles") for m in said) is warns


def test_auto_reads_from_disk_what_would_take_over_half_the_memory(scene: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import collections

    import psutil

    from geoseg.train import region_memory

    t = Trainer(_cfg(scene, tmp_path / "o"))
    assert t.read_from == "memory"
    need = region_memory(t.train_region, 3, "uint8")
    for available, mode in ((2 * need, "memory"), (2 * need - 2, "disk")):
        monkeypatch.setattr(psutil, "virtual_memory",
                            lambda a=available: collections.namedtuple("vm", "available total")(a, 2**40))
        assert Trainer(_cfg(scene, tmp_path / "o")).read_from == mode


@pytest.mark.parametrize("gaps", [False, True])
def test_regions_read_from_disk_train_as_those_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         gaps: bool) -> None:
    # read_from: disk holds only the labels (read in blocks of rows) and reads each window from
    # the file: the same statistics, labels, windows, validation and class prior as in memory.
    import pickle

    import geoseg.train as T

    rng = np.random.default_rng(1)
    cls = class_image(H, W, 3, seed=1) + 1
    img = (np.array([[40, 90, 160], [200, 60, 100], [120, 180, 30]])[cls - 1].transpose(2, 0, 1)
           + rng.normal(0, 8, (3, H, W))).clip(1, 255).astype(np.uint8)
    img[:, :5, :7] = 0  # nodata corner
    if gaps:
        img[2, :, :12] = 0  # band 3's frame
    scene = (write_raster(tmp_path / "img.tif", img, nodata=0),
             write_raster(tmp_path / "lab.tif", cls.astype(np.uint8), nodata=0))
    settings = {"train_on_gaps": not gaps, "params": {"width": 0.125, "gap_channels": gaps},
                "train_region": [3, 2, 45, 44]}  # [col, row, width, height]: windows away from the origin
    mem = Trainer(_cfg(scene, tmp_path / "m", **settings))
    monkeypatch.setattr(T, "BAND_PIXELS", 48 * 7)  # blocks of 7 rows: statistics pooled over blocks
    disk = Trainer(_cfg(scene, tmp_path / "d", read_from="disk", **settings))
    assert mem.read_from == "memory" and disk.read_from == "disk"
    assert isinstance(disk.train_data.image, T.DiskImage) and disk.train_data.image.shape == mem.train_data.image.shape
    np.testing.assert_allclose(disk.normalization.mean, mem.normalization.mean, atol=2e-6)
    np.testing.assert_allclose(disk.normalization.std, mem.normalization.std, atol=2e-6)
    np.testing.assert_array_equal(disk.train_data.labels, mem.train_data.labels)
    np.testing.assert_array_equal(disk.train_valid, mem.train_valid)
    assert disk.val_data is not None and mem.val_data is not None
    np.testing.assert_array_equal(disk.val_data.labels, mem.val_data.labels)
    np.testing.assert_allclose(np.asarray(disk.val_data.image), mem.val_data.image, atol=1e-4, equal_nan=True)
    image = pickle.loads(pickle.dumps(disk.train_data.image))  # as DataLoader workers get it
    np.testing.assert_allclose(image[:, 10:42, 3:35], mem.train_data.image[:, 10:42, 3:35], atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(image[1], mem.train_data.image[1], atol=1e-4, equal_nan=True)
    a = WindowDataset(disk.train_data, 32, 6, seed=4, brightness=0.1, gap_fill=disk.gap_fill)
    b = WindowDataset(mem.train_data, 32, 6, seed=4, brightness=0.1, gap_fill=mem.gap_fill)
    for i in range(6):
        np.testing.assert_allclose(a[i][0], b[i][0], atol=1e-4, equal_nan=True)
        np.testing.assert_array_equal(a[i][1], b[i][1])
    # Rescaled windows read from disk too (larger and smaller windows than the window size).
    a = WindowDataset(disk.train_data, 32, 6, seed=4, gap_fill=disk.gap_fill, scale=(0.75, 1.33))
    b = WindowDataset(mem.train_data, 32, 6, seed=4, gap_fill=mem.gap_fill, scale=(0.75, 1.33))
    for i in range(6):
        np.testing.assert_allclose(a[i][0], b[i][0], atol=1e-4, equal_nan=True)
        np.testing.assert_array_equal(a[i][1], b[i][1])
    res = train(_cfg(scene, tmp_path / "run", read_from="disk", iterations=3, **settings))
    assert res.best_miou is not None and res.weights.exists()
    model = disk.configure_model()
    from geoseg.models.checkpoints import load_weights

    load_weights(model, res.weights)
    # The class prior (sampled windows) and validation (blended windows) read the same pixels.
    np.testing.assert_allclose(disk.class_prior(model), mem.class_prior(model), atol=1e-4)
    assert disk.validate(model)["miou"] == pytest.approx(mem.validate(model)["miou"], abs=1e-3)


# ---- several scenes -------------------------------------------------------------------------------
def _second_scene(tmp_path: Path, *, bands: int = 3, dtype: str = "uint8", offset: int = 30) -> tuple[Path, Path]:
    """Another scene (40x56) of the same classes, brighter by ``offset``."""
    rng = np.random.default_rng(9)
    cls = class_image(40, 56, 3, seed=5) + 1
    means = np.array([[40, 90, 160, 70], [200, 60, 100, 20], [120, 180, 30, 220]], np.float64)[:, :bands]
    img = np.clip(means[cls - 1].transpose(2, 0, 1) + offset + rng.normal(0, 8, (bands, 40, 56)), 1, 255)
    return (write_raster(tmp_path / "img2.tif", img.astype(dtype), nodata=0),
            write_raster(tmp_path / "lab2.tif", cls.astype(np.uint8), nodata=0))


def _scenes_cfg(scene: tuple[Path, Path], second: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    base = _cfg(scene, out).to_dict()
    for k in ("image", "labels", "train_region", "val_region"):
        base.pop(k)
    base["scenes"] = [
        {"image": str(scene[0]), "labels": str(scene[1]), "train_region": [0, 0, 48, 48], "val_region": [48, 0, 16, 48]},
        {"image": str(second[0]), "labels": str(second[1]), "train_region": [0, 0, 40, 40], "val_region": [40, 0, 16, 40]},
    ]
    base.update(kw)
    return TrainConfig.from_mapping(base)


def test_pooled_band_statistics_equal_those_of_all_pixels_together() -> None:
    from geoseg.train import band_statistics, pooled_band_statistics

    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 255, (2, 30, 20)), rng.integers(100, 255, (2, 10, 50))
    va, vb = rng.random((30, 20)) > 0.2, rng.random((10, 50)) > 0.5
    gb = np.zeros((2, 10, 50), bool)
    gb[1, :, :10] = True  # band 2 lacks data in part of region b
    pooled = pooled_band_statistics([(a, va, None), (b, vb, gb)], 1 / 255)
    band2 = np.concatenate([a[1][va], b[1][vb & ~gb[1]]]) / 255
    assert pooled[0][1] == pytest.approx(band2.mean(), abs=1e-6) and pooled[1][1] == pytest.approx(band2.std(), abs=1e-6)
    # The same pixels as one region give the same figures.
    joined = np.concatenate([a[:, va], b[:, vb]], axis=1)[:, None, :]
    single = band_statistics(joined, np.ones(joined.shape[1:], bool), 1 / 255)
    np.testing.assert_allclose(pooled_band_statistics([(a, va, None), (b, vb, None)], 1 / 255), single, atol=2e-6)


def test_windows_are_drawn_from_every_region_by_labelled_pixels() -> None:
    from geoseg.train import Region, RegionData

    def region(value: float, labelled: int) -> RegionData:
        lab = np.full((32, 32), IGNORE_INDEX, np.uint8)
        lab.ravel()[:labelled] = int(value)
        return RegionData(np.full((2, 32, 32), value, np.float32), lab, Region(0, 0, 32, 32, np.ones((32, 32), bool)))

    ds = WindowDataset([region(0.0, 256), region(1.0, 768)], 16, 400, seed=1, flips=False, rot90=False)
    from_second = np.mean([ds[i][0][0, 0, 0] == 1.0 for i in range(400)])
    assert 0.68 < from_second < 0.82  # 3/4 of the labelled pixels are in the second region


def test_training_on_two_scenes_pools_statistics_validation_and_prior(scene: tuple[Path, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio

    import geoseg.train as T

    second = _second_scene(tmp_path)
    tr = Trainer(_scenes_cfg(scene, second, tmp_path / "two"))
    assert len(tr.train_sets) == 2 and len(tr.val_sets) == 2
    # Normalisation: the mean of band 1 over both training regions' valid pixels.
    a = rasterio.open(scene[0]).read(1)[:48, :48]
    b = rasterio.open(second[0]).read(1)[:40, :40]
    both = np.concatenate([a[a != 0], b[b != 0]]).astype(np.float64) / 255
    assert tr.normalization.mean[0] == pytest.approx(both.mean(), abs=1e-6)
    assert tr.normalization.std[0] == pytest.approx(both.std(), abs=1e-6)
    # Validation counts the labelled pixels of both validation regions: with every pixel called
    # index 0, OA is the share of index 0 among them.
    monkeypatch.setattr(T, "predict_array", lambda model, image, *a, **k: np.zeros(image.shape[1:], np.int64))
    labels = np.concatenate([d.labels[d.labels != IGNORE_INDEX] for d in tr.val_sets])
    assert tr.validate(None)["overall_accuracy"] == pytest.approx(float((labels == 0).mean()))
    monkeypatch.undo()
    # Training runs end to end; the card names both scenes and the prior covers both.
    res = train(_scenes_cfg(scene, second, tmp_path / "two", iterations=3, val_every=3))
    card = ModelCard.load(res.card)
    assert [Path(sc["image"]).name for sc in card.training["scenes"]] == ["img.tif", "img2.tif"]
    assert card.training["scenes"][1]["val_region"] == [40, 0, 16, 40] and "image" not in card.training
    assert sum(card.class_prior) == pytest.approx(1.0, abs=1e-5) and card.metrics["validation"]["miou"] >= 0


def test_scene_lists_are_checked_before_reading(scene: tuple[Path, Path], tmp_path: Path) -> None:
    second = _second_scene(tmp_path)
    with pytest.raises(ParameterError, match="both scenes and image"):
        _scenes_cfg(scene, second, tmp_path / "o", image=str(scene[0]))
    with pytest.raises(ParameterError, match="scene 2 lacks 'labels'"):
        _scenes_cfg(scene, second, tmp_path / "o", scenes=[{"image": str(scene[0]), "labels": str(scene[1])},
                                                           {"image": str(second[0])}])
    with pytest.raises(ParameterError, match="scene 1 has unknown key.*bands"):
        _scenes_cfg(scene, second, tmp_path / "o", scenes=[{"image": str(scene[0]), "labels": str(scene[1]), "bands": [1]}])
    (tmp_path / "x").mkdir()
    four = _second_scene(tmp_path / "x", bands=4)
    with pytest.raises(ParameterError, match="scene 2 .* gives 4 bands but scene 1 gives 3"):
        Trainer(_scenes_cfg(scene, four, tmp_path / "o"))
    (tmp_path / "y").mkdir()
    wide = _second_scene(tmp_path / "y", dtype="uint16")
    with pytest.raises(ParameterError, match="scene 2 .* is uint16 but scene 1 is uint8"):
        Trainer(_scenes_cfg(scene, wide, tmp_path / "o"))
    with pytest.raises(ParameterError, match=r"scene 2 \(img2.tif\) train_region .* lies outside"):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(scene[0]), "labels": str(scene[1])},
            {"image": str(second[0]), "labels": str(second[1]), "train_region": [500, 500, 10, 10]}]))
    with pytest.raises(GridMismatchError):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(scene[0]), "labels": str(scene[1])}, {"image": str(second[0]), "labels": str(scene[1])}]))


def test_a_scene_s_own_label_shift_moves_only_its_labels(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # label_shift in a scene entry applies to that scene only; the others keep the config's.
    second = _second_scene(tmp_path)
    base = Trainer(_scenes_cfg(scene, second, tmp_path / "o", label_shift=[0, 1]))
    cfg = _scenes_cfg(scene, second, tmp_path / "o2", label_shift=[0, 1], scenes=[
        {"image": str(scene[0]), "labels": str(scene[1]), "train_region": [0, 0, 48, 48]},
        {"image": str(second[0]), "labels": str(second[1]), "train_region": [0, 0, 40, 40], "label_shift": [2, 0]}])
    assert [sc["label_shift"] for sc in cfg.scene_list()] == [(0, 1), (2, 0)]
    t = Trainer(cfg)
    np.testing.assert_array_equal(t.train_sets[0].labels, base.train_sets[0].labels)  # the config's [0, 1]
    plain = Trainer(_scenes_cfg(scene, second, tmp_path / "o3"))
    a, b = plain.train_sets[1].labels, t.train_sets[1].labels
    assert (b[:2] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(b[2:], a[:-2])  # two rows down, no column shift
    assert t.card({}, 0).training["scenes"][1]["label_shift"] == [2, 0]
    assert "label_shift" not in t.card({}, 0).training["scenes"][0]
    with pytest.raises(ParameterError, match="scene 2 label_shift"):
        _scenes_cfg(scene, second, tmp_path / "o4", scenes=[
            {"image": str(scene[0]), "labels": str(scene[1])},
            {"image": str(second[0]), "labels": str(second[1]), "label_shift": [1.5, 0]}])


def test_a_large_region_is_predicted_in_bands_with_the_same_result() -> None:
    from geoseg.train import predict_array

    rng = np.random.default_rng(6)
    image = rng.normal(0, 2, (3, 150, 40)).astype(np.float32)
    whole = predict_array(_Softmaxed(), image, 3, 16, 4)
    calls = []

    class Counting(_Softmaxed):
        def forward(self, x):  # type: ignore[no-untyped-def]
            calls.append(x.shape[0])
            return super().forward(x)

    banded = predict_array(Counting(), image, 3, 16, 4, max_pixels=32 * 40)
    np.testing.assert_array_equal(banded, whole)
    np.testing.assert_array_equal(whole, image.argmax(axis=0))
    assert len(calls) > len(list(range(0, 150, 12)))  # several bands, each with its own windows
    # A real network: bands with a window of context each side agree with the whole pass.
    paddle.seed(0)
    from geoseg.models import build_model

    net = build_model("unet", in_channels=3, num_classes=3, width=0.125)
    a = predict_array(net, image, 3, 32, 8)
    b = predict_array(net, image, 3, 32, 8, max_pixels=32 * 40)
    assert (a == b).mean() > 0.98


def test_scene_patterns_and_validation_only_scenes(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    chips, labs = tmp_path / "chips", tmp_path / "labs"
    chips.mkdir(), labs.mkdir()
    for name in ("b", "a", "c"):
        shutil.copy(scene[0], chips / f"{name}.tif")
        shutil.copy(scene[1], labs / f"{name}_lab.tif")
    second = _second_scene(tmp_path)
    cfg = _scenes_cfg(scene, second, tmp_path / "o", scenes=[
        {"image": str(chips / "*.tif"), "labels": str(labs / "{stem}_lab.tif"), "train_region": [0, 0, 48, 48]},
        {"image": str(second[0]), "labels": str(second[1]), "use": "val"},
    ])
    assert [Path(sc["image"]).name for sc in cfg.scene_list()] == ["a.tif", "b.tif", "c.tif", "img2.tif"]
    assert Path(cfg.scene_list()[1]["labels"]).name == "b_lab.tif"
    tr = Trainer(cfg)
    assert len(tr.train_sets) == 3 and len(tr.val_sets) == 1  # the validation scene trains nothing
    assert tr.val_sets[0].image.shape[1:] == (40, 56)  # ... and is validated whole
    card = tr.card({}, 0)
    assert card.training["scene_files"] == 4 and card.training["scenes"][1]["use"] == "val"
    with pytest.raises(ParameterError, match="matches no file"):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(chips / "*.tiff"), "labels": str(labs / "{stem}_lab.tif")}]))
    with pytest.raises(ParameterError, match="is a pattern: its labels must name .*{stem}"):
        _scenes_cfg(scene, second, tmp_path / "o", scenes=[{"image": str(chips / "*.tif"), "labels": str(scene[1])}])
    with pytest.raises(ParameterError, match="validation only"):
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(second[0]), "labels": str(second[1]), "use": "val"}]))
    with pytest.raises(ParameterError, match="use 'test': choose train"):
        _scenes_cfg(scene, second, tmp_path / "o", scenes=[{"image": str(scene[0]), "labels": str(scene[1]), "use": "test"}])
    # A missing label file of one matched image names it.
    (labs / "c_lab.tif").unlink()
    from geoseg.errors import SceneReadError

    with pytest.raises(SceneReadError, match="c_lab.tif does not exist"):
        Trainer(cfg)


def test_the_class_prior_of_many_scenes_predicts_a_bounded_number_of_windows(scene: tuple[Path, Path], tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import geoseg.train as T

    chips, labs = tmp_path / "chips", tmp_path / "labs"
    chips.mkdir(), labs.mkdir()
    for k in range(6):
        shutil.copy(scene[0], chips / f"c{k}.tif")
        shutil.copy(scene[1], labs / f"c{k}.tif")
    tr = Trainer(_scenes_cfg(scene, scene, tmp_path / "o", window=16, scenes=[
        {"image": str(chips / "*.tif"), "labels": str(labs / "{stem}.tif"), "train_region": [0, 0, 48, 48]}]))
    paddle.seed(0)
    model = tr.configure_model()
    exact = np.array(tr.class_prior(model))  # 6 scenes x 9 windows (16 px, no overlap) <= 64: every window
    seen = []
    real = T.predict_probs, T.sampled_mean_probs
    monkeypatch.setattr(T, "predict_probs", lambda *a, **k: seen.append(16) or real[0](*a, **k))
    monkeypatch.setattr(T, "sampled_mean_probs", lambda *a, **k: seen.append(a[-1]) or real[1](*a, **k))
    monkeypatch.setattr(T, "PRIOR_WINDOWS", 4)  # fewer than the scenes: 4 of the 6, one window each
    few = np.array(tr.class_prior(model))
    assert seen == [1, 1, 1, 1]
    # Four copies of one scene, one window each: the prior of that one (middle) window's core.
    grid = T.make_grid(48, 48, 16, 0)
    one = real[1](model, tr.train_sets[0].image, tr.train_valids[0], grid, 3, 1)
    np.testing.assert_allclose(few, one / one.sum(), atol=2e-6)
    assert exact.sum() == pytest.approx(1.0, abs=1e-5) and not np.allclose(exact, few, atol=1e-3)


def test_cli_train_on_a_scene_list(scene: tuple[Path, Path], tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    second = _second_scene(tmp_path)
    cfg = _scenes_cfg(scene, second, tmp_path / "cli2", iterations=2, val_every=2).to_dict()
    assert "image" in cfg and cfg["image"] is None and len(cfg["scenes"]) == 2
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(cli, ["-q", "train", "--config", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(tmp_path / "cli2" / "weights.yaml")
    assert card.training["scene_files"] == 2 and "img2.tif" in card.description
    # --image on top of a scene list: one line saying what to do, exit code 1.
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "s.yaml"), "--image", str(scene[0])])
    assert r.exit_code == 1 and "both scenes and image" in r.output and "Traceback" not in r.output


def test_polygon_labels_are_burnt_onto_the_image_grid(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    def box(c0: int, r0: int, c1: int, r1: int) -> list[list[float]]:  # pixel box -> map ring (10 m, origin 500000/4800000)
        x0, x1, y0, y1 = 500000 + 10 * c0, 500000 + 10 * c1, 4800000 - 10 * r0, 4800000 - 10 * r1
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    def polys(path: Path, props: list[dict]) -> Path:
        feats = [{"type": "Feature", "properties": p, "geometry": {"type": "Polygon", "coordinates": [box(*b)]}}
                 for p, b in zip(props, [(8, 8, 20, 20), (24, 10, 40, 30)])]
        path.write_text(json.dumps({"type": "FeatureCollection", "features": feats,
                                    "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}))
        return path

    by_id = polys(tmp_path / "ids.geojson", [{"cls": 1, "note": "a"}, {"cls": 3, "note": "b"}])
    t = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="cls", val_region=None,
                     train_region=[0, 0, 48, 48]))
    lab = t.train_data.labels
    assert (lab[8:20, 8:20] == 0).all() and (lab[10:30, 24:40] == 2).all()  # ids 1, 3 -> indexes 0, 2
    inside = np.zeros_like(lab, bool)
    inside[8:20, 8:20] = inside[10:30, 24:40] = True
    assert (lab[~inside] == IGNORE_INDEX).all()  # outside every polygon: unlabelled
    assert t.card({}, 0).training["labels"] == str(by_id)
    # Class names instead of ids, matched to the config's classes.
    by_name = polys(tmp_path / "names.geojson", [{"kind": "A"}, {"kind": "c"}])
    t2 = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_name), label_field="kind", val_region=None))
    assert (t2.train_data.labels[10:30, 24:40] == 2).all() and (t2.train_data.labels[8:20, 8:20] == 0).all()
    with pytest.raises(ParameterError, match=r"needs label_field: .*fields: cls, note"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id)))
    # partly names, partly ids (in one text field): both read
    mixed = polys(tmp_path / "mixed.geojson", [{"kind": "3"}, {"kind": "a"}])
    t2 = Trainer(_cfg(scene, tmp_path / "o", labels=str(mixed), label_field="kind", val_region=None))
    assert (t2.train_data.labels[8:20, 8:20] == 2).all() and (t2.train_data.labels[10:30, 24:40] == 0).all()
    with pytest.raises(ParameterError, match="kind must hold class names or whole class ids 1..65535"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(polys(tmp_path / "m0.geojson", [{"kind": "0"}, {"kind": "a"}])),
                     label_field="kind"))
    with pytest.raises(ParameterError, match="values z are not class names or ids"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(polys(tmp_path / "z.geojson", [{"k": "a"}, {"k": "z"}])),
                     label_field="k"))
    with pytest.raises(ParameterError, match="whole class ids 1..65535"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(polys(tmp_path / "zero.geojson", [{"k": 0}, {"k": 2}])),
                     label_field="k"))
    # Footprints: outside every polygon is the background class; with two classes no field is needed.
    two = [{"id": 1, "name": "background", "color": [0, 0, 0]}, {"id": 2, "name": "building", "color": [9, 9, 9]}]
    t3 = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), classes=two, background="Background",
                      val_region=None, train_region=[0, 0, 48, 48]))
    lab3 = t3.train_data.labels
    assert (lab3[inside] == 1).all()  # building -> index 1
    img_valid = np.ones_like(inside)
    img_valid[:6, :6] = False  # the scene's nodata corner stays unlabelled
    assert (lab3[~inside & img_valid] == 0).all() and (lab3[~img_valid] == IGNORE_INDEX).all()
    # with a field, the background fills the rest of a multi-class map
    t4 = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="cls", background=2, val_region=None,
                      train_region=[0, 0, 48, 48]))
    lab4 = t4.train_data.labels
    assert (lab4[8:20, 8:20] == 0).all() and (lab4[10:30, 24:40] == 2).all() and (lab4[~inside & img_valid] == 1).all()
    with pytest.raises(ParameterError, match="background 'sky' is not a class name"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), classes=two, background="sky"))
    with pytest.raises(ParameterError, match=r"background 7 is not one of the config's class ids \[1, 2, 3\]"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="cls", background=7))
    with pytest.raises(ParameterError, match="needs label_field"):  # three classes: which one is a polygon?
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), background=2))


def test_a_refused_config_leaves_no_burnt_labels_behind(scene: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary folder of burnt polygon labels stayed in the temp folder as long as the refusal was held
    (a notebook's last error: for good), with a ResourceWarning when it went."""
    import tempfile

    from geoseg.train import Trainer

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    boxes = [(8, 8, 20, 20), (24, 10, 40, 30)]
    by_id = _polygon_file(tmp_path / "ids.geojson", [{"cls": 1}, {"cls": 2}], boxes)
    with pytest.raises(ParameterError) as caught:
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="cls", train_region=[0, 0, 48, 36],
                     val_region=[0, 36, 12, 12]))
    assert "val_region has no labelled pixels" in str(caught.value), caught.value
    assert list(temp.iterdir()) == []


def test_ema_decay_warms_up_as_configured() -> None:
    from geoseg.train import _Ema

    lag = {}
    for warmup in (10.0, 2.0):
        net = paddle.nn.Linear(2, 1)
        paddle.assign(paddle.zeros_like(net.weight), output=net.weight)
        ema = _Ema(paddle, net, 0.99, warmup)
        expected = 0.0
        for it in range(1, 200):
            paddle.assign(paddle.full_like(net.weight, float(it)), output=net.weight)  # the weights at step it
            ema.update(net, it)
            d = min(0.99, (1.0 + it) / (warmup + it))
            expected = d * expected + (1 - d) * it
        got = float(ema.state_dict()["weight"].numpy().ravel()[0])
        assert got == pytest.approx(expected, rel=1e-4)
        lag[warmup] = 199 - got
    # The default warm-up still averages over only the last ~20 steps at step 199; a short one
    # has reached the 0.99 decay and averages much further back.
    assert lag[10.0] < 25 and lag[2.0] > 2 * lag[10.0]


# ---- knowledge distillation (teacher) ------------------------------------------------------------
def test_distillation_loss_is_the_hand_computed_kl_over_labelled_pixels() -> None:
    import paddle.nn.functional as F

    from geoseg.train import distillation_loss

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    y = rng.integers(0, 3, (2, 4, 5))
    y[0, 0, :] = IGNORE_INDEX
    def sm(z: np.ndarray, temp: float) -> np.ndarray:
        e = np.exp(z / temp - (z / temp).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    for temp in (1.0, 2.0):
        kl = (sm(t, temp) * (np.log(sm(t, temp)) - np.log(sm(s, temp)))).sum(axis=1)
        want = kl[y != IGNORE_INDEX].mean() * temp**2
        got = distillation_loss(F, paddle.to_tensor(s, "float32"), paddle.to_tensor(t, "float32"),
                                paddle.to_tensor(y), temp)
        assert float(got) == pytest.approx(want, rel=1e-5)
    same = distillation_loss(F, paddle.to_tensor(t, "float32"), paddle.to_tensor(t, "float32"), paddle.to_tensor(y))
    assert abs(float(same)) < 1e-6


def test_a_student_learns_its_teacher_and_the_card_names_it(scene: tuple[Path, Path], tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    train(_cfg(scene, teacher, iterations=6))
    # The student trains on other columns: its normalisation differs, so the teacher's input is mapped.
    cfg = _cfg(scene, tmp_path / "student", teacher=str(teacher), distill_weight=1.0, train_region=[16, 0, 48, 48],
               val_region=None, seed=5)
    t = Trainer(cfg)
    tt = t.configure_teacher()
    assert tt is not None and tt.affine is not None
    # Mapped student input = the teacher's own normalisation of the same raw pixels.
    with rasterio.open(scene[0]) as ds:
        raw = ds.read().astype(np.float32)[:, :32, 16:48]
    tcard = ModelCard.load(teacher / "weights.yaml")
    mine = t.normalization.apply(raw, "uint8")
    theirs = tcard.normalization.apply(raw, "uint8")
    np.testing.assert_allclose(mine * tt.affine[0][0] + tt.affine[1][0], theirs, rtol=1e-5, atol=1e-5)
    # With weight 1 the loss is the distillation term alone, and it falls as the student learns.
    paddle.seed(0)
    model, loss_fn = t.configure_model(), t.configure_loss()
    t.teacher = tt
    opt = t.configure_optimizer(model)
    model.train()
    x = paddle.to_tensor(mine[None])
    y = paddle.to_tensor(t.train_data.labels[None, :32, :32].astype(np.int64))
    parts = [t.step(model, opt, loss_fn, x, y, 0.01) for _ in range(6)]
    assert all(p[0] == pytest.approx(p[1]["distill"], rel=1e-5) for p in parts)
    assert parts[-1][0] < parts[0][0]
    # A whole run logs the term and the card records the teacher.
    res = train(_cfg(scene, tmp_path / "run", teacher=str(teacher), distill_temperature=2.0))
    header = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[0].split(",")
    assert "distill" in header and np.isfinite(res.history[-1]["distill"])
    card = ModelCard.load(tmp_path / "run" / "weights.yaml")
    assert card.training["teacher"] == {"model": str(teacher), "name": tcard.name, "weight": 0.5, "temperature": 2.0}


def test_a_teacher_of_the_same_weights_costs_nothing(scene: tuple[Path, Path], tmp_path: Path) -> None:
    from geoseg.models.checkpoints import load_weights

    train(_cfg(scene, tmp_path / "teacher", iterations=2))
    t = Trainer(_cfg(scene, tmp_path / "o", teacher=str(tmp_path / "teacher"), distill_weight=1.0))
    tt = t.configure_teacher()
    assert tt is not None and tt.affine is None  # same region, same normalisation: input passed as it is
    t.teacher = tt
    model = t.configure_model()
    load_weights(model, tmp_path / "teacher" / "weights.pdparams")
    model.eval()  # BatchNorm as the teacher runs it
    x = paddle.to_tensor(t.train_data.image[None, :, :32, :32])
    y = paddle.to_tensor(t.train_data.labels[None, :32, :32].astype(np.int64))
    loss, _ = t._with_teacher(t.configure_loss(), x)(model(x)[0], y)
    assert abs(float(loss)) < 1e-5


def test_teacher_errors_say_what_to_give(scene: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ParameterError, match="^teacher .*does not exist"):
        Trainer(_cfg(scene, tmp_path / "o", teacher=str(tmp_path / "nowhere"))).configure_teacher()
    train(_cfg(scene, tmp_path / "two", iterations=2, classes=[{"id": 1, "name": "a", "color": [1, 2, 3]},
                                                                  {"id": 2, "name": "b", "color": [4, 5, 6]}]))
    with pytest.raises(ParameterError, match=r"predicts classes \[1, 2\], this model \[1, 2, 3\]"):
        Trainer(_cfg(scene, tmp_path / "o", teacher=str(tmp_path / "two"))).configure_teacher()
    # `teacher: unet` into `out: unet`: the folder of that name is the run's own, not a second meaning (it was
    # refused as "unet lies here too"); the shipped unet is then taken, here refused for its classes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(ParameterError, match=r"predicts classes \[1, 2, 3, 4, 5, 6, 7\], this model \[1, 2, 3\]"):
        Trainer(_cfg(scene, tmp_path / "unet", teacher="unet")).configure_teacher()
    with pytest.raises(ParameterError, match="lies here too"):  # (another run's folder unet: either may be meant)
        Trainer(_cfg(scene, tmp_path / "o", teacher="unet")).configure_teacher()
    with pytest.raises(ParameterError, match="distill_weight"):
        _cfg(scene, tmp_path / "o", teacher="x", distill_weight=0)
    with pytest.raises(ParameterError, match="distill_temperature"):
        _cfg(scene, tmp_path / "o", teacher="x", distill_temperature=-1)



def test_the_polygon_recipe_labels_the_dense_map_s_classes_where_its_polygons_lie(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Real data: the NC recipes load; the 25 train-column polygons (EPSG:3358, reprojected and burnt,
    shifted as the map) label exactly the pixels and classes the dense map gives them."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipes name their data relative to the repository
    data = {}
    for name in ("nc_unet", "nc_unet_polygons", "nc_deeplabv3p"):
        cfg = TrainConfig.load(root / "sample_data" / "recipes" / f"{name}.yaml", {"out": str(tmp_path / name)})
        data[name] = Trainer(cfg).train_data.labels
    dense, polys = data["nc_unet"], data["nc_unet_polygons"]
    np.testing.assert_array_equal(data["nc_deeplabv3p"], dense)  # the same map and split for both models
    labelled = polys != IGNORE_INDEX
    assert 1400 < labelled.sum() <= 1582 and dense.shape == polys.shape  # 1,582 burnt, less the image's nodata
    assert len(np.unique(polys[labelled])) == 7 and (dense != IGNORE_INDEX).sum() > 100_000
    np.testing.assert_array_equal(polys[labelled], dense[labelled])


def test_resuming_past_the_iterations_asked_is_refused_before_any_loader(scene: tuple[Path, Path], tmp_path: Path,
                                                                          runner) -> None:  # type: ignore[no-untyped-def]
    # It logged "nothing to do", then built a DataLoader of negative length: a thread traceback and a hang.
    out = tmp_path / "run"
    train(_cfg(scene, out, iterations=3, val_every=3))
    with pytest.raises(ParameterError, match=r"checkpoint is at iteration 3, past iterations 1: give --iterations 3 or more") as e:
        train(_cfg(scene, out, iterations=1, resume=str(out / "checkpoints")))
    assert "\n" not in str(e.value)
    cfg = _cfg(scene, out, iterations=3).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from geoseg_cli.main import cli

    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--iterations", "1",
                            "--resume", str(out / "checkpoints")])
    assert r.exit_code == 1 and "checkpoint is at iteration 3" in r.output, r.output
    assert len(WindowDataset(Trainer(_cfg(scene, tmp_path / "o")).train_data, 32, -4)) == 0  # never negative


def test_an_output_that_cannot_be_a_folder_is_a_one_line_error(scene: tuple[Path, Path], tmp_path: Path,
                                                               runner) -> None:  # type: ignore[no-untyped-def]
    from geoseg_cli.main import cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, tmp_path / "x").to_dict()))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, words in [(afile, "is a file"), (afile / "sub", "is a file"), (Path("/proc/geoseg-x"), "cannot create")]:
        r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--iterations", "1"])
        assert r.exit_code == 1 and words in r.output and "unexpected" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert afile.read_text() == "not a folder"


def test_class_entries_with_unknown_keys_and_negative_amounts_are_refused(scene: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match=r"classes: class 1 has unknown key\(s\) colr, nmae \(did you mean "
                                             r"color, name\?\); known keys: color, id, name") as e:
        _cfg(scene, tmp_path, classes=[{"id": 1, "nmae": "x", "colr": [1, 2, 3]}, {"id": 2}])
    assert "\n" not in str(e.value)
    with pytest.raises(ParameterError, match=r"did you mean color"):
        _cfg(scene, tmp_path, classes=[{"id": 1, "colour": [1, 2, 3]}, {"id": 2}])
    for key in ("brightness", "contrast", "warmup", "min_lr", "weight_decay", "power", "ce_weight", "dice_weight",
                "lovasz_weight", "tile_overlap"):
        with pytest.raises(ParameterError, match=f"^{key} -1"):
            _cfg(scene, tmp_path, **{key: -1})
    assert _cfg(scene, tmp_path, brightness=0, warmup=0).warmup == 0


def test_resume_drops_the_csv_rows_past_the_checkpoint(scene: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    save = Trainer._save_checkpoint

    def killed_at_4(self: Trainer, d: Path, model: object, opt: object, it: int, *args: object) -> None:
        if it == 4:
            raise KeyboardInterrupt
        save(self, d, model, opt, it, *args)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_checkpoint", killed_at_4)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(scene, out, iterations=4, val_every=2))
    assert [r.split(",")[0] for r in (out / "train_log.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]
    train(_cfg(scene, out, iterations=4, val_every=2, resume=str(out / "checkpoints")))
    rows = (out / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[0].startswith("iteration,")


def test_overwrite_removes_the_old_run_before_the_new_one_writes(scene: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    train(_cfg(scene, out, iterations=2))
    (out / "notes.txt").write_text("mine")
    (out / "weights.bak").write_text("mine too")

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(scene, out, iterations=2), overwrite=True)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert "weights.pdparams" not in left and "weights.yaml" not in left and "train_log.json" not in left
    assert not any(p.startswith("checkpoints/") for p in left), left
    assert (out / "notes.txt").read_text() == "mine" and (out / "weights.bak").read_text() == "mine too"


@pytest.mark.parametrize(("part", "landed"), [("last.pdparams", False), ("last.pdparams", True),
                                              ("last.ema.pdparams", False), ("last.pdopt", False), ("last.pdopt", True),
                                              ("last.rng", False), ("last.rng", True),
                                              ("last.json", False), ("best.pdparams", False), ("best.pdparams", True)])
def test_a_run_stopped_while_saving_a_checkpoint_resumes_from_the_previous_one(
        scene: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str, landed: bool) -> None:
    # The checkpoint's files used to be replaced one by one: a kill between them left new weights beside
    # the previous iteration's last.json, which resume refused ("train anew"): all progress lost.
    import os

    out = tmp_path / "run"
    kw = {"iterations": 4, "val_every": 1, "val_region": None, "ema": 0.5}
    real_replace = os.replace
    calls = {"n": 0}

    def killed_on_the_second(src: object, dst: object) -> None:
        if Path(str(dst)).name == part:
            calls["n"] += 1
            if calls["n"] == 2:
                if landed:
                    real_replace(src, dst)
                raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_on_the_second)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(scene, out, **kw))
    assert calls["n"] == 2
    assert not (out / "weights.yaml").exists()  # an interrupted run leaves no card that reads as finished
    res = train(_cfg(scene, out, resume=str(out / "checkpoints"), **kw))
    assert [r["iteration"] for r in res.history] == [1, 2, 3, 4]
    assert ModelCard.load(res.card).class_prior is not None
    # parts that disagree with last.json under both names are still refused, in one line
    for name in ("last.pdopt", "prev.pdopt"):
        (out / "checkpoints" / name).write_bytes(b"not this one")
    with pytest.raises(ParameterError, match=r"resume: the checkpoint in .* is inconsistent \(last.pdopt is not "
                                             r"the one last.json was saved with, and no earlier copy is left") as e:
        train(_cfg(scene, out, resume=str(out / "checkpoints"), **{**kw, "iterations": 5}))
    assert "\n" not in str(e.value)


def test_resuming_another_run_into_a_folder_holding_a_run_is_refused(scene: tuple[Path, Path], tmp_path: Path) -> None:
    m, t = tmp_path / "m", tmp_path / "t"
    train(_cfg(scene, m, iterations=2))
    train(_cfg(scene, t, iterations=2, seed=5))
    before = (t / "weights.pdparams").read_bytes()
    with pytest.raises(ParameterError, match=r"already holds .*--overwrite") as e:
        train(_cfg(scene, t, iterations=3, resume=str(m / "checkpoints")))
    assert "\n" not in str(e.value) and (t / "weights.pdparams").read_bytes() == before
    res = train(_cfg(scene, t, iterations=3, resume=str(m / "checkpoints")), overwrite=True)
    assert [r["iteration"] for r in res.history] == [1, 2, 3]
    # its own checkpoints into its own folder (also as a file path, and with --overwrite) keep resuming
    assert train(_cfg(scene, t, iterations=4, resume=str(t / "checkpoints" / "last.pdparams"))).iterations == 4
    assert train(_cfg(scene, t, iterations=5, resume=str(t / "checkpoints")), overwrite=True).iterations == 5


def test_the_same_file_for_training_and_validation_may_not_overlap(scene: tuple[Path, Path], tmp_path: Path) -> None:
    second = _second_scene(tmp_path)
    (tmp_path / "sub").mkdir()
    same = str(tmp_path / "sub" / ".." / scene[0].name)  # the same file, spelt otherwise
    with pytest.raises(ParameterError, match=r"scene 1 .*train_region and scene 2 .*val_region share \d+ pixels: "
                                             r"make them disjoint") as e:
        Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
            {"image": str(scene[0]), "labels": str(scene[1]), "train_region": [0, 0, 48, 48]},
            {"image": same, "labels": str(scene[1]), "use": "val"}]))
    assert "\n" not in str(e.value)
    tr = Trainer(_scenes_cfg(scene, second, tmp_path / "o", scenes=[
        {"image": str(scene[0]), "labels": str(scene[1]), "train_region": [0, 0, 48, 48]},
        {"image": same, "labels": str(scene[1]), "use": "val", "val_region": [48, 0, 16, 48]}]))
    assert len(tr.val_sets) == 1


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(scene: tuple[Path, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 100,000 windows was killed by the kernel at 24 GB after minutes, with no message."""
    import collections

    import psutil

    from geoseg.train import TRAIN_BASE_MB, TRAIN_MB_PER_WINDOW, train

    vm = collections.namedtuple("vm", "total available")
    need_mb = TRAIN_BASE_MB + TRAIN_MB_PER_WINDOW * 2 * (32 / 128) ** 2  # the config's batch of 2 32-px windows
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(int(need_mb * 2**20) - 1, int(need_mb * 2**20) - 1))
    with pytest.raises(ParameterError, match=r"batch_size 2 of 32-px windows needs at least .* GB of memory to train, "
                                             r"more than this machine's .*: lower batch_size or window"):
        train(_cfg(scene, tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    # more than is free now, less than the machine has: trained, with a warning
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(64 * 2**30, int(need_mb * 2**20) - 1))
    with pytest.warns(PerformanceWarning, match=r"of memory to train, more than the .* GB available now: it may be slow"):
        train(_cfg(scene, tmp_path / "w", iterations=1))
    assert (tmp_path / "w" / "weights.pdparams").exists()


def test_a_train_result_is_plain_json_data(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """TrainResult holds paths and a history of numbers: ``to_dict()`` is what ``json.dumps`` takes."""
    import dataclasses

    from geoseg.train import train

    res = train(_cfg(scene, tmp_path / "r", iterations=2, val_every=1))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert list(d) == [f.name for f in dataclasses.fields(res)]
    assert d["weights"] == str(res.weights) and Path(d["weights"]).exists()
    assert d["card"] == str(res.card) and d["log_csv"] == str(res.log_csv)
    assert (d["best_iteration"], d["iterations"], d["seconds"]) == (res.best_iteration, res.iterations, res.seconds)
    assert d["best_miou"] == pytest.approx(res.best_miou) and len(d["history"]) == len(res.history) == 2
    assert d["history"][-1]["loss"] == pytest.approx(res.history[-1]["loss"])


def test_a_second_run_into_a_folder_in_use_is_refused(scene: tuple[Path, Path], tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    # Two runs started together into one --out both passed the "already holds a run" check and wrote
    # over each other (interleaved train_log.csv, one result silently lost).
    import fcntl
    import os

    from geoseg.errors import OutputError
    from geoseg.train import LOCK_FILE
    from geoseg_cli.main import cli

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # as another run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid 1 on elsewhere since 09:00\n")
        with pytest.raises(OutputError, match=r"run is in use by another geoseg train run \(pid 1 on elsewhere since "
                                              r"09:00\): wait for it to end or choose another --out"):
            train(_cfg(scene, out, iterations=2))
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, out, iterations=2).to_dict()))
        r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml")])
        assert r.exit_code == 1 and "in use by another geoseg train run" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        os.close(fd)  # the holder ends (or dies: the kernel drops its lock alike)
    res = train(_cfg(scene, out, iterations=2))
    assert res.weights.is_file() and (out / LOCK_FILE).read_text() == ""
    # a run refused before writing into a folder it made leaves no folder
    with pytest.raises(GridMismatchError):
        train(_cfg(scene, tmp_path / "new", labels=str(write_raster(tmp_path / "l.tif", np.ones((9, 9), np.uint8)))))
    assert not (tmp_path / "new").exists()


def test_a_stopped_end_of_run_never_leaves_new_weights_beside_the_old_card(scene: tuple[Path, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The final weights and card were published one by one: a stop between them left a card that
    # describes other weights (here: the 2-iteration run's card beside the 3-iteration weights).
    import os

    out = tmp_path / "run"
    train(_cfg(scene, out, iterations=2, val_region=None))
    real_replace = os.replace

    def stopped_after_the_weights(src: object, dst: object) -> None:
        real_replace(src, dst)
        if Path(str(dst)) == out / "weights.pdparams":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", stopped_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(scene, out, iterations=3, val_region=None, resume=str(out / "checkpoints")))
    assert (out / "weights.pdparams").is_file() and not (out / "weights.yaml").exists()
    res = train(_cfg(scene, out, iterations=3, val_region=None, resume=str(out / "checkpoints")))
    assert ModelCard.load(res.card).training["best_iteration"] == 3


def test_a_resumed_deeplab_run_goes_on_with_the_dropout_masks_of_an_uninterrupted_one(
        scene: tuple[Path, Path], tmp_path: Path) -> None:
    # DeepLabv3+'s ASPP has Dropout, whose masks come from Paddle's RNG; fit seeds it at every start and the
    # checkpoint did not hold its state, so a resumed run drew the first iterations' masks again (its weights
    # 0.44 away from the uninterrupted run's after 6 iterations stopped at 3).
    import shutil

    if int(paddle.__version__.split(".")[0]) < 3 and paddle.__version__ != "0.0.0":
        pytest.skip("Paddle 2.x pickles a generator's state without its position: resume starts from the seed")

    from geoseg.models.checkpoints import read_state_dict

    kw = {"model": "deeplabv3p", "params": {"backbone_width": 0.25, "aspp_channels": 16, "decoder_channels": 16},
          "iterations": 4, "val_every": 2, "val_region": None}

    class Stop(Exception):
        pass

    def stop_at_2(it: int, row: object) -> None:
        if it == 2:
            raise Stop

    half, old = tmp_path / "half", tmp_path / "old"
    with pytest.raises(Stop):
        train(_cfg(scene, half, **kw), progress=stop_at_2)
    state = json.loads((half / "checkpoints" / "last.json").read_text())
    assert state["iteration"] == 2 and "last.rng" in state["files"]
    shutil.copytree(half, old)
    train(_cfg(scene, half, resume=str(half / "checkpoints"), **kw))
    train(_cfg(scene, tmp_path / "full", **kw))
    a = read_state_dict(tmp_path / "full" / "checkpoints" / "last.pdparams")
    b = read_state_dict(half / "checkpoints" / "last.pdparams")
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=0, atol=1e-6, err_msg=k)
    # a checkpoint of an older geoseg (no random state) still resumes, from the seeded state
    del state["files"]["last.rng"]
    (old / "checkpoints" / "last.json").write_text(json.dumps(state))
    (old / "checkpoints" / "last.rng").unlink()
    res = train(_cfg(scene, old, resume=str(old / "checkpoints"), **kw))
    assert [r["iteration"] for r in res.history] == [1, 2, 3, 4]


def test_a_class_weight_of_0_leaves_the_class_out_of_the_lovasz_loss_without_nan(scene: tuple[Path, Path],
                                                                                  tmp_path: Path) -> None:
    # (terms * w).sum() / w.sum() was 0/0 = NaN on a batch whose classes all weigh 0, and training went on
    # with NaN weights to a NaN class prior
    rng = np.random.default_rng(2)
    y = paddle.to_tensor(np.zeros((2, 8, 8), np.int64))  # every labelled pixel is class 0, of weight 0
    for kind in ("lovasz", "ce+lovasz"):
        logits = paddle.to_tensor(rng.normal(size=(2, 3, 8, 8)).astype(np.float32), stop_gradient=False)
        loss, parts = make_loss(kind, 3, np.array([0.0, 1.0, 1.0], np.float32))(logits, y)
        loss.backward()
        assert float(loss) == 0.0 and parts["lovasz"] == 0.0, kind
        assert np.isfinite(logits.grad.numpy()).all(), kind
    # weights that leave nothing to learn, or are negative, are refused when the config is read
    for weights, said in (([-1, 1, 1], r"class_weights \[-1, 1, 1\]: a weight is negative: use 0 or more"),
                          ([0, 0.0, 0], r"class_weights \[0, 0.0, 0\]: every weight is 0, so nothing would be learned"),
                          (["a", 1, 1], r"class_weights \['a', 1, 1\]: give none, auto, balanced or a list of numbers")):
        with pytest.raises(ParameterError, match=said) as e:
            _cfg(scene, tmp_path / "run", class_weights=weights)
        assert "\n" not in str(e.value)
    assert _cfg(scene, tmp_path / "run", class_weights=[0, 1, 2]).class_weights == [0, 1, 2]


def test_a_loss_that_is_not_a_number_stops_training_at_once(scene: tuple[Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # training ran to its end on NaN (every log row nan) and failed only then, on a NaN class prior
    real = Trainer.configure_loss

    def nan_on_the_second_batch(self: Trainer) -> object:
        fn, calls = real(self), {"n": 0}

        def loss(logits: object, y: object) -> tuple[object, dict[str, float]]:
            calls["n"] += 1
            value, parts = fn(logits, y)
            return (value * float("nan") if calls["n"] == 2 else value), parts

        return loss

    monkeypatch.setattr(Trainer, "configure_loss", nan_on_the_second_batch)
    out = tmp_path / "run"
    with pytest.raises(ParameterError, match=r"^iteration 2: the loss is nan, not a finite number, so training stopped "
                                             r"\(its weights would turn to NaN\): try a lower lr or other class_weights, "
                                             r"training anew with --overwrite$"):
        train(_cfg(scene, out, iterations=4, val_every=1, class_weights=[1, 0, 1]))
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1"]
    assert json.loads((out / "checkpoints" / "last.json").read_text())["iteration"] == 1
    assert not (out / "weights.yaml").exists()


def test_a_validation_region_without_a_labelled_pixel_is_refused(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # every validation gave mIoU NaN, no weights were ever the best, and the card said best_iteration -1 with
    # no metrics for the last iteration's weights
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    labels[:, 48:] = 0  # the validation columns are not labelled
    unlabelled = write_raster(tmp_path / "lab_unl.tif", labels, nodata=0)
    with pytest.raises(ParameterError, match=r"^val_region has no labelled pixels \(every label there is unlabelled or "
                                             r"ignored\), so nothing can be validated: choose a val_region with labels, "
                                             r"or train without validation \(--set val_region=null\)$"):
        Trainer(_cfg((scene[0], unlabelled), tmp_path / "run"))


def test_a_learning_rate_or_seed_no_run_can_take_is_refused(scene: tuple[Path, Path], tmp_path: Path,
                                                              runner) -> None:  # type: ignore[no-untyped-def]
    # lr nan trained NaN weights into a half-written run (and failed on its class prior); seed -1 was
    # Paddle's five-line "manual_seed(): incompatible function arguments"
    from geoseg_cli.main import cli

    for key, value, said in (("lr", float("nan"), "lr nan: use a positive learning rate"),
                             ("lr", float("inf"), "lr inf: use a positive learning rate"),
                             ("seed", -1, "seed -1: use a whole number 0 .. 4294967295"),
                             ("weight_decay", float("nan"), "weight_decay nan: give a finite number")):
        with pytest.raises(ParameterError, match=said):
            _cfg(scene, tmp_path / "o", **{key: value})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(scene, tmp_path / "cli").to_dict()))
    r = runner.invoke(cli, ["train", "--config", str(tmp_path / "c.yaml"), "--seed", "-1"])
    assert r.exit_code == 2 and "Traceback" not in r.output and not (tmp_path / "cli").exists(), r.output
    r = runner.invoke(cli, ["train", "--config", str(tmp_path), "--out", str(tmp_path / "x")])  # a folder
    assert r.exit_code == 1 and f"training config {tmp_path} is a folder: give a YAML file" in r.output, r.output


def test_one_scene_s_validation_region_without_labels_is_warned_about(scene: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    # beside another scene's labelled validation region it validated nothing, without a word
    second = _second_scene(tmp_path)
    with rasterio.open(second[1]) as ds:
        labels = ds.read(1)
    labels[:, 40:] = 0  # scene 2's validation columns are not labelled
    second = (second[0], write_raster(tmp_path / "lab2_unl.tif", labels, nodata=0))
    with pytest.warns(TrainingWarning, match=r"^scene 2 \(img2.tif\) val_region has no labelled pixels: it validates "
                                             r"nothing \(the other scenes' validation regions do\)"):
        tr = Trainer(_scenes_cfg(scene, second, tmp_path / "run"))
    assert len(tr.val_sets) == 2


def test_a_run_whose_validation_never_scores_cards_the_iteration_it_ships(scene: tuple[Path, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    nan = float("nan")
    monkeypatch.setattr(Trainer, "validate", lambda self, model: {
        "miou": nan, "overall_accuracy": nan, "kappa": nan, "per_class_iou": {}, "miou_classes": []})
    out = tmp_path / "run"
    res = train(_cfg(scene, out, iterations=2))
    assert res.best_iteration == 2  # the last weights are shipped: the card said best_iteration -1
    assert ModelCard.load(res.card).training["best_iteration"] == 2
    assert json.loads((out / "train_log.json").read_text())["best_iteration"] == 2


def test_a_training_region_smaller_than_the_smallest_window_is_refused(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # rng.integers raised a bare "ValueError: high <= 0" in the loader, whose reader thread then hung
    with pytest.raises(ParameterError, match=r"^train_region is 12x48 pixels: training windows are at least 16 pixels: "
                                             r"give a region at least 16 pixels wide and high$"):
        Trainer(_cfg(scene, tmp_path / "run", train_region=[0, 0, 12, 48]))


def _polygon_file(path: Path, props: list[dict], boxes: list[tuple[int, int, int, int]]) -> Path:
    """A GeoJSON (EPSG:32633) of pixel boxes ``(col0, row0, col1, row1)`` on the test scenes' grid
    (10 m, origin 500000/4800000), one feature per ``props`` entry."""
    def ring(c0: int, r0: int, c1: int, r1: int) -> list[list[float]]:
        x0, x1, y0, y1 = 500000 + 10 * c0, 500000 + 10 * c1, 4800000 - 10 * r0, 4800000 - 10 * r1
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    feats = [{"type": "Feature", "properties": p, "geometry": {"type": "Polygon", "coordinates": [ring(*b)]}}
             for p, b in zip(props, boxes)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats,
                                "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}))
    return path


def test_point_and_line_labels_burn_their_pixels_and_are_said(scene: tuple[Path, Path], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Point samples and lines in a label file burn the pixels they fall on or cross, as rasterio
    burns them; a user who meant areas had no word of it: the log now counts them."""
    from geoseg.io import open_scene
    from geoseg.train import rasterize_labels

    def px(c: float, r: float) -> list[float]:
        return [500000 + 10 * c, 4800000 - 10 * r]

    feats = [{"type": "Feature", "properties": {"k": 2}, "geometry": {"type": "Point", "coordinates": px(30.5, 7.5)}},
             {"type": "Feature", "properties": {"k": 3},
              "geometry": {"type": "LineString", "coordinates": [px(10.5, 40.5), px(20.5, 40.5)]}},
             {"type": "Feature", "properties": {"k": 1}, "geometry": {"type": "Polygon", "coordinates": [
                 [px(8, 8), px(20, 8), px(20, 20), px(8, 20), px(8, 8)]]}}]
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats,
                                "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}}))
    meta = open_scene(scene[0])
    with caplog.at_level(logging.INFO, logger="geoseg.train"):
        with rasterio.open(rasterize_labels(path, meta, "k", None, tmp_path / "b.tif")) as ds:
            burnt = ds.read(1)
    assert burnt[7, 30] == 2 and np.count_nonzero(burnt == 2) == 1  # the point: one pixel
    assert (burnt[40, 10:21] == 3).all() and np.count_nonzero(burnt == 3) == 11  # the line: the pixels it crosses
    assert (burnt[8:20, 8:20] == 1).all()
    said = [r.getMessage() for r in caplog.records if "burnt as the pixels" in r.getMessage()]
    assert said == ["polygon labels mixed.geojson: 1 point and 1 line burnt as the pixels they fall on or cross "
                    "(a point labels one pixel)"]
    caplog.clear()
    only = _polygon_file(tmp_path / "only.geojson", [{"k": 1}], [(8, 8, 20, 20)])
    with caplog.at_level(logging.INFO, logger="geoseg.train"):
        rasterize_labels(only, meta, "k", None, tmp_path / "c.tif")
    assert not [r for r in caplog.records if "burnt as the pixels" in r.getMessage()]  # polygons alone: no word


def test_polygon_labels_hold_class_0_when_it_is_a_class(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """Cloud polygons (0 cloud, 1 shadow, 2 clear; geoseg vectorize's class_id, or names) were refused
    ("whole class ids 1..65535") or, by name, burnt as the internal raster's nodata ("class 0 (cloud) is
    also the label raster's nodata value ... gdal_edit.py -unsetnodata"): class 0 is now burnt as 0 and
    the unlabelled pixels get a value no class has."""
    from geoseg.io import open_scene
    from geoseg.train import rasterize_labels

    boxes = [(8, 8, 20, 20), (24, 10, 40, 30), (2, 30, 14, 44)]
    inside = np.zeros((48, 48), bool)
    for c0, r0, c1, r1 in boxes:
        inside[r0:r1, c0:c1] = True
    cloud = [{"id": 0, "name": "cloud", "color": [255, 255, 255]}, {"id": 1, "name": "shadow", "color": [9, 9, 9]},
             {"id": 2, "name": "clear", "color": [0, 200, 0]}]
    by_id = _polygon_file(tmp_path / "ids.geojson", [{"class_id": 0}, {"class_id": 2}, {"class_id": 1}], boxes)
    by_name = _polygon_file(tmp_path / "names.geojson", [{"cls": "Cloud"}, {"cls": "clear"}, {"cls": "shadow"}], boxes)
    for labels, field in ((by_id, "class_id"), (by_name, "cls")):
        t = Trainer(_cfg(scene, tmp_path / "o", labels=str(labels), label_field=field, classes=cloud, val_region=None))
        lab = t.train_data.labels
        assert [c.id for c in t.classes] == [0, 1, 2]
        assert (lab[8:20, 8:20] == 0).all() and (lab[10:30, 24:40] == 2).all() and (lab[30:44, 2:14] == 1).all()
        assert (lab[~inside] == IGNORE_INDEX).all()  # outside every polygon: unlabelled, not cloud
    # the burnt raster: unlabelled = 255, its nodata (no class); with 0 not a class, 0 as before
    meta = open_scene(scene[0])
    with rasterio.open(rasterize_labels(by_id, meta, "class_id", cloud, tmp_path / "b.tif")) as ds:
        burnt = ds.read(1)
        assert ds.nodata == 255 and ds.dtypes[0] == "uint8"
    assert (burnt[:48, :48][~inside] == 255).all() and (burnt[8:20, 8:20] == 0).all()
    three = _polygon_file(tmp_path / "three.geojson", [{"k": 3}, {"k": 2}, {"k": 1}], boxes)
    with rasterio.open(rasterize_labels(three, meta, "k", None, tmp_path / "b3.tif")) as ds:
        assert ds.nodata == 0 and (ds.read(1)[:48, :48][~inside] == 0).all()
    with pytest.raises(ParameterError, match=r"whole class ids 1..65535 \(0 is left for unlabelled pixels; if 0 is a "
                                             r"class, list it in classes\)"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="class_id", val_region=None))  # classes 1..3
    # no classes listed and ignore: [] (0 is a class): the ids present, 0 among them
    t = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="class_id", classes=None, ignore=[],
                     val_region=None))
    assert [c.id for c in t.classes] == [0, 1, 2] and (t.train_data.labels[~inside] == IGNORE_INDEX).all()
    # background cloud (class 0) fills the rest; polygons of class 0 stay 0
    t = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), label_field="class_id", classes=cloud,
                     background="cloud", val_region=None))
    lab = t.train_data.labels
    valid = np.ones_like(inside)
    valid[:6, :6] = False  # the image's nodata corner
    assert (lab[~inside & valid] == 0).all() and (lab[10:30, 24:40] == 2).all() and (lab[8:20, 8:20] == 0).all()
    # footprints over a background 0, no field
    two = [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "building", "color": [9, 9, 9]}]
    t = Trainer(_cfg(scene, tmp_path / "o", labels=str(by_id), classes=two, background=0, val_region=None))
    lab = t.train_data.labels
    assert (lab[inside] == 1).all() and (lab[~inside & valid] == 0).all() and (lab[~valid] == IGNORE_INDEX).all()


def test_a_warmup_not_shorter_than_the_run_is_warned_about(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """iterations 40 with the default warmup 50: the learning rate climbed to 0.0008 of 0.001 and never
    decayed, without a word. Warned, naming both numbers; the schedule itself is unchanged."""
    import warnings

    with pytest.warns(TrainingWarning, match=r"^warmup 10 is not shorter than iterations 4: the learning rate climbs "
                                             r"only to 0\.004, never to lr 0\.01 and the poly decay never starts: set "
                                             r"warmup below iterations .*or train for more iterations$"):
        Trainer(_cfg(scene, tmp_path / "o", warmup=10))
    with pytest.warns(TrainingWarning, match=r"^warmup 4 is not shorter than iterations 4: the learning rate reaches "
                                             r"lr 0\.01 only at the last iteration and the poly decay never starts"):
        Trainer(_cfg(scene, tmp_path / "o", warmup=4))
    cfg = TrainConfig(image="i", labels="l", iterations=40)  # the defaults: warmup 50, lr 0.001
    assert [learning_rate(i, cfg) for i in (0, 39)] == pytest.approx([0.00002, 0.0008])  # as before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(_cfg(scene, tmp_path / "o", warmup=3))
        Trainer(_cfg(scene, tmp_path / "o", warmup=1, iterations=1))  # a warm-up of 1 is none
    assert not [w for w in seen if "warmup" in str(w.message)]


def test_polygons_without_a_class_field_are_told_about_background(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """Building footprints (OSM fields, no class): the error listed the fields but not background, the
    documented answer for polygons of one class."""
    fields = {f"osm_{k}": "x" for k in range(20)}
    foot = _polygon_file(tmp_path / "buildings.geojson", [fields, fields], [(8, 8, 20, 20), (24, 10, 40, 30)])
    with pytest.raises(ParameterError, match=r"^polygon labels buildings.geojson needs label_field: set label_field to "
                                             r"the attribute holding each polygon's class \(its fields: osm_0, .*osm_11 "
                                             r"\.\.\. \(20 in all\)\); polygons of one class \(e\.g\. building "
                                             r"footprints\) need no field: set background to the class outside them"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(foot)))
    two = [{"id": 0, "name": "background"}, {"id": 1, "name": "building"}]
    with pytest.raises(ParameterError, match=r"has no field 'cls': .*; or leave label_field out: every polygon is then "
                                             r"class 1 over background 0$"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(foot), label_field="cls", classes=two, background="background"))
    with pytest.raises(ParameterError, match=r"needs label_field: .*without a field, background needs two classes "
                                             r"listed \(the polygons are the other one\), the config lists 3$"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(foot), background=2))


_LOCK_THEN_DIE = """
import os, sys, time
from pathlib import Path
from geoseg.train import _run_lock, _worker_init
out = Path(sys.argv[1])
with _run_lock(out):
    child = os.fork()  # as a DataLoader worker is forked
    if child == 0:
        time.sleep(120)
        os._exit(0)
    parent, worker = os.getpid(), os.fork()
    if worker == 0:  # a worker started as fit starts its DataLoader's
        _worker_init(parent, 0)
        time.sleep(120)
        os._exit(0)
    (out / "child").write_text(f"{child} {worker}")
    time.sleep(0.5)
    os._exit(0)  # the run dies holding the lock (kill -9: no cleanup)
"""


def test_a_dead_runs_forked_workers_do_not_keep_its_lock(tmp_path: Path) -> None:
    # kill -9 of a run with DataLoader workers (workers: 2) left the workers alive, sharing the lock's
    # open file: --resume was refused for good, naming the dead pid.
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from geoseg.train import _run_lock

    out = tmp_path / "run"
    out.mkdir()
    subprocess.run([sys.executable, "-c", _LOCK_THEN_DIE, str(out)], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[1])
    child, worker = map(int, (out / "child").read_text().split())
    try:
        os.kill(child, 0)  # the forked child outlived its parent, as the workers did
        with _run_lock(out):
            pass
        for _ in range(100):  # a DataLoader worker goes with its run
            if not Path(f"/proc/{worker}").exists() or "\nState:\tZ" in Path(f"/proc/{worker}/status").read_text():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker outlived its run")
    finally:
        for pid in (child, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_lock_held_for_a_dead_run_says_so(tmp_path: Path) -> None:
    import fcntl
    import os
    import socket
    import subprocess

    from geoseg.errors import OutputError
    from geoseg.train import LOCK_FILE, _run_lock

    done = subprocess.Popen(["true"])
    done.wait()
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # as a leftover of the dead run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"pid {done.pid} on {socket.gethostname()} since 09:00\n".encode())
        with pytest.raises(OutputError, match=rf"locked by leftover processes of the geoseg train run {done.pid}, "
                                              r"which is dead .*fuser -v"):
            with _run_lock(out):
                pass
    finally:
        os.close(fd)


def test_labels_hidden_by_their_mask_band_are_not_trained_on(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # A label raster without nodata whose internal mask hides some pixels: the hidden pixels were
    # trained (and validated) on with whatever value lay under the mask; evaluate takes them as no label.
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    shown = np.ones(labels.shape, bool)
    shown[:, :10] = False  # in the training region
    shown[:, 56:60] = False  # in the validation region
    masked = write_raster(tmp_path / "lab_m.tif", np.where(labels == 0, 2, labels).astype(np.uint8), masks=shown)
    for read_from in ("memory", "disk"):
        t = Trainer(_cfg((scene[0], masked), tmp_path / "o", read_from=read_from))
        train = np.asarray(t.train_data.labels)
        assert (train[:, :10] == IGNORE_INDEX).all(), read_from
        assert (train[:, 10:] != IGNORE_INDEX).sum() > 0
        val = np.asarray(t.val_data.labels)  # type: ignore[union-attr]  # the validation region with context left of it
        c0 = val.shape[1] - 16  # its column 48
        assert (val[:, c0 + 8 : c0 + 12] == IGNORE_INDEX).all(), read_from
        assert (val[:, c0 : c0 + 8] != IGNORE_INDEX).any() and (val[:, c0 + 12 :] != IGNORE_INDEX).any()


def test_label_values_far_above_the_class_ids_cost_no_table_of_their_size(scene: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    # The label-to-index table was sized by the largest label value, nodata included: uint32 nodata
    # 4294967295 ended in "out of memory", int32 nodata 1e8 took 800 MB for a tiny raster.
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    big = np.where(labels == 0, 10_000_000, labels.astype(np.int32))
    b = write_raster(tmp_path / "lab_big.tif", big, nodata=10_000_000)
    a, t = Trainer(_cfg(scene, tmp_path / "a")), Trainer(_cfg((scene[0], b), tmp_path / "b"))
    np.testing.assert_array_equal(t.train_data.labels, a.train_data.labels)
    np.testing.assert_array_equal(t.val_data.labels, a.val_data.labels)  # type: ignore[union-attr]
    assert t.lut.nbytes <= 256 * 8


def test_a_label_nodata_that_is_no_whole_number_matches_no_class(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # Nodata 2.5 was compared as int(2.5) = 2: every class-2 pixel became unlabelled, without a word.
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    a = Trainer(_cfg(scene, tmp_path / "a"))
    for dtype in ("uint8", "float32"):
        lab = write_raster(tmp_path / f"lab_{dtype}.tif", labels.astype(dtype), nodata=2.5)
        t = Trainer(_cfg((scene[0], lab), tmp_path / "b"))
        np.testing.assert_array_equal(t.train_data.labels, a.train_data.labels)
        assert (np.asarray(t.train_data.labels) == 1).any()  # class 2 (index 1) is trained on


def test_negative_and_validation_only_label_values_are_warned(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # -5 in int16 labels became unlabelled silently (9 was warned about); a value found only in the
    # validation region was left out of validation mIoU silently; auto classes with labels {-5, -1, 3}
    # blamed "label value 0 (ignore)", which the labels do not hold.
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1).astype(np.int16)
    labels[10:14, 10:14] = -5
    labels[20:30, 50:60] = 4  # the validation region only
    lab = write_raster(tmp_path / "lab_neg.tif", labels)
    with pytest.warns(TrainingWarning) as seen:
        Trainer(_cfg((scene[0], lab), tmp_path / "o"))
    said = [str(w.message) for w in seen]
    assert any(re.search(r"label values \[-5\] are negative, and class ids are 0..254", m) for m in said), said
    assert any(re.search(r"val_region label values \[4\] \(.* % of its labelled pixels\) are not among the classes "
                         r"\[1, 2, 3\]: they are not validated", m) for m in said), said
    three = write_raster(tmp_path / "lab_3.tif", np.where(labels >= 0, 3, labels).astype(np.int16))
    with pytest.raises(ParameterError, match=r"one class only \(3\) in the training region; label values \[-5\] are "
                                             r"negative, and class ids are 0..254") as err:
        Trainer(_cfg((scene[0], three), tmp_path / "o", classes=None))
    assert "(ignore)" not in str(err.value)


def test_resuming_a_finished_run_leaves_its_model_as_it_is(scene: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A no-op --resume of a finished run republished it: the card went first, then the copy of the
    # weights failed on a full disk, leaving weights without a card and an error naming the source file.
    import errno
    import shutil

    from geoseg.errors import NoRoomError

    out = tmp_path / "run"
    train(_cfg(scene, out, iterations=2))
    files = [out / "weights.pdparams", out / "weights.yaml", out / "train_log.json"]
    before = [(p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in files]

    def full(src: object, dst: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", full)
        res = train(_cfg(scene, out, iterations=2, resume=str(out / "checkpoints")))
        assert res.weights == files[0] and res.iterations == 2
        assert [(p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in files] == before
        # going on past the end: a full disk at the final copy names the weights and keeps the old card
        with pytest.raises(NoRoomError, match=r"cannot write .*run/weights.pdparams: no space left"):
            train(_cfg(scene, out, iterations=3, resume=str(out / "checkpoints")))
    assert files[1].read_bytes() == before[1][2] and files[0].read_bytes() == before[0][2]


def test_checkpoint_write_errors_and_damaged_checkpoints_are_one_line(scene: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # ulimit -f at a checkpoint said "unexpected error: OSError: [Errno 27] File too large" (no file, no
    # hint); a truncated last.json "unexpected error: JSONDecodeError", {} "unexpected error: KeyError".
    import errno

    from geoseg.errors import NoRoomError

    out = tmp_path / "run"
    real_save, calls = paddle.save, []

    def too_large(obj: object, path: str, *a: object, **kw: object) -> None:
        if ".geoseg-last.pdopt." in path:
            calls.append(path)
            if len(calls) == 2:  # the second checkpoint's
                raise OSError(errno.EFBIG, "File too large")
        real_save(obj, path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(paddle, "save", too_large)
        with pytest.raises(NoRoomError, match=r"cannot write .*checkpoints/last.pdopt: file too large: .*; the "
                                              r"checkpoint of iteration 2 is intact: --resume .*checkpoints goes on"):
            train(_cfg(scene, out, iterations=4))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    res = train(_cfg(scene, out, iterations=4, resume=str(out / "checkpoints")))
    assert res.iterations == 4
    meta = out / "checkpoints" / "last.json"
    good = meta.read_text()
    for text, said in ((good[: len(good) // 2], r".*"), ("{}", r"no 'iteration'"),
                       ("[1]", r"not a JSON object")):
        meta.write_text(text)
        with pytest.raises(ParameterError, match=rf"resume: the checkpoint in .*checkpoints is damaged \(last.json "
                                                 rf"cannot be read: {said}\): "
                                                 r"train anew with --overwrite"):
            train(_cfg(scene, out, iterations=4, resume=str(out / "checkpoints")))


def test_a_killed_runs_temp_files_are_removed_when_it_resumes(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # kill -9 during a checkpoint write left .geoseg-*.tmp files (an optimizer state each) that no resume removed.
    import os
    import subprocess

    from geoseg.atomic import temp_name

    out = tmp_path / "run"
    train(_cfg(scene, out, iterations=2))
    done = subprocess.Popen(["true"])
    done.wait()
    dead = []
    for target in (out / "weights.pdparams", out / "checkpoints" / "last.pdopt"):
        name = temp_name(target).name.replace(f"-{os.getpid()}-", f"-{done.pid}-")
        (target.parent / name).write_bytes(b"half")
        dead.append(target.parent / name)
    live = temp_name(out / "checkpoints" / "last.pdparams")  # a writer that still runs (this process)
    live.write_bytes(b"busy")
    train(_cfg(scene, out, iterations=2, resume=str(out / "checkpoints")))
    assert not any(p.exists() for p in dead) and live.exists()


def test_odd_numbers_and_label_setups_are_refused_or_warned(scene: tuple[Path, Path], tmp_path: Path) -> None:
    # train_region [0.5, 0, 48, 47.7] and class id 1.5 were cut to whole numbers silently; background with
    # raster labels (no polygons) was ignored silently, naming no class; a 2-band label raster used band 1
    # silently; a polygon without a class value got "must hold whole class ids", and id 300 named the
    # temporary burnt raster (0_big.tif) in its message.
    with pytest.raises(ParameterError, match=r"train_region \[0.5, 0, 48, 47.7\]: give .* in whole pixels"):
        Trainer(_cfg(scene, tmp_path / "o", train_region=[0.5, 0, 48, 47.7]))
    classes = [{"id": 1.5, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    with pytest.raises(ParameterError, match=r"classes: class 1 .*give id \(a whole number\)"):
        Trainer(_cfg(scene, tmp_path / "o", classes=classes))
    with pytest.raises(ParameterError, match=r"background 'zzz' is not a class name"):
        Trainer(_cfg(scene, tmp_path / "o", background="zzz"))
    with pytest.warns(TrainingWarning, match=r"background 'b' is for polygon labels .*not used"):
        Trainer(_cfg(scene, tmp_path / "o", background="b"))
    with rasterio.open(scene[1]) as ds:
        labels = ds.read(1)
    two = write_raster(tmp_path / "lab2b.tif", np.stack([labels, labels]), nodata=0)
    with pytest.warns(TrainingWarning, match=r"labels lab2b.tif have 2 bands: band 1 is read as the class ids"):
        Trainer(_cfg((scene[0], two), tmp_path / "o"))
    boxes = [(8, 8, 20, 20), (24, 10, 40, 30), (2, 30, 12, 40)]
    null = _polygon_file(tmp_path / "null.geojson", [{"cls": 1}, {"cls": None}, {"cls": 2}], boxes)
    with pytest.raises(ParameterError, match=r"null.geojson: 1 feature\(s\) have no value in cls: give each polygon"):
        Trainer(_cfg(scene, tmp_path / "o", labels=str(null), label_field="cls", classes=None, val_region=None))
    big = _polygon_file(tmp_path / "big.geojson", [{"cls": 1}, {"cls": 300}, {"cls": 2}], boxes)
    with pytest.raises(ParameterError, match=r"polygon labels big.geojson: cls value\(s\) 300 cannot be class ids") as e:
        Trainer(_cfg(scene, tmp_path / "o", labels=str(big), label_field="cls", classes=None, val_region=None))
    assert "0_big.tif" not in str(e.value)


def test_a_forked_child_unwinding_through_the_run_lock_leaves_other_files_alone(tmp_path: Path) -> None:
    """A child forked inside the run (a progress callback's) closes its copy of the lock at its fork; when
    it unwound through the lock's ``finally`` (sys.exit), it truncated and closed whatever file had taken
    that descriptor number since: its own output, emptied."""
    script = tmp_path / "fork_unwind.py"
    script.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from geoseg.train import _run_lock\n"
        f"out, other = Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'child.txt')!r})\n"
        "out.mkdir()\n"
        "with _run_lock(out):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        f = open(other, 'w')\n"
        "        f.write('the child output\\n'); f.flush()\n"
        "        sys.exit(0)\n"
        "    os.waitpid(pid, 0)\n"
        "    print('held', (out / '.geoseg-train.lock').read_text().startswith('pid '))\n"
        "print('size', other.stat().st_size)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["held", "True", "size", "17"], r.stdout + r.stderr


def test_a_worker_started_by_a_fork_server_does_not_kill_itself() -> None:
    """Workers started by a fork server (multiprocessing's forkserver, Python 3.14's default on Linux) have
    the server as their parent: the check for a dead run took that for the run's death, and every worker
    killed itself ("Blocking queue is killed")."""
    code = "from geoseg.train import _worker_init\n_worker_init(-12345, 0)\nprint('alive')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "alive", (r.returncode, r.stderr)


def test_a_checkpoint_once_whole_leaves_no_copy_of_the_previous(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """The previous checkpoint's parts are kept as prev.* only until the new last.json is in place (as the
    README says); they stayed after every checkpoint and after the run, doubling the checkpoints' size."""
    out = tmp_path / "o"
    res = train(_cfg(scene, out, iterations=4, val_every=2))
    ck = out / "checkpoints"
    assert (ck / "last.json").is_file() and (ck / "last.pdparams").is_file()
    assert sorted(p.name for p in ck.glob("prev.*")) == []
    res2 = train(_cfg(scene, out, resume=str(ck), iterations=6, val_every=2))  # (resumes from the kept parts)
    assert [r["iteration"] for r in res2.history][-1] == 6 and res.best_iteration >= 0


def test_the_csv_log_of_a_resumed_run_is_whole_after_a_torn_or_deleted_one(scene: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    """A kill can tear the CSV log's last row (the resumed run's first row was glued onto it) or a user delete
    it (rebuilt with the rows after the checkpoint only): the log is now rewritten from the checkpoint's history."""
    import csv

    out = tmp_path / "o"
    kw = dict(val_every=2, log_every=1)
    train(_cfg(scene, out, iterations=4, **kw))
    log_csv = out / "train_log.csv"

    def rows() -> list[list[str]]:
        with open(log_csv, newline="") as f:
            return list(csv.reader(f))

    width = len(rows()[0])
    log_csv.write_bytes(log_csv.read_bytes()[:-7])  # torn mid-row
    train(_cfg(scene, out, resume=str(out / "checkpoints"), iterations=6, **kw))
    got = rows()
    assert [r[0] for r in got[1:]] == [str(i) for i in range(1, 7)] and all(len(r) == width for r in got), got
    log_csv.unlink()
    train(_cfg(scene, out, resume=str(out / "checkpoints"), iterations=8, **kw))
    assert [r[0] for r in rows()[1:]] == [str(i) for i in range(1, 9)]


@pytest.mark.parametrize("read_from", ["memory", "disk"])
def test_a_band_of_one_value_over_the_training_region_is_warned_about(scene: tuple[Path, Path], tmp_path: Path,
                                                                      read_from: str) -> None:
    """A band constant over the training region got a std of 1e-6 without a word: it teaches nothing, and
    any other value of it at predict time normalises to some 1e5 standard deviations."""
    with rasterio.open(scene[0]) as ds:
        img, nodata = ds.read(), ds.nodata
    img[1][img[1] != 0] = 77  # band 2: one value wherever the scene has data
    flat = write_raster(tmp_path / "flat.tif", img, nodata=nodata)
    with pytest.warns(TrainingWarning, match=r"^band 2 holds one value over the training region: the model learns "
                                             r"nothing from it"):
        Trainer(_cfg((flat, scene[1]), tmp_path / "o", read_from=read_from))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        Trainer(_cfg(scene, tmp_path / "o2", read_from=read_from))


def test_resume_refuses_data_changed_since_the_checkpoint(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """An image rewritten at the same path between a kill and --resume was trained on silently: the resumed
    run's statistics came from the new data, its weights from the old. Refused now; a file only touched is not."""
    import shutil

    (tmp_path / "data").mkdir()
    img, lab = tmp_path / "data" / "img.tif", tmp_path / "data" / "lab.tif"
    shutil.copy(scene[0], img)
    shutil.copy(scene[1], lab)
    out = tmp_path / "o"
    train(_cfg((img, lab), out, iterations=2, val_every=2))
    os.utime(img)  # touched, same bytes: goes on
    train(_cfg((img, lab), out, resume=str(out / "checkpoints"), iterations=4, val_every=2))
    with rasterio.open(img, "r+") as ds:
        data = ds.read()
        ds.write(np.where(data > 0, 255 - data, 0).astype(data.dtype))
    with pytest.raises(ParameterError, match=r"resume: .*img.tif changed since the checkpoint was saved"):
        train(_cfg((img, lab), out, resume=str(out / "checkpoints"), iterations=6, val_every=2))


def test_resume_refuses_scenes_added_or_a_shapefile_relabelled(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """A scene pattern that matched one more file at --resume, or polygon labels whose classes were edited
    in QGIS (a shapefile's .dbf changes, its .shp not), resumed without a word: the weights had learnt
    the old data, the statistics and labels were the new."""
    import shutil

    import pyogrio.raw
    import shapely

    d = tmp_path / "data"
    d.mkdir()
    for name in ("a", "b"):
        shutil.copy(scene[0], d / f"{name}.tif")
        shutil.copy(scene[1], d / f"{name}_lab.tif")
    base = {k: v for k, v in _cfg(scene, tmp_path / "x").to_dict().items()
            if k not in ("image", "labels", "out", "train_region", "val_region")}
    cfg = {**base, "scenes": [{"image": str(d / "*.tif"), "labels": str(d / "{stem}_lab.tif")}],
           "iterations": 2, "val_every": 2}
    (d / "a_lab.tif").rename(tmp_path / "a_lab.tif")  # (kept out of the pattern: *.tif would take it)
    (d / "b_lab.tif").rename(tmp_path / "b_lab.tif")
    cfg["scenes"][0]["labels"] = str(tmp_path / "{stem}_lab.tif")
    out = tmp_path / "o"
    train(TrainConfig.from_mapping({**cfg, "out": str(out)}))
    shutil.copy(scene[0], d / "c.tif")
    shutil.copy(scene[1], tmp_path / "c_lab.tif")
    with pytest.raises(ParameterError, match=r"resume: the run was trained on 2 scene\(s\) and its config now gives 3"):
        train(TrainConfig.from_mapping({**cfg, "out": str(out), "resume": str(out / "checkpoints"), "iterations": 4}))
    # polygon labels: the .dbf alone changes
    polys = tmp_path / "p.shp"
    with rasterio.open(scene[0]) as ds:
        b = ds.bounds
        crs = ds.crs.to_wkt()
    boxes = np.array([shapely.box(b.left, b.bottom, (b.left + b.right) / 2, b.top),
                      shapely.box((b.left + b.right) / 2, b.bottom, b.right, b.top)])
    pyogrio.raw.write(polys, shapely.to_wkb(boxes), [np.array([1, 2])], ["id"], geometry_type="Polygon", crs=crs,
                      driver="ESRI Shapefile")
    pcfg = {**base, "image": str(scene[0]), "labels": str(polys), "label_field": "id", "val_region": None,
            "train_region": [0, 0, 48, 48], "iterations": 2, "val_every": 2}
    out2 = tmp_path / "o2"
    train(TrainConfig.from_mapping({**pcfg, "out": str(out2)}))
    shp = polys.read_bytes()
    pyogrio.raw.write(polys, shapely.to_wkb(boxes), [np.array([2, 1])], ["id"], geometry_type="Polygon", crs=crs,
                      driver="ESRI Shapefile")
    assert polys.read_bytes() == shp  # (the geometries are the same: only the attribute table changed)
    with pytest.raises(ParameterError, match=r"resume: .*p.shp changed since the checkpoint was saved"):
        train(TrainConfig.from_mapping({**pcfg, "out": str(out2), "resume": str(out2 / "checkpoints"), "iterations": 4}))


def test_a_schedule_that_would_climb_and_labels_of_one_listed_class_are_refused(scene: tuple[Path, Path],
                                                                                 tmp_path: Path) -> None:
    """min_lr above lr made the learning rate climb without a word; labels holding one of the listed
    classes trained (a warning per missing class) and validated mIoU = OA."""
    with pytest.raises(ParameterError, match=r"min_lr 0.05: .* must not exceed lr 0.01"):
        _cfg(scene, tmp_path / "o", min_lr=0.05)
    assert _cfg(scene, tmp_path / "o", min_lr=0.05, schedule="constant").min_lr == 0.05  # (unused there)
    # a checkpoint saved before a shapefile's identity held its sidecars resumes (its .shp part is compared)
    from geoseg.train import _same_file_identity

    assert _same_file_identity("10:ab", "10:ab|.dbf:5:cd") and not _same_file_identity("10:ab", "11:ab|.dbf:5:cd")
    assert not _same_file_identity("10:ab|.dbf:5:cd", "10:ab|.dbf:5:ce")
    with rasterio.open(scene[1]) as ds:
        labels, profile = ds.read(1), ds.profile
    one = tmp_path / "one.tif"
    with rasterio.open(one, "w", **profile) as ds:
        ds.write(np.where(labels > 0, 2, 0).astype(labels.dtype), 1)
    with pytest.raises(ParameterError, match=r"the config lists 3 classes and the training labels hold one of them "
                                             r"only \(2\)"):
        Trainer(_cfg((scene[0], one), tmp_path / "o"))


def test_classes_found_in_the_labels_keep_the_names_the_labels_carry(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """classes: null on a label raster that names its classes (band tag CLASSES=1=developed,... as the NC
    labels have): the card, the masks and the polygons said class_1, class_2 ..."""
    import shutil

    labels = tmp_path / "named.tif"
    shutil.copy(scene[1], labels)
    with rasterio.open(labels, "r+") as ds:
        ds.update_tags(1, CLASSES="1=water,2=forest,3=urban")
    t = Trainer(_cfg((scene[0], labels), tmp_path / "o", classes=None))
    assert [(c.id, c.name) for c in t.classes] == [(1, "water"), (2, "forest"), (3, "urban")]
    t = Trainer(_cfg(scene, tmp_path / "o2", classes=None))  # no names: ids
    assert [c.name for c in t.classes] == ["class_1", "class_2", "class_3"]


@pytest.mark.slow
def test_dataloader_workers_train_under_spawn(scene: tuple[Path, Path], tmp_path: Path) -> None:
    """`workers: 2` where DataLoader workers are spawned (macOS, Windows; Linux's default from Python 3.14 is
    forkserver): "Can't pickle local object '_PaddleDataset.__new__.<locals>._DS'". And forked, as on Linux now."""
    import subprocess
    import sys

    import yaml

    base = {
        "image": str(scene[0]), "labels": str(scene[1]), "model": "unet", "params": {"width": 0.125},
        "train_region": [0, 0, 48, 48], "val_region": [48, 0, 16, 48], "window": 32, "batch_size": 2, "iterations": 2,
        "val_every": 2, "log_every": 1, "lr": 0.01, "warmup": 1, "device": "cpu", "seed": 3, "workers": 2,
        "classes": [{"id": 1, "name": "a", "color": [1, 2, 3]}, {"id": 2, "name": "b", "color": [4, 5, 6]},
                    {"id": 3, "name": "c", "color": [7, 8, 9]}],
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base))
    import paddle

    # (Paddle 2.6's DataLoader workers crash under spawn, its own fault: "Unexpected segmentation fault encountered in
    # DataLoader workers"; it runs them forked on Linux, and on one process on macOS and Windows)
    methods = ("spawn", "fork") if int(paddle.__version__.split(".")[0]) >= 3 else ("fork",)
    for method in methods:
        code = (f"import multiprocessing as mp; mp.set_start_method({method!r}, force=True); import sys; "
                "from geoseg_cli import main; sys.argv[0] = 'geoseg'; main()")
        out = tmp_path / method
        r = subprocess.run([sys.executable, "-c", code, "-q", "train", "--config", str(config), "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "weights.pdparams").is_file() and (out / "weights.yaml").is_file()


def test_the_train_lock_takes_the_umask_s_mode(tmp_path: Path) -> None:
    """The run lock was made 0644 whatever the umask (batch's too, before session 29)."""
    import stat

    from geoseg.train import LOCK_FILE, _run_lock

    old = os.umask(0o002)
    try:
        (tmp_path / LOCK_FILE).touch()
        os.chmod(tmp_path / LOCK_FILE, 0o644)  # (as geoseg made it before)
        with _run_lock(tmp_path):
            mode = stat.S_IMODE((tmp_path / LOCK_FILE).stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o664


def test_a_pretrained_start_stays_out_of_the_card_and_odd_settings_are_told_plainly(
        scene: tuple[Path, Path], tmp_path: Path) -> None:
    """params.pretrained stayed in the card: every later use loaded the start weights again, and failed once
    they moved; `pretrained: true` was a bare TypeError; lr -1 was blamed on min_lr; a first checkpoint cut
    short was "no checkpoint at .../last.pdparams", a file that was there."""
    import shutil

    from geoseg.engine import resolve_model

    first = train(_cfg(scene, tmp_path / "first", iterations=2))
    start = tmp_path / "start.pdparams"
    shutil.copy(first.weights, start)
    res = train(_cfg(scene, tmp_path / "second", iterations=2, params={"width": 0.125, "pretrained": str(start)}))
    card = ModelCard.load(res.weights.with_suffix(".yaml"))
    assert "pretrained" not in card.params and card.params["width"] == 0.125
    start.unlink()
    resolve_model(None, res.weights)  # (builds and loads the finished model)
    # the settings an ensemble compares are in the card: members that differ in min_lr are told apart
    assert card.training["min_lr"] == 0.0 and card.training["loss_weights"] == {"ce": 1.0, "dice": 1.0, "lovasz": 1.0}
    from geoseg.ensemble import combine_models

    other = train(_cfg(scene, tmp_path / "third", iterations=2, min_lr=0.001))
    with pytest.warns(GeosegWarning, match=r"differ in more than their seeds \(min_lr: 0.0 \| 0.001"):
        combine_models([str(first.weights.parent), str(other.weights.parent)], tmp_path / "ens")
    with pytest.raises(ParameterError, match="params.pretrained True: give the .pdparams file"):
        _cfg(scene, tmp_path / "x", params={"width": 0.125, "pretrained": True})
    with pytest.raises(ParameterError, match=r"^lr -1.0: use a positive learning rate"):
        _cfg(scene, tmp_path / "x", lr=-1.0)
    ckpt = tmp_path / "first" / "checkpoints"
    (ckpt / "last.json").unlink()
    with pytest.raises(ParameterError, match="is incomplete .no last.json: the run was stopped while saving its first"):
        train(_cfg(scene, tmp_path / "first", iterations=4, resume=str(ckpt)))


def test_a_key_given_twice_in_a_config_is_refused(tmp_path: Path) -> None:
    """`image:` twice trained on the second without a word (YAML's last key wins)."""
    from geoseg.config import load_yaml_mapping

    cfg = tmp_path / "c.yaml"
    cfg.write_text("image: a.tif\nlabels: b.tif\nparams:\n  width: 0.25\n  width: 0.5\n")
    with pytest.raises(ParameterError, match=r"is not valid YAML: key 'width' is given twice \(line 5\): keep one"):
        load_yaml_mapping(cfg, "training config", ParameterError)
    cfg.write_text("base: &b\n  lr: 1\nrun:\n  <<: *b\n  lr: 2\n")  # a merge key may be overridden
    assert load_yaml_mapping(cfg, "training config", ParameterError)["run"] == {"lr": 2}
