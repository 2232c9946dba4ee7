"""Model cards: the YAML file that travels with every weights file and drives predict.

A card says which architecture to build (a name in :mod:`geoseg.models` plus its keyword
arguments), which bands the model expects and in which order, how to normalise them, and
which class id, name and colour each output channel stands for.  Output channel ``i`` of
the model is written to the mask as ``classes[i].id``; ``nodata_id`` marks pixels where the
input is nodata.

Normalisation is ``(x * scale[dtype] - mean[b]) / std[b]`` per band ``b``; ``scale`` is
looked up by the input's dtype name (``uint8``, ``uint16``, ``int16``, ``float32`` ...),
falling back to ``default``.  So a card trained on uint8 imagery still does the right thing
on a uint16 export of the same sensor if its ``scale`` table says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geoseg.errors import ModelError

CARD_VERSION = 1

#: Default colours for generic classes (a qualitative palette, RGB).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
)

#: Scale per input dtype used when a card does not say otherwise.
DEFAULT_SCALE: dict[str, float] = {
    "uint8": 1 / 255.0,
    "uint16": 1 / 10000.0,
    "int16": 1 / 10000.0,
    "default": 1.0,
}


@dataclass(frozen=True)
class ClassInfo:
    """One output class: the id written into the mask, its name and RGB colour."""

    id: int
    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not 0 <= int(self.id) <= 254:
            raise ModelError(f"class id {self.id} is out of range: use 0..254 (255 is nodata)")
        if len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise ModelError(f"class {self.name!r} has colour {self.color}: give three values 0..255")


@dataclass(frozen=True)
class Normalization:
    """Per-band normalisation: ``(x * scale[dtype] - mean) / std``.

    ``mean`` and ``std`` have one value per model input band (after band selection).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SCALE))

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ModelError(
                f"normalization has {len(self.mean)} means but {len(self.std)} stds: give one of each per band"
            )
        if any(float(s) <= 0 for s in self.std):
            raise ModelError("normalization std values must all be > 0")

    def scale_for(self, dtype: str | np.dtype[Any]) -> float:
        """Return the scale factor applied to raw values of ``dtype``."""
        name = np.dtype(dtype).name
        if name in self.scale:
            return float(self.scale[name])
        return float(self.scale.get("default", 1.0))

    def apply(self, x: np.ndarray, dtype: str | np.dtype[Any], missing: np.ndarray | None = None,
              fill: float = 0.0) -> np.ndarray:
        """Normalise raw pixels ``x`` (``...CHW`` layout, C = bands) to float32.

        ``dtype`` is the raster's dtype (``x`` may already have been cast). Values without data
        (``missing``, bool like ``x``; see :func:`geoseg.io.read_window_gaps`) and non-finite
        values (NaN nodata) become ``fill`` after normalisation: by default 0, the band's mean,
        not a measurement; NaN for a model that reads gaps itself (``gap_channels``).
        """
        n = x.shape[-3]
        if n != len(self.mean):
            raise ModelError(f"normalization is for {len(self.mean)} bands but the data has {n}")
        scale = np.float32(self.scale_for(dtype))
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        # a huge nodata fill (-3.4e38, a float64's -1.8e308 past float32): replaced below
        with np.errstate(over="ignore", invalid="ignore"):
            out = x.astype(np.float32)
            out *= scale / std
            out -= mean / std
        if x.dtype.kind == "f":
            np.nan_to_num(out, copy=False, nan=fill, posinf=fill, neginf=fill)
        if missing is not None:
            np.copyto(out, np.float32(fill), where=missing)
        return out


