"""Frozen kernels stored quantized (QLoRA): int8 and NF4, pure and jittable.

QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023) keeps the
frozen base in 4 bits and trains LoRA adapters over its dequantized weights. Here a
kernel ``W: [in, out]`` (or ``[L, in, out]`` stacked over layers by nn.scan, each layer
quantized on its own) becomes a small dict in ``TrainState.frozen``, so memory (and
Orbax) hold only the quantized bytes; `dequantize_tree` turns it back into ``[in, out]``
inside the jitted step:

    int8   {"qint8": int8 [in, out], "scale": f32 [out]}     per output channel:
           scale = max|W[:, o]| / 127, q = round(W / scale); |W - q scale| <= scale / 2
    nf4    {"nf4": uint8 [in/2, out], "absmax": f32 [in/64, out]}    blocks of 64 inputs:
           code = the NF4 value nearest W / absmax (16 of them, `NF4_CODE`), two codes a
           byte (row 2i in the high nibble, 2i+1 in the low one, as bitsandbytes packs);
           W ~ NF4_CODE[code] * absmax of its block

Which kernels are quantized (the frozen "kernel" leaves that are one matrix per layer) is
`quantize_kernels`; everything else (embeddings, norms, trainable leaves) stays float.

Inside a step a plain nn.Dense multiplies by its quantized kernel where it is used
(`quantized_dense`): the float kernel exists only for that product, and the backward pass
makes it again from the quantized bytes, so no float copy of the base is held between the
forward and the backward pass. (A `jax.checkpoint` policy cannot do this: values computed
only from non-differentiated inputs, as the frozen base is, are always saved.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import adapters
from jaxdl.errors import UserError

KINDS = ("int8", "nf4")
NF4_BLOCK = 64  # inputs per absmax block

# The 16 NormalFloat4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
# (QLoRA's appendix; bitsandbytes' `create_normal_map(0.9677083)` in float32).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # code i covers (mid[i-1], mid[i]]

_FIELDS = {"int8": frozenset({"qint8", "scale"}), "nf4": frozenset({"nf4", "absmax"})}

Tree = Mapping[str, Any]


def _safe(scale: jax.Array) -> jax.Array:
    """Divisor for a scale that may be 0 (an all-zero channel or block quantizes to 0)."""
    return jnp.where(scale > 0, scale, 1.0)


def quantize_int8(w: jax.Array) -> dict[str, jax.Array]:
    """w [..., in, out] -> {"qint8": int8 [..., in, out], "scale": f32 [..., out]} (absmax
    per column; leading axes are layers stacked by nn.scan, each quantized on its own)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
    q = jnp.clip(jnp.round(w / _safe(scale)[..., None, :]), -127, 127).astype(jnp.int8)
    return {"qint8": q, "scale": scale}


