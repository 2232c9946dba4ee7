"""Window grid geometry."""

from __future__ import annotations

import numpy as np
import pytest

from rasterio.windows import Window

from geoseg.errors import ParameterError
from geoseg.tiling import axis_offsets, core_bounds, fit_tile, make_grid, spread_tiles

SIZES = [(1, 1), (37, 600), (512, 512), (513, 700), (600, 9000), (9000, 600), (1100, 1500), (2048, 2048), (1000, 1025)]


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize(("tile", "overlap"), [(512, 128), (256, 0), (64, 48)])
def test_grid_covers_every_pixel_and_stays_inside(height: int, width: int, tile: int, overlap: int) -> None:
    grid = make_grid(height, width, tile, overlap)
    hits = np.zeros((height, width), np.int32)
    for t in grid.tiles():
        assert t.row >= 0 and t.col >= 0
        assert t.row_stop <= height and t.col_stop <= width
        assert t.height == min(tile, height) and t.width == min(tile, width)
        hits[t.row : t.row_stop, t.col : t.col_stop] += 1
    assert hits.min() >= 1
    assert len(list(grid.tiles())) == len(grid) == grid.shape[0] * grid.shape[1]


@pytest.mark.parametrize("size", [513, 700, 1000, 4097, 9000])
def test_consecutive_windows_overlap_at_least_overlap(size: int) -> None:
    offs = axis_offsets(size, 512, 128)
    assert offs[0] == 0 and offs[-1] == size - 512
    assert all(b - a <= 512 - 128 for a, b in zip(offs, offs[1:]))
    assert all(b > a for a, b in zip(offs, offs[1:]))
    # the count formula in the module docstring
    assert len(offs) == int(np.ceil((size - 512) / 384)) + 1


def test_grid_is_the_same_for_any_block_split() -> None:
    grid = make_grid(3000, 2100, 512, 128)
    whole = list(grid.tiles())
    by_rows = [t for i in range(grid.shape[0]) for t in grid.row_band(i)]
    assert whole == by_rows
    # a grid built for a different scene height shares its first rows of windows
    taller = make_grid(5000, 2100, 512, 128)
    for i in range(grid.shape[0] - 1):
        assert taller.row_band(i) == grid.row_band(i)


@pytest.mark.parametrize(
    ("tile", "overlap", "word"),
    [(512, 512, "smaller than the tile size"), (512, 600, "smaller"), (8, 0, "too small"), (500, 0, "multiple of 16"),
     (512, -1, "negative")],
)
def test_bad_tile_parameters_are_refused(tile: int, overlap: int, word: str) -> None:
    with pytest.raises(ParameterError, match=word):
        make_grid(100, 100, tile, overlap)


@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (513, 128, 32), (40, 16, 4), (16, 16, 0)])
def test_window_cores_partition_the_axis_inside_their_windows(size: int, tile: int, overlap: int) -> None:
    offsets = axis_offsets(size, tile, overlap)
    b = core_bounds(offsets, tile, size)
    assert b[0] == 0 and b[-1] == size and len(b) == len(offsets) + 1
    for k, off in enumerate(offsets):
        assert b[k] < b[k + 1]  # consecutive, non-empty: every pixel in exactly one core
        assert off <= b[k] and b[k + 1] <= off + tile  # the core lies inside its window


