"""The import graph of jaxdl, read with `ast` (nothing is imported), against DESIGN.md's layout.

- No circles among jaxdl's modules. An edge A -> B is any `import B` or `from B import x`
  in A (A -> B.x when x is a submodule): at module level, inside a function (a lazy import
  still has to run before the code that needs it, so it is a dependency all the same) or
  under `if TYPE_CHECKING:` alike. Not an edge: the parent packages a dotted name implies
  (`import jaxdl.data.records` also runs `jaxdl/data/__init__.py`). A package's
  `__init__` is its facade: it names its children, never the other way round, so counting
  the implied parent imports would make every child and its facade a circle.
- Imports point down, by package (the first name below `jaxdl`): `core` imports nothing of
  jaxdl but `core`, `models` (types) and `errors`; `models`, `data`, `checkpoint` and
  `deploy` import nothing of `finetune`, `interop`, `training` or `runs`; `training`
  imports nothing of `runs`; nothing imports `jaxdl.cli`.
- No private names across packages: no module of jaxdl, benchmarks/ or experiments/ imports
  or reads a `_name` of a jaxdl module outside its own package (`from jaxdl.x import _n`,
  `module._n` on an imported module, `import jaxdl.x._m`).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# importer packages -> packages they must not import (DESIGN.md, "Layout")
CORE_MAY_IMPORT = {"core", "models", "errors"}
LOWER = ("models", "data", "checkpoint", "deploy")
UPPER = ("finetune", "interop", "training", "runs")
FORBIDDEN = {**{p: set(UPPER) for p in LOWER}, "training": {"runs"}}
TOP = "jaxdl.cli"


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "jaxdl.data.records"; a package is its __init__'s name
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package the module lives in (a package lives in itself)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def modules(root: Path, top: str) -> dict[str, Module]:
    """Every .py file under root/top as a Module, by dotted name."""
    out = {}
    for path in sorted((root / top).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = Module(name, path, is_package)
    return out


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")[: len(module.package.split(".")) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: Module, known: dict[str, Module]) -> Iterator[tuple[ast.AST, str, str]]:
    """(node, imported module, imported name or "") for every import of a `known` module,
    wherever it stands in the file."""
    for node in ast.walk(ast.parse(module.path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield node, alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in known:
                    yield node, child, ""
                elif source in known:
                    yield node, source, alias.name


def graph(mods: dict[str, Module]) -> dict[str, list[Edge]]:
    return {
        name: list(dict.fromkeys(Edge(name, t, node.lineno) for node, t, _ in imports(m, mods)))
        for name, m in mods.items()
    }


def circles(edges: dict[str, list[Edge]]) -> list[list[Edge]]:
    """The strongly connected components of more than one module (or a module importing
    itself), each as the edges inside it (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            edge = next(todo, None)
            if edge is not None:
                nxt = edge.target
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.add(member)
                    if member == node:
                        break
                inside = [e for m in sorted(members) for e in edges[m] if e.target in members]
                if len(members) > 1 or inside:
                    found.append(inside)
    return found


def _layer(name: str) -> str:
    """The package of jaxdl a module belongs to: "jaxdl.core.steps" -> "core"."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(edges: dict[str, list[Edge]]) -> list[str]:
    bad = []
    for source, out in edges.items():
        here = _layer(source)
        for edge in out:
            there = _layer(edge.target)
            if there == here:
                continue
            if edge.target == TOP or (here == "core" and there not in CORE_MAY_IMPORT):
                bad.append(str(edge))
            elif there in FORBIDDEN.get(here, ()):
                bad.append(str(edge))
    return bad


def private_names(importers: dict[str, Module], known: dict[str, Module]) -> list[str]:
    """Reads of a `_name` of a `known` module (or a `_module`) from another package."""
    found = []
    for module in importers.values():
        bound: dict[str, str] = {}  # local name -> the known module it names
        for node, target, name in imports(module, known):
            for alias in node.names:
                if isinstance(node, ast.Import) and alias.name == target:
                    head = alias.asname or target.split(".")[0]
                    bound[head] = target if alias.asname else head
                elif isinstance(node, ast.ImportFrom) and not name:
                    if target.rpartition(".")[2] == alias.name:
                        bound[alias.asname or alias.name] = target
            if known[target].package == module.package:
                continue
            if name and _private(name):
                found.append(f"{module.name}:{node.lineno}: from {target} import {name}")
            elif not name and any(_private(part) for part in target.split(".")):
                found.append(f"{module.name}:{node.lineno}: import {target}")
        for node in ast.walk(ast.parse(module.path.read_text())):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            dotted = _dotted(node.value, bound)
            if dotted in known and known[dotted].package != module.package:
                found.append(f"{module.name}:{node.lineno}: {dotted}.{node.attr}")
    return sorted(found)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node: ast.AST, bound: dict[str, str]) -> str | None:
    """`a.b.c` as the dotted module name it spells, when `a` is bound to a module."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, bound)
        return None if base is None else f"{base}.{node.attr}"
    return None


JAXDL = modules(REPO, "jaxdl")
EDGES = graph(JAXDL)
OUTSIDE = {**modules(REPO, "benchmarks"), **modules(REPO, "experiments")}


def test_no_import_circles_among_jaxdl_modules():
    assert [[str(e) for e in c] for c in circles(EDGES)] == []


def test_imports_point_down_the_layers():
    assert upward(EDGES) == []


@pytest.mark.parametrize("where", ["jaxdl", "benchmarks and experiments"])
def test_no_private_names_across_packages(where):
    importers = JAXDL if where == "jaxdl" else OUTSIDE
    assert private_names(importers, JAXDL) == []


def test_the_walker_finds_a_lazy_circle_an_upward_import_and_a_private_read(tmp_path):
    files = {
        "jaxdl/__init__.py": "",
        "jaxdl/errors.py": "",
        "jaxdl/core/__init__.py": "",
        "jaxdl/core/steps.py": "from jaxdl.training import loop\n",
        "jaxdl/models/__init__.py": "",
        "jaxdl/models/resnet.py": "_VARIANTS = {}\nDEPTHS = {}\n",
        "jaxdl/training/__init__.py": "",
        "jaxdl/training/loop.py": "import jaxdl.runs.sweep as sw\n",
        "jaxdl/runs/__init__.py": "",
        "jaxdl/runs/sweep.py": (
            "def run():\n    from jaxdl.training import loop\n"
            "    from jaxdl.models.resnet import _VARIANTS, DEPTHS\n"
        ),
        "benchmarks/__init__.py": "",
        "benchmarks/flops.py": (
            "import jaxdl.models.resnet\nfrom jaxdl.models import resnet as r\n"
            "a = jaxdl.models.resnet._VARIANTS\nb = r._VARIANTS\nc = r.DEPTHS\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mods = modules(tmp_path, "jaxdl")
    edges = graph(mods)
    assert [[str(e) for e in c] for c in circles(edges)] == [
        ["jaxdl.runs.sweep:2 -> jaxdl.training.loop", "jaxdl.training.loop:1 -> jaxdl.runs.sweep"]
    ]
    assert upward(edges) == [
        "jaxdl.core.steps:1 -> jaxdl.training.loop",
        "jaxdl.training.loop:1 -> jaxdl.runs.sweep",
    ]
    assert private_names(mods, mods) == [
        "jaxdl.runs.sweep:3: from jaxdl.models.resnet import _VARIANTS"
    ]
    assert private_names(modules(tmp_path, "benchmarks"), mods) == [
        "benchmarks.flops:3: jaxdl.models.resnet._VARIANTS",
        "benchmarks.flops:4: jaxdl.models.resnet._VARIANTS",
    ]
