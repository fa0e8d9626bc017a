"""Classification metrics (jittable jnp) and a host-side running mean.

``mask`` marks real examples with 1 and padding with 0 (a batch padded to a fixed size),
so an eval step compiled once counts only the real ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp


def _labels(labels: jax.Array, logits_ndim: int) -> jax.Array:
    # One-hot or probability rows [B, C] -> class ids [B].
    return jnp.argmax(labels, axis=-1) if labels.ndim == logits_ndim else labels


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    values = values.astype(jnp.float32)
    if mask is None:
        return values.mean()
    mask = mask.astype(jnp.float32)
    # An all-padding batch gives 0, not NaN; weight batches by mask.sum() when averaging.
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of argmax(logits) == labels. logits [B, C]; labels [B] ids or [B, C]; mask [B]."""
    hits = jnp.argmax(logits, axis=-1) == _labels(labels, logits.ndim)
    return _masked_mean(hits, mask)


def top_k_accuracy(
    logits: jax.Array, labels: jax.Array, k: int, mask: jax.Array | None = None
) -> jax.Array:
    """Fraction of examples whose label is among the k largest logits. Shapes as `accuracy`."""
    _, top = jax.lax.top_k(logits, k)  # [B, k]
    hits = (top == _labels(labels, logits.ndim)[:, None]).any(axis=-1)
    return _masked_mean(hits, mask)


def confusion_matrix(
    preds: jax.Array, labels: jax.Array, num_classes: int, mask: jax.Array | None = None
) -> jax.Array:
    """Counts [num_classes, num_classes] int32: row = true label, column = prediction.

    preds: class ids [B] (or logits [B, C], reduced by argmax); labels: class ids [B];
    mask [B]. The layout matches sklearn.metrics.confusion_matrix.
    """
    if preds.ndim == labels.ndim + 1:
        preds = jnp.argmax(preds, axis=-1)
    weight = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
    cm = jnp.zeros((num_classes, num_classes), jnp.int32)
    return cm.at[labels, preds].add(weight, mode="drop")


@dataclasses.dataclass(frozen=True)
class Mean:
    """Weighted running mean on the host; immutable, so `update` returns a new one.

    >>> Mean().update(0.5, count=2).update(1.0, count=2).compute()
    0.75
    """

    total: float = 0.0
    count: float = 0.0

    def update(self, value: float | jax.Array, count: float | jax.Array = 1.0) -> Mean:
        """Add `value`, itself a mean over `count` examples (a batch metric and its size)."""
        count = float(count)
        return Mean(self.total + float(value) * count, self.count + count)

    def merge(self, other: Mean) -> Mean:
        return Mean(self.total + other.total, self.count + other.count)

    def compute(self) -> float:
        """The mean so far; NaN before any update."""
        return self.total / self.count if self.count else math.nan


def update_means(
    means: Mapping[str, Mean], values: Mapping[str, float | jax.Array], count: float = 1.0
) -> dict[str, Mean]:
    """Fold one batch of named metrics (each a mean over `count` examples) into `means`."""
    out = dict(means)
    for name, value in values.items():
        out[name] = out.get(name, Mean()).update(value, count)
    return out


def compute_means(means: Mapping[str, Mean]) -> dict[str, float]:
    """{name: Mean} -> {name: mean}."""
    return {name: mean.compute() for name, mean in means.items()}