def dequantize_int8(q: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """{"qint8", "scale"} -> [..., in, out] in ``dtype``."""
    return (q["qint8"].astype(jnp.float32) * q["scale"][..., None, :]).astype(dtype)


def quantize_nf4(w: jax.Array) -> dict[str, jax.Array]:
    """w [..., in, out], in % 64 == 0 -> {"nf4": uint8 [..., in/2, out], "absmax": f32
    [..., in/64, out]} (leading axes: stacked layers, each quantized on its own)."""
    w = jnp.asarray(w, jnp.float32)
    *lead, n_in, n_out = w.shape
    assert n_in % NF4_BLOCK == 0, f"nf4 needs in % {NF4_BLOCK} == 0, found {w.shape}"
    blocks = w.reshape(*lead, n_in // NF4_BLOCK, NF4_BLOCK, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    normed = (blocks / _safe(absmax)[..., None, :]).reshape(w.shape)
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed).astype(jnp.uint8)
    return {"nf4": (codes[..., 0::2, :] << 4) | codes[..., 1::2, :], "absmax": absmax}


def nf4_codes(packed: jax.Array) -> jax.Array:
    """uint8 [..., in/2, out] -> the 4-bit codes, uint8 [..., in, out] (high nibble first)."""
    pairs = jnp.stack([packed >> 4, packed & 0x0F], axis=-2)  # [..., in/2, 2, out]
    return pairs.reshape(*packed.shape[:-2], -1, packed.shape[-1])


def dequantize_nf4(q: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """{"nf4", "absmax"} -> [..., in, out] in ``dtype``: NF4_CODE[code] * the block's absmax."""
    values = jnp.asarray(NF4_CODE)[nf4_codes(q["nf4"])]
    *lead, n_in, n_out = values.shape
    blocks = values.reshape(*lead, n_in // NF4_BLOCK, NF4_BLOCK, n_out)
    return (blocks * q["absmax"][..., None, :]).reshape(values.shape).astype(dtype)


def kind_of(node: Any) -> str | None:
    """ "int8" / "nf4" when ``node`` is a quantized kernel's dict, else None."""
    if not isinstance(node, Mapping):
        return None
    keys = frozenset(node)
    return next((kind for kind, fields in _FIELDS.items() if keys == fields), None)


def quantize(w: jax.Array, kind: str) -> dict[str, jax.Array]:
    return quantize_int8(w) if kind == "int8" else quantize_nf4(w)


_jitted_quantize = jax.jit(quantize, static_argnums=1)  # one compile per kernel shape


def dequantize(node: Mapping[str, jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    return dequantize_int8(node, dtype) if kind_of(node) == "int8" else dequantize_nf4(node, dtype)


def _is_quantizable(path: str, leaf: Any, layer_axes: Mapping[str, int]) -> bool:
    """A kernel that is one matrix per layer: 2-D, or [L, in, out] stacked by nn.scan."""
    ndim = len(getattr(leaf, "shape", ())) - layer_axes.get(path, 0)
    return path.rsplit("/", 1)[-1] == "kernel" and ndim == 2


def check_kind(kind: Any) -> None:
    if kind is not None and kind not in KINDS:
        raise UserError(
            f"lora.quantize: expected None, 'int8' or 'nf4', found {kind!r}. "
            "Fix: --config.lora.quantize=nf4 (4-bit QLoRA), int8, or None."
        )


def quantize_kernels(
    tree: Tree,
    kind: str,
    prefix: str = "",
    *,
    consume: bool = False,
    made: Callable[[Any], Any] | None = None,
    layer_axes: Mapping[str, int] | None = None,
) -> dict:
    """``tree`` (e.g. the frozen params) with every 2-D leaf named "kernel" quantized, and
    every kernel stacked over layers by nn.scan (``layer_axes``: {path: leading layer axes},
    `jaxdl.core.adapters.layer_axes`), one layer at a time.

    ``consume``: pop each entry from ``tree`` (a dict) as it is done, so a float kernel
    nothing else holds is freed before the next is quantized: the peak is one float base,
    not a float base and a growing quantized one beside a float copy held to the end.
    ``made``: turns a kernel leaf that is not yet an array (a checkpoint's lazily read
    leaf) into one, just before it is quantized: then the float base is never held whole.

    Raises UserError naming lora.quantize and the layer when a kernel cannot be quantized
    (nf4: its input axis is not a multiple of 64).
    """
    check_kind(kind)
    layer_axes = layer_axes or {}
    out: dict[str, Any] = {}
    for key in list(tree):
        value = tree.pop(key) if consume else tree[key]
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out[key] = quantize_kernels(
                value, kind, path, consume=consume, made=made, layer_axes=layer_axes
            )
        elif _is_quantizable(path, value, layer_axes):
            value = value if made is None else made(value)
            if kind == "nf4" and value.shape[-2] % NF4_BLOCK:
                raise UserError(
                    f"lora.quantize='nf4': kernel {path} has shape {tuple(value.shape)}, whose "
                    f"input axis is not a multiple of {NF4_BLOCK} (NF4 blocks); "
                    "Fix: use lora.quantize='int8', or a partition rule that trains this layer."
                )
            out[key] = _jitted_quantize(value, kind)
        else:
            out[key] = value
    return out


def has_quantized(tree: Tree) -> bool:
    return bool(quantized_kernels(tree))


def dequantize_tree(tree: Tree, dtype: Any = jnp.float32, *, keep: Collection[str] = ()) -> dict:
    """``tree`` with each quantized kernel back to a float [..., in, out] array; jittable.

    Kernels whose path ("params/.../kernel") is in ``keep`` stay quantized (the nn.Dense
    layers that use them multiply by them quantized, `quantized_dense`).
    """
    return _dequantized(tree, dtype, frozenset(keep), "")


def _dequantized(tree: Tree, dtype: Any, keep: frozenset[str], prefix: str) -> dict:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if kind_of(value) is not None:
            out[key] = dict(value) if path in keep else dequantize(value, dtype)
        elif isinstance(value, Mapping):
            out[key] = _dequantized(value, dtype, keep, path)
        else:
            out[key] = value
    return out


def quantized_kernels(tree: Tree, prefix: str = "") -> dict[str, Mapping[str, jax.Array]]:
    """{"params/.../kernel": its quantized dict} of every quantized kernel in ``tree``."""
    found: dict[str, Mapping[str, jax.Array]] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if kind_of(value) is not None:
            found[path] = value
        elif isinstance(value, Mapping):
            found.update(quantized_kernels(value, path))
    return found


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _after(node: Mapping[str, jax.Array], value: jax.Array) -> dict[str, jax.Array]:
    """``node``, made to wait for ``value`` (a layer's input, or its output's cotangent), so
    that XLA dequantizes it just before its product, and the forward's and the backward's
    dequantizations stay two (not one float kernel held between them, for every layer).

    Off CPU an optimization barrier does it (as it keeps `jax.checkpoint`'s recomputations
    apart; not measured here: no GPU was lent). XLA:CPU removes barriers before it schedules,
    so there each field gets 0 * one element of value added, which XLA does not fold for
    floats (NaN); the value is unchanged unless that element is not finite, when the step's
    loss or gradients are not finite either. (Under data parallelism that element is one
    scalar all-reduce per product, which is why it is the CPU path only.)
    """

    def barrier(node, value):
        return jax.lax.optimization_barrier((node, value))[0]

    def data_dependence(node, value):
        zero = value.reshape(-1)[0].astype(jnp.float32) * 0.0
        return {key: field + zero.astype(field.dtype) for key, field in node.items()}

    return jax.lax.platform_dependent(node, value, cpu=data_dependence, default=barrier)


def quantized_product(x: jax.Array, node: Mapping[str, jax.Array], product: Callable) -> jax.Array:
    """``product(x, node)`` (a product by the kernel it dequantizes), differentiable in x.

    The backward pass runs `product` again for x's cotangent: its residuals are x and the
    quantized bytes, never the float kernel, and each dequantization runs just before its
    product (`_after`). The kernel is frozen: it gets a zero cotangent.
    """

    @jax.custom_vjp
    def run(x, node):
        return product(x, _after(node, x))

    def forward(x, node):
        return product(x, _after(node, x)), (x, node)

    def backward(residuals, g):
        x, node = residuals
        _, x_vjp = jax.vjp(lambda x: product(x, _after(node, g)), x)
        return x_vjp(g)[0], jax.tree.map(_zero_cotangent, node)

    run.defvjp(forward, backward)
    return run(x, node)


def _dense_call(module: nn.Dense, x: jax.Array, node: Mapping[str, jax.Array]) -> jax.Array:
    """What ``module(x)`` (an nn.Dense, flax.linen.linear) computes, its kernel given
    quantized: the same dtype promotion, dot_general, precision and bias."""
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dtype = module.dtype or jnp.result_type(
        x, module.param_dtype, *([] if bias is None else [bias])
    )
    if module.dot_general_cls is not None:
        dot_general = module.dot_general_cls()
    else:
        dot_general = module.dot_general or jax.lax.dot_general

    def product(x, node):
        x, kernel = module.promote_dtype(x, dequantize(node, dtype), dtype=dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return dot_general(x, kernel, dims, precision=module.precision)

    y = quantized_product(x, node, product)
    if bias is not None:
        y += jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


@contextlib.contextmanager
def quantized_dense():
    """Within: each nn.Dense whose "kernel" parameter is a quantized dict (`dequantize_tree`'s
    ``keep``) computes its output from it (`quantized_product`); other modules run as they
    are. The kernel is read as the module's own parameter, so a layer stacked by nn.scan
    gets its own slice of the quantized bytes."""

    def multiply(next_fun, args, kwargs, context):
        module = context.module
        if adapters.dense_kernel_path(context) is None:
            return next_fun(*args, **kwargs)
        node = module.get_variable("params", "kernel")
        if kind_of(node) is None:
            return next_fun(*args, **kwargs)
        return _dense_call(module, args[0] if args else kwargs["inputs"], node)

    with nn.intercept_methods(multiply):
        yield


def quantized_bytes(tree: Tree) -> dict[str, int]:
    """{kernel path: bytes stored} of the quantized kernels in ``tree``."""
    return {
        path: int(sum(x.size * np.dtype(x.dtype).itemsize for x in node.values()))
        for path, node in quantized_kernels(tree).items()
    }
