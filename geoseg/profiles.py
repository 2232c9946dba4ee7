"""Output profiles: GDAL COG creation options as data.

Each profile is a :class:`Profile` subclass with class-level ``defaults``; :func:`get_profile`
returns a copy with user ``--co`` options applied on top.  Keys other than ``dtype`` and
``nodata`` are passed to GDAL's COG driver.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from geoseg.errors import ParameterError


class Profile(dict[str, Any]):
    """Base class: a dict initialised from ``defaults``."""

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **overrides: Any) -> None:
        super().__init__(self.defaults)
        self.update(overrides)


class MaskProfile(Profile):
    """uint8 class mask: DEFLATE, 512 px tiles, mode-resampled internal overviews."""

    defaults: ClassVar[dict[str, Any]] = {
        "dtype": "uint8",
        "nodata": 255,
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "NO",
        "LEVEL": "6",
        "BLOCKSIZE": "512",
        "OVERVIEW_RESAMPLING": "MODE",
        "OVERVIEWS": "IGNORE_EXISTING",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }


class ConfidenceUint8Profile(Profile):
    """Max class probability in percent (0-100), 255 = nodata."""

    defaults: ClassVar[dict[str, Any]] = {**MaskProfile.defaults, "OVERVIEW_RESAMPLING": "AVERAGE"}


class ConfidenceFloatProfile(Profile):
    """Max class probability as float32 0-1, NaN = nodata."""

    defaults: ClassVar[dict[str, Any]] = {
        **MaskProfile.defaults,
        "dtype": "float32",
        "nodata": float("nan"),
        "PREDICTOR": "FLOATING_POINT",
        "OVERVIEW_RESAMPLING": "AVERAGE",
    }


class ProbabilitiesUint8Profile(ConfidenceUint8Profile):
    """Class probabilities in percent (0-100), one band per class, 255 = nodata."""


class ProbabilitiesFloatProfile(ConfidenceFloatProfile):
    """Class probabilities as float32 0-1, one band per class, NaN = nodata. DEFLATE level 1: their
    mantissas hardly compress (level 6 saved 2 % on the NC mosaic and took 70 % longer)."""

    defaults: ClassVar[dict[str, Any]] = {**ConfidenceFloatProfile.defaults, "LEVEL": "1"}


PROFILES: dict[str, type[Profile]] = {
    "mask": MaskProfile,
    "confidence_uint8": ConfidenceUint8Profile,
    "confidence_float32": ConfidenceFloatProfile,
    "probabilities_uint8": ProbabilitiesUint8Profile,
    "probabilities_float32": ProbabilitiesFloatProfile,
}

_PROTECTED = {"DTYPE", "NODATA"}


def get_profile(name: str, creation_options: Mapping[str, str] | None = None) -> Profile:
    """A fresh copy of profile ``name`` with ``creation_options`` (GDAL COG options) on top.

    Raises:
        ParameterError: an unknown profile, a protected key, or an option GDAL's COG driver does not
            accept (unknown name or value: GDAL would only warn and ignore it, or fail at the end).
    """
    try:
        profile = PROFILES[name]()
    except KeyError:
        raise ParameterError(f"unknown output profile {name!r}: choose one of {', '.join(PROFILES)}") from None
    for k, v in (creation_options or {}).items():
        key = k.upper()
        if key in _PROTECTED:
            raise ParameterError(f"--co {k}: the mask's {k.lower()} is fixed by geoseg")
        profile[key] = v
    if creation_options:
        gdal_options = tuple(sorted((k, str(v)) for k, v in profile.items() if k not in ("dtype", "nodata")))
        refusal = _cog_refusal(gdal_options, str(profile["dtype"]))
        if refusal:
            given = " ".join(f"{k}={v}" for k, v in creation_options.items())
            raise ParameterError(f"--co {given}: GDAL's COG driver refuses it ({refusal}); its options are listed at "
                                 "https://gdal.org/en/stable/drivers/raster/cog.html")
    return profile


@functools.lru_cache(maxsize=16)
def _cog_refusal(options: tuple[tuple[str, str], ...], dtype: str) -> str | None:
    """What GDAL says against writing a small COG with ``options`` (its first warning or error), or None."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    import rasterio.transform
    from rasterio.io import MemoryFile

    said: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(re.sub(r"^CPLE_\w+ in ", "", record.getMessage()).rstrip(". "))

    gdal_log = logging.getLogger("rasterio._env")  # where rasterio reports GDAL's warnings
    handler, level, propagate = _Collect(logging.WARNING), gdal_log.level, gdal_log.propagate
    gdal_log.addHandler(handler)
    gdal_log.setLevel(logging.WARNING)
    gdal_log.propagate = False
    try:
        with MemoryFile() as mem, MemoryFile(ext=".tif") as target:
            grid = {"crs": "EPSG:3857", "transform": rasterio.transform.from_origin(0, 64, 1, 1)}
            with mem.open(driver="GTiff", width=64, height=64, count=1, dtype=dtype, **grid) as ds:
                ds.write(np.zeros((1, 64, 64), dtype))
            try:
                rasterio.shutil.copy(mem.name, target.name, driver="COG", **dict(options))
            except Exception as exc:  # GDAL's errors (CPLE_*) are not all RasterioErrors
                said.append(str(exc).splitlines()[0] or type(exc).__name__)
    finally:
        gdal_log.removeHandler(handler)
        gdal_log.setLevel(level)
        gdal_log.propagate = propagate
    return said[0] if said else None
