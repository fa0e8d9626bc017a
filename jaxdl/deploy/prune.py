"""Magnitude pruning as a parameter-tree transform, and an optax mask to keep it.

`prune` zeroes the smallest-magnitude kernel weights (leaves named "kernel", ndim >= 2;
biases and norms are never pruned). The count is exact: ``round(sparsity * n)`` weights,
ties broken by position, over all kernels together (``scope="global"``: layers lose
different fractions) or in every kernel separately (``scope="layer"``).

Recovery fine-tuning keeps pruned weights at zero by masking the optimizer's updates::

    tx = optax.chain(tx, keep_masked({"params": masks}))

Masking the *updates* (after weight decay and the learning rate) holds a zero weight at
exactly zero whatever the optimizer: its gradient may be non-zero, its update is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.core import tree
from jaxdl.errors import UserError

Params = Mapping[str, Any]
SCOPES = ("global", "layer")


def _zero_smallest(magnitudes: np.ndarray, count: int) -> np.ndarray:
    """Bool keep-mask, flat: False for the `count` smallest entries (stable on ties)."""
    keep = np.ones(magnitudes.size, bool)
    keep[np.argsort(magnitudes, kind="stable")[:count]] = False
    return keep


def prune(params: Params, sparsity: float, scope: str = "global") -> tuple[dict, dict]:
    """Zero the smallest |w| of the kernels -> (pruned params, masks).

    masks has the structure of params: bool arrays, True = kept (all True off kernels).
    """
    if not 0.0 <= sparsity < 1.0:
        raise UserError(
            f"sparsity: expected a fraction in [0, 1), found {sparsity}. "
            "Fix: pass e.g. 0.5 to zero half the kernel weights."
        )
    if scope not in SCOPES:
        raise UserError(f"scope: expected one of {list(SCOPES)}, found {scope!r}.")
    flat = {p: np.asarray(v) for p, v in tree.flatten(params).items()}
    kernels = [p for p in sorted(flat) if tree.is_kernel(p, flat[p])]
    masks = {p: np.ones(v.shape, bool) for p, v in flat.items()}
    if scope == "global":
        sizes = [flat[p].size for p in kernels]
        magnitudes = np.concatenate([np.abs(flat[p]).ravel() for p in kernels] or [np.zeros(0)])
        keep = _zero_smallest(magnitudes, round(sparsity * magnitudes.size))
        for path, part in zip(kernels, np.split(keep, np.cumsum(sizes)[:-1]), strict=True):
            masks[path] = part.reshape(flat[path].shape)
    else:
        for path in kernels:
            w = flat[path]
            masks[path] = _zero_smallest(np.abs(w).ravel(), round(sparsity * w.size)).reshape(
                w.shape
            )
    pruned = {p: np.where(masks[p], v, np.zeros((), v.dtype)) for p, v in flat.items()}
    return tree.unflatten(pruned), tree.unflatten(masks)


def sparsity(params: Params) -> dict[str, Any]:
    """Fraction of exactly-zero kernel weights: {"global": f, "layers": {path: f}}."""
    flat = tree.flatten(params)
    layers, zeros, total = {}, 0, 0
    for path, leaf in flat.items():
        if tree.is_kernel(path, leaf):
            w = np.asarray(leaf)
            n_zero = int(np.count_nonzero(w == 0))
            layers[path] = n_zero / w.size
            zeros, total = zeros + n_zero, total + w.size
    return {"global": zeros / max(total, 1), "layers": layers}


def keep_masked(masks: Params) -> optax.GradientTransformation:
    """Multiply updates by `masks` (same structure as the params): pruned weights stay put."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, masks)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
