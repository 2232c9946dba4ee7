"""Tiny generated class rasters for the vectorize tests (written with rasterio)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

PIXEL = 10.0
TRANSFORM = Affine(PIXEL, 0.0, 500000.0, 0.0, -PIXEL, 4000000.0)
CRS = "EPSG:32617"
NODATA = 255
CLASSES = [
    {"id": 1, "name": "developed", "color": [255, 0, 0]},
    {"id": 2, "name": "forest", "color": [0, 120, 0]},
    {"id": 3, "name": "water", "color": [0, 0, 255]},
]


def class_array(rows: int = 40, cols: int = 48, seed: int = 3) -> np.ndarray:
    """Blobs of classes 1-3 crossing many rows, holes, islands, a nodata corner and specks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    a = np.ones((rows, cols), dtype=np.uint8)
    a[((yy - 15) ** 2 + (xx - 18) ** 2) < 120] = 2
    a[((yy - 28) ** 2 / 2 + (xx - 35) ** 2) < 60] = 3
    a[(xx + yy) % 17 == 0] = 3  # diagonal lines: regions cross every seam, 8-connected steps
    a[18:21, 16:19] = 1  # island (hole in the forest)
    a[rng.random((rows, cols)) < 0.03] = 2  # specks
    a[:6, :9] = NODATA
    a[rows - 3 :, cols - 12 :] = NODATA
    return a


def write_mask(path: Path, array: np.ndarray, *, crs: str | None = CRS, nodata: float | None = NODATA,
               transform: Affine = TRANSFORM, tags: bool = True, colormap: bool = True) -> Path:
    """Write ``array`` as a single-band GeoTIFF like geoseg predict's masks."""
    profile = {
        "driver": "GTiff", "width": array.shape[1], "height": array.shape[0], "count": 1,
        "dtype": array.dtype.name, "transform": transform, "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array, 1)
        if tags:
            ds.update_tags(GEOSEG_CLASSES=json.dumps(CLASSES))
        if colormap and array.dtype == np.uint8:
            ds.write_colormap(1, {c["id"]: tuple(c["color"]) + (255,) for c in CLASSES})
    return path
