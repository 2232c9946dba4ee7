"""Tests of geoseg.models: registry, architectures, checkpoints and the inference runtime.

Everything runs on CPU with tiny widths and small inputs (a few seconds in total).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from geoseg.errors import ModelError, PerformanceWarning, WeightsError  # noqa: E402
from geoseg.models import MODEL_NAMES, build_model  # noqa: E402
from geoseg.models.checkpoints import load_weights, save_weights  # noqa: E402
from geoseg.models.deeplab import ASPP, DeepLabV3P  # noqa: E402
from geoseg.models.inference import (  # noqa: E402
    DygraphPredictor,
    InferencePredictor,
    export_model,
    find_model_files,
)
from geoseg.models.unet import UNet  # noqa: E402

TINY: dict[str, dict[str, Any]] = {
    "unet": {"width": 0.125},
    "deeplabv3p": {"backbone_width": 0.25, "aspp_channels": 32, "decoder_channels": 32},
}


def tiny(name: str, in_channels: int = 3, num_classes: int = 3, **extra: Any) -> Any:
    """Build a tiny variant of ``name`` in eval mode with a fixed seed."""
    paddle.seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, **{**TINY[name], **extra})
    model.eval()
    return model


def run(model: Any, x: np.ndarray) -> np.ndarray:
    """Forward a NCHW numpy batch and return the main logits as numpy."""
    with paddle.no_grad():
        out = model(paddle.to_tensor(x))
    assert isinstance(out, list) and len(out) >= 1
    return out[0].numpy()


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- registry ---------------------------------------------------------------------------


def test_importing_registry_does_not_import_paddle() -> None:
    code = "import sys, geoseg.models; assert 'paddle' not in sys.modules, 'paddle imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_names() -> None:
    assert MODEL_NAMES == ("deeplabv3p", "unet")


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'x': choose one of deeplabv3p, unet$"):
        build_model("x", in_channels=3, num_classes=2)


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(ModelError, match="'levels'") as info:
        build_model("unet", in_channels=3, num_classes=2, levels=4)
    assert "\n" not in str(info.value) and "width" in str(info.value)


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("deeplabv3p", {"backbone_depth": 20}, "backbone_depth"),
        ("deeplabv3p", {"output_stride": 32}, "output_stride"),
        ("deeplabv3p", {"backbone_width": 0}, "backbone_width"),
        ("deeplabv3p", {"fine_channels": -1}, "fine_channels"),
        ("deeplabv3p", {"image_pooling": "no"}, "image_pooling"),
        ("deeplabv3p", {"aspp_rates": [2, 4]}, "aspp_rates"),
        ("unet", {"width": -1.0}, "width"),
        ("unet", {"upsample": "nearest"}, "upsample"),
        ("unet", {"depth": 5}, "depth"),
        ("unet", {"num_classes": 0}, "num_classes"),
        ("unet", {"gap_channels": "yes"}, "gap_channels"),
        ("deeplabv3p", {"gap_channels": 1}, "gap_channels"),
        ("unet", {"indices": [[4, 3]], "band_stats": ([0.0] * 3, [1.0] * 3)}, "positions 1..3"),
        ("unet", {"indices": [[2, 2]], "band_stats": ([0.0] * 3, [1.0] * 3)}, "two different bands"),
        ("unet", {"indices": [2, 1], "band_stats": ([0.0] * 3, [1.0] * 3)}, "band position pairs"),
        ("deeplabv3p", {"indices": [[2, 1]]}, "band_stats"),
        ("deeplabv3p", {"indices": [[2, 1]], "band_stats": ([0.0] * 2, [1.0] * 2)}, "band_stats"),
    ],
)
def test_invalid_parameter_values(name: str, params: dict[str, Any], fragment: str) -> None:
    kw: dict[str, Any] = {"in_channels": 3, "num_classes": 2, **params}
    with pytest.raises(ModelError, match=fragment) as info:
        build_model(name, **kw)
    assert "\n" not in str(info.value)


def test_registered_classes() -> None:
    assert isinstance(tiny("unet"), UNet)
    assert isinstance(tiny("deeplabv3p"), DeepLabV3P)


# ---- architectures -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 4, 10])
def test_output_shapes_any_bands_and_size(name: str, in_channels: int) -> None:
    model = tiny(name, in_channels=in_channels, num_classes=5)
    for h, w in [(67, 93), (64, 64), (9, 5)]:
        logits = run(model, rand(2, in_channels, h, w))
        assert logits.shape == (2, 5, h, w)
        assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_unet_transpose_upsampling_odd_size() -> None:
    model = tiny("unet", upsample="transpose")
    assert run(model, rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)


def test_unet_width_scales_channels() -> None:
    assert UNet(2, width=1.0).channels == (64, 128, 256, 512, 1024)
    assert UNet(2, width=0.25).channels == (16, 32, 64, 128, 256)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unet_depth_limits_the_receptive_field(depth: int) -> None:
    model = tiny("unet", depth=depth)
    assert len(model.channels) == depth + 1 and len(model.downs) == len(model.ups) == depth
    assert run(model, rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)
    model.eval()
    x = rand(1, 3, 96, 96)
    y = x.copy()
    y[:, :, 48, 48] += 5.0
    d = np.abs(run(model, y) - run(model, x))[0].max(axis=0)
    reach = np.argwhere(d > 0)[:, 1]
    # Each level adds two 3x3 convs at its scale: the change cannot reach further than this.
    bound = 2 + sum(2 * 2**k + 2 ** (k + 1) for k in range(1, depth + 1)) + 2 * depth + 2
    assert d[48, 48] > 0 and np.abs(reach - 48).max() <= bound
    if depth < 3:
        assert np.abs(reach - 48).max() < 40  # much less than the full network


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_output_strides(output_stride: int) -> None:
    model = tiny("deeplabv3p", output_stride=output_stride)
    x = paddle.to_tensor(rand(1, 3, 64, 64))
    feats = model.backbone(x)
    expected = [16, 8, 4, 4] if output_stride == 16 else [16, 8, 8, 8]
    assert [f.shape[-1] for f in feats] == expected
    assert run(model, rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)


def test_deeplab_fine_refinement_is_a_full_resolution_path() -> None:
    """fine_channels adds a path from each input pixel to its own logits at full resolution."""
    fine = tiny("deeplabv3p", fine_channels=8)
    assert run(fine, rand(2, 3, 67, 93)).shape == (2, 3, 67, 93)
    x = rand(1, 3, 64, 64)
    y = x.copy()
    y[:, :, 33, 33] += 5.0  # one pixel changes
    # Cut the stride-4 decoder off (its projection outputs a constant): what is left is the
    # fine path, three 3x3 convolutions at full resolution, so the change stays within 3 px.
    fine.fine_project[0].weight.set_value(np.zeros(fine.fine_project[0].weight.shape, np.float32))
    d = np.abs(run(fine, y) - run(fine, x))[0].max(axis=0)
    assert d[33, 33] > 1e-3
    outside = np.ones_like(d, bool)
    outside[30:37, 30:37] = False
    assert d[outside].max() == 0.0
    # The paper's network spreads a one-pixel change far beyond that (stride-4 logits, ASPP).
    plain = tiny("deeplabv3p")
    d = np.abs(run(plain, y) - run(plain, x))[0].max(axis=0)
    assert d[outside].max() > 1e-4


def test_deeplab_without_image_pooling_is_local() -> None:
    """The image-pooling branch lets a far pixel change every logit; without it nothing far moves."""
    x = rand(1, 3, 16, 1280)
    y = x.copy()
    y[:, :, :, :8] += 5.0  # change the left end of a long strip
    for pooling in (True, False):
        model = tiny("deeplabv3p", image_pooling=pooling)
        assert hasattr(model.aspp, "pool") == pooling
        d = np.abs(run(model, y) - run(model, x))[0, :, :, -16:].max()  # the right end, 1200+ px away
        assert (d > 0) == pooling, (pooling, d)


def test_deeplab_aspp_rates() -> None:
    model = tiny("deeplabv3p", aspp_rates=[1, 2, 3])
    assert [b[0]._dilation for b in model.aspp.branches[1:]] == [[1, 1], [2, 2], [3, 3]]
    assert run(model, rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)
    assert [b[0]._dilation for b in tiny("deeplabv3p").aspp.branches[1:]] == [[6, 6], [12, 12], [18, 18]]


def test_deeplab_separable_head_is_smaller() -> None:
    def size(model: Any) -> int:
        return sum(int(np.prod(p.shape)) for p in model.parameters())

    dense, sep = tiny("deeplabv3p"), tiny("deeplabv3p", separable=True)
    assert size(sep) < size(dense)
    assert run(sep, rand(1, 3, 67, 93)).shape == (1, 3, 67, 93)


def test_deeplab_resnet50() -> None:
    model = tiny("deeplabv3p", backbone_depth=50)
    assert model.backbone.feat_channels == [64, 128, 256, 512]  # 4x expansion at width 0.25
    assert run(model, rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_aspp_image_pooling_sees_far_pixels() -> None:
    paddle.seed(0)
    aspp = ASPP(8, 8, (6, 12, 18))
    aspp.eval()
    x = rand(1, 8, 64, 64)
    far = x.copy()
    far[..., 40:48, 41:49] += 5.0  # beyond the largest dilation (18) seen from pixel (0, 0)
    with paddle.no_grad():
        a = aspp(paddle.to_tensor(x)).numpy()[..., 0, 0]
        b = aspp(paddle.to_tensor(far)).numpy()[..., 0, 0]
    assert not np.allclose(a, b)


def test_aspp_without_pooling_is_local() -> None:
    """Control for the test above: the atrous branches alone do not reach that far."""
    paddle.seed(0)
    aspp = ASPP(8, 8, (6, 12, 18))
    aspp.eval()
    x = rand(1, 8, 64, 64)
    far = x.copy()
    far[..., 40:48, 41:49] += 5.0
    with paddle.no_grad():
        outs = [
            [branch(paddle.to_tensor(v)).numpy()[..., 0, 0] for branch in aspp.branches] for v in (x, far)
        ]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b)


# ---- checkpoints --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:When training, we now always track:UserWarning")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    model = tiny(name, in_channels=4)
    # Non-default BN statistics make sure buffers travel too.
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(rand(2, 4, 32, 32)))
    model.eval()
    path = save_weights(model, tmp_path / "w.pdparams")
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["w.pdparams"]
    x = rand(1, 4, 33, 47, seed=1)
    paddle.seed(123)
    other = build_model(name, in_channels=4, num_classes=3, **TINY[name])
    other.eval()
    assert not np.allclose(run(other, x), run(model, x))
    load_weights(other, path)
    np.testing.assert_array_equal(run(other, x), run(model, x))
    via_pretrained = build_model(name, in_channels=4, num_classes=3, pretrained=str(path), **TINY[name])
    via_pretrained.eval()
    np.testing.assert_array_equal(run(via_pretrained, x), run(model, x))


def test_load_other_num_classes_names_shapes(tmp_path: Path) -> None:
    path = save_weights(tiny("unet", num_classes=3), tmp_path / "w.pdparams")
    with pytest.raises(WeightsError) as info:
        load_weights(tiny("unet", num_classes=5), path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "classifier.weight" in msg and "[3, 8, 1, 1]" in msg and "[5, 8, 1, 1]" in msg
    assert "another number of bands or classes" in msg


def test_load_other_in_channels_names_shapes(tmp_path: Path) -> None:
    path = save_weights(tiny("deeplabv3p", in_channels=4), tmp_path / "w.pdparams")
    with pytest.raises(WeightsError, match=r"backbone.stem.0.0.weight.* shape \[8, 4, 3, 3\] in the file but \[8, 10, 3, 3\]"):
        build_model("deeplabv3p", in_channels=10, num_classes=3, pretrained=path, **TINY["deeplabv3p"])


def test_load_other_architecture(tmp_path: Path) -> None:
    path = save_weights(tiny("unet"), tmp_path / "w.pdparams")
    with pytest.raises(WeightsError, match="lacks .* parameter") as info:
        load_weights(tiny("deeplabv3p"), path)
    assert "\n" not in str(info.value)


def test_load_unexpected_keys(tmp_path: Path) -> None:
    model = tiny("unet")
    state = model.state_dict()
    state["extra.weight"] = paddle.zeros([2])
    paddle.save(state, str(tmp_path / "w.pdparams"))
    with pytest.raises(WeightsError, match="'extra.weight'"):
        load_weights(model, tmp_path / "w.pdparams")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tiny("unet"), tmp_path / "nope.pdparams")


@pytest.mark.parametrize("content", [b"", b"not a pickle at all" * 10, b"half"])
def test_load_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "w.pdparams"
    if content == b"half":
        save_weights(tiny("unet"), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="corrupt") as info:
        load_weights(tiny("unet"), path)
    assert "\n" not in str(info.value)


def test_weights_pickled_by_another_numpy_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights saved under numpy 2 reference numpy._core, which numpy 1 lacks: the error names numpy, not
    a corrupt file (the shipped weights are such pickles)."""
    import paddle

    path = tmp_path / "w.pdparams"
    save_weights(tiny("unet"), path)

    def load(*_a: object, **_k: object) -> None:
        raise ModuleNotFoundError("No module named 'numpy._core'", name="numpy._core")

    monkeypatch.setattr(paddle, "load", load)
    with pytest.raises(WeightsError, match=r"saved with another numpy \(numpy._core is missing.*pip install 'numpy>=2'"):
        load_weights(tiny("unet"), path)


