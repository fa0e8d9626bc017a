"""No jaxdl module imports (or reads) a private name of another package of jaxdl."""

import ast
import importlib.util
from pathlib import Path

import jaxdl


def _package(module: str) -> str:
    """The package `module` lives in (a package lives in itself)."""
    spec = importlib.util.find_spec(module)
    return module if spec.submodule_search_locations is not None else module.rpartition(".")[0]


def _private_names_across_packages() -> list[str]:
    """`from jaxdl.X import _name`, or `module._name` on an imported jaxdl module, where the
    importing module and X live in different packages of jaxdl (jaxdl has no relative
    imports)."""
    root = Path(jaxdl.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        here = _package(module.removesuffix(".__init__"))
        tree = ast.parse(path.read_text())
        bound = {}  # local name -> the jaxdl module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname})
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxdl")):
                continue
            there = _package(node.module)
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if there == node.module and importlib.util.find_spec(full) is not None:
                    bound[alias.asname or alias.name] = full
                if alias.name.startswith("_") and there != here:
                    found.append(f"{module}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and bound[node.value.id].startswith("jaxdl")
                and _package(bound[node.value.id]) != here
            ):
                found.append(f"{module}: {bound[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another_package():
    assert _private_names_across_packages() == []
