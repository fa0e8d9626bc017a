"""Applying low-rank adapters to a model's parameters: what the train step needs of LoRA.

An adapted kernel ``W`` (viewed as a matrix ``[in, out]``: ``in`` = the product of all
leading axes) has ``A: [in, rank]`` and ``B: [rank, out]``; the adapted function uses
``W + (alpha / rank) * (A @ B)``. A kernel stacked over layers by nn.scan (``[L, in, out]``,
each layer's module reads one ``[in, out]`` slice: `layer_axes`) has one adapter per layer,
``A: [L, in, rank]``, ``B: [L, rank, out]``, as PEFT keeps them. Two equal ways to compute it:

    merged     `merge`: the kernel becomes ``W + s A B`` before the model runs
    factored   `low_rank_dense`: an nn.Dense returns ``x W + s (x A) B`` (kernel left as is),
               its A and B read beside its kernel (`place_factors`), so nn.scan hands each
               layer its own slice of them

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


def layer_axes(run: Callable[[Any], Any], variables: Tree) -> dict[str, int]:
    """{"params/.../kernel": leading axes its module does not see} for every kernel a model
    stacks over layers (nn.scan): a scanned layer's module reads a ``[in, out]`` slice of a
    ``[L, in, out]`` kernel, so 1 there. Kernels read whole are left out.

    ``run(variables)`` applies the model; it is traced abstractly (`jax.eval_shape`: no
    FLOPs), so ``variables`` may hold shapes only.
    """
    seen: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and module.has_variable("params", "kernel"):
            path = "/".join(("params", *module.scope.path, "kernel"))
            seen[path] = len(jax.numpy.shape(module.get_variable("params", "kernel")))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(run, variables)
    flat = tree_lib.flatten(variables)
    return {p: len(flat[p].shape) - n for p, n in seen.items() if len(flat[p].shape) > n}


def adapter_shapes(
    kernel_shape: tuple[int, ...], rank: int, stacked: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A's shape, B's shape) for a kernel whose first ``stacked`` axes are layers."""
    lead = tuple(kernel_shape[:stacked])
    fan_in, fan_out = matrix_shape(tuple(kernel_shape[stacked:]))
    return (*lead, fan_in, rank), (*lead, rank, fan_out)


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
        stacked = len(a.shape) - 2  # leading layer axes (nn.scan), one adapter per layer
        if (tuple(a.shape), tuple(b.shape)) != adapter_shapes(kernel.shape, rank, stacked):
            raise UserError(
                f"lora: adapter {path!r} has A {a.shape}, B {b.shape}, which do not fit kernel "
                f"{kernel.shape} at lora.rank={rank}; use the rank the adapters were made with"
            )
        delta = (a @ b).reshape(kernel.shape)  # batched over stacked layers
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
    """Adapted kernels a plain nn.Dense may use as they are: those whose adapter has one
    matrix per slice the module reads (2-D for a 2-D kernel, [L, in, r] for a kernel stacked
    by nn.scan). A convolution's adapter views its kernel as one matrix: merged."""
    flat = tree_lib.flatten(params_tree)
    return frozenset(
        p
        for p, (a, _) in pairs(adapters).items()
        if p in flat and len(a.shape) == len(flat[p].shape)
    )


def factorable(run: Callable[[], Any], params_tree: Tree, adapters: Tree) -> frozenset[str]:
    """Adapted kernels that `run()` (a model apply) uses as a plain nn.Dense kernel (in a
    layer stacked by nn.scan too). Other adapted kernels (convolutions, DenseGeneral) are
    merged."""
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


FACTORS = ("lora_a", "lora_b")  # a factored kernel's A and B, as its module's params


def place_factors(params_tree: Tree, adapters: Tree, paths: Collection[str]) -> dict:
    """``params_tree`` with the adapters of the kernels at ``paths`` placed beside them:
    ``.../q_proj/kernel`` gets ``.../q_proj/lora_a`` (A) and ``.../q_proj/lora_b`` (B), which
    `low_rank_dense` reads as the module's own parameters, so nn.scan slices a stacked
    layer's adapters as it slices its kernel."""
    flat = tree_lib.flatten(params_tree)
    for path, (a, b) in pairs(adapters).items():
        if path in paths:
            module = path.rsplit("/", 1)[0]
            flat[f"{module}/{FACTORS[0]}"], flat[f"{module}/{FACTORS[1]}"] = a, b
    return tree_lib.unflatten(flat)


@contextlib.contextmanager
def low_rank_dense(*, rank: int, alpha: float):
    """Within: each nn.Dense whose params hold factors (`place_factors`: its kernel left
    unmerged) returns ``dense(x) + (alpha/rank) * (x @ A) @ B``.

    Same function as the merged kernel, but the backward pass never forms the full
    ``[in, out]`` weight gradient ``x^T g`` that a merged kernel needs: A and B get theirs
    from the rank-r factors, and a frozen W gets none. That removes about a third of a
    dense layer's training FLOPs (XLA's counts: `python benchmarks/lora_cost.py`).
    """
    check_hparams(rank, alpha)
    scale = alpha / rank

    def add_low_rank(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if dense_kernel_path(context) is None or not module.has_variable("params", FACTORS[0]):
            return y
        a, b = (module.get_variable("params", name) for name in FACTORS)
        x = args[0] if args else kwargs["inputs"]
        return y + low_rank(x.astype(y.dtype), a.astype(y.dtype), b.astype(y.dtype), scale)

    with nn.intercept_methods(add_low_rank):
        yield