# ---- inference runtime -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "extra"),
    [("unet", {}), ("deeplabv3p", {}), ("deeplabv3p", {"separable": True, "output_stride": 8}),
     ("deeplabv3p", {"separable": True, "fine_channels": 8, "image_pooling": False})],
)
def test_exported_predictor_matches_dygraph(name: str, extra: dict[str, Any], tmp_path: Path) -> None:
    model = tiny(name, in_channels=4, num_classes=3, **extra)
    model.train()  # export must switch to eval and back
    folder = export_model(model, tmp_path / "export" / "model", in_channels=4)
    assert model.training
    program, params = find_model_files(folder)
    assert program.suffix in (".json", ".pdmodel") and params.suffix == ".pdiparams"
    fast = InferencePredictor(program, params, threads=1)
    ref = DygraphPredictor(model)
    for batch, (h, w) in [(2, (64, 64)), (1, (96, 128)), (3, (67, 93))]:
        x = rand(batch, 4, h, w, seed=batch)
        got, want = fast(x), ref(x)
        assert got.shape == want.shape == (batch, 3, h, w)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "extra"), [("unet", {}), ("deeplabv3p", {"fine_channels": 8})])
def test_gap_channels_read_nan_as_a_band_gap(name: str, extra: dict[str, Any], tmp_path: Path) -> None:
    # A gap_channels model takes NaN for "this band has no data here": it gives finite logits,
    # and they differ from those of the same input with the gap at the band mean (0), which a
    # model without the channels cannot tell from a measured value.
    model = tiny(name, in_channels=3, num_classes=4, gap_channels=True, **extra)
    model.eval()
    x = rand(2, 3, 64, 64, seed=5)
    gap = x.copy()
    gap[0, 2, :, :20] = np.nan  # one band of one sample, a frame of 20 columns
    gap[1, :, 30:34] = np.nan  # every band: a nodata stripe
    ref = DygraphPredictor(model)
    got = ref(gap)
    assert np.isfinite(got).all()
    filled = ref(np.nan_to_num(gap, nan=0.0))
    assert np.abs(got - filled)[0, :, :, :20].max() > 1e-3
    # Paddle Inference runs the exported graph (isnan, where) the same way, batch and all.
    program, params = find_model_files(export_model(model, tmp_path / "model", in_channels=3))
    np.testing.assert_allclose(InferencePredictor(program, params, threads=1)(gap), got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "extra"), [("unet", {}), ("deeplabv3p", {"fine_channels": 8, "gap_channels": True})])