@dataclass(frozen=True)
class ModelCard:
    """Everything predict needs to know about a trained (or random-init) model."""

    name: str
    architecture: str
    bands: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    normalization: Normalization
    params: Mapping[str, Any] = field(default_factory=dict)
    nodata_id: int = 255
    tile_size: int = 512
    overlap: int = 128
    weights: str | None = None
    description: str = ""
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    version: int = CARD_VERSION
    #: Mean predicted probability per output channel over the training region (written by
    #: ``geoseg train``): the priors the model's posteriors reflect, for prior adaptation.
    class_prior: tuple[float, ...] | None = None
    #: Whether predict adapts the posteriors to each scene's class priors by default.
    adapt_prior: bool = False
    #: Ground size in metres of the training data's pixels (the square root of a pixel's ground
    #: area; written by ``geoseg train``): predict warns on scenes whose pixels differ much from it.
    pixel_size: float | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise ModelError("model card has no classes")
        if self.pixel_size is not None and not (np.isfinite(self.pixel_size) and self.pixel_size > 0):
            raise ModelError(f"model card's pixel_size {self.pixel_size} must be a positive size in metres")
        if self.class_prior is not None:
            if len(self.class_prior) != len(self.classes):
                raise ModelError(f"model card's class_prior has {len(self.class_prior)} values for "
                                 f"{len(self.classes)} classes: give one per class")
            if not all(np.isfinite(v) and v >= 0 for v in self.class_prior) or sum(self.class_prior) <= 0:
                raise ModelError(f"model card's class_prior {list(self.class_prior)} must be non-negative with a positive sum")
        if self.adapt_prior and self.class_prior is None:
            raise ModelError("model card sets adapt_prior but has no class_prior: retrain, or add the training "
                             "region's mean class probabilities as class_prior")
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ModelError(f"model card has duplicate class ids: {ids}")
        if self.nodata_id != 255:  # (a card saying 1 still got masks with 255)
            raise ModelError(f"nodata_id {self.nodata_id}: geoseg's masks mark nodata with 255; set nodata_id: 255 "
                             "(class ids 0-254)")
        if self.nodata_id in ids:
            raise ModelError(f"nodata id {self.nodata_id} is also a class id: pick another")
        if len(self.normalization.mean) != len(self.bands):
            raise ModelError(
                f"model card lists {len(self.bands)} bands but normalization has "
                f"{len(self.normalization.mean)} values"
            )

    @property
    def in_channels(self) -> int:
        """Number of model input bands."""
        return len(self.bands)

    @property
    def gap_fill(self) -> float:
        """Input value for band values without data (see :func:`gap_fill_for`)."""
        return gap_fill_for(self.params)

    def model_input(self, x: np.ndarray, dtype: str | np.dtype[Any], missing: np.ndarray | None = None) -> np.ndarray:
        """Raw pixels (``...CHW``) to the model's float32 input: normalised, gaps as :attr:`gap_fill`."""
        return self.normalization.apply(x, dtype, missing, fill=self.gap_fill)

    @property
    def num_classes(self) -> int:
        """Number of model output channels."""
        return len(self.classes)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`geoseg.models.build_model` (without ``pretrained``: the starting
        weights of its training, which a card's finished weights replace; a card that named them failed
        once they moved)."""
        params = {k: v for k, v in self.params.items() if k != "pretrained"}
        return model_kwargs(params, self.in_channels, self.num_classes, self.normalization)

    def class_lut(self) -> np.ndarray:
        """Lookup table from output channel index to class id (uint8)."""
        return np.asarray([c.id for c in self.classes], dtype=np.uint8)

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what goes into the YAML file)."""
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "params": dict(self.params),
            "weights": self.weights,
            "bands": list(self.bands),
            "normalization": {
                "scale": {k: float(v) for k, v in self.normalization.scale.items()},
                "mean": [float(v) for v in self.normalization.mean],
                "std": [float(v) for v in self.normalization.std],
            },
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "nodata_id": self.nodata_id,
            "tile_size": self.tile_size,
            "overlap": self.overlap,
            "training": _plain(self.training),
            "metrics": _plain(self.metrics),
            **({"class_prior": [round(float(v), 6) for v in self.class_prior]} if self.class_prior is not None else {}),
            **({"adapt_prior": True} if self.adapt_prior else {}),
            **({"pixel_size": round(float(self.pixel_size), 4)} if self.pixel_size is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Build a card from plain data, with one-line errors naming the bad field."""
        try:
            norm = d["normalization"]
            classes = tuple(
                ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"]))  # type: ignore[arg-type]
                for c in d["classes"]
            )
            return cls(
                name=str(d.get("name", d["architecture"])),
                architecture=str(d["architecture"]),
                bands=tuple(str(b) for b in d["bands"]),
                classes=classes,
                normalization=Normalization(
                    mean=tuple(float(v) for v in norm["mean"]),
                    std=tuple(float(v) for v in norm["std"]),
                    scale={str(k): float(v) for k, v in (norm.get("scale") or DEFAULT_SCALE).items()},
                ),
                params=dict(d.get("params") or {}),
                nodata_id=int(d.get("nodata_id", 255)),
                tile_size=int(d.get("tile_size", 512)),
                overlap=int(d.get("overlap", 128)),
                weights=d.get("weights"),
                description=str(d.get("description", "")),
                training=dict(d.get("training") or {}),
                metrics=dict(d.get("metrics") or {}),
                version=int(d.get("version", CARD_VERSION)),
                class_prior=(None if d.get("class_prior") is None
                             else tuple(float(v) for v in d["class_prior"])),
                adapt_prior=_flag(d.get("adapt_prior", False), "adapt_prior"),
                pixel_size=None if d.get("pixel_size") is None else float(d["pixel_size"]),
            )
        except KeyError as exc:
            raise ModelError(f"{source} lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"{source} is malformed: {exc}") from None

    def to_yaml(self) -> str:
        """YAML text of the card."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write the card to ``path`` atomically (temp file + rename)."""
        from geoseg.atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card from a YAML file."""
        from geoseg.config import load_yaml_mapping

        data = load_yaml_mapping(path, "model card", ModelError)
        return cls.from_dict(data, source=f"model card {path}")

    def replace(self, **changes: Any) -> ModelCard:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """Stable short hash of the card's content (for caches and manifests)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    #: Card fields that change no output: words for people, figures recorded after training (``evaluate
    #: --record-card``), and the training pixel size (a warning's).
    NOT_IN_OUTPUTS = ("description", "metrics", "training", "pixel_size")

    def output_digest(self) -> str:
        """Stable short hash of what in the card shapes predict's outputs (:data:`NOT_IN_OUTPUTS` left out):
        batch's manifest compares it, so that test figures recorded in a card, or a new description, do not
        redo an archive."""
        kept = {k: v for k, v in self.to_dict().items() if k not in self.NOT_IN_OUTPUTS}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def model_kwargs(params: Mapping[str, Any], in_channels: int, num_classes: int,
                 normalization: Normalization) -> dict[str, Any]:
    """Keyword arguments for :func:`geoseg.models.build_model` from a card's (or a training
    config's) ``params``: with ``indices``, the network also gets the normalisation's mean and
    std (``band_stats``) to compute its normalised differences from the bands' own values."""
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, **dict(params)}
    if params.get("indices"):
        kwargs["band_stats"] = (tuple(float(v) for v in normalization.mean),
                                tuple(float(v) for v in normalization.std))
    return kwargs


