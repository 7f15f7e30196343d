"""The dependency rules docs/architecture.md states, checked on the imports of every module (function-level
imports included): a change that breaks one fails here, not in a review."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "captioning"
ENTRY_POINTS = {"train", "eval", "caption", "serve", "export"}  # src/<name>.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in it, absolute (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import x` imports a module x
    return found


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def offenders(prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for name, found in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            hits = sorted(m for m in found if any(m == f or m.startswith(f + ".") for f in forbidden))
            if hits:
                bad[name] = hits
    return bad


def test_the_modules_are_found():
    assert {"captioning.models.rnn", "captioning.data.coco", "captioning.metrics.cider", "captioning.module"} <= set(
        MODULES)
    assert "captioning.models.loss" in MODULES["captioning.models.captioner"]  # relative imports resolved


@pytest.mark.parametrize(("prefix", "forbidden"), [
    # the math imports torch (and the standard library), never the framework around it
    ("captioning.models", ("lightning", "hydra", "omegaconf", "wandb", "captioning.data", "captioning.module",
                           "captioning.metrics", "captioning.objectives", "captioning.callbacks")),
    ("captioning.data", ("captioning.models", "captioning.module", "captioning.callbacks", "wandb")),
    # the metrics score strings
    ("captioning.metrics", ("captioning.models", "captioning.data", "captioning.module", "lightning", "hydra")),
    ("captioning.grounding", ("captioning.models", "captioning.module", "torch")),
    ("captioning.chair", ("captioning.models", "captioning.module", "torch")),
])
def test_dependencies_point_one_way(prefix, forbidden):
    assert offenders(prefix, forbidden) == {}


def test_no_package_code_imports_an_entry_point():
    bad = {name: sorted(found & ENTRY_POINTS) for name, found in MODULES.items() if found & ENTRY_POINTS}
    assert bad == {}


def test_the_exported_runtime_and_io_stand_alone():
    # runtime.py is copied into export folders as run.py; io.py is imported by every layer
    assert not any(m.startswith("captioning") for m in MODULES["captioning.runtime"])
    outside = {m.split(".")[0] for m in MODULES["captioning.io"]} - set(sys.stdlib_module_names) - {"__future__"}
    assert outside == set()


def test_the_package_has_no_import_cycles():
    """Module-level imports between the package's modules form no cycle (function-level ones may point back)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        top = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        path_imports = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in top.body:
            if isinstance(node, ast.ImportFrom):
                base = (package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else [])
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                candidates = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                candidates = [a.name for a in node.names]
            path_imports |= {c for c in candidates if c in MODULES and c != name}
        graph[name] = path_imports
    # a package's __init__ re-exporting its own modules is not a cycle through them
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and m in graph)}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, trail + [nxt]):
                return True
        state[node] = 2
        return False

    for node in graph:
        if state.get(node) is None and visit(node, [node]):
            break
    assert cycle == [], " -> ".join(cycle)
