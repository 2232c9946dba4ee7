"""Save and load model weights (``.pdparams`` state dicts) with one-line errors.

:func:`save_weights` publishes the file atomically (a killed run never leaves a truncated
weights file under the real name).  :func:`load_weights` checks the file against the model
before touching it: a missing or corrupt file, missing or unexpected parameter names and
shape mismatches each raise :class:`~geoseg.errors.WeightsError` naming the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geoseg.atomic import atomic_output
from geoseg.errors import WeightsError, require_paddle

if TYPE_CHECKING:  # pragma: no cover
    import paddle

__all__ = ["WEIGHTS_SUFFIX", "load_weights", "read_state_dict", "save_weights"]

logger = logging.getLogger(__name__)

#: Conventional suffix of a Paddle state-dict file.
WEIGHTS_SUFFIX = ".pdparams"

_MAX_NAMES = 3  # parameter names quoted in an error message before "... and N more"


def save_weights(model: paddle.nn.Layer, path: str | Path, dtype: str | None = None) -> Path:
    """Write the model's state dict (parameters and batch-norm statistics) atomically.

    Args:
        model: The network whose ``state_dict()`` is saved.
        path: Destination file, conventionally ending in ``.pdparams``; its folder must
            exist.  An existing file is replaced.
        dtype: ``"float16"`` stores float32 values as float16 (half the file; :func:`load_weights`
            casts them back to the model's dtype); None keeps them as they are.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: The folder is missing or not writable.
    """
    paddle = require_paddle()
    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        state = model.state_dict()
        if dtype is not None:
            if dtype != "float16":
                raise ValueError(f"dtype must be None or 'float16', got {dtype!r}")
            # rounded by numpy (to nearest, ties to even): Paddle 2.6's cast rounds otherwise, and the same
            # weights would make other files under other Paddle versions. A tensor with a value past
            # float16's range (65504: a batch-norm variance of raw 16-bit inputs) stays float32: it would
            # become inf, and the model's outputs NaN.
            state = {k: paddle.to_tensor(_half(v.numpy())) if v.dtype == paddle.float32 else v for k, v in state.items()}
        paddle.save(state, str(tmp))  # type: ignore[attr-defined]
    logger.info("saved weights to %s", path)
    return path


def _half(a: np.ndarray) -> np.ndarray:
    """``a`` as float16, or as it is when a value lies past float16's largest finite one."""
    if a.size and np.abs(a).max() > np.finfo(np.float16).max:
        return a
    return a.astype(np.float16)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a ``.pdparams`` file into a ``{name: tensor}`` dict.

    Args:
        path: The weights file.

    Returns:
        The state dict as saved by :func:`save_weights` (or ``paddle.save``).

    Raises:
        WeightsError: The file is missing, unreadable, corrupt or not a state dict.
    """
    paddle = require_paddle()
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise WeightsError(f"weights file {path} {what}: check the path (or the card's 'weights' entry)")
    try:
        state = paddle.load(str(path))  # type: ignore[attr-defined]
    except Exception as exc:  # paddle raises ValueError, EOFError, pickle errors ...
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("numpy"):
            raise WeightsError(
                f"weights file {path} was saved with another numpy ({exc.name} is missing from numpy {np.__version__}): "
                "install numpy 2 (pip install 'numpy>=2'), as geoseg requires"
            ) from exc
        raise WeightsError(
            f"weights file {path} is corrupt or not a Paddle .pdparams file "
            f"({type(exc).__name__}): re-download or re-export it"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f"weights file {path} does not hold a state dict: save it with save_weights")
    return dict(state)


def load_weights(model: paddle.nn.Layer, path: str | Path) -> None:
    """Load a ``.pdparams`` file into ``model`` after checking names and shapes.

    Nothing is loaded unless every parameter and buffer of ``model`` has a value of the
    same shape in the file and the file holds no other entries.

    Args:
        model: The network to fill in place.
        path: The weights file.

    Raises:
        WeightsError: The file is missing or corrupt, names are missing or unexpected, or
            a shape differs (the message names the parameter and both shapes).
    """
    path = Path(path)
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise WeightsError(
            f"weights file {path} lacks {len(missing)} parameter(s) of the model "
            f"({_names(missing)}): was it saved from another architecture or variant?"
        )
    if unexpected:
        raise WeightsError(
            f"weights file {path} has {len(unexpected)} parameter(s) the model lacks "
            f"({_names(unexpected)}): was it saved from another architecture or variant?"
        )
    paddle = require_paddle()
    for name, target in expected.items():
        value = state[name]
        want, got = list(target.shape), list(value.shape)
        if want != got:
            raise WeightsError(
                f"weights file {path}: parameter {name!r} has shape {got} in the file but "
                f"{want} in the model: was it trained for another number of bands or classes?"
            )
        # float16-stored weights (save_weights(dtype=...)) go back to the model's dtype
        if "float" in str(value.dtype) and "float" in str(target.dtype) and str(value.dtype) != str(target.dtype):
            tensor = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
            state[name] = tensor.astype(target.dtype)
    model.set_state_dict(state)
    logger.debug("loaded weights from %s", path)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES])
    return shown if len(names) <= _MAX_NAMES else f"{shown} and {len(names) - _MAX_NAMES} more"