def gap_fill_for(params: Mapping[str, Any]) -> float:
    """Model input value for band values without data: NaN when the model reads gaps itself
    (``params.gap_channels``, see :func:`geoseg.models.gap_channels_input`), else 0 (the band mean)."""
    return float("nan") if params.get("gap_channels") is True else 0.0


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"model card field {name} is {value!r}: use true or false")
    return value


def _plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to YAML-safe plain data."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def generic_classes(n: int, ids: Sequence[int] | None = None) -> tuple[ClassInfo, ...]:
    """``n`` classes named ``class_<id>`` with palette colours."""
    ids = list(ids) if ids is not None else list(range(n))
    return tuple(ClassInfo(i, f"class_{i}", PALETTE[k % len(PALETTE)]) for k, i in enumerate(ids))


def default_card(
    architecture: str,
    in_channels: int,
    num_classes: int,
    *,
    params: Mapping[str, Any] | None = None,
    bands: Sequence[str] | None = None,
    tile_size: int = 512,
    overlap: int = 128,
) -> ModelCard:
    """A card for an untrained model: generic classes, identity-ish normalisation.

    Used by tests and by ``geoseg train`` before statistics are known.
    """
    return ModelCard(
        name=f"{architecture}-untrained",
        architecture=architecture,
        bands=tuple(bands) if bands is not None else tuple(f"b{i + 1}" for i in range(in_channels)),
        classes=generic_classes(num_classes),
        normalization=Normalization(mean=(0.5,) * in_channels, std=(0.25,) * in_channels),
        params=dict(params or {}),
        tile_size=tile_size,
        overlap=overlap,
        description="untrained (random initialisation)",
    )
