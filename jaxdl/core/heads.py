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
# Train-step metrics that are checks, not measurements: the trainer tests them, never logs them.
FLAGS = ("finite", "labels_ok", "bad_label")


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


def label_flags(labels: jax.Array, num_classes: int) -> Metrics:
    """On-device label check of one batch: labels [B] int ->
    {"labels_ok": bool [], "bad_label": the first label outside [0, num_classes) (or labels[0])}.

    Out-of-range labels do not fail by themselves: one_hot (label smoothing, mse) turns them
    into all-zero rows and trains on, and integer cross-entropy turns them into NaN, which
    would blame the learning rate. The flag costs the host nothing until a log point.
    Probability rows (the one_hot transform) were indexed on the host already: always ok.
    """
    ok = _labels_in_range(labels, num_classes)
    # argmin: the first False, or 0 when all are True
    bad = labels[jnp.argmin(ok)] if ok.ndim else jnp.int32(0)
    return {"labels_ok": jnp.all(ok), "bad_label": bad.astype(jnp.int32)}


def _labels_in_range(labels: jax.Array, num_classes: int) -> jax.Array:
    """bool [B]: each integer label in [0, num_classes); a scalar True for probability rows."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        return jnp.bool_(True)
    return (labels >= 0) & (labels < num_classes)


def check_label_flags(host: list[Mapping[str, Any]], first_step: int) -> None:
    """Raise naming the step and the label when a train step's `label_flags` failed.

    host: fetched metrics of steps first_step + 1, first_step + 2, ...
    """
    for i, metrics in enumerate(host):
        if "labels_ok" in metrics and not bool(metrics["labels_ok"]):
            step, label = first_step + 1 + i, int(metrics["bad_label"])
            fix = "make every label a class index >= 0"
            if label >= 0:
                fix = f"set model.num_classes to at least {label + 1}, or fix the labels"
            raise UserError(
                f"data: the train batch of step {step} (steps {first_step + 1}.."
                f"{first_step + len(host)} checked) holds label {label}, outside "
                f"[0, model.num_classes); parameters after step {first_step} were not "
                f"saved. Fix: {fix}."
            )


def classification(loss_cfg: Mapping[str, Any], num_classes: int) -> Head:
    name, smoothing = loss_cfg["name"], float(loss_cfg["label_smoothing"])
    if name not in LOSSES:
        raise UserError(f"loss.name: expected one of {list(LOSSES)}, found {name!r}.")

    def loss(logits, batch):
        per_example = _per_example_loss(name, logits, batch["label"], num_classes, smoothing)
        correct = jnp.argmax(logits, -1) == batch["label"]
        flags = label_flags(batch["label"], num_classes)
        return per_example.mean(), {"accuracy": correct.mean(), **flags}

    def eval_sums(logits, batch):
        mask = batch["mask"]
        labels = batch["label"]
        per_example = _per_example_loss(name, logits, labels, num_classes, 0.0)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        bad = jnp.logical_not(_labels_in_range(labels, num_classes)).astype(jnp.float32)
        return {
            "loss": jnp.sum(per_example * mask),
            "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
            "bad_labels": jnp.sum(bad * mask),
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
    """Masked sums -> means; LMs also get bits per byte and perplexity.

    Refuses sums over labels outside the model's classes (`bad_labels` > 0): accuracy and
    loss over them would be meaningless numbers.
    """
    bad = int(sums.get("bad_labels", 0))
    if bad:
        raise UserError(
            f"data: {bad} evaluation examples hold labels outside the model's classes "
            "(model.num_classes). Fix: raise model.num_classes or fix the labels of the "
            "evaluation split."
        )
    count = max(float(sums["count"]), 1.0)
    out = {k: float(v) / count for k, v in sums.items() if k not in ("count", "bad_labels")}
    if kind == "lm":
        out["bits_per_byte"] = out["loss"] / math.log(2)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out
