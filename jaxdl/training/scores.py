"""Exact metrics from a split's gathered predictions (scikit-learn's definitions).

ROC AUC, average precision, F1 and R^2 are not sums over batches: averaging them per
batch gives a different (wrong) number. The evaluator gathers each example's score,
prediction and label (a head's ``"per_example"`` output, padding dropped) and scores the
whole split here, on the host, with `sklearn.metrics` itself, so the figures are
scikit-learn's by construction, except the ones a confusion matrix gives (per-class and
macro precision / recall / F1, the matrix itself): those follow sklearn's definitions in
numpy, so that a classification run does not import sklearn (about 0.9 s a process);
tests/training/test_scores.py checks them against sklearn on random and degenerate cases.

`exact_metrics` returns scalars (logged to metrics.jsonl as val_*, summary.json as test_*)
and `details` the per-class / per-label lists and the confusion matrix (summary.json only).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxdl.core.heads import finalize

Arrays = Mapping[str, np.ndarray]


def _skm():
    """sklearn.metrics, imported on first use: the import takes about 0.9 s, which every
    jaxdl process would otherwise pay at start, runs that never score with it included."""
    from sklearn import metrics

    return metrics


def gather(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch {"mask": [B], name: [B, ...]} -> {name: [N, ...]} of the real examples."""
    keep = np.concatenate([np.asarray(b["mask"]) > 0 for b in batches])
    names = [k for k in batches[0] if k != "mask"]
    return {k: np.concatenate([np.asarray(b[k]) for b in batches])[keep] for k in names}


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximizing F1 of ``scores >= threshold`` over the split's scores."""
    precision, recall, thresholds = _skm().precision_recall_curve(labels, scores)
    # The curve's last point (recall 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    i = int(np.argmax(f1))
    return float(thresholds[i]), float(f1[i])


def _binary(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, float]:
    pred = (scores >= 0.5).astype(np.int64)
    out = {
        "precision": _skm().precision_score(labels, pred, zero_division=0),
        "recall": _skm().recall_score(labels, pred, zero_division=0),
        "f1": _skm().f1_score(labels, pred, zero_division=0),
    }
    if len(np.unique(labels)) == 2:  # AUCs are undefined on a one-class split
        out["roc_auc"] = _skm().roc_auc_score(labels, scores)
        out["pr_auc"] = _skm().average_precision_score(labels, scores)
        if threshold is None:
            out["best_threshold"], out["f1_at_best_threshold"] = best_f1_threshold(labels, scores)
    if threshold is not None:
        chosen = (scores >= threshold).astype(np.int64)
        out["f1_at_val_threshold"] = _skm().f1_score(labels, chosen, zero_division=0)
        out["accuracy_at_val_threshold"] = _skm().accuracy_score(labels, chosen)
    return {k: float(v) for k, v in out.items()}


def _defined_labels(labels: np.ndarray) -> np.ndarray:
    """Label columns with both values present: those with a defined AUC."""
    return np.flatnonzero((labels.min(axis=0) == 0) & (labels.max(axis=0) == 1))


def _confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, row = true class, column = prediction (scikit-learn's layout)."""
    index = y.astype(np.int64) * num_classes + pred.astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def _per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1) [C] as scikit-learn's precision_recall_fscore_support
    defines them with zero_division=0: tp / predicted, tp / true, 2 tp / (true +
    predicted), 0 where the denominator is 0."""
    tp = np.diag(confusion).astype(np.float64)
    true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)

    def divide(a, b):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1, b))

    return divide(tp, predicted), divide(tp, true), divide(2 * tp, true + predicted)


def _macro_prf(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro precision / recall / F1 over the classes present in y or pred, as scikit-learn's
    ``average="macro"`` (computed here from the confusion matrix: sklearn's import costs
    about 0.9 s a process, which every classification run would pay at its first eval)."""
    confusion = _confusion(y, pred, int(max(y.max(), pred.max())) + 1)
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    p, r, f1 = (v[present].mean() for v in _per_class(confusion))
    return {"macro_f1": float(f1), "macro_precision": float(p), "macro_recall": float(r)}


