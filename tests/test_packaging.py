"""What ``pip install geoseg[cpu]`` brings is enough for every module geoseg imports."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, requires
from pathlib import Path

OWN = {"geoseg", "geoseg_cli", "cli"}


def _name(req: str) -> str:
    return re.split(r"[\s;<>=!\[~(]", req, maxsplit=1)[0].lower().replace("_", "-")


def install_closure(extras: set[str]) -> set[str]:
    """Distributions a ``pip install geoseg[extras]`` installs (from the installed metadata)."""
    seen: set[str] = set()
    todo = [("geoseg", extras)]
    while todo:
        dist, wanted = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            reqs = requires(dist) or []
        except PackageNotFoundError:
            continue
        for req in reqs:
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
            if extra and extra.group(1) not in wanted:
                continue
            wants = re.match(r"\s*[\w.-]+\s*\[([^\]]*)\]", req)  # e.g. dask[array]
            todo.append((_name(req), {e.strip() for e in wants.group(1).split(",")} if wants else set()))
    return seen


def module_providers() -> dict[str, set[str]]:
    """Top-level importable name → distributions whose installed files provide it (from each
    distribution's RECORD: Python 3.10's ``packages_distributions`` reads only ``top_level.txt``,
    which many wheels no longer carry)."""
    found: dict[str, set[str]] = {}
    for dist in distributions():
        name = _name(dist.metadata["Name"] or "")
        for f in dist.files or ():
            top = f.parts[0] if f.parts else ""
            if top.endswith(".py"):
                top = top[:-3]
            elif len(f.parts) < 2 or top.endswith((".dist-info", ".egg-info", ".data")) or top == "..":
                continue
            if top.isidentifier():
                found.setdefault(top, set()).add(name)
    return found


def imported_modules() -> dict[str, str]:
    """Top-level modules imported anywhere in the library and the CLI (lazy imports too) → a file."""
    import geoseg
    import geoseg_cli

    found: dict[str, str] = {}
    # the code that is imported (a wheel's, when the tests run against an installed geoseg), not the checkout's
    for folder in (Path(geoseg.__file__).parent, Path(geoseg_cli.__file__).parent):
        paths = sorted(folder.rglob("*.py"))
        assert len(paths) >= 5, f"{folder}: {len(paths)} modules"  # (an empty folder passed every check)
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    found.setdefault(n.split(".")[0], f"{folder.name}/{path.relative_to(folder)}")
    return found


def test_every_imported_module_comes_with_the_cpu_install() -> None:
    closure = install_closure({"cpu"})
    dists = module_providers()
    missing = []
    for module, where in imported_modules().items():
        if module in OWN or module in sys.stdlib_module_names or module == "__future__":
            continue
        if module == "paddle":  # the cpu/gpu extras: one of them is what a user installs
            assert "paddlepaddle" in closure
            continue
        providers = dists.get(module, set())
        if not providers & closure:
            missing.append(f"{module} (imported in {where}; provided by {sorted(providers) or 'nothing installed'})")
    assert not missing, "not brought by pip install geoseg[cpu]: " + "; ".join(missing)
