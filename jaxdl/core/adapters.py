"""Applying low-rank adapters to a model's parameters: what the train step needs of LoRA.

An adapted kernel ``W`` (viewed as a matrix ``[in, out]``: ``in`` = the product of all
leading axes) has ``A: [in, rank]`` and ``B: [rank, out]``; the adapted function uses
``W + (alpha / rank) * (A @ B)``. Two equal ways to compute it:

    merged     `merge`: the kernel becomes ``W + s A B`` before the model runs
    factored   `low_rank_dense`: an nn.Dense returns ``x W + s (x A) B`` (kernel left as is)

Adapters are a tree keyed by the kernel's path plus "a"/"b", e.g.
``{"params": {"block_0": {"query": {"kernel": {"a": A, "b": B}}}}}``.
Making adapters (init, target regex) is `jaxdl.finetune.lora`, which builds on this module.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.models.matmul import contract

Tree = Mapping[str, Any]


def check_hparams(rank: Any, alpha: Any = 1.0) -> None:
    """Raise UserError unless rank is an int >= 1 and alpha a number > 0."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"lora.rank: expected an int >= 1, found {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"lora.alpha: expected a number > 0, found {alpha!r}")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(in, out) of a kernel viewed as a matrix: leading axes flattened, last axis kept."""
    return math.prod(shape[:-1]), shape[-1]


def pairs(adapters: Tree) -> dict[str, tuple[Any, Any]]:
    """{"kernel/path": (A, B)} from the adapter tree."""
    flat = tree_lib.flatten(adapters)
    found = {}
    for path in flat:
        kernel_path, part = path.rsplit("/", 1)
        assert part in ("a", "b"), f"adapter leaf {path} is neither .../a nor .../b"
        found[kernel_path] = (flat[f"{kernel_path}/a"], flat[f"{kernel_path}/b"])
    return found


def merge(
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
    check_hparams(rank, alpha)
    flat = tree_lib.flatten(params_tree)
    scale = alpha / rank
    for path, (a, b) in pairs(adapters).items():
        if path in skip:
            continue
        if path not in flat:
            raise UserError(
                f"lora: adapter for {path!r} has no kernel in the model params; the adapters "
                "were made for a different model: re-create them with lora.init_adapters"
            )
        kernel = flat[path]
        if a.shape[1] != rank or (a.shape[0], b.shape[1]) != matrix_shape(kernel.shape):
            raise UserError(
                f"lora: adapter {path!r} has A {a.shape}, B {b.shape}, which do not fit kernel "
                f"{kernel.shape} at lora.rank={rank}; use the rank the adapters were made with"
            )
        delta = (a @ b).reshape(kernel.shape)
        flat[path] = kernel + (scale * delta).astype(kernel.dtype)
    return tree_lib.unflatten(flat)


def dense_kernel_path(context: Any) -> str | None:
    """ "params/.../kernel" of the nn.Dense a Flax method interceptor sees, else None."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
        return None
    return "/".join(("params", *module.scope.path, "kernel"))


def dense_kernels(run: Callable[[], Any], paths: Collection[str]) -> frozenset[str]:
    """The kernel ``paths`` that `run()` (a model apply) uses as a plain nn.Dense's kernel.

    Found by tracing `run` abstractly (`jax.eval_shape`: no FLOPs, nothing compiled), each
    call afresh: eval_shape caches a trace by function, and a cached trace would call no
    interceptor.
    """
    wanted, found = frozenset(paths), set()

    def record(next_fun, args, kwargs, context):
        path = dense_kernel_path(context)
        if path in wanted:
            found.add(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: run())
    return frozenset(found)


def factorable_candidates(params_tree: Tree, adapters: Tree) -> frozenset[str]:
    """Adapted kernels that are 2-D in the params tree: those a plain nn.Dense may use as
    they are (a layer stacked by nn.scan sees a slice of a 3-D one and is merged)."""
    flat = tree_lib.flatten(params_tree)
    return frozenset(p for p in pairs(adapters) if p in flat and len(flat[p].shape) == 2)


def factorable(run: Callable[[], Any], params_tree: Tree, adapters: Tree) -> frozenset[str]:
    """Adapted kernels that `run()` (a model apply) uses as a plain 2-D nn.Dense kernel.
    Other adapted kernels (convolutions, DenseGeneral, layers stacked by nn.scan) are merged."""
    return dense_kernels(run, factorable_candidates(params_tree, adapters))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * (x @ a) @ b``: x [..., in], a [in, r], b [r, out] -> [..., out].

    Differentiable in x, a and b with a backward pass of its own: each product takes the
    output cotangent g [N, out] as it is (``g @ b.T``, ``(x a).T @ g``), where autodiff's
    ``db`` contracts g's leading axis and makes XLA transpose it first. On CPU XLA fuses that
    transpose with whatever produced g (a GELU's backward pass, say) and recomputes it in a
    strided loop, which cost more than the rank-r products themselves.
    """
    return scale * contract(contract(x, a, -1, 0), b, -1, 0)


def _low_rank_fwd(x, a, b, scale):
    xa = contract(x, a, -1, 0)
    return scale * contract(xa, b, -1, 0), (x, a, b, xa)


def _low_rank_bwd(scale, residuals, g):
    # Every product accumulates in float32 (`contract`): in bf16 compute a bf16 -> bf16
    # product is upcast whole on XLA:CPU, and these are a LoRA step's most numerous dots.
    x, a, b, xa = residuals
    x2, xa2 = x.reshape(-1, x.shape[-1]), xa.reshape(-1, xa.shape[-1])
    g2 = scale * g.reshape(-1, g.shape[-1])  # [N, out]
    gb = contract(g2, b, 1, 1)  # [N, r]: the cotangent of x a
    return contract(gb, a, 1, 1).reshape(x.shape), contract(x2, gb, 0, 0), contract(xa2, g2, 0, 0)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@contextlib.contextmanager
def low_rank_dense(adapters: Tree, paths: Collection[str], *, rank: int, alpha: float):
    """Within: each nn.Dense at `paths` (kernels left unmerged) returns
    ``dense(x) + (alpha/rank) * (x @ A) @ B``.

    Same function as the merged kernel, but the backward pass never forms the full
    ``[in, out]`` weight gradient ``x^T g`` that a merged kernel needs: A and B get theirs
    from the rank-r factors, and a frozen W gets none. That removes about a third of a
    dense layer's training FLOPs (XLA's counts: `python benchmarks/lora_cost.py`).
    """
    check_hparams(rank, alpha)
    adapted = {p: ab for p, ab in pairs(adapters).items() if p in paths}
    scale = alpha / rank

    def add_low_rank(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = dense_kernel_path(context)
        if path not in adapted:
            return y
        a, b = adapted[path]
        x = args[0] if args else kwargs["inputs"]
        return y + low_rank(x.astype(y.dtype), a.astype(y.dtype), b.astype(y.dtype), scale)

    with nn.intercept_methods(add_low_rank):
        yield