def exact_metrics(kind: str, arrays: Arrays, threshold: float | None = None) -> dict[str, float]:
    """Scalar metrics of one split: ``arrays`` from `gather` of the head's per-example outputs.

    classification: pred [N] ids, label [N] -> macro_f1, macro_precision, macro_recall.
    binary: score [N] in [0, 1], label [N] {0, 1} -> roc_auc, pr_auc (average precision),
        precision / recall / f1 at 0.5, best_threshold (max F1 on this split) and its F1;
        with ``threshold`` (chosen on val) instead f1 / accuracy at that threshold.
    multilabel: score [N, L], label [N, L] -> micro_f1, macro_f1 at 0.5, macro_roc_auc
        (over labels with both values present), subset_accuracy.
    regression: pred [N, K], label [N, K] in original units -> mse, mae, r2, rmse.
    """
    if kind == "classification":
        return _macro_prf(arrays["label"], arrays["pred"])
    if kind == "binary":
        labels, probs = arrays["label"].astype(np.int64), arrays["score"].astype(np.float64)
        return _binary(labels, probs, threshold)
    if kind == "multilabel":
        y = (arrays["label"] > 0.5).astype(np.int64)
        scores = arrays["score"].astype(np.float64)
        pred = (scores >= 0.5).astype(np.int64)
        out = {
            "micro_f1": _skm().f1_score(y, pred, average="micro", zero_division=0),
            "macro_f1": _skm().f1_score(y, pred, average="macro", zero_division=0),
            "subset_accuracy": _skm().accuracy_score(y, pred),
        }
        defined = _defined_labels(y)
        if len(defined):
            out["macro_roc_auc"] = _skm().roc_auc_score(
                y[:, defined], scores[:, defined], average="macro"
            )
        return {k: float(v) for k, v in out.items()}
    if kind == "regression":
        y = arrays["label"].astype(np.float64)
        pred = arrays["pred"].astype(np.float64)
        mse = _skm().mean_squared_error(y, pred)
        return {
            "mse": float(mse),
            "rmse": float(np.sqrt(mse)),
            "mae": float(_skm().mean_absolute_error(y, pred)),
            "r2": float(_skm().r2_score(y, pred)),
        }
    raise AssertionError(f"no exact metrics for task kind {kind!r}")


def details(kind: str, arrays: Arrays, num_classes: int) -> dict[str, list]:
    """Per-class / per-label lists for summary.json.

    classification: per_class_precision, per_class_recall, per_class_f1 [C] and
    confusion_matrix [C][C] (row = true class, column = prediction, as scikit-learn).
    binary: confusion_matrix [2][2] at threshold 0.5. multilabel: per_label_roc_auc [L]
    (None where a label has one value in the split), per_label_f1 [L].
    """
    if kind == "classification":
        y, pred = arrays["label"], arrays["pred"]
        confusion = _confusion(y, pred, max(num_classes, int(y.max()) + 1, int(pred.max()) + 1))
        p, r, f1 = _per_class(confusion)
        return {
            "per_class_precision": p.tolist(),
            "per_class_recall": r.tolist(),
            "per_class_f1": f1.tolist(),
            "confusion_matrix": confusion.tolist(),
        }
    if kind == "binary":
        pred = (arrays["score"] >= 0.5).astype(np.int64)
        return {"confusion_matrix": _confusion(arrays["label"], pred, 2).tolist()}
    if kind == "multilabel":
        y = (arrays["label"] > 0.5).astype(np.int64)
        scores = arrays["score"].astype(np.float64)
        defined = set(_defined_labels(y).tolist())
        auc = [
            float(_skm().roc_auc_score(y[:, j], scores[:, j])) if j in defined else None
            for j in range(y.shape[1])
        ]
        f1 = _skm().f1_score(y, (scores >= 0.5).astype(np.int64), average=None, zero_division=0)
        return {"per_label_roc_auc": auc, "per_label_f1": f1.tolist()}
    return {}


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], out_path) -> None:
    """The confusion matrix as a PNG: rows true class, columns prediction, counts in cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    size = 1.2 + 0.45 * len(cm)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(cm))
    ax.set_xticks(ticks, labels=names, rotation=90 if len(cm) > 6 else 0)
    ax.set_yticks(ticks, labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(cm) <= 20:
        for i, j in np.ndindex(*cm.shape):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)


def member_metrics(
    sums: Mapping[str, np.ndarray],
    per_example: Sequence[Mapping[str, np.ndarray]],
    kind: str,
    members: int,
) -> list[dict[str, float]]:
    """Scalar metrics of each member of a vmapped group, as `evaluate_split` scores a single
    run: ``sums`` hold [M] masked sums per key; ``per_example`` (one entry per batch, [M, B,
    ...] arrays) gives the exact whole-split metrics (AUC, F1, R^2)."""
    rows = []
    for i in range(members):
        metrics = finalize({k: v[i] for k, v in sums.items()}, kind)
        if per_example:
            mine = [{k: np.asarray(v)[i] for k, v in batch.items()} for batch in per_example]
            metrics.update(exact_metrics(kind, gather(mine)))
        rows.append(metrics)
    return rows
