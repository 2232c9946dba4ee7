"""Weighted blending of overlapping windows."""

from __future__ import annotations

import numpy as np
import pytest

from geoseg.blending import WEIGHT_FLOOR, BlendMode, StripMerger, blend_array, weight_map
from geoseg.errors import ParameterError
from geoseg.tiling import make_grid
from tests.conftest import class_image


@pytest.mark.parametrize("mode", list(BlendMode))
def test_weight_map_is_positive_and_peaks_at_centre(mode: BlendMode) -> None:
    w = weight_map(64, 48, mode)
    assert w.shape == (64, 48)
    assert w.min() >= WEIGHT_FLOOR**2 > 0
    assert w[32, 24] == pytest.approx(w.max())
    if mode == BlendMode.GAUSSIAN:
        assert w[0, 0] < 0.01 < w[32, 24]


def one_hot(cls: np.ndarray, n: int) -> np.ndarray:
    return (np.arange(n)[:, None, None] == cls[None]).astype(np.float32)


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(150, 230, 64, 16), (64, 64, 64, 0), (40, 300, 64, 32), (333, 97, 32, 8)])
@pytest.mark.parametrize("mode", list(BlendMode))
def test_identity_predictor_gives_back_the_input(h: int, w: int, tile: int, overlap: int, mode: BlendMode) -> None:
    cls = class_image(h, w, 5, seed=h)
    image = cls[None].astype(np.float32)
    grid = make_grid(h, w, tile, overlap)
    probs = blend_array(lambda x: one_hot(x[0].astype(int), 5), image, list(grid.tiles()), 5, tile, mode)
    np.testing.assert_array_equal(probs.argmax(axis=0), cls)
    np.testing.assert_allclose(probs, one_hot(cls, 5), rtol=0, atol=1e-6)
    # a float identity too: blending a window's own values gives them back
    vals = np.random.default_rng(1).random((2, h, w)).astype(np.float32)
    out = blend_array(lambda x: x, vals, list(grid.tiles()), 2, tile, mode)
    np.testing.assert_allclose(out, vals, rtol=1e-5, atol=1e-6)


def test_merger_refuses_out_of_order_windows() -> None:
    grid = make_grid(300, 100, 64, 16)
    m = StripMerger(2, 300, 100, 64)
    first = grid.tile_at(0, 0)
    m.aggregate(np.ones((2, 64, 64), np.float32), first)
    list(m.release(grid.row_offsets[2]))
    with pytest.raises(ParameterError, match="out of order"):
        m.aggregate(np.ones((2, 64, 64), np.float32), first)
    with pytest.raises(ParameterError, match="shape"):
        m.aggregate(np.ones((3, 64, 64), np.float32), grid.tile_at(2, 0))


def test_merger_memory_is_one_window_row() -> None:
    m = StripMerger(7, 100_000, 2048, 512)
    assert m._acc.shape == (7, 512, 2048)


@pytest.mark.parametrize("mode", list(BlendMode))
def test_rows_no_window_ran_over_come_out_empty_and_the_rest_unchanged(mode: BlendMode) -> None:
    """Windows skipped as all nodata (a scene's empty top, gaps in a mosaic): their rows come out
    uncovered and zero without blending work, and the covered rows are exactly as when every
    window runs (here: the windows of the middle rows only, values as the whole image's)."""
    h, w, tile, overlap = 333, 97, 32, 8
    vals = np.random.default_rng(2).random((2, h, w)).astype(np.float32)
    grid = make_grid(h, w, tile, overlap)
    every = blend_array(lambda x: x, vals, list(grid.tiles()), 2, tile, mode)
    ran = [t for t in grid.tiles() if 3 <= t.row // (tile - overlap) <= 6]  # window rows 3..6 only
    m = StripMerger(2, h, w, tile, mode)
    out = np.full((2, h, w), -1.0, np.float32)
    covered = np.zeros((h, w), bool)
    last = -1
    for t in [*grid.tiles()]:
        if t.row != last:
            for s in m.release(t.row):
                out[:, s.row:s.row + s.height], covered[s.row:s.row + s.height] = s.probs, s.covered
            last = t.row
        if t in ran:
            m.aggregate(vals[:, t.row:t.row_stop, t.col:t.col_stop], t)
    for s in m.finish():
        out[:, s.row:s.row + s.height], covered[s.row:s.row + s.height] = s.probs, s.covered
    top, bottom = ran[0].row, max(t.row_stop for t in ran)
    assert not covered[:top].any() and not covered[bottom:].any() and covered[top:bottom].all()
    assert (out[:, :top] == 0).all() and (out[:, bottom:] == 0).all()
    # rows only these windows reach are blended as in the full run
    inner = slice(ran[0].row + overlap, bottom - overlap)
    np.testing.assert_allclose(out[:, inner], every[:, inner], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, top:bottom], vals[:, top:bottom], rtol=1e-5, atol=1e-6)
