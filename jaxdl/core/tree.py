"""Parameter-tree paths: flatten nested dicts to "a/b/c" keys and back.

Every jaxdl component that reasons about parameters by name (partition rules, LoRA
targets, pretrained restore, checkpoints) uses these paths, so one convention holds:
the tree keys joined by "/", e.g. ``params/backbone/Conv_0/kernel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

Tree = Mapping[str, Any]


def path_str(key_path: Sequence[Any]) -> str:
    """A jax tree path -> "a/b/0/c" (dict keys, attribute names and indices)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def leaf_paths(tree: Any) -> dict[str, Any]:
    """Any pytree (dicts, dataclasses such as TrainState, NamedTuples) -> {"a/0/b": leaf}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(path): leaf for path, leaf in flat}


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}. Empty sub-dicts vanish."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dicts (inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def merge(*trees: Tree) -> dict[str, Any]:
    """Union of trees with disjoint leaves (e.g. trainable and frozen parts)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        part = flatten(tree)
        clash = flat.keys() & part.keys()
        assert not clash, f"trees overlap at {sorted(clash)[:5]}"
        flat.update(part)
    return unflatten(flat)


def is_kernel(path: str, leaf: Any) -> bool:
    """Weight matrices and conv kernels ("kernel" leaves, ndim >= 2): what quantization and
    pruning act on."""
    return path.rsplit("/", 1)[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2


def num_params(tree: Tree) -> int:
    """Total number of scalars in the tree's array leaves."""
    return int(sum(getattr(leaf, "size", 1) for leaf in flatten(tree).values()))
