"""The trained models shipped in geoseg/weights load and run on the NC sample scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.card import ModelCard
from geoseg.engine import (
    WEIGHTS_DIR,
    PredictOptions,
    resolve_model,
    segment_scene,
    shipped_models,
)
from tests.conftest import SAMPLE_DATA

pytest.importorskip("paddle")

NC = SAMPLE_DATA / "nc_landsat7" / "image_6band_uint8.tif"
NC_LABELS = SAMPLE_DATA / "nc_landsat7" / "landcover96_labels.tif"
NAMES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]


@pytest.mark.parametrize("name", ["deeplabv3p", "unet"])
def test_shipped_card_and_weights(name: str) -> None:
    assert name in shipped_models()
    card = ModelCard.load(WEIGHTS_DIR / f"{name}.yaml")
    assert card.architecture == name
    assert [c.name for c in card.classes] == NAMES and [c.id for c in card.classes] == list(range(1, 8))
    assert card.in_channels == 5 and card.tile_size % 16 == 0  # bands 1-5 (UNet session 8, DeepLabv3+ session 9)
    weights = WEIGHTS_DIR / f"{name}.pdparams"
    assert weights.stat().st_size <= 15 * 2**20
    test = card.metrics["test"]
    assert test["miou_classes"] == [1, 3, 4, 5, 6, 7]
    assert 0.0 < test["miou"] < 1.0 and 0.0 < test["overall_accuracy"] < 1.0
    assert set(test["per_class_iou"]) == {"1", "3", "4", "5", "6", "7"}
    # Prior adaptation: the training region's mean class probabilities, a distribution over the classes.
    assert card.class_prior is not None and sum(card.class_prior) == pytest.approx(1.0, abs=1e-4)
    assert card.adapt_prior is True  # chosen on the folds (recipes README: DeepLabv3+ session 6, UNet session 8)
    # Seed ensembles (session 8): the stated number of members, one seed each, all in the weights file.
    members = {"deeplabv3p": 2, "unet": 3}[name]
    assert card.params["members"] == members and len(set(card.training["seeds"])) == members
    # Trained on the train columns 0-325 only (the fixed split); a validation region, if any, too.
    assert card.training["train_region"][0] + card.training["train_region"][2] <= 326
    if card.training["val_region"] is not None:
        assert card.training["val_region"][0] + card.training["val_region"][2] <= 326


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3p", "unet"])
def test_shipped_model_runs_on_the_sample_scene(name: str, tmp_path: Path) -> None:
    if not NC.exists():
        pytest.skip("sample_data/nc_landsat7 is missing")
    src = resolve_model(name)  # no --weights: the shipped ones
    res = segment_scene(NC, tmp_path, source=src, options=PredictOptions(device="cpu"))
    with rasterio.open(res.mask) as ds, rasterio.open(NC_LABELS) as ref:
        mask, labels = ds.read(1), ref.read(1)
        assert ds.crs == ref.crs and ds.transform == ref.transform
        assert ("GEOSEG_SCENE_PRIOR" in ds.tags()) == src.card.adapt_prior
    assert (res.scene_prior is not None) == src.card.adapt_prior
    assert set(np.unique(mask)) <= {1, 2, 3, 4, 5, 6, 7, 255}
    # A real land-cover map, not noise: most labelled pixels of the training columns agree.
    train = (labels[:, :326] > 0) & (mask[:, :326] != 255)
    assert (mask[:, :326][train] == labels[:, :326][train]).mean() > 0.6


def test_deeplab_warns_far_from_its_training_window_size() -> None:
    import dataclasses
    import warnings

    from geoseg.engine import check_window_size
    from geoseg.errors import WindowSizeWarning

    shipped = ModelCard.load(WEIGHTS_DIR / "deeplabv3p.yaml")
    base = {k: v for k, v in shipped.params.items() if k not in ("aspp_rates", "image_pooling")}
    paper = dataclasses.replace(shipped, params={**base, "output_stride": 8})  # rates 12/24/36, pooling
    pooled = dataclasses.replace(shipped, params={**base, "aspp_rates": [2, 4, 6]})
    for card in (paper, pooled):
        with pytest.warns(WindowSizeWarning, match=f"trained on {card.tile_size}-pixel windows; in 512-pixel"):
            check_window_size(card, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_window_size(paper, paper.tile_size)
        check_window_size(paper, paper.tile_size * 2)
        # Small atrous rates and no image pooling: fully local, any window size is fine.
        check_window_size(dataclasses.replace(shipped, params={**base, "aspp_rates": [2, 4, 6],
                                                                 "image_pooling": False}), 1024)
        check_window_size(ModelCard.load(WEIGHTS_DIR / "unet.yaml"), 1024)  # a UNet has no atrous taps


# ---- the GPU paths (run where paddle has CUDA and sees a GPU; skipped elsewhere, see conftest) ----------
def _mask(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.mark.gpu
@pytest.mark.parametrize("runtime, precision", [("dygraph", "fp32"), ("dygraph", "fp16"), ("inference", "fp32"),
                                                ("inference", "fp16")])
def test_the_gpu_gives_the_cpu_s_map(tmp_path: Path, runtime: str, precision: str) -> None:
    """Dygraph (autocast O1 for fp16) and Paddle Inference (Half) on the GPU, against the CPU's mask of the
    shipped UNet; the description says where and how it ran, and the GPU default batch is used."""
    from geoseg.engine import build_predictor

    src = resolve_model("unet")
    cpu = segment_scene(NC, tmp_path / "cpu", source=src, options=PredictOptions(device="cpu", vector="none"))
    gpu = segment_scene(NC, tmp_path / "gpu", source=src, options=PredictOptions(
        device="gpu", runtime=runtime, precision=precision, vector="none"))  # type: ignore[arg-type]
    assert gpu.device.startswith(f"gpu/{runtime}/")  # (fp32 on a GPU without FP16 autocast, with a warning)
    agree = (_mask(cpu.mask) == _mask(gpu.mask)).mean()
    assert agree >= (0.999 if precision == "fp32" else 0.99), agree
    _, desc = build_predictor(src, "gpu:0", precision, runtime)  # type: ignore[arg-type]
    assert desc.startswith(f"gpu:0/{runtime}/")
