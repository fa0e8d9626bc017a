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
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError

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


def _check_hparams(rank: Any, alpha: Any = 1.0) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"lora.rank: expected an int >= 1, found {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"lora.alpha: expected a number > 0, found {alpha!r}")


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


def init_adapters(rng: jax.Array, params_tree: Tree, *, rank: int, targets: str) -> dict:
    """Adapters ``{kernel_path: {"a": [in, rank], "b": [rank, out]}}`` as a nested tree.

    ``params_tree`` is the model variables' ``{"params": ...}``; adapters take the kernel's
    dtype. B is zero, so `apply` returns ``params_tree`` unchanged until B is trained.
    """
    _check_hparams(rank)
    flat = tree_lib.flatten(params_tree)
    adapters = {}
    for i, path in enumerate(target_paths(params_tree, targets)):
        kernel = flat[path]
        fan_in, fan_out = _matrix_shape(kernel.shape)
        bound = 1.0 / math.sqrt(fan_in)
        adapters[f"{path}/a"] = jax.random.uniform(
            jax.random.fold_in(rng, i), (fan_in, rank), kernel.dtype, -bound, bound
        )
        adapters[f"{path}/b"] = jnp.zeros((rank, fan_out), kernel.dtype)
    return tree_lib.unflatten(adapters)


def _pairs(adapters: Tree) -> dict[str, tuple[Any, Any]]:
    """{"kernel/path": (A, B)} from the adapter tree."""
    flat = tree_lib.flatten(adapters)
    pairs = {}
    for path in flat:
        kernel_path, part = path.rsplit("/", 1)
        assert part in ("a", "b"), f"adapter leaf {path} is neither .../a nor .../b"
        pairs[kernel_path] = (flat[f"{kernel_path}/a"], flat[f"{kernel_path}/b"])
    return pairs


def apply(
    params_tree: Tree,
    adapters: Tree,
    *,
    rank: int,
    alpha: float,
    skip: Collection[str] = (),
) -> dict:
    """``params_tree`` with each adapted kernel replaced by ``W + (alpha/rank) * reshape(A @ B)``.

    Pure and jittable; differentiable w.r.t. both trees. Returns a plain nested dict.
    Kernels in ``skip`` stay ``W``: `low_rank_dense` adds their adapters instead.
    """
    _check_hparams(rank, alpha)
    flat = tree_lib.flatten(params_tree)
    scale = alpha / rank
    for path, (a, b) in _pairs(adapters).items():
        if path in skip:
            continue
        if path not in flat:
            raise UserError(
                f"lora: adapter for {path!r} has no kernel in the model params; the adapters "
                "were made for a different model: re-create them with lora.init_adapters"
            )
        kernel = flat[path]
        if a.shape[1] != rank or (a.shape[0], b.shape[1]) != _matrix_shape(kernel.shape):
            raise UserError(
                f"lora: adapter {path!r} has A {a.shape}, B {b.shape}, which do not fit kernel "
                f"{kernel.shape} at lora.rank={rank}; use the rank the adapters were made with"
            )
        delta = (a @ b).reshape(kernel.shape)
        flat[path] = kernel + (scale * delta).astype(kernel.dtype)
    return tree_lib.unflatten(flat)


def _dense_kernel_path(context: Any) -> str | None:
    """ "params/.../kernel" of the nn.Dense a Flax method interceptor sees, else None."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
        return None
    return "/".join(("params", *module.scope.path, "kernel"))


def factorable(run: Callable[[], Any], params_tree: Tree, adapters: Tree) -> frozenset[str]:
    """Adapted kernels that `run()` (a model apply) uses as a plain 2-D nn.Dense kernel.

    Found by tracing `run` abstractly (`jax.eval_shape`: no FLOPs, nothing compiled). Other
    adapted kernels (convolutions, DenseGeneral, layers stacked by nn.scan) are merged.
    """
    flat = tree_lib.flatten(params_tree)
    pairs = _pairs(adapters)
    found: set[str] = set()

    def record(next_fun, args, kwargs, context):
        path = _dense_kernel_path(context)
        if path in pairs and len(flat[path].shape) == 2:
            found.add(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(run)
    return frozenset(found)


@contextlib.contextmanager
def low_rank_dense(adapters: Tree, paths: Collection[str], *, rank: int, alpha: float):
    """Within: each nn.Dense at `paths` (kernels left unmerged) returns
    ``dense(x) + (alpha/rank) * (x @ A) @ B``.

    Same function as the merged kernel, but the backward pass never forms the full
    ``[in, out]`` weight gradient ``x^T g`` that a merged kernel needs: A and B get theirs
    from the rank-r factors, and a frozen W gets none. That removes about a third of a
    dense layer's training FLOPs (XLA's counts: `python benchmarks/lora_cost.py`).
    """
    _check_hparams(rank, alpha)
    pairs = {p: ab for p, ab in _pairs(adapters).items() if p in paths}
    scale = alpha / rank

    def add_low_rank(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = _dense_kernel_path(context)
        if path not in pairs:
            return y
        a, b = pairs[path]
        x = args[0] if args else kwargs["inputs"]
        low = (x.astype(y.dtype) @ a.astype(y.dtype)) @ b.astype(y.dtype)
        return y + (scale * low).astype(y.dtype)

    with nn.intercept_methods(add_low_rank):
        yield


def merge(params_tree: Tree, adapters: Tree, *, rank: int, alpha: float) -> dict:
    """Fold the adapters into plain params (for export or evaluation): same as `apply`."""
    return apply(params_tree, adapters, rank=rank, alpha=alpha)


def num_adapter_params(adapters: Tree) -> int:
    """Scalars in the adapters: sum of ``rank * (in + out)`` over the adapted kernels."""
    return tree_lib.num_params(adapters)
