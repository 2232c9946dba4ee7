"""Shared fixtures: tiny generated GeoTIFFs, a CliRunner, seeded tiny models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.crs import CRS
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "sample_data"

UTM33 = CRS.from_epsg(32633)
NC_LCC = CRS.from_epsg(32119)


def write_band_vrt(src: Path, vrt: Path) -> Path:
    """Split ``src`` into one GeoTIFF per band beside ``vrt`` (``B1.tif`` ...) and stack them in
    ``vrt`` as ``gdalbuildvrt -separate`` would (a per-band delivery such as Landsat's)."""
    from xml.sax.saxutils import escape

    with rasterio.open(src) as ds:
        t, crs, nodata = ds.transform, ds.crs.to_wkt(), ds.nodata
        xml = [f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}"><SRS>{escape(crs)}</SRS>',
               f"<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>"]
        for b in range(1, ds.count + 1):
            with rasterio.open(vrt.parent / f"B{b}.tif", "w", **{**ds.profile, "count": 1}) as one:
                one.write(ds.read(b), 1)
            nd = "" if nodata is None else f"<NoDataValue>{nodata:g}</NoDataValue>"
            gdal_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}[ds.dtypes[0]]
            xml.append(f'<VRTRasterBand dataType="{gdal_type}" '
                       f'band="{b}">{nd}<SimpleSource><SourceFilename relativeToVRT="1">B{b}.tif</SourceFilename>'
                       "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>")
    vrt.write_text("".join(xml) + "</VRTDataset>")
    return vrt


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: Any = UTM33,
    transform: Any = None,
    nodata: float | None = None,
    masks: np.ndarray | None = None,
    **profile: Any,
) -> Path:
    """Write a CHW array as a GeoTIFF (optionally with an internal mask)."""
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    transform = transform if transform is not None else from_origin(500000.0, 4800000.0, 10.0, 10.0)
    prof = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs=crs,
                transform=transform, nodata=nodata)
    prof.setdefault("photometric", "MINISBLACK")  # GDAL would flag a 4th uint8 band as alpha
    prof.update(profile)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **prof) as ds:
        ds.write(data)
        if masks is not None:
            ds.write_mask(masks.astype(np.uint8) * 255)
    return path


def class_image(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    """HW int array of blocky class regions 0..n-1 (regions larger than a few pixels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n, size=(max(1, h // 7 + 1), max(1, w // 9 + 1)))
    return np.kron(coarse, np.ones((7, 9), dtype=coarse.dtype))[:h, :w]


@pytest.fixture
def runner() -> CliRunner:
    """A Click test runner."""
    return CliRunner()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep exported-model caches out of the user's home folder."""
    monkeypatch.setenv("GEOSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "geoseg-cache"))


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_raster(name, data, **profile)`` writes into tmp_path."""

    def make(name: str, data: np.ndarray, **kw: Any) -> Path:
        return write_raster(tmp_path / name, data, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded random-init UNet (width 0.125, 3 bands, 4 classes) saved as weights + card."""
    paddle = pytest.importorskip("paddle")
    from geoseg.card import default_card
    from geoseg.models import build_model
    from geoseg.models.checkpoints import save_weights

    paddle.seed(7)
    card = default_card("unet", 3, 4, params={"width": 0.125}, tile_size=64, overlap=16)
    layer = build_model("unet", **card.model_kwargs())
    d = tmp_path_factory.mktemp("tiny_unet")
    weights = save_weights(layer, d / "tiny.pdparams")
    card.save(d / "tiny.yaml")
    return Path(weights), d / "tiny.yaml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests unless paddle has CUDA and sees a device."""
    try:
        import paddle

        has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu and not os.environ.get("GEOSEG_SKIP_GPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA build of paddle and a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _geoseg_logger_as_found() -> Iterator[None]:
    """Put the ``geoseg`` logger back as a test found it: the CLI's setup stops it propagating to the
    root logger, where ``caplog`` listens (pytest 7.0 then saw no record in a later test's caplog)."""
    import logging

    logger = logging.getLogger("geoseg")
    state = logger.propagate, logger.level, list(logger.handlers)
    yield
    logger.propagate, logger.level = state[0], state[1]
    logger.handlers[:] = state[2]
