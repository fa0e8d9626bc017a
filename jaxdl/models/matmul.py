"""Matrix products of Dense layers and heads under a low-precision compute dtype.

A ``bfloat16`` x ``bfloat16`` product that returns ``bfloat16`` accumulates however the
backend likes; asked for ``float32`` (``preferred_element_type``) it accumulates in float32,
which is what mixed precision means, and on XLA:CPU it is also the only bf16 product that
reaches the library kernels (YNNPACK, with AMX / AVX512-BF16 where the CPU has them): a
bf16 -> bf16 product is upcast to float32 math. Autodiff's transpose of such a product
keeps the float32 cotangent, so the backward products would be float32 ones;
`low_precision_matmul` gives them bf16 operands and float32 accumulation too.

Float32 operands take `jax.lax.dot_general` unchanged (nn.Dense's own HLO), so float32
parity is untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# A low-precision product of at most this many rows (a decode step's batch) times an
# [out, in] matrix runs with the matrix as the left operand (`_weight_first_product`).
FEW_ROWS = 16


def _f32_accumulated(lhs, rhs, lhs_axis: int, rhs_axis: int, precision=None):
    if lhs.dtype in LOW_PRECISION:
        rows = lhs.size // lhs.shape[lhs_axis]
        if rhs.ndim == 2 and rhs_axis == 1 and rows <= FEW_ROWS:
            return _weight_first_product(lhs, rhs, lhs_axis, precision)
        if rows == 1:
            return _vector_product(lhs, rhs, lhs_axis, rhs_axis, precision)
    dims = (((lhs_axis,), (rhs_axis,)), ((), ()))
    return jax.lax.dot_general(
        lhs, rhs, dims, precision=precision, preferred_element_type=jnp.float32
    )


def _vector_product(vector, rhs, lhs_axis: int, rhs_axis: int, precision=None):
    """A low-precision vector (one row: a decode step's batch of one) times a matrix, as a
    two-row product. XLA:CPU's library kernels take no one-row bf16 product, so it would
    upcast it to float32 math, and inside `generate`'s loop hoist a float32 copy of every
    weight out of the loop (2x the bf16 weights' memory, and a conversion before the first
    token); two rows run in the library kernel at bf16's memory traffic."""
    rows = jnp.pad(vector.reshape(1, -1), ((0, 1), (0, 0)))
    out = jax.lax.dot_general(
        rows,
        rhs,
        (((1,), (rhs_axis,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )[0]
    free = [n for i, n in enumerate(vector.shape) if i != lhs_axis]
    return out.reshape(*free, *out.shape)


def _weight_first_product(lhs, matrix, lhs_axis: int, precision=None):
    """A few low-precision rows times an [out, in] matrix (contracting its axis 1), computed
    as ``matrix @ columns``: the rows transposed into a fresh [in, m] array, zero-padded to
    m > rows, a multiple of 8. Read this way the matrix streams through XLA:CPU's library
    kernel (YNNPACK: AVX512-BF16 / AMX pair products along `in`, which the [out, in] rows
    hold side by side) at bf16's memory traffic: ~2x the speed of ``rows @ matrix.T`` and of
    a [in, out] matrix's product. The padding matters: without it XLA folds the transposes
    back into ``rows @ matrix.T`` (`python benchmarks/cpu_gaps.py --probes matvec`)."""
    x = jnp.moveaxis(lhs, lhs_axis, -1)
    free, rows = x.shape[:-1], x.size // x.shape[-1]
    width = (rows // 8 + 1) * 8
    columns = jnp.pad(x.reshape(rows, -1).T, ((0, 0), (0, width - rows)))
    out = jax.lax.dot_general(
        matrix,
        columns,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return out[:, :rows].T.reshape(*free, matrix.shape[0])


def contract(
    lhs: jax.Array, rhs: jax.Array, lhs_axis: int, rhs_axis: int, out_dtype: Any = None
) -> jax.Array:
    """lhs and rhs contracted over one axis each, accumulated in float32, returned in
    out_dtype (default lhs's): ``contract(x, w, -1, 0)`` is ``x @ w``, ``contract(g, w, -1,
    1)`` is ``g @ w.T``, ``contract(x, g, 0, 0)`` is ``x.T @ g``. For float32 operands it is
    the plain product."""
    out = _f32_accumulated(lhs, rhs, lhs_axis % lhs.ndim, rhs_axis % rhs.ndim)
    return out.astype(out_dtype or lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def low_precision_matmul(
    x: jax.Array,
    w: jax.Array,
    w_transposed: bool = False,
    out_dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """``x @ w`` (``x @ w.T`` when w_transposed) for x [..., K] and w [K, N] ([N, K]) in one
    low-precision dtype: float32 accumulation, the result in out_dtype (default x's)."""
    y = _f32_accumulated(x, w, x.ndim - 1, 1 if w_transposed else 0, precision)
    return y.astype(out_dtype or x.dtype)


def _matmul_fwd(x, w, w_transposed, out_dtype, precision):
    return low_precision_matmul(x, w, w_transposed, out_dtype, precision), (x, w)


def _matmul_bwd(w_transposed, out_dtype, precision, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    # dx = g w^T contracts N; dw = x^T g (or g^T x) contracts every leading axis of x, and
    # XLA drops it when w is frozen.
    dx = _f32_accumulated(g, w, g.ndim - 1, 0 if w_transposed else 1, precision)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = (
        _f32_accumulated(g2, x2, 0, 0, precision)
        if w_transposed
        else _f32_accumulated(x2, g2, 0, 0, precision)
    )
    return dx.astype(x.dtype), dw.astype(w.dtype)


low_precision_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _is_low_precision(*arrays: jax.Array) -> bool:
    return len({a.dtype for a in arrays}) == 1 and arrays[0].dtype in LOW_PRECISION


def dense_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    out_dtype: Any = None,
) -> jax.Array:
    """A drop-in ``dot_general`` for ``nn.Dense``: `low_precision_matmul` when both operands
    share a low-precision dtype and the product is a Dense one, else `jax.lax.dot_general`.
    out_dtype: the low-precision product's result dtype (`head_dot_general` asks for
    float32, for logits that should not be rounded to bf16)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    dense = (
        tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not tuple(lhs_batch)
        and not tuple(rhs_batch)
        and rhs.ndim == 2
    )
    if dense and preferred_element_type is None and _is_low_precision(lhs, rhs):
        return low_precision_matmul(lhs, rhs, False, out_dtype, precision)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def tied_logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """float32 logits ``h @ embedding.T`` of a tied head, h and embedding in the compute
    dtype: a low-precision pair accumulates in float32 and is never rounded to bf16."""
    if _is_low_precision(h, embedding):
        return low_precision_matmul(h, embedding, True, jnp.float32)
    return jnp.dot(h, embedding.T).astype(jnp.float32)


# `dense_dot_general` for an untied head: a low-precision product returns float32 logits.
# One module-level object, so Flax modules holding it compare and hash equal.
head_dot_general = functools.partial(dense_dot_general, out_dtype=jnp.float32)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated and returned in float32: for attention's q.k and
    weights.v, whose bf16 -> bf16 form XLA:CPU would upcast whole. Its backward products are
    autodiff's (float32): a custom bf16 backward made XLA:CPU 0.10 emit batched bf16 x bf16 ->
    f32 dots that its fallback kernel cannot run ("Unsupported element type for
    DotThunk::Execute") on small shapes."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]``: rows of an embedding table [V, D] for integer ids [...] -> [..., D].

    XLA:CPU runs a bf16 gather as a float32 one on the converted table (so does a bf16
    dynamic slice). Alone the convert fuses into the gather, which reads only the rows, but
    inside `generate`'s decode loop XLA hoists it out of the loop as a float32 copy of the
    whole table (113 MB for SmolLM2's, 1 GB for Llama 3.2 1B's); a gather of the 16-bit
    patterns is hoisted the same way, as a 16-bit copy. An optimization barrier that ties
    the table to the ids keeps the convert in the loop, fused into the gather. The gradient
    is the plain gather's (a scatter-add into the table)."""
    if table.dtype in LOW_PRECISION:
        table, ids = jax.lax.optimization_barrier((table, ids))
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
    return embedding_lookup(table, ids), (table, ids)


def _lookup_bwd(residuals, g):
    table, ids = residuals
    _, pullback = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
    return pullback(g)[0], None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)
