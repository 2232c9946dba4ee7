"""Reading YAML files (model cards, training configs, deploy.yaml) with one-line errors, and
turning results into plain JSON/YAML data."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
import reprlib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import yaml

from geoseg.errors import GeosegError


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one won without a word:
    ``image:`` twice in a config trained on the second)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: a merge may be overridden)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # (an unhashable key: SafeLoader says so itself)
                continue
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}): keep one")
        return super().construct_mapping(node, deep=deep)


def load_yaml_mapping(path: str | Path, what: str, error: type[GeosegError], *, empty_ok: bool = False) -> dict[str, Any]:
    """Read ``path`` as a YAML mapping, or raise ``error`` with one line naming ``what`` and the problem.

    ``empty_ok`` turns an empty file into ``{}`` instead of an error.
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:  # (was "unexpected error: IsADirectoryError")
        raise error(f"{what} {path} is a folder: give a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} cannot be read ({getattr(exc, 'strerror', None) or exc}): give a YAML file") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, Mapping):
        raise error(f"{what} {path} is not a YAML mapping")
    return dict(data)


def plain(value: Any) -> Any:
    """``value`` as plain JSON/YAML data: paths as strings, numpy scalars and arrays as Python numbers
    and (nested) lists, tuples as lists, mapping keys as strings (as JSON has them), NaN and
    infinities as None; a dataclass as the mapping of its fields (or its own ``to_dict()``).

    Raises:
        TypeError: a value of another type (no silent ``str()``).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict):
            return plain(to_dict())
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not plain data")


def options_of(value: Any, cls: type, what: str) -> Any:
    """``value`` as the options dataclass ``cls``: itself, ``cls()`` for None, or ``cls(**value)`` for a mapping
    (a library caller's ``options={"vector": "gpkg"}``).

    Raises:
        ParameterError: anything else, or a mapping with a key ``cls`` does not have (naming it and the
            keys it has); ``what`` names the argument.
    """
    from geoseg.errors import ParameterError

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ParameterError(f"{what}: {cls.__name__} has no {', '.join(map(repr, unknown))} (its fields: "
                                 f"{', '.join(names)})")
        hints = typing.get_type_hints(cls)
        given = {}
        for k, v in value.items():
            v = _as_type(v, hints.get(k, Any))
            if v is _MISFIT:  # ("no" taken as True, "*.tif" as the patterns "*", ".", ...)
                raise ParameterError(f"{what}: {k}={value[k]!r}: give {_type_name(hints[k])}")
            given[k] = v
        return cls(**given)
    raise ParameterError(f"{what} must be a {cls.__module__}.{cls.__name__} (or a mapping of its fields), got "
                         f"{type(value).__name__}")


_MISFIT = object()


def materialise_iterators(obj: Any) -> None:
    """Replace each field of the frozen dataclass ``obj`` given as an iterator (a generator) by a tuple of
    its items: the first check that looked at it used it up (``bands`` became empty: the card's bands)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Iterator):
            object.__setattr__(obj, f.name, tuple(value))


def check_fields(obj: Any, what: str) -> None:
    """Check (and take as :func:`options_of` takes a mapping's values) every field of the frozen dataclass
    ``obj`` against its annotation: an instance built in code was taken as given (``overwrite="no"``
    replaced a mask, ``overlap=32.0`` failed as an IndexError). Fields of a fixed set of choices (a
    ``Literal``, an enum) are left to the class's own check, which names the choices.

    Raises:
        ParameterError: a value of the wrong type, naming the field (``what``: the class or argument).
    """
    from geoseg.errors import ParameterError

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints.get(f.name, Any)
        v = _as_type(value, tp)
        if v is _MISFIT:
            if _has_choices(tp):
                continue
            raise ParameterError(f"{what}: {f.name}={reprlib.repr(value)}: give {_type_name(tp)}")
        if v is not value and type(v) is not type(value):
            object.__setattr__(obj, f.name, v)


def checked_arguments(fn: Any) -> Any:
    """Decorate a public entry point so that an argument of the wrong type is a one-line
    :class:`ParameterError` naming it (``min_pixels="3"`` was a bare TypeError deep in the call), as
    the options classes' fields are (:func:`check_fields`). Only checked, never converted; arguments
    annotated with choices (a ``Literal``, an enum) are left to the function's own check."""
    import functools
    import inspect

    sig = inspect.signature(fn)
    hints: dict[str, Any] | None = None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        if hints is None:
            try:
                hints = typing.get_type_hints(fn)
            except (NameError, TypeError):  # (an annotation only a type checker resolves: no checks)
                hints = {}
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # (Python's own message for a missing or unknown argument)
        for name, value in bound.arguments.items():
            tp = hints.get(name)
            if tp is None or sig.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            if isinstance(value, Iterator):  # (looked at once as a tuple, and passed on as that)
                value = bound.arguments[name] = tuple(value)
            if _as_type(value, tp) is _MISFIT and not _has_choices(tp):
                from geoseg.errors import ParameterError

                raise ParameterError(f"{fn.__name__}: {name}={reprlib.repr(value)}: give {_type_name(tp)}")
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def _has_choices(tp: Any) -> bool:
    """Whether the annotation ``tp`` takes a ``Literal`` or an enum (in a union too)."""
    if typing.get_origin(tp) is typing.Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return True
    return any(_has_choices(a) for a in typing.get_args(tp))


def _as_type(value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp`` takes it (a list for a tuple field: a tuple; a string for a Path or an
    enum), or :data:`_MISFIT` when it is not one (a string for a bool, an int or a tuple of strings)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            v = _as_type(value, a)
            if v is not _MISFIT:
                return v
        return _MISFIT
    if origin is typing.Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _MISFIT
    if tp is type(None):
        return value if value is None else _MISFIT
    if tp is bool:
        return value if isinstance(value, (bool, np.bool_)) else _MISFIT
    if tp is int:  # (numpy's as Python's: they go into JSON)
        return int(value) if is_whole_number(value) else _MISFIT
    if tp is float:  # (a Fraction or numpy's as a Python float: they go into JSON)
        return float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) else _MISFIT
    if tp is str:  # (a path given as a Path or another os.PathLike: its text)
        return value if isinstance(value, str) else os.fspath(value) if isinstance(value, os.PathLike) else _MISFIT
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return Path(value) if isinstance(value, (str, os.PathLike)) else _MISFIT
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            return _MISFIT
    if origin is tuple:  # (a list, a set, an array or a generator: as a tuple)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Iterable, np.ndarray)):
            return _MISFIT
        item = args[0] if args else Any
        if isinstance(value, (set, frozenset)):  # (no order of its own: a sorted one, the same in every process)
            value = sorted(value, key=lambda v: (type(v).__name__, v))
        out = tuple(_as_type(v, item) for v in value)
        return _MISFIT if any(v is _MISFIT for v in out) else out
    if origin in (dict, Mapping) or tp in (dict, Mapping):  # (or NAME=VALUE pairs: as a dict)
        if isinstance(value, Mapping):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            return dict(value)
        return _MISFIT
    if origin in (list, Sequence):  # (checked, as given: ["x"] for class ids was a bare ValueError)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Iterable, np.ndarray)):
            return _MISFIT
        if isinstance(value, Iterator):
            return value  # (its items are the function's to take: looking would use them up)
        item = args[0] if args else Any
        return value if all(_item_fits(v, item) for v in value) else _MISFIT
    return value  # (anything else: as given)


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _item_fits(value: Any, tp: Any) -> bool:
    """Whether a list item fits ``tp``: as :func:`_as_type`, or a whole number as a float (numpy's
    ``arange(4.)`` of class ids)."""
    if _as_type(value, tp) is not _MISFIT:
        return True
    whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    return whole and _as_type(int(value), tp) is not _MISFIT


def _type_name(tp: Any) -> str:
    """An annotation in words for a message (``int or None``, ``one of 'auto', 'cpu', 'gpu'``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp is type(None):
        return "None"
    if origin in (tuple, list, Sequence):
        return f"a list ({_type_name(args[0]) if args else 'values'} each)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in tp)
    words = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "a path"
    return f"a {getattr(tp, '__name__', str(tp))}"
