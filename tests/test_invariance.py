"""Tiling invariance: tiled + blended prediction equals one whole-image forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.card import default_card
from geoseg.engine import ModelSource, PredictOptions, build_predictor, segment_scene
from geoseg.tiling import make_grid
from tests.conftest import SAMPLE_DATA, write_raster

paddle = pytest.importorskip("paddle")


def seeded_fcn(in_channels: int, num_classes: int) -> paddle.nn.Layer:
    """A small fully-convolutional net (receptive field 31 px), seeded."""
    nn = paddle.nn
    paddle.seed(1234)

    class FCN(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2D(in_channels, 16, 3, padding=1), nn.ReLU(),
                nn.Conv2D(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
                nn.Conv2D(16, 16, 3, padding=4, dilation=4), nn.ReLU(),
                nn.Conv2D(16, 16, 3, padding=8, dilation=8), nn.ReLU(),
                nn.Conv2D(16, num_classes, 1),
            )

        def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
            return [self.body(x)]

    return FCN()


def real_scene(path: Path, h: int = 1100, w: int = 1500) -> Path:
    """Mirror-tile the real NAIP sample to h × w (4 bands, uint8)."""
    with rasterio.open(SAMPLE_DATA / "naip" / "naip_rgbn_uint8.tif") as ds:
        a = ds.read()
        profile = ds.profile
    reps = (1, -(-h // a.shape[1]), -(-w // a.shape[2]))
    row = np.concatenate([a, a[:, :, ::-1]] * reps[2], axis=2)
    img = np.concatenate([row, row[:, ::-1]] * reps[1], axis=1)[:, :h, :w]
    img = np.maximum(img, 1)  # keep every pixel valid
    return write_raster(path, np.ascontiguousarray(img), crs=profile["crs"], transform=profile["transform"])


@pytest.mark.slow
def test_tiled_prediction_matches_whole_image(tmp_path: Path) -> None:
    src = real_scene(tmp_path / "scene.tif")
    card = default_card("fcn", 4, 5, tile_size=512, overlap=128)
    source = ModelSource(card, layer=seeded_fcn(4, 5))
    predictor, _ = build_predictor(source, device="cpu")

    with rasterio.open(src) as ds:
        x = card.normalization.apply(ds.read(), ds.dtypes[0])
    whole = predictor(x[None])[0].argmax(axis=0)

    agree = {}
    for overlap in (128, 0):
        res = segment_scene(src, tmp_path / f"ov{overlap}", source=source, predictor=predictor,
                            options=PredictOptions(overlap=overlap))
        with rasterio.open(res.mask) as ds:
            mask = ds.read(1)
        agree[overlap] = mask == whole  # class ids are 0..4 = channel indexes
    print(f"\ntiled (512/128, gaussian blend) vs whole-image argmax agreement: {agree[128].mean():.5f}")
    assert agree[128].mean() >= 0.995

    # near the window borders of the overlap-0 grid, overlap 128 disagrees less
    grid0 = make_grid(1100, 1500, 512, 0)
    near = np.zeros((1100, 1500), bool)
    for r in grid0.row_offsets[1:]:
        near[r - 16 : r + 16] = True
    for c in grid0.col_offsets[1:]:
        near[:, c - 16 : c + 16] = True
    dis0, dis128 = 1 - agree[0][near].mean(), 1 - agree[128][near].mean()
    print(f"disagreement within 16 px of window borders: overlap 0 {dis0:.4f}, overlap 128 {dis128:.4f}")
    assert dis128 < dis0
