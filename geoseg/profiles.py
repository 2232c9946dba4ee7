"""Output profiles: GDAL COG creation options as data.

Each profile is a :class:`Profile` subclass with class-level ``defaults``; :func:`get_profile`
returns a copy with user ``--co`` options applied on top.  Keys other than ``dtype`` and
``nodata`` are passed to GDAL's COG driver.
"""

from __future__ import annotations

import logging
import re
import threading
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
#: COG options that make GDAL warp the raster onto another grid (with TILING_SCHEME other than CUSTOM):
#: the mask must keep the input's CRS, transform and size (exit 0 with a mask on Web Mercator tiles is a
#: mask off the scene). The options of a warp (WARP_RESAMPLING, ADD_ALPHA, ...) change nothing without one.
_REGRIDDING = {"TARGET_SRS", "RES", "EXTENT"}
#: Lossy codecs: a class map's values must come back as written (WEBP failed to write and left an
#: all-nodata mask behind exit 0; LERC with MAX_Z_ERROR moved class ids).
_LOSSY = {"JPEG", "WEBP"}


#: Overview resamplings that keep class ids: others (AVERAGE, BILINEAR, CUBIC, ...) put ids between two
#: classes' on their edges (CUBIC: "agriculture" six times as common, and 0, in a mask's overviews).
_CATEGORICAL = {"MODE", "NEAREST"}


def _changes_values(profile: Mapping[str, Any], classes: bool = False) -> str | None:
    """Why ``profile``'s options would put other values or another grid in the file (``classes``: its values
    are class ids, in the full resolution and the overviews), or None."""
    opts = {k: str(v).upper() for k, v in profile.items() if k not in ("dtype", "nodata")}
    if classes and opts.get("OVERVIEW_RESAMPLING", "MODE") not in _CATEGORICAL:
        return (f"OVERVIEW_RESAMPLING={opts['OVERVIEW_RESAMPLING']} would put values that are no class in the mask's "
                "overviews (QGIS shows them zoomed out): use MODE (the default) or NEAREST")
    regrid = sorted(k for k in opts if k in _REGRIDDING)
    if regrid or opts.get("TILING_SCHEME", "CUSTOM") != "CUSTOM":
        key = regrid[0] if regrid else "TILING_SCHEME"
        return (f"{key} makes GDAL warp the raster onto another grid: geoseg's outputs keep the scene's CRS, "
                "transform and size (warp the mask afterwards, e.g. gdalwarp -t_srs EPSG:3857)")
    codec = opts.get("COMPRESS", "")
    # LERC moves a value by up to MAX_Z_ERROR: whole class ids come back as written below 0.5
    error, integer = _number(opts.get("MAX_Z_ERROR", "0")), not str(profile.get("dtype", "")).startswith("float")
    lossy = (codec in _LOSSY or (codec.startswith("LERC") and (error is None or error >= (0.5 if integer else 1e-300)))
             or (codec == "JXL" and opts.get("JXL_LOSSLESS", "YES") == "NO"))
    if lossy:
        return (f"COMPRESS={codec} is lossy here: the raster's values would not come back as written (class ids "
                "changed or lost); use a lossless codec: DEFLATE, LZW, ZSTD or LERC with MAX_Z_ERROR below 0.5")
    return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


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
        given = " ".join(f"{k}={v}" for k, v in creation_options.items())
        why = _changes_values(profile, classes=name == "mask")
        if why:
            raise ParameterError(f"--co {given}: {why}")
        # GDAL's codec errors in its worker threads (NUM_THREADS) never reach rasterio's handler: the
        # probe compresses in this thread; the mask's palette is there too (JPEG refuses one)
        gdal_options = tuple(sorted((k, str(v)) for k, v in profile.items() if k not in ("dtype", "nodata", "NUM_THREADS")))
        refusal = _cog_refusal(gdal_options, str(profile["dtype"]))
        if refusal:
            raise ParameterError(f"--co {given}: GDAL's COG driver refuses it ({refusal}); its options are listed at "
                                 "https://gdal.org/en/stable/drivers/raster/cog.html")
    return profile


#: Option sets GDAL took (a refusal is asked again: one made wrong by another thread's message stayed).
_ACCEPTED: set[tuple[tuple[tuple[str, str], ...], str]] = set()


def _cog_refusal(options: tuple[tuple[str, str], ...], dtype: str) -> str | None:
    """What GDAL says against writing a small COG with ``options`` (its first warning or error), or None."""
    if (options, dtype) in _ACCEPTED:
        return None
    said = _probe_cog(options, dtype)
    if said is None:
        _ACCEPTED.add((options, dtype))
    return said


#: One probe at a time: each sets the GDAL logger's level for its call and puts it back (two at once
#: left it changed for the process).
_PROBE_LOCK = threading.Lock()


def _probe_cog(options: tuple[tuple[str, str], ...], dtype: str) -> str | None:
    with _PROBE_LOCK:
        return _probe_cog_once(options, dtype)


def _probe_cog_once(options: tuple[tuple[str, str], ...], dtype: str) -> str | None:
    import numpy as np
    import rasterio
    import rasterio.shutil
    import rasterio.transform
    from rasterio.io import MemoryFile

    said: list[str] = []
    me = threading.get_ident()
    gdal_log = logging.getLogger("rasterio._env")  # where rasterio reports GDAL's warnings
    shown = gdal_log.getEffectiveLevel()

    class _Collect(logging.Filter):
        """This thread's GDAL messages are the probe's (collected, not shown); other threads' pass as
        they would have (a thread writing meanwhile had its warnings taken for the probe's refusal)."""

        def filter(self, record: logging.LogRecord) -> bool:
            if record.thread == me:
                if record.levelno >= logging.WARNING:
                    said.append(re.sub(r"^CPLE_\w+ in ", "", record.getMessage()).rstrip(". "))
                return False
            return record.levelno >= shown

    collect, level = _Collect(), gdal_log.level
    gdal_log.addFilter(collect)
    gdal_log.setLevel(min(shown, logging.WARNING))
    try:
        with MemoryFile() as mem, MemoryFile(ext=".tif") as target:
            grid = {"crs": "EPSG:3857", "transform": rasterio.transform.from_origin(0, 64, 1, 1)}
            with mem.open(driver="GTiff", width=64, height=64, count=1, dtype=dtype, **grid) as ds:
                ds.write(np.zeros((1, 64, 64), dtype))
                if dtype == "uint8":  # as the mask: a palette
                    ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 255, 255, 255)})
            try:
                rasterio.shutil.copy(mem.name, target.name, driver="COG", **dict(options))
            except Exception as exc:  # GDAL's errors (CPLE_*) are not all RasterioErrors
                said.append(str(exc).splitlines()[0] or type(exc).__name__)
    finally:
        gdal_log.removeFilter(collect)
        gdal_log.setLevel(level)
    return said[0] if said else None
