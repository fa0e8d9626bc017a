"""Losses as pure jnp functions over arrays (article chapter 4), built on optax.

Per-example losses come back unreduced, so the caller decides how to mask and average:
``mse`` and ``softmax_cross_entropy`` return [B]; ``sigmoid_binary_cross_entropy``
returns one loss per element. Penalties reduce a parameter tree to a scalar.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdl.errors import UserError

Params = Any  # a pytree of arrays


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error per example: pred, target [B, ...] -> [B].

    Averages over every axis but the first; for [B] inputs it is the squared error itself,
    so ``mse(pred, target).mean()`` is the article's MSE (4.1.1).
    """
    if pred.shape != target.shape:
        raise UserError(
            f"mse: expected pred and target of the same shape, found {pred.shape} and "
            f"{target.shape}. Fix: reshape the targets to the model output."
        )
    err = optax.losses.squared_error(pred.astype(jnp.float32), target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def static_zero(value: float | jax.Array) -> bool:
    """A Python 0: the term it weights is left out. An array (one member's value in a
    vmapped sweep, `jaxdl.core.vmapped`) always computes the term, even where it is 0."""
    return isinstance(value, int | float) and value == 0


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy of softmax(logits) per example: logits [B, C] -> [B] (nats).

    labels: integer class ids [B], or target probabilities / one-hot [B, C].
    label_smoothing: alpha in ``(1 - alpha) * onehot + alpha / C`` (Mueller et al. 2019).
    """
    logits = logits.astype(jnp.float32)
    if labels.shape == logits.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
        if static_zero(label_smoothing):
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        labels = jax.nn.one_hot(labels, logits.shape[-1])
    elif labels.shape != logits.shape:
        raise UserError(
            f"softmax_cross_entropy: expected integer labels {logits.shape[:-1]} or "
            f"probabilities {logits.shape}, found {labels.dtype} {labels.shape}. "
            "Fix: pass class ids or one-hot rows matching the logits."
        )
    labels = labels.astype(jnp.float32)
    if not static_zero(label_smoothing):
        labels = optax.losses.smooth_labels(labels, label_smoothing)
    return optax.losses.softmax_cross_entropy(logits, labels)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of sigmoid(logits) per element: logits, labels [...] -> [...].

    ``-(y log p + (1 - y) log(1 - p))`` with p = sigmoid(logits), computed from the logits
    for stability. Both terms count: for labels [1, 0, 1] and p [0.6, 0.4, 0.9] this gives
    [0.5108, 0.5108, 0.1054]. The article's 4.1.2 example, ``-sum(y log p)`` = 0.6162, is
    the categorical form and keeps only the positive-label terms.
    """
    return optax.losses.sigmoid_binary_cross_entropy(
        logits.astype(jnp.float32), labels.astype(jnp.float32)
    )


def _weights(params: Params) -> list[jax.Array]:
    # Kernels and embeddings (ndim > 1) are penalised; biases and norm scales are not,
    # the usual choice: shrinking them does not limit capacity, only shifts activations.
    return [w for w in jax.tree.leaves(params) if jnp.ndim(w) > 1]


def l1_penalty(params: Params) -> jax.Array:
    """``sum |w|`` over leaves with ndim > 1 (kernels, not biases): a float32 scalar."""
    return sum((jnp.abs(w.astype(jnp.float32)).sum() for w in _weights(params)), jnp.float32(0))


def l2_penalty(params: Params) -> jax.Array:
    """``0.5 * sum w^2`` over leaves with ndim > 1 (kernels, not biases): a float32 scalar.

    The 0.5 makes its gradient ``w``, so ``loss + lam * l2_penalty`` is weight decay ``lam``.
    """
    return 0.5 * sum(
        (jnp.square(w.astype(jnp.float32)).sum() for w in _weights(params)), jnp.float32(0)
    )
