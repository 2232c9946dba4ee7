"""Model registry: build a segmentation network by name.

Importing this package does not import PaddlePaddle; :func:`build_model` imports the
architecture's module (and so Paddle) on first use.  Every registered model is a
``paddle.nn.Layer`` whose constructor takes ``num_classes``, ``in_channels`` and a
``pretrained`` weights path, and whose ``forward`` maps a float32 NCHW batch
``[N, in_channels, H, W]`` to a list of logits tensors ``[N, num_classes, H, W]`` at the
input size, main output first.

Example:
    >>> from geoseg.models import build_model
    >>> net = build_model("unet", in_channels=4, num_classes=6, width=0.25)
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from geoseg.errors import ModelError, require_paddle

if TYPE_CHECKING:  # pragma: no cover
    import paddle

__all__ = [
    "MODEL_NAMES", "build_model", "check_indices", "expand_input", "gap_channels_input", "model_class",
    "normalized_difference_input", "register_model", "validate_io",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("deeplabv3p", "unet")

#: Module that defines (and registers) each model; imported lazily.
_MODULES: dict[str, str] = {
    "deeplabv3p": "geoseg.models.deeplab",
    "unet": "geoseg.models.unet",
}

#: DeepLabv3+'s default ASPP atrous rates per output stride (the paper's); here, without
#: Paddle, so the engine can reason about a card's model before building it.
DEEPLAB_ASPP_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}

_REGISTRY: dict[str, type[Any]] = {}

_T = TypeVar("_T", bound=type)


def register_model(name: str) -> Callable[[_T], _T]:
    """Class decorator that registers a model class under ``name``.

    Args:
        name: Registry key, one of :data:`MODEL_NAMES`.

    Returns:
        The decorator; it returns the class unchanged.
    """

    def decorator(cls: _T) -> _T:
        _REGISTRY[name] = cls
        return cls

    return decorator


def validate_io(num_classes: int, in_channels: int) -> None:
    """Check the input band and output class counts shared by every model.

    Args:
        num_classes: Number of output channels; must be an integer >= 1.
        in_channels: Number of input bands; must be an integer >= 1.

    Raises:
        ModelError: Either count is not a positive integer.
    """
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ModelError(f"{label} must be a positive integer, got {value!r}")


def network_in_channels(in_channels: int, gap_channels: Any, indices: tuple[tuple[int, int], ...] = ()) -> int:
    """Channels a model's first layers take: ``in_channels``, doubled by ``gap_channels``, plus
    one per normalised-difference index (``indices`` as :func:`check_indices` returns them).

    Validates ``gap_channels`` (see :func:`gap_channels_input`).
    """
    if not isinstance(gap_channels, bool):
        raise ModelError(f"gap_channels must be true or false, got {gap_channels!r}")
    return (in_channels * 2 if gap_channels else in_channels) + len(indices)


def expand_input(x: paddle.Tensor, gap_channels: bool, indices: tuple[tuple[int, int], ...],
                 band_stats: Any) -> paddle.Tensor:
    """A model's input as its first layers take it: band-gap presence channels
    (:func:`gap_channels_input`), then normalised-difference indices
    (:func:`normalized_difference_input`), each when the model has them."""
    if gap_channels:
        x = gap_channels_input(x)
    if indices:
        x = normalized_difference_input(x, indices, band_stats)
    return x


def check_indices(indices: Any, in_channels: int, band_stats: Any) -> tuple[tuple[int, int], ...]:
    """Validate a model's ``indices`` parameter and return its pairs as 0-based band positions.

    ``indices`` lists pairs ``[a, b]`` of 1-based positions among the model's input bands; each
    adds the input channel ``(A - B) / (|A| + |B|)`` of the bands' values before normalisation
    (NDVI for near-infrared and red, NDBI for SWIR and near-infrared, ...). ``band_stats`` is the
    card's normalisation ``(mean, std)``, which the model needs to undo it; the model card passes
    it (:meth:`geoseg.card.ModelCard.model_kwargs`).
    """
    if indices is None or (isinstance(indices, (list, tuple)) and not indices):
        return ()
    bad = ModelError(f"indices must be a list of band position pairs, e.g. [[4, 3], [5, 4]] for NDVI and NDBI "
                     f"of the model's bands 1..{in_channels}, got {indices!r}")
    if not isinstance(indices, (list, tuple)):
        raise bad
    pairs = []
    for pair in indices:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair)):
            raise bad
        a, b = int(pair[0]), int(pair[1])
        if not (1 <= a <= in_channels and 1 <= b <= in_channels) or a == b:
            raise ModelError(f"indices pair {list(pair)} must name two different bands among the model's "
                             f"{in_channels} (positions 1..{in_channels})")
        pairs.append((a - 1, b - 1))
    if (not isinstance(band_stats, (list, tuple)) or len(band_stats) != 2
            or any(len(v) != in_channels for v in band_stats)):
        raise ModelError("a model with indices needs the normalisation's mean and std of its bands (band_stats): "
                         "build it from its model card")
    return tuple(pairs)


def normalized_difference_input(x: paddle.Tensor, pairs: Any, band_stats: Any) -> paddle.Tensor:
    """Append ``(A - B) / (|A| + |B|)`` for each 0-based band pair to ``[N, C', H, W]``.

    ``A`` and ``B`` are the first channels' values before normalisation (``x * std + mean``,
    ``band_stats = (mean, std)``); a value filled for a gap is the band's mean. The index is
    unchanged by any common scale of the bands (raw counts or reflectance alike) and lies in
    [-1, 1]. The constants are Python numbers, so the exported graph holds them.
    """
    import paddle

    mean, std = band_stats
    outs = [x]
    for a, b in pairs:
        va = x[:, a:a + 1] * float(std[a]) + float(mean[a])
        vb = x[:, b:b + 1] * float(std[b]) + float(mean[b])
        outs.append((va - vb) / (paddle.abs(va) + paddle.abs(vb) + 1e-6))
    return paddle.concat(outs, axis=1)


def gap_channels_input(x: paddle.Tensor) -> paddle.Tensor:
    """Turn ``[N, C, H, W]`` with NaN where a band has no data into ``[N, 2C, H, W]``.

    The first ``C`` channels are the values with gaps set to 0 (the band's mean after
    normalisation); the last ``C`` say whether the band has data there (1) or not (0). A model
    built with ``gap_channels=True`` calls this first, so it can tell a band gap (Landsat-7's
    wider SWIR2 frame, SLC-off stripes, a scene's nodata collar) from a measured value, and its
    input stays ``C`` bands everywhere else (export, Paddle Inference, the engine): the engine
    hands it NaN for values without data when the card's params set ``gap_channels``.
    """
    import paddle

    has_data = x == x  # False only for NaN
    present = has_data.astype(x.dtype)
    # ``present`` is exactly 0 where a value is missing: it fills the gaps without a constant
    # tensor (``zeros_like`` warns when exported to a static graph).
    return paddle.concat([paddle.where(has_data, x, present), present], axis=1)


def model_class(name: str) -> type[Any]:
    """Return the class registered as ``name``, importing its module (and Paddle).

    Args:
        name: A model name from :data:`MODEL_NAMES`.

    Returns:
        The ``paddle.nn.Layer`` subclass.

    Raises:
        ModelError: ``name`` is not a known model.
        DependencyError: PaddlePaddle is not installed.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    require_paddle()
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]


