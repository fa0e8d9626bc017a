"""What a batch means: which key feeds the model, the loss, and the metrics.

A task is plain data plus two pure functions, so the steps in `jaxdl.core.steps` stay
task-agnostic. Metrics from `eval_sums` are (masked) sums, so they add up exactly over
padded eval batches and across hosts; `finalize` turns sums into means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxdl.core import losses
from jaxdl.errors import UserError

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

LOSSES = ("softmax_cross_entropy", "mse", "sigmoid_cross_entropy")


@dataclasses.dataclass(frozen=True)
class Head:
    kind: str  # "classification" | "lm"
    input_key: str
    loss: Callable[[jax.Array, Batch], tuple[jax.Array, Metrics]]  # -> (mean loss, metrics)
    eval_sums: Callable[[jax.Array, Batch], Metrics]  # -> masked sums incl. "count"


def _per_example_loss(name: str, logits, labels, num_classes: int, smoothing: float):
    """Per-example losses [B] for a classification head."""
    if name == "softmax_cross_entropy":
        return losses.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if name == "mse":  # the article's 3.1 choice: sigmoid outputs regressed onto one-hot targets
        return jnp.mean((jax.nn.sigmoid(logits) - one_hot) ** 2, axis=-1)
    if name == "sigmoid_cross_entropy":
        return jnp.mean(losses.sigmoid_binary_cross_entropy(logits, one_hot), axis=-1)
    raise UserError(f"loss.name: expected one of {list(LOSSES)}, found {name!r}.")


def classification(loss_cfg: Mapping[str, Any], num_classes: int) -> Head:
    name, smoothing = loss_cfg["name"], loss_cfg["label_smoothing"]  # an array in a sweep
    if name not in LOSSES:
        raise UserError(f"loss.name: expected one of {list(LOSSES)}, found {name!r}.")

    def loss(logits, batch):
        per_example = _per_example_loss(name, logits, batch["label"], num_classes, smoothing)
        correct = jnp.argmax(logits, -1) == batch["label"]
        return per_example.mean(), {"accuracy": correct.mean()}

    def eval_sums(logits, batch):
        mask = batch["mask"]
        per_example = _per_example_loss(name, logits, batch["label"], num_classes, 0.0)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {
            "loss": jnp.sum(per_example * mask),
            "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return Head("classification", "image", loss, eval_sums)


def language_model() -> Head:
    """Next-token prediction on byte windows: inputs [B, T] -> targets [B, T]."""

    def token_losses(logits, batch):
        return losses.softmax_cross_entropy(logits.astype(jnp.float32), batch["targets"])

    def loss(logits, batch):
        per_token = token_losses(logits, batch)
        mean = per_token.mean()
        return mean, {"bits_per_byte": mean / math.log(2)}

    def eval_sums(logits, batch):
        per_token = token_losses(logits, batch)  # [B, T]
        mask = batch["mask"][:, None] * jnp.ones_like(per_token)
        return {"loss": jnp.sum(per_token * mask), "count": jnp.sum(mask)}

    return Head("lm", "inputs", loss, eval_sums)


def make_head(kind: str, loss_cfg: Mapping[str, Any], num_classes: int) -> Head:
    if kind == "lm":
        return language_model()
    return classification(loss_cfg, num_classes)


def finalize(sums: Mapping[str, float], kind: str) -> dict[str, float]:
    """Masked sums -> means; LMs also get bits per byte and perplexity."""
    count = max(float(sums["count"]), 1.0)
    out = {k: float(v) / count for k, v in sums.items() if k != "count"}
    if kind == "lm":
        out["bits_per_byte"] = out["loss"] / math.log(2)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out
