"""Blending overlapping window predictions into one seamless result, strip by strip.

Each window's per-class probabilities (CHW float32) are multiplied by a weight map that is
largest at the window centre and never 0, added into an accumulator, and the weights are
added into a weight accumulator; a pixel's result is ``sum(w * p) / sum(w)``.  A weight of 0
on a window's outer pixels would leave the raster's edge pixels without a prediction, so the
weights have a floor.

Memory stays bounded: :class:`StripMerger` holds only one window-row of the raster
(``classes × tile × width`` floats), and releases finished rows as soon as the next row of
windows starts below them.  Nothing raster-sized with a class axis is ever allocated.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from geoseg.errors import ParameterError
from geoseg.tiling import Tile

WEIGHT_FLOOR = 1e-3


class BlendMode(str, enum.Enum):
    """How window predictions are weighted."""

    CONSTANT = "constant"
    GAUSSIAN = "gaussian"


@lru_cache(maxsize=16)
def weight_map(height: int, width: int, mode: BlendMode = BlendMode.GAUSSIAN, sigma_scale: float = 0.125) -> np.ndarray:
    """HW float32 weights for a window: 1 at the centre, >= ``WEIGHT_FLOOR**2`` everywhere.

    GAUSSIAN uses sigma = ``sigma_scale`` × side length per axis (as MONAI's sliding window
    inferer does) so predictions near a window's border, which see little context, count
    little where another window sees the same pixel nearer its centre.
    """
    if mode == BlendMode.CONSTANT:
        w = np.ones((height, width), np.float32)
    else:
        # The floor is applied per axis, before the outer product: a floor on the 2D map
        # would give two windows equal weight wherever both are near a shared edge in the
        # other axis, and the window that sees the pixel at its border would count as much
        # as the one that sees it in its middle.
        def axis(n: int) -> np.ndarray:
            x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            sigma = max(sigma_scale * n, 1e-6)
            return np.maximum(np.exp(-0.5 * (x / sigma) ** 2), WEIGHT_FLOOR)

        w = np.outer(axis(height), axis(width)).astype(np.float32)
    w.setflags(write=False)
    return w


@dataclass
class Strip:
    """A finished block of full-width rows: ``probs`` CHW (blended), ``valid`` HW bool."""

    row: int
    probs: np.ndarray
    valid: np.ndarray
    covered: np.ndarray

    @property
    def height(self) -> int:
        """Number of rows."""
        return int(self.probs.shape[1])


class StripMerger:
    """Accumulate weighted window probabilities and release finished full-width row strips.

    Windows must arrive in grid order of their top row (row bands top to bottom, any order
    within a band).  Call :meth:`release` with the top row of the next window row before
    feeding it; rows above it are final.  :meth:`finish` releases the rest.
    """

    def __init__(self, num_classes: int, height: int, width: int, tile: int, mode: BlendMode = BlendMode.GAUSSIAN) -> None:
        if num_classes < 1:
            raise ParameterError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.height, self.width, self.tile = height, width, tile
        self.mode = BlendMode(mode)
        cap = min(tile, height)
        self._acc = np.zeros((num_classes, cap, width), np.float32)
        self._wsum = np.zeros((cap, width), np.float32)
        self._valid = np.zeros((cap, width), bool)
        self._base = 0  # raster row of buffer row 0
        self._touched = False  # a window was added since the buffer was last all zeros

    def aggregate(self, probs: np.ndarray, tile: Tile, valid: np.ndarray | None = None) -> None:
        """Add one window's CHW probabilities (cropped to ``tile``'s size) with its weights."""
        c, h, w = probs.shape
        if c != self.num_classes or (h, w) != (tile.height, tile.width):
            raise ParameterError(
                f"window prediction has shape {probs.shape}, expected ({self.num_classes}, {tile.height}, {tile.width})"
            )
        r0 = tile.row - self._base
        if r0 < 0 or r0 + h > self._acc.shape[1]:
            raise ParameterError(f"window at row {tile.row} arrived out of order (buffer starts at row {self._base})")
        wm = weight_map(h, w, self.mode)
        cs = slice(tile.col, tile.col + w)
        acc = self._acc[:, r0 : r0 + h, cs]
        for k in range(c):  # plane by plane: no class-sized temporary
            acc[k] += probs[k] * wm
        self._wsum[r0 : r0 + h, cs] += wm
        self._touched = True
        if valid is not None:
            self._valid[r0 : r0 + h, cs] |= valid

    def release(self, until_row: int, chunk_rows: int = 128) -> Iterator[Strip]:
        """Yield the blended rows ``[base, until_row)`` in strips of at most ``chunk_rows``.

        Strips are produced one at a time so the temporary probabilities stay small
        (``classes × chunk_rows × width``); the rows are dropped from the buffer once the
        generator is exhausted, so consume it fully before the next call.
        """
        n = min(until_row, self.height) - self._base
        if n <= 0:
            return
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            if not self._touched:  # no window ran over these rows (nodata, outside an AOI): nothing to blend
                shape = (b - a, self.width)
                yield Strip(self._base + a, np.zeros((self.num_classes, *shape), np.float32), np.zeros(shape, bool),
                            np.zeros(shape, bool))
                continue
            wsum = self._wsum[a:b]
            covered = wsum > 0
            probs = np.divide(self._acc[:, a:b], wsum, out=np.zeros(self._acc[:, a:b].shape, np.float32), where=covered)
            yield Strip(self._base + a, probs, self._valid[a:b].copy(), covered)
        if not self._touched:  # the buffer is all zeros: nothing to move
            self._base += n
            return
        keep = self._acc.shape[1] - n
        if keep > 0:
            self._acc[:, :keep] = self._acc[:, n:]
            self._wsum[:keep] = self._wsum[n:]
            self._valid[:keep] = self._valid[n:]
        self._acc[:, keep:] = 0
        self._wsum[keep:] = 0
        self._valid[keep:] = False
        self._base += n
        self._touched = bool(self._wsum[:keep].any()) if keep > 0 else False

    def finish(self) -> Iterator[Strip]:
        """Yield all remaining rows (see :meth:`release`)."""
        return self.release(self.height)


def blend_array(
    predict_window: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tiles: list[Tile],
    num_classes: int,
    tile: int,
    mode: BlendMode = BlendMode.GAUSSIAN,
) -> np.ndarray:
    """Blend a whole in-memory CHW image window by window (small images, tests).

    ``predict_window`` maps a CHW window (cropped, no padding) to CHW probabilities.
    Returns CHW blended probabilities.
    """
    _, height, width = image.shape
    merger = StripMerger(num_classes, height, width, tile, mode)
    out = np.zeros((num_classes, height, width), np.float32)
    last_row = -1
    for t in tiles:
        if t.row != last_row:
            for s in merger.release(t.row):
                out[:, s.row : s.row + s.height] = s.probs
            last_row = t.row
        merger.aggregate(predict_window(image[:, t.row : t.row_stop, t.col : t.col_stop]), t)
    for s in merger.finish():
        out[:, s.row : s.row + s.height] = s.probs
    return out
