"""Window grid: pure geometry, no pixels.

One global grid covers the raster.  Along an axis of ``size`` pixels with window ``tile`` and
``overlap``, the stride is ``tile - overlap`` and the window offsets are::

    size <= tile:  [0]                                  (one window, padded to ``tile``)
    otherwise:     [min(k * stride, size - tile) for k in range(n)],
                   n = ceil((size - tile) / stride) + 1

so the last window is shifted inward to end exactly at the raster edge instead of being
padded; consecutive windows overlap by at least ``overlap`` pixels.  The window count is the
product of both axes' ``n``.  A window never reads outside the raster; only a raster smaller
than ``tile`` along an axis gets padding (reflect), which is cropped off again; predict and
info first shrink a window larger than the whole raster to what it needs (:func:`fit_tile`).

Units are pixels; rows are y (height) and columns x (width).  The grid depends only on
(height, width, tile, overlap), so any split of it into blocks (rows of windows) yields the
same windows.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rasterio.windows import Window

from geoseg.errors import ParameterError

MIN_TILE = 16


@dataclass(frozen=True)
class Tile:
    """One window of the grid, in raster pixel coordinates.

    ``row``/``col`` are the top-left offsets; ``height``/``width`` the pixels actually read
    (smaller than the tile size only when the raster is); ``index`` is (window row, window col).
    """

    row: int
    col: int
    height: int
    width: int
    index: tuple[int, int]

    @property
    def window(self) -> Window:
        """The rasterio read window."""
        return Window(self.col, self.row, self.width, self.height)

    @property
    def row_stop(self) -> int:
        """First row after the window."""
        return self.row + self.height

    @property
    def col_stop(self) -> int:
        """First column after the window."""
        return self.col + self.width


def tile_size_problem(tile: int) -> str | None:
    """Why the models cannot take windows of ``tile`` pixels (``"8 is too small: ..."``), or None."""
    if tile < MIN_TILE:
        return f"{tile} is too small: use at least {MIN_TILE} (512 is typical)"
    if tile % 16:
        return f"{tile} is not a multiple of 16: the models downsample 16x (try {tile // 16 * 16 or 16})"
    return None


def check_tile_params(tile: int, overlap: int) -> None:
    """Raise :class:`ParameterError` when ``tile``/``overlap`` cannot make a grid."""
    problem = tile_size_problem(tile)
    if problem is not None:
        raise ParameterError(f"tile size {problem}")
    if overlap < 0:
        raise ParameterError(f"overlap {overlap} is negative: use 0 or more")
    if overlap >= tile:
        raise ParameterError(f"overlap {overlap} must be smaller than the tile size {tile}: try {tile // 4}")


def axis_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """Window offsets along one axis (see the module docstring for the formula)."""
    if size <= 0:
        raise ParameterError(f"raster size {size} must be positive")
    check_tile_params(tile, overlap)
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    return [min(k * stride, size - tile) for k in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """The global window grid of a ``height`` × ``width`` raster."""

    height: int
    width: int
    tile: int
    overlap: int
    row_offsets: tuple[int, ...]
    col_offsets: tuple[int, ...]
    #: The model input size ``(height, width)`` every window is padded to; None: ``tile × tile``.
    input_shape: tuple[int, int] | None = None

    @property
    def model_shape(self) -> tuple[int, int]:
        """The model input size ``(height, width)`` of every window (see :func:`make_grid`)."""
        return self.input_shape or (self.tile, self.tile)

    @property
    def shape(self) -> tuple[int, int]:
        """Number of window rows and columns."""
        return len(self.row_offsets), len(self.col_offsets)

    def __len__(self) -> int:
        return len(self.row_offsets) * len(self.col_offsets)

    def tile_at(self, i: int, j: int) -> Tile:
        """Window (i, j)."""
        r, c = self.row_offsets[i], self.col_offsets[j]
        return Tile(r, c, min(self.tile, self.height - r), min(self.tile, self.width - c), (i, j))

    def row_band(self, i: int) -> list[Tile]:
        """All windows of window row ``i``, left to right (one processing block)."""
        return [self.tile_at(i, j) for j in range(len(self.col_offsets))]

    def tiles(self) -> Iterator[Tile]:
        """All windows, row-major."""
        for i in range(len(self.row_offsets)):
            yield from self.row_band(i)

    def covering(self, window: Window) -> tuple[TileGrid, Window]:
        """The windows of this grid that meet ``window`` (a pixel window of the raster), as the
        grid of the region they span, and that region: ``(grid, region)``, offsets relative to
        the region's top-left pixel. Every pixel of ``window`` lies in the same windows as in
        this grid, so it is blended exactly as in a run over the whole raster."""

        def meeting(offsets: tuple[int, ...], size: int, lo: int, hi: int) -> list[int]:
            return [o for o in offsets if o < hi and o + min(self.tile, size - o) > lo]

        r0, c0 = int(window.row_off), int(window.col_off)
        rows = meeting(self.row_offsets, self.height, r0, r0 + int(window.height))
        cols = meeting(self.col_offsets, self.width, c0, c0 + int(window.width))
        if not rows or not cols:
            raise ParameterError(f"window {window} lies outside the {self.width}x{self.height} raster")
        top, left = rows[0], cols[0]
        bottom, right = rows[-1] + min(self.tile, self.height - rows[-1]), cols[-1] + min(self.tile, self.width - cols[-1])
        grid = TileGrid(bottom - top, right - left, self.tile, self.overlap,
                        tuple(o - top for o in rows), tuple(o - left for o in cols), self.input_shape)
        return grid, Window(left, top, right - left, bottom - top)


def fit_tile(height: int, width: int, tile: int, overlap: int, floor: int | None = None) -> tuple[int, int]:
    """The window size and overlap a ``height`` × ``width`` raster needs: ``(tile, overlap)`` as
    given, unless the raster is smaller than ``tile`` along both axes. Then one window covers it
    and a larger one only pads it (the model's memory and time grow with the padded pixels), so
    the window shrinks to the raster's longer side rounded up to a multiple of 16 (the models
    downsample 16x), but not below ``floor`` (the model's own window size: a raster smaller
    than that keeps the window it would get by default). The overlap, unused by a single window,
    shrinks with it if it must. Validates ``tile`` and ``overlap`` as :func:`make_grid`."""
    check_tile_params(tile, overlap)
    if height <= 0 or width <= 0:
        raise ParameterError(f"raster size {width}x{height} must be positive")
    need = -(-max(height, width, floor or MIN_TILE) // 16) * 16
    if need >= tile:
        return tile, overlap
    return need, min(overlap, need - 16)


def padded_size(size: int, tile: int, floor: int) -> int:
    """The model input length along an axis of ``size`` pixels in windows of ``tile``: ``tile``,
    unless the axis is shorter (one window spans it); then its length rounded up to a multiple of
    16 (the models downsample 16x), not below ``floor`` (nor above ``tile``)."""
    if size >= tile:
        return tile
    return min(tile, max(-(-size // 16) * 16, floor))


def make_grid(height: int, width: int, tile: int = 512, overlap: int = 128, pad_floor: int | None = None) -> TileGrid:
    """Build the window grid of a raster (validates ``tile`` and ``overlap``).

    ``pad_floor`` None: every window reaches the model padded to ``tile × tile``. Else an axis of
    the raster shorter than ``tile`` is padded only to :func:`padded_size` (``pad_floor``: the
    model's own window): a 600 x 3,000 strip in 3,008-px windows ran 608 x 3,008 inputs, not
    3,008², 5 times the pixels (10 GB). Along such an axis there is one window, so the blending
    weights, the same for every window along it, cancel: only the padding changes."""
    shape = None if pad_floor is None else (padded_size(height, tile, pad_floor), padded_size(width, tile, pad_floor))
    return TileGrid(
        height, width, tile, overlap,
        tuple(axis_offsets(height, tile, overlap)),
        tuple(axis_offsets(width, tile, overlap)),
        None if shape == (tile, tile) else shape,
    )


def core_bounds(offsets: Sequence[int], tile: int, size: int) -> list[int]:
    """Bounds of the windows' *cores* along one axis: core ``k`` is ``[b[k], b[k + 1])``.

    Neighbouring windows meet in the middle of their overlap, so the cores partition the axis
    (every pixel lies in exactly one window's core).
    """
    return [0] + [(offsets[i] + offsets[i - 1] + tile) // 2 for i in range(1, len(offsets))] + [size]


def spread_tiles(grid: TileGrid | Sequence[Tile], count: int) -> list[Tile]:
    """All windows of ``grid`` (or of a list of its windows) if there are at most ``count``, else
    ``count`` spread evenly over them (row-major order; one: the middle window)."""
    tiles = list(grid.tiles()) if isinstance(grid, TileGrid) else list(grid)
    if len(tiles) <= count:
        return tiles
    if count == 1:  # the middle window rather than the corner one
        return [tiles[len(tiles) // 2]]
    keep = np.unique(np.linspace(0, len(tiles) - 1, count).round().astype(int))
    return [tiles[i] for i in keep]


def batched(items: Sequence[Tile], size: int, skip: Container[tuple[int, int]] | None = None) -> Iterator[list[Tile]]:
    """Split ``items`` into lists of at most ``size``, in order; windows whose ``index`` is in ``skip``
    (already run) ride along without counting, so the model still gets ``size`` windows per call."""
    if not skip:
        for k in range(0, len(items), size):
            yield list(items[k : k + size])
        return
    part: list[Tile] = []
    n = 0
    for t in items:
        part.append(t)
        if t.index not in skip:
            n += 1
            if n == size:
                yield part
                part, n = [], 0
    if part:
        yield part
