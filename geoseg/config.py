"""Reading YAML files (model cards, training configs, deploy.yaml) with one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from geoseg.errors import GeosegError


def load_yaml_mapping(path: str | Path, what: str, error: type[GeosegError], *, empty_ok: bool = False) -> dict[str, Any]:
    """Read ``path`` as a YAML mapping, or raise ``error`` with one line naming ``what`` and the problem.

    ``empty_ok`` turns an empty file into ``{}`` instead of an error.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, Mapping):
        raise error(f"{what} {path} is not a YAML mapping")
    return dict(data)
