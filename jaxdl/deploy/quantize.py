"""Post-training int8 weight quantization as a parameter-tree transform.

Each kernel (a leaf named "kernel" with ndim >= 2) becomes an `Int8Tensor`: int8 values
plus one float32 scale per output channel (the last axis), symmetric around zero:

    scale[c] = max |w[..., c]| / 127        (1.0 for an all-zero channel)
    q[..., c] = clip(round(w[..., c] / scale[c]), -127, 127)

so dequantizing (``q * scale``) is off by at most ``scale / 2`` per weight. Biases, norms
and embeddings stay float32. `dequantize` works on numpy and inside `jax.jit` alike, so an
exported model can keep the int8 constants and dequantize in the function (4x smaller).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import tree

Params = Mapping[str, Any]
SCHEME = "int8 symmetric, per output channel (last axis), kernels with ndim >= 2"


class Int8Tensor(flax.struct.PyTreeNode):
    """A quantized kernel: values int8 [..., C], scale float32 [C]."""

    values: Any
    scale: Any


def quantize_kernel(w: Any) -> Int8Tensor:
    """w: float [..., C] -> Int8Tensor with scale = max|w| over all axes but the last / 127."""
    w = np.asarray(w, np.float32)
    peak = np.abs(w).max(axis=tuple(range(w.ndim - 1)))
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    values = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8Tensor(values=values, scale=scale)


def dequantize_kernel(q: Int8Tensor, dtype=jnp.float32) -> jax.Array:
    """int8 values * per-channel scale -> float kernel (traceable: stays in the jitted graph)."""
    return jnp.asarray(q.values).astype(dtype) * jnp.asarray(q.scale).astype(dtype)


def _nbytes(leaf: Any) -> int:
    if isinstance(leaf, Int8Tensor):
        return int(np.asarray(leaf.values).nbytes + np.asarray(leaf.scale).nbytes)
    return int(np.asarray(leaf).nbytes)


def quantize_params(params: Params) -> tuple[dict, dict]:
    """Float params -> (tree with kernels as Int8Tensor, report).

    report: {"scheme", "quantized": [paths], "bytes_before", "bytes_after", "ratio",
    "max_abs_error" (largest |w - dequantized w| over all kernels)}.
    """
    flat = tree.flatten(params)
    out, quantized, worst = {}, [], 0.0
    for path, leaf in flat.items():
        if tree.is_kernel(path, leaf):
            q = quantize_kernel(leaf)
            error = np.abs(np.asarray(leaf, np.float32) - np.asarray(dequantize_kernel(q)))
            worst = max(worst, float(error.max(initial=0.0)))
            out[path] = q
            quantized.append(path)
        else:
            out[path] = leaf
    before = sum(_nbytes(v) for v in flat.values())
    after = sum(_nbytes(v) for v in out.values())
    report = {
        "scheme": SCHEME,
        "quantized": quantized,
        "bytes_before": before,
        "bytes_after": after,
        "ratio": before / max(after, 1),
        "max_abs_error": worst,
    }
    return tree.unflatten(out), report


def dequantize(qtree: Params, dtype=jnp.float32) -> dict:
    """Inverse of `quantize_params` (up to rounding): every Int8Tensor -> float kernel."""
    flat = tree.flatten(qtree)
    return tree.unflatten(
        {
            p: dequantize_kernel(v, dtype) if isinstance(v, Int8Tensor) else v
            for p, v in flat.items()
        }
    )