def build_model(name: str, *, in_channels: int, num_classes: int, **params: Any) -> paddle.nn.Layer:
    """Build the segmentation network registered as ``name``.

    Args:
        name: A model name from :data:`MODEL_NAMES`.
        in_channels: Number of input bands ``C`` of the NCHW input.
        num_classes: Number of output channels (classes) of the NCHW logits.
        **params: Architecture keyword arguments (e.g. ``width`` for ``unet``,
            ``backbone_depth``/``output_stride``/``backbone_width`` for ``deeplabv3p``,
            ``pretrained`` for both). ``members=N`` (N >= 2) builds N such networks whose
            class probabilities are averaged (:class:`geoseg.models.ensemble.Ensemble`; its
            output is the log of the mean probability).

    Returns:
        The model (in training mode), mapping ``[N, in_channels, H, W]`` float32 to a list
        of ``[N, num_classes, H, W]`` logits.

    Raises:
        ModelError: Unknown model name, unknown parameter or invalid parameter value.
        WeightsError: ``pretrained`` weights cannot be loaded.
        DependencyError: PaddlePaddle is not installed.
    """
    members = params.pop("members", 1)
    if isinstance(members, bool) or not isinstance(members, numbers.Integral) or members < 1:
        raise ModelError(f"members must be a positive integer (the number of networks averaged), got {members!r}")
    if members > 1:
        nets = [build_model(name, in_channels=in_channels, num_classes=num_classes, **params) for _ in range(members)]
        from geoseg.models.ensemble import Ensemble

        return Ensemble(nets)
    cls = model_class(name)
    sig = inspect.signature(cls)
    accepted = [p for p in sig.parameters if p not in ("num_classes", "in_channels")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ModelError(
            f"model {name!r} has no parameter {', '.join(map(repr, unknown))}: "
            f"accepted are {', '.join(accepted)}"
        )
    logger.debug("building %s(in_channels=%s, num_classes=%s, %s)", name, in_channels, num_classes, params)
    try:
        return cls(num_classes=num_classes, in_channels=in_channels, **params)
    except ModelError:
        raise
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid parameters for model {name!r}: {exc}") from exc
