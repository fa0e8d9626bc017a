"""LoRA as a transform of the parameter tree: no model code changes.

A target kernel ``W`` gets a low-rank update ``W + (alpha / rank) * (A @ B)`` (Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", 2021). Only leaves named ``kernel``
with ``ndim >= 2`` can be adapted; the kernel is viewed as a matrix ``[in, out]`` with
``in`` = the product of all leading axes and ``out`` = the last axis:

    Dense   [in, out]              -> [in, out]
    Conv    [kh, kw, cin, cout]    -> [kh*kw*cin, cout]  (acts on each im2col patch)

``A: [in, rank]`` is uniform in +-1/sqrt(in) (the reference implementation's Kaiming
init), ``B: [rank, out]`` is zeros, so the adapted model starts equal to the base.

Config: ``lora = {"rank": r, "alpha": a, "targets": regex}``. ``targets`` is matched with
``re.fullmatch`` against the kernel paths of the model variables, which start with
"params/", e.g. ``".*(query|value)/kernel"``, ``"params/.*/kernel"`` (every kernel) or
``"params/head/kernel"``. Adapters are a tree keyed by the kernel's path plus "a"/"b":
``{"params": {"block_0": {"query": {"kernel": {"a": A, "b": B}}}}}``; in the partition tree
they sit under "lora", e.g. ``lora/params/block_0/query/kernel/a``.

Applying adapters (`apply`: merged; `low_rank_dense`: factored) lives in
`jaxdl.core.adapters`, because the train step needs it and core imports nothing above it;
this module makes adapters and re-exports those names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxdl.core import adapters as adapters_lib
from jaxdl.core import tree as tree_lib
from jaxdl.core.adapters import factorable, low_rank_dense
from jaxdl.core.adapters import merge as apply
from jaxdl.errors import UserError

__all__ = [
    "apply",
    "factorable",
    "init_adapters",
    "low_rank_dense",
    "merge",
    "num_adapter_params",
    "target_paths",
]

Tree = Mapping[str, Any]


def _is_adaptable(path: str, leaf: Any) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and len(leaf.shape) >= 2


def target_paths(params_tree: Tree, targets: str) -> list[str]:
    """Kernel paths of ``params_tree`` (``{"params": ...}``) that ``targets`` fullmatches.

    Raises ValueError (naming lora.targets and some available kernels) when none match.
    """
    try:
        pattern = re.compile(targets)
    except (re.error, TypeError) as err:
        raise UserError(f"lora.targets: {targets!r} is not a valid regex ({err})") from err
    kernels = [p for p, leaf in tree_lib.flatten(params_tree).items() if _is_adaptable(p, leaf)]
    matched = [p for p in kernels if pattern.fullmatch(p)]
    if not matched:
        examples = ", ".join(kernels[:5]) or "none (the model has no kernel with ndim >= 2)"
        raise UserError(
            f"lora.targets: regex {targets!r} (re.fullmatch) matched no kernel; available "
            f"kernel paths include {examples}; e.g. use 'params/.*/kernel' for all of them"
        )
    return matched


def init_adapters(
    rng: jax.Array,
    params_tree: Tree,
    *,
    rank: int,
    targets: str,
    layer_axes: Mapping[str, int] | None = None,
) -> dict:
    """Adapters ``{kernel_path: {"a": [in, rank], "b": [rank, out]}}`` as a nested tree.

    ``params_tree`` is the model variables' ``{"params": ...}``; adapters take the kernel's
    dtype. B is zero, so `apply` returns ``params_tree`` unchanged until B is trained.
    ``layer_axes`` ({kernel path: leading layer axes}, `jaxdl.core.adapters.layer_axes`)
    names the kernels nn.scan stacks over layers: each layer gets its own adapter,
    ``A: [L, in, rank]``, ``B: [L, rank, out]``, as the same model unscanned would have.
    """
    adapters_lib.check_hparams(rank)
    flat = tree_lib.flatten(params_tree)
    layer_axes = layer_axes or {}
    adapters = {}
    for i, path in enumerate(target_paths(params_tree, targets)):
        kernel = flat[path]
        a_shape, b_shape = adapters_lib.adapter_shapes(kernel.shape, rank, layer_axes.get(path, 0))
        bound = 1.0 / math.sqrt(a_shape[-2])
        adapters[f"{path}/a"] = jax.random.uniform(
            jax.random.fold_in(rng, i), a_shape, kernel.dtype, -bound, bound
        )
        adapters[f"{path}/b"] = jnp.zeros(b_shape, kernel.dtype)
    return tree_lib.unflatten(adapters)


def merge(params_tree: Tree, adapters: Tree, *, rank: int, alpha: float) -> dict:
    """Fold the adapters into plain params (for export or evaluation): same as `apply`."""
    return apply(params_tree, adapters, rank=rank, alpha=alpha)


def num_adapter_params(adapters: Tree) -> int:
    """Scalars in the adapters: sum of ``rank * (in + out)`` over the adapted kernels."""
    return tree_lib.num_params(adapters)