def test_spread_tiles_keeps_all_or_an_even_spread() -> None:
    grid = make_grid(100, 120, 32, 8)
    assert spread_tiles(grid, len(grid)) == list(grid.tiles())
    some = spread_tiles(grid, 5)
    assert len(some) == 5 and some[0] == next(iter(grid.tiles())) and some[-1] == list(grid.tiles())[-1]
    assert len({t.index for t in some}) == 5
    assert spread_tiles(grid, 1) == [list(grid.tiles())[len(grid) // 2]]


@pytest.mark.parametrize("window", [(0, 0, 10, 10), (130, 77, 300, 41), (0, 0, 1000, 700), (999, 699, 1, 1),
                                    (384, 384, 1, 1)])
def test_covering_keeps_exactly_the_windows_meeting_an_area(window: tuple[int, int, int, int]) -> None:
    from rasterio.windows import Window

    grid = make_grid(700, 1000, 512, 128)
    c, r, w, h = window
    sub, region = grid.covering(Window(c, r, w, h))
    full = [t for t in grid.tiles() if t.row < r + h and t.row_stop > r and t.col < c + w and t.col_stop > c]
    got = [(t.row + region.row_off, t.col + region.col_off, t.height, t.width) for t in sub.tiles()]
    assert got == [(t.row, t.col, t.height, t.width) for t in full]
    # the region is their union and holds the area
    assert region.row_off == min(t.row for t in full) and region.col_off == min(t.col for t in full)
    assert region.row_off + region.height == max(t.row_stop for t in full) <= 700
    assert region.col_off + region.width == max(t.col_stop for t in full) <= 1000
    assert (sub.height, sub.width) == (region.height, region.width)
    with pytest.raises(ParameterError, match="outside"):
        grid.covering(Window(1000, 0, 5, 5))


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "floor", "fitted"), [
    (443, 489, 8000, 32, 128, (496, 32)),  # the NC sample in 8,000-px windows: one window of its size
    (443, 489, 512, 128, 128, (496, 128)),
    (100, 100, 1024, 512, 16, (112, 96)),  # the overlap, unused by one window, shrinks with it
    (20, 20, 8000, 32, 128, (128, 32)),  # smaller than the model's window: the window it gets by default
    (20, 20, 64, 16, 128, (64, 16)),  # a window smaller than the model's is not grown
    (443, 489, 496, 32, 128, (496, 32)),
    (600, 300, 512, 128, 128, (512, 128)),  # larger than the window along one axis: as asked
    (2048, 2048, 2048, 32, 128, (2048, 32)),
])
def test_a_window_larger_than_the_raster_shrinks_to_it(height: int, width: int, tile: int, overlap: int, floor: int,
                                                       fitted: tuple[int, int]) -> None:
    assert fit_tile(height, width, tile, overlap, floor) == fitted
    big, small = make_grid(height, width, tile, overlap), make_grid(height, width, *fitted)
    # the same windows read (a raster smaller than the window is read whole): only the padding differs
    assert [(t.row, t.col, t.height, t.width) for t in big.tiles()] == [(t.row, t.col, t.height, t.width)
                                                                      for t in small.tiles()]
    if fitted[0] < tile:
        assert len(small) == 1 and fitted[0] % 16 == 0 and fitted[0] >= max(height, width)


@pytest.mark.parametrize(("height", "width", "tile", "floor", "shape"), [
    (600, 3000, 3008, 128, (608, 3008)),  # a strip: padded along its short axis only
    (600, 10000, 4096, 128, (608, 4096)),  # also where the long axis needs several windows
    (20, 3000, 512, 128, (128, 512)),  # not below the model's window
    (1, 5000, 512, 16, (16, 512)),
    (512, 512, 512, 128, (512, 512)),
    (3000, 3000, 512, 128, (512, 512)),
])
def test_an_axis_shorter_than_the_window_pads_to_its_length(height: int, width: int, tile: int, floor: int,
                                                           shape: tuple[int, int]) -> None:
    grid = make_grid(height, width, tile, 0, pad_floor=floor)
    assert grid.model_shape == shape
    assert make_grid(height, width, tile, 0).model_shape == (tile, tile)  # without pad_floor: as before
    assert all(t.height <= shape[0] and t.width <= shape[1] for t in grid.tiles())
    # a sub-grid (an AOI's windows) pads as the whole raster's grid does
    sub, _ = grid.covering(Window(0, 0, min(width, 40), min(height, 40)))
    assert sub.model_shape == shape


def test_fit_tile_validates_as_make_grid() -> None:
    with pytest.raises(ParameterError, match="multiple of 16"):
        fit_tile(20, 20, 500, 0)
    with pytest.raises(ParameterError, match="smaller than the tile size"):
        fit_tile(20, 20, 8000, 8000)
