"""What a batch means: which key feeds the model, the loss, and the metrics.

A task is plain data plus two pure functions, so the steps in `jaxdl.core.steps` stay
task-agnostic. Metrics from `eval_sums` are (masked) sums, so they add up exactly over
padded eval batches and across hosts; `finalize` turns sums into means. Metrics that are
not sums (ROC AUC, F1, R^2) need every example: `eval_sums` then also returns
``"per_example"``, a dict of [B, ...] arrays with the batch's "mask", which the evaluator
gathers and scores exactly on the host (`jaxdl.training.scores`).

Task kinds and their batches (label shapes per example):
    classification  label int32 []     logits [B, C]   softmax cross-entropy
    binary          label int32 []     logits [B, 1]   sigmoid cross-entropy
    multilabel      label float32 [L]  logits [B, L]   per-label sigmoid cross-entropy
    regression      label float32 [K]  outputs [B, K]  MSE or Huber on train-standardized targets
    lm              targets int32 [T]  logits [B, T, V]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.core import losses
from jaxdl.errors import UserError

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

LOSSES = ("softmax_cross_entropy", "mse", "sigmoid_cross_entropy")
KINDS = ("classification", "binary", "multilabel", "regression", "lm", "sft")
# The config default loss.name; for binary, multilabel and regression it means the task's
# own first loss below, so a task inferred from the data trains without a loss override.
DEFAULT_LOSS = "softmax_cross_entropy"
TASK_LOSSES = {
    "binary": ("sigmoid_cross_entropy",),
    "multilabel": ("sigmoid_cross_entropy",),
    "regression": ("mse", "huber"),
}
# Train-step metrics that are checks, not measurements: the trainer tests them, never logs them.
FLAGS = ("finite", "labels_ok", "bad_label")


@dataclasses.dataclass(frozen=True)
class Head:
    kind: str  # one of KINDS
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


def class_weights(spec: Any, counts: Sequence[int] | None, num_classes: int) -> jax.Array | None:
    """loss.class_weights -> float32 [num_classes], or None for unweighted.

    "balanced" is scikit-learn's ``n / (num_classes * count_c)`` over the train labels
    (``counts``), so the weights average to one over the train examples.
    """
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise UserError(
                f"loss.class_weights: expected 'balanced' or a list of {num_classes} numbers, "
                f"found {spec!r}. Fix: --config.loss.class_weights=balanced."
            )
        if counts is None:
            raise UserError(
                "loss.class_weights: 'balanced' needs the train label counts, which this data "
                "source does not provide. Fix: give a list of per-class weights."
            )
        counts = np.asarray(counts, np.float64)
        if len(counts) != num_classes or (counts == 0).any():
            raise UserError(
                f"loss.class_weights: 'balanced' needs every one of {num_classes} classes in the "
                f"train split, found counts {counts.astype(int).tolist()}. Fix: give a list."
            )
        return jnp.asarray(counts.sum() / (num_classes * counts), jnp.float32)
    weights = np.asarray(spec, np.float64)
    if weights.shape != (num_classes,) or not np.all(weights > 0):
        raise UserError(
            f"loss.class_weights: expected {num_classes} positive numbers, found {list(spec)}. "
            "Fix: one weight per class, or 'balanced'."
        )
    return jnp.asarray(weights, jnp.float32)


def _weighted(per_example: jax.Array, labels: jax.Array, weights: jax.Array | None) -> jax.Array:
    return per_example if weights is None else per_example * weights[labels]


def classification(
    loss_cfg: Mapping[str, Any],
    num_classes: int,
    *,
    input_key: str = "image",
    class_counts: Sequence[int] | None = None,
) -> Head:
    """Softmax over C classes. Train loss weighted by loss.class_weights; eval loss is not."""
    name, smoothing = loss_cfg["name"], loss_cfg["label_smoothing"]  # an array in a sweep
    if name not in LOSSES:
        raise UserError(f"loss.name: expected one of {list(LOSSES)}, found {name!r}.")
    weights = class_weights(loss_cfg.get("class_weights"), class_counts, num_classes)

    def loss(logits, batch):
        per_example = _per_example_loss(name, logits, batch["label"], num_classes, smoothing)
        correct = jnp.argmax(logits, -1) == batch["label"]
        flags = label_flags(batch["label"], num_classes)
        mean = _weighted(per_example, batch["label"], weights).mean()
        return mean, {"accuracy": correct.mean(), **flags}

    def eval_sums(logits, batch):
        mask = batch["mask"]
        labels = batch["label"]
        per_example = _per_example_loss(name, logits, labels, num_classes, 0.0)
        pred = jnp.argmax(logits, -1).astype(jnp.int32)
        correct = (pred == labels).astype(jnp.float32)
        bad = jnp.logical_not(_labels_in_range(labels, num_classes)).astype(jnp.float32)
        return {
            "loss": jnp.sum(per_example * mask),
            "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
            "bad_labels": jnp.sum(bad * mask),
            "per_example": {"pred": pred, "label": labels, "mask": mask},
        }

    return Head("classification", input_key, loss, eval_sums)


def _task_loss(kind: str, loss_cfg: Mapping[str, Any]) -> str:
    spec = loss_cfg.get("class_weights")
    if kind != "binary" and spec is not None and (isinstance(spec, str) or len(spec)):
        raise UserError(
            f"loss.class_weights: weights classes, and a {kind} task has none; found "
            f"{spec!r}. Fix: remove loss.class_weights."
        )
    name = loss_cfg["name"]
    name = TASK_LOSSES[kind][0] if name == DEFAULT_LOSS else name
    if name not in TASK_LOSSES[kind]:
        raise UserError(
            f"loss.name: a {kind} task takes one of {list(TASK_LOSSES[kind])}, found {name!r}. "
            f"Fix: --config.loss.name={TASK_LOSSES[kind][0]}."
        )
    return name


def binary(
    loss_cfg: Mapping[str, Any],
    *,
    input_key: str = "features",
    class_counts: Sequence[int] | None = None,
) -> Head:
    """One logit per example, [B, 1]; label 1 is the positive class. Scores: sigmoid(logit)."""
    _task_loss("binary", loss_cfg)
    weights = class_weights(loss_cfg.get("class_weights"), class_counts, 2)

    def per_example(logits, batch):
        labels = batch["label"]
        return losses.sigmoid_binary_cross_entropy(logits[:, 0], labels), labels

    def loss(logits, batch):
        values, labels = per_example(logits, batch)
        correct = (logits[:, 0] > 0) == (labels == 1)
        return _weighted(values, labels, weights).mean(), {"accuracy": correct.mean()}

    def eval_sums(logits, batch):
        mask = batch["mask"]
        values, labels = per_example(logits, batch)
        correct = ((logits[:, 0] > 0) == (labels == 1)).astype(jnp.float32)
        score = jax.nn.sigmoid(logits[:, 0].astype(jnp.float32))
        return {
            "loss": jnp.sum(values * mask),
            "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
            "per_example": {"score": score, "label": labels, "mask": mask},
        }

    return Head("binary", input_key, loss, eval_sums)


def multilabel(loss_cfg: Mapping[str, Any], *, input_key: str = "features") -> Head:
    """L independent sigmoids: logits [B, L], label float32 {0, 1} [B, L]."""
    _task_loss("multilabel", loss_cfg)

    def per_example(logits, batch):
        return losses.sigmoid_binary_cross_entropy(logits, batch["label"]).mean(axis=-1)

    def loss(logits, batch):
        correct = (logits > 0) == (batch["label"] > 0.5)
        return per_example(logits, batch).mean(), {"label_accuracy": correct.mean()}

    def eval_sums(logits, batch):
        mask = batch["mask"]
        correct = ((logits > 0) == (batch["label"] > 0.5)).astype(jnp.float32).mean(axis=-1)
        score = jax.nn.sigmoid(logits.astype(jnp.float32))
        return {
            "loss": jnp.sum(per_example(logits, batch) * mask),
            "label_accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
            "per_example": {"score": score, "label": batch["label"], "mask": mask},
        }

    return Head("multilabel", input_key, loss, eval_sums)


def regression(
    loss_cfg: Mapping[str, Any],
    *,
    target_mean: Sequence[float],
    target_std: Sequence[float],
    input_key: str = "features",
) -> Head:
    """outputs [B, K] predict standardized targets ``(y - mean) / std`` (train statistics);
    labels [B, K] and the gathered predictions are in the targets' original units."""
    name = _task_loss("regression", loss_cfg)
    mean = jnp.asarray(target_mean, jnp.float32)
    std = jnp.asarray(target_std, jnp.float32)

    def per_example(outputs, batch):
        z = (batch["label"] - mean) / std
        if name == "mse":
            return losses.mse(outputs, z)
        return optax.losses.huber_loss(outputs.astype(jnp.float32), z).mean(axis=-1)

    def loss(outputs, batch):
        return per_example(outputs, batch).mean(), {}

    def eval_sums(outputs, batch):
        mask = batch["mask"]
        pred = outputs.astype(jnp.float32) * std + mean
        return {
            "loss": jnp.sum(per_example(outputs, batch) * mask),
            "count": jnp.sum(mask),
            "per_example": {"pred": pred, "label": batch["label"], "mask": mask},
        }

    return Head("regression", input_key, loss, eval_sums)


