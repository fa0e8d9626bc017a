"""Exact split metrics: the evaluator's gathered, padded, batched path equals scikit-learn
on the unbatched predictions to 1e-6, and differs from averaging per batch."""

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxdl.core import heads
from jaxdl.training import scores
from jaxdl.training.evaluate import evaluate_split

LOSS = {"name": "softmax_cross_entropy", "label_smoothing": 0.0}


def _batches(outputs: np.ndarray, labels: np.ndarray, batch: int):
    """Padded eval batches as the loader makes them: the last one filled with mask 0."""
    n = len(labels)
    pad = -n % batch
    outputs = np.concatenate([outputs, np.zeros((pad, *outputs.shape[1:]), outputs.dtype)])
    labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
    mask = np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32)
    for i in range(0, n + pad, batch):
        s = slice(i, i + batch)
        yield {"outputs": outputs[s], "label": labels[s], "mask": mask[s]}


def _evaluate(head, outputs, labels, batch=16, **kw):
    step = jax.jit(lambda state, b: head.eval_sums(b["outputs"], b))
    return evaluate_split(step, None, _batches(outputs, labels, batch), head.kind, **kw)


def test_binary_metrics_equal_sklearn_and_differ_from_batch_means():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 203).astype(np.int32)
    logits = (rng.normal(size=203) + 1.2 * y).astype(np.float32)[:, None]
    got = _evaluate(heads.binary(LOSS), logits, y)
    p = 1 / (1 + np.exp(-logits[:, 0].astype(np.float64)))
    pred = (p >= 0.5).astype(int)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-6)
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred), abs=1e-6)
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred), abs=1e-6)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    per_batch = [skm.roc_auc_score(y[i : i + 16], p[i : i + 16]) for i in range(0, 192, 16)]
    assert abs(np.mean(per_batch) - got["roc_auc"]) > 1e-3  # why AUC must be gathered


def test_best_threshold_maximizes_f1_over_every_cut():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 97)
    s = rng.random(97) * 0.5 + 0.4 * y
    threshold, f1 = scores.best_f1_threshold(y, s)
    brute = max(skm.f1_score(y, (s >= t).astype(int)) for t in np.unique(s))
    assert f1 == pytest.approx(brute, abs=1e-12)
    assert skm.f1_score(y, (s >= threshold).astype(int)) == pytest.approx(brute, abs=1e-12)
    at = scores.exact_metrics("binary", {"label": y, "score": s}, threshold=threshold)
    assert at["f1_at_val_threshold"] == pytest.approx(brute, abs=1e-12)
    assert "best_threshold" not in at


def test_classification_macro_f1_and_confusion_equal_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 150).astype(np.int32)
    logits = rng.normal(size=(150, 4)).astype(np.float32)
    logits[np.arange(150), y] += 1.0
    got = _evaluate(heads.classification(LOSS, 4), logits, y, num_classes=4)
    pred = logits.argmax(1)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert got["per_class_recall"] == pytest.approx(
        skm.recall_score(y, pred, average=None).tolist(), abs=1e-6
    )
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


@pytest.mark.parametrize(
    "y, pred, num_classes",
    [
        (*np.random.default_rng(4).integers(0, 5, (2, 300)), 5),
        ([0, 0, 2, 2, 2], [0, 2, 2, 2, 0], 4),  # class 1 nowhere, class 3 only in num_classes
        ([1, 1, 1], [3, 3, 3], 4),  # every prediction wrong: zero divisions
        ([0, 1, 2, 3], [0, 1, 2, 3], 6),  # perfect, two classes never seen
        ([2], [0], 3),
    ],
)  # fmt: skip
def test_confusion_figures_are_sklearns(y, pred, num_classes):
    """Computed in numpy from the confusion matrix: exactly sklearn's values, macro over the
    classes present in y or pred, per class over every class, 0 where a ratio is 0 / 0."""
    y, pred = np.asarray(y), np.asarray(pred)
    got = scores.exact_metrics("classification", {"label": y, "pred": pred})
    for name, fn in [
        ("f1", skm.f1_score),
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
    ]:
        assert got[f"macro_{name}"] == pytest.approx(
            fn(y, pred, average="macro", zero_division=0), abs=1e-12
        )
    detail = scores.details("classification", {"label": y, "pred": pred}, num_classes)
    labels = list(range(num_classes))
    assert detail["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert detail["per_class_precision"] == pytest.approx(p.tolist(), abs=1e-12)
    assert detail["per_class_recall"] == pytest.approx(r.tolist(), abs=1e-12)
    assert detail["per_class_f1"] == pytest.approx(f1.tolist(), abs=1e-12)


def test_regression_metrics_in_original_units_equal_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.normal(size=(90, 1)) * 50 + 150).astype(np.float32)
    z = ((y - 140) / 45 + rng.normal(size=(90, 1)) * 0.3).astype(np.float32)
    head = heads.regression({"name": "mse"}, target_mean=[140.0], target_std=[45.0])
    got = _evaluate(head, z, y)
    pred = z.astype(np.float64) * 45 + 140
    assert got["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-6)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-6)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y, pred), rel=1e-6)
    # The loss stays in standardized units: mean squared error of z against (y - 140) / 45.
    assert got["loss"] == pytest.approx(np.mean((z - (y - 140) / 45) ** 2), rel=1e-5)


def test_multilabel_f1_and_auc_equal_sklearn():
    rng = np.random.default_rng(4)
    y = (rng.random((120, 3)) < 0.4).astype(np.float32)
    logits = (rng.normal(size=(120, 3)) + 1.5 * y - 0.5).astype(np.float32)
    got = _evaluate(heads.multilabel(LOSS), logits, y)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    pred = (p >= 0.5).astype(int)
    assert got["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"), abs=1e-6)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert got["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert got["per_label_roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, p, average=None).tolist(), abs=1e-6
    )