def test_indices_are_normalised_differences_of_the_raw_bands(name: str, extra: dict[str, Any], tmp_path: Path) -> None:
    # The network undoes the normalisation of its input and appends (A - B) / (|A| + |B|) per
    # pair, so the channel it sees is the index of the raw bands (here NDVI-like of bands 3, 2
    # and the reverse of 1, 3), whatever the normalisation; the exported graph computes the same.
    from geoseg.models import normalized_difference_input

    rng = np.random.default_rng(3)
    raw = rng.uniform(0.05, 0.9, size=(2, 3, 32, 32)).astype(np.float32)
    mean, std = (0.3, 0.4, 0.5), (0.1, 0.2, 0.3)
    x = (raw - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    pairs = ((2, 1), (0, 2))
    got = normalized_difference_input(paddle.to_tensor(x.astype(np.float32)), pairs, (mean, std)).numpy()
    assert got.shape == (2, 5, 32, 32)
    np.testing.assert_allclose(got[:, :3], x, atol=1e-6)
    want = [(raw[:, a] - raw[:, b]) / (raw[:, a] + raw[:, b]) for a, b in pairs]
    np.testing.assert_allclose(got[:, 3:], np.stack(want, axis=1), atol=1e-5)

    kw = {"indices": [[3, 2], [1, 3]], "band_stats": (mean, std), **extra}
    model = tiny(name, in_channels=3, num_classes=4, **kw)
    plain = tiny(name, in_channels=3, num_classes=4, **extra)
    ref = DygraphPredictor(model)
    out = ref(x.astype(np.float32))
    assert out.shape == (2, 4, 32, 32) and np.isfinite(out).all()
    # The first layer takes two more channels than the same network without indices.
    first = [p.shape for p in model.parameters() if len(p.shape) == 4][0]
    first_plain = [p.shape for p in plain.parameters() if len(p.shape) == 4][0]
    assert first[1] == first_plain[1] + 2
    program, params = find_model_files(export_model(model, tmp_path / "model", in_channels=3))
    np.testing.assert_allclose(InferencePredictor(program, params, threads=1)(x.astype(np.float32)), out,
                               atol=1e-4, rtol=1e-4)


def test_find_model_files_variants(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no exported model"):
        find_model_files(tmp_path)
    (tmp_path / "net.pdmodel").write_bytes(b"x")
    with pytest.raises(ModelError, match="no exported model"):
        find_model_files(tmp_path)  # program without params
    (tmp_path / "net.pdiparams").write_bytes(b"x")
    assert find_model_files(tmp_path) == (tmp_path / "net.pdmodel", tmp_path / "net.pdiparams")
    assert find_model_files(tmp_path / "net") == (tmp_path / "net.pdmodel", tmp_path / "net.pdiparams")
    (tmp_path / "model.json").write_bytes(b"x")
    (tmp_path / "model.pdiparams").write_bytes(b"x")
    assert find_model_files(tmp_path)[0] == tmp_path / "model.json"
    with pytest.raises(ModelError, match="no exported model"):
        find_model_files(tmp_path / "other")


def test_predictor_arguments() -> None:
    with pytest.raises(ModelError, match="device"):
        DygraphPredictor(tiny("unet"), device="tpu")
    with pytest.raises(ModelError, match="precision"):
        DygraphPredictor(tiny("unet"), precision="int8")  # type: ignore[arg-type]
    with pytest.warns(PerformanceWarning):
        pred = DygraphPredictor(tiny("unet"), precision="fp16")
    assert pred.precision == "fp32"
    with pytest.raises(ModelError, match="NCHW"):
        pred(np.zeros((3, 8, 8), np.float32))
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(ModelError, match="CUDA"):
            DygraphPredictor(tiny("unet"), device="gpu")


def test_inference_predictor_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        InferencePredictor(tmp_path / "model.json", tmp_path / "model.pdiparams")


def test_export_works_with_a_home_that_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """paddle's to_static writes under ~/.cache/paddle whatever the export's folder: with an unwritable
    HOME (a container, a cron or service user) every first predict failed ("No such file or directory:
    '/proc/nohome'"). HOME points at a scratch folder beside the export for the call, then back."""
    import os

    home = "/proc/geoseg-no-home"  # cannot be created, even by root
    monkeypatch.setenv("HOME", home)
    model = tiny("unet", in_channels=3, num_classes=2)
    folder = export_model(model, tmp_path / "export" / "model", in_channels=3)
    program, params = find_model_files(folder)
    assert program.exists() and params.exists()
    assert os.environ["HOME"] == home
    assert not [p for p in folder.iterdir() if p.name.startswith(".geoseg-home-")]  # the scratch home is gone


@pytest.mark.parametrize("capability, expected", [((6, 1), False), ((7, 0), True), ((9, 0), True)])
def test_fp16_autocast_needs_compute_capability_7(capability: tuple[int, int], expected: bool) -> None:
    """Below compute capability 7.0 Paddle turns FP16 autocast off with a bare UserWarning: predict said
    fp16 and ran fp32 (P100, P4/P40, GTX 10xx). geoseg asks first (and warns, and says fp32)."""
    import types

    from geoseg.models.inference import amp_fp16_supported

    asked = []
    cuda = types.SimpleNamespace(get_device_capability=lambda i: asked.append(i) or capability)
    fake = types.SimpleNamespace(device=types.SimpleNamespace(cuda=cuda))
    assert amp_fp16_supported(fake, 1) is expected and asked == [1]


def test_loading_paddle_leaves_the_application_s_signal_handler_and_logging(tmp_path: Path) -> None:
    """geoseg as a library: paddle's import replaced the application's SIGTERM handler with a C++
    "FatalError" dump and put an INFO stderr handler on the root logger (every library's INFO lines
    printed; the application's later logging.basicConfig did nothing). Both are put back."""
    script = tmp_path / "app.py"
    script.write_text(
        "import logging, os, signal, time\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: got.append('term'))\n"
        "from geoseg.errors import require_paddle\n"
        "require_paddle()\n"
        "root = logging.getLogger()\n"
        "print('handlers', len(root.handlers), 'level', root.level)\n"
        "print('OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS'))\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "print('handler', got)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    # (paddle set OMP_NUM_THREADS=1 where it was unset: every process the application started later had one core)
    assert r.stdout.splitlines() == ["handlers 0 level 30", "OMP_NUM_THREADS None", "handler ['term']"], \
        r.stdout + r.stderr
    assert "FatalError" not in r.stderr
    # loaded in another thread (a Dask task, a web worker), where no Python handler can be set again:
    # paddle's C++ handler printed its dump to stdout (a pipeline's output); now SIGTERM ends it plainly
    script.write_text(
        "import os, signal, threading, time\n"
        "from geoseg.errors import require_paddle\n"
        "t = threading.Thread(target=require_paddle)\n"
        "t.start(); t.join(); time.sleep(1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -15 and "FatalError" not in r.stdout + r.stderr, (r.returncode, r.stdout[-500:])


def _python(tmp_path: Path, code: str, omp: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with ``OMP_NUM_THREADS`` set to ``omp`` (unset for None)."""
    script = tmp_path / "probe.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_s_commands_leave_omp_num_threads_as_the_user_set_it(tmp_path: Path) -> None:
    """The CLI imports paddle before its commands (its SIGTERM handler must win), bypassing what puts
    paddle's import changes back: OMP_NUM_THREADS stayed 1 in ``geoseg train`` (a teacher's predictor
    on one core) and in every process a command started."""
    code = ("import os, geoseg_cli.main as m\n"
            "cmd = m.cli.get_command(None, 'train')\n"
            "cmd.callback, cmd.params = (lambda *a, **k: print('OMP', os.environ.get('OMP_NUM_THREADS'))), []\n"
            "m.cli.main(['train'], standalone_mode=False)\n")
    r = _python(tmp_path, code, None)
    assert r.returncode == 0 and r.stdout.strip() == "OMP None", r.stdout + r.stderr
    r = _python(tmp_path, code, "1")
    assert r.stdout.strip() == "OMP 1", r.stdout + r.stderr


def test_paddle_s_thread_advice_is_left_out_and_other_stderr_passes(tmp_path: Path) -> None:
    """OMP_NUM_THREADS=4 made paddle's import print "WARNING: OMP_NUM_THREADS set to 4, not 1. The
    computation speed will not be optimized if you use data parallel ..." on every command."""
    r = _python(tmp_path, "import os, sys\nfrom geoseg.errors import require_paddle\nrequire_paddle()\n"
                          "print('after', file=sys.stderr)\n"
                          "print('OMP', os.environ.get('OMP_NUM_THREADS'), type(sys.stderr).__name__)\n", "2")
    assert r.returncode == 0 and "OMP_NUM_THREADS" not in r.stderr and "WISELY" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == "after" and r.stdout.strip() == "OMP 2 TextIOWrapper", r.stdout + r.stderr


def test_two_threads_first_using_paddle_and_exporting_at_once(tmp_path: Path, tiny_unet: tuple[Path, Path]) -> None:
    """A web service's first two requests in a fresh process: the second thread found the half-imported
    paddle in sys.modules ("partially initialized module 'paddle' has no attribute ...") and two first
    exports into an empty cache broke each other's to_static translation ("Not found key in IRMapping");
    GLOG_minloglevel, set for paddle's import, stayed in the environment of every child process."""
    code = f"""
import os, threading
from geoseg.engine import ModelSource, exported_for_inference, resolve_model
from geoseg.errors import require_paddle
barrier, modules, exports, errors = threading.Barrier(2), [], [], []
source = resolve_model(None, {str(tiny_unet[0])!r})
def job():
    try:
        barrier.wait()
        modules.append(require_paddle())
        exports.append(exported_for_inference(source))
    except BaseException as exc:
        errors.append(f"{{type(exc).__name__}}: {{exc}}")
threads = [threading.Thread(target=job) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors or "ok", len({{id(m) for m in modules}}), len(exports) == 2 and exports[0] == exports[1])
print("GLOG", os.environ.get("GLOG_minloglevel"))
"""
    env_cache = tmp_path / "cache"
    script = tmp_path / "race.py"
    script.write_text(code)
    env = {**{k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}, "GEOSEG_CACHE_DIR": str(env_cache)}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.splitlines() == ["ok 1 True", "GLOG None"], r.stdout + r.stderr[-3000:]
    assert len(list((env_cache / "exports").iterdir())) == 1