def language_model(bytes_per_token: float = 1.0) -> Head:
    """Next-token prediction on token windows: inputs [B, T] -> targets [B, T].

    ``bytes_per_token``: the tokenizer's average over the corpus (1 for bytes), so
    bits_per_byte is per byte of text whatever the tokenizer; perplexity stays per token.
    """
    bits_per_nat = 1.0 / (math.log(2) * float(bytes_per_token))

    def token_losses(logits, batch):
        return losses.softmax_cross_entropy(logits.astype(jnp.float32), batch["targets"])

    def loss(logits, batch):
        per_token = token_losses(logits, batch)
        mean = per_token.mean()
        return mean, {"bits_per_byte": mean * bits_per_nat}

    def eval_sums(logits, batch):
        per_token = token_losses(logits, batch)  # [B, T]
        mask = batch["mask"][:, None] * jnp.ones_like(per_token)
        total = jnp.sum(per_token * mask)
        return {"loss": total, "bits_per_byte": total * bits_per_nat, "count": jnp.sum(mask)}

    return Head("lm", "inputs", loss, eval_sums)


def make_head(kind: str, loss_cfg: Mapping[str, Any], num_classes: int, **fields: Any) -> Head:
    """The head for task ``kind``. ``fields`` are what the data fixed (`Data.task_fields`
    "head"): input_key, class_counts (train), target_mean / target_std (regression)."""
    if kind == "lm":
        return language_model(**fields)
    if kind == "binary":
        return binary(loss_cfg, **fields)
    if kind == "multilabel":
        return multilabel(loss_cfg, **fields)
    if kind == "regression":
        return regression(loss_cfg, **fields)
    if kind != "classification":
        raise UserError(f"task: expected one of {list(KINDS)}, found {kind!r}.")
    return classification(loss_cfg, num_classes, **fields)


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
        out.setdefault("bits_per_byte", out["loss"] / math.log(2))
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out
