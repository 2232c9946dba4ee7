"""Output profiles: GDAL COG creation options as data.

Each profile is a :class:`Profile` subclass with class-level ``defaults``; :func:`get_profile`
returns a copy with user ``--co`` options applied on top.  Keys other than ``dtype`` and
``nodata`` are passed to GDAL's COG driver.
"""

from __future__ import annotations

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


PROFILES: dict[str, type[Profile]] = {
    "mask": MaskProfile,
    "confidence_uint8": ConfidenceUint8Profile,
    "confidence_float32": ConfidenceFloatProfile,
}

_PROTECTED = {"DTYPE", "NODATA"}


def get_profile(name: str, creation_options: Mapping[str, str] | None = None) -> Profile:
    """A fresh copy of profile ``name`` with ``creation_options`` (GDAL COG options) on top."""
    try:
        profile = PROFILES[name]()
    except KeyError:
        raise ParameterError(f"unknown output profile {name!r}: choose one of {', '.join(PROFILES)}") from None
    for k, v in (creation_options or {}).items():
        key = k.upper()
        if key in _PROTECTED:
            raise ParameterError(f"--co {k}: the mask's {k.lower()} is fixed by geoseg")
        profile[key] = v
    return profile
