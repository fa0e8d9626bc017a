"""Metrics against hand-computed values and sklearn's confusion matrix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from jaxdl.core import metrics

# 4 examples, 3 classes. argmax: [2, 0, 1, 1]; second choice: [1, 1, 2, 0].
LOGITS = jnp.array(
    [[0.1, 0.5, 0.9], [0.8, 0.3, 0.1], [0.2, 0.7, 0.4], [0.5, 0.6, 0.0]], jnp.float32
)
LABELS = jnp.array([2, 1, 1, 2])


def test_accuracy_by_hand():
    np.testing.assert_allclose(metrics.accuracy(LOGITS, LABELS), 2 / 4)
    np.testing.assert_allclose(metrics.accuracy(LOGITS, jax.nn.one_hot(LABELS, 3)), 2 / 4)
    # Padding rows (mask 0) do not count: examples 0, 1, 2 -> 2 of 3 right.
    mask = jnp.array([1, 1, 1, 0])
    np.testing.assert_allclose(metrics.accuracy(LOGITS, LABELS, mask), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics.accuracy(LOGITS, LABELS, jnp.zeros(4)), 0.0)


def test_top_k_accuracy_by_hand():
    np.testing.assert_allclose(metrics.top_k_accuracy(LOGITS, LABELS, 1), 2 / 4)
    # Top-2 sets {2,1}, {0,1}, {1,2}, {1,0}: labels 2, 1, 1 are in, 2 is not -> 3 of 4.
    np.testing.assert_allclose(metrics.top_k_accuracy(LOGITS, LABELS, 2), 3 / 4)
    np.testing.assert_allclose(metrics.top_k_accuracy(LOGITS, LABELS, 3), 1.0)
    mask = jnp.array([0, 1, 1, 1])
    np.testing.assert_allclose(metrics.top_k_accuracy(LOGITS, LABELS, 2, mask), 2 / 3, rtol=1e-6)


def test_confusion_matrix_by_hand_rows_are_true_labels():
    cm = metrics.confusion_matrix(jnp.argmax(LOGITS, -1), LABELS, 3)
    # (true, pred): (2,2), (1,0), (1,1), (2,1)
    np.testing.assert_array_equal(cm, [[0, 0, 0], [1, 1, 0], [0, 1, 1]])
    assert cm.dtype == jnp.int32
    np.testing.assert_array_equal(metrics.confusion_matrix(LOGITS, LABELS, 3), cm)
    masked = metrics.confusion_matrix(LOGITS, LABELS, 3, mask=jnp.array([1, 0, 1, 1]))
    np.testing.assert_array_equal(masked, [[0, 0, 0], [0, 1, 0], [0, 1, 1]])


def test_confusion_matrix_matches_sklearn_under_jit():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
    fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
    np.testing.assert_array_equal(
        fn(jnp.asarray(preds), jnp.asarray(labels), 5),
        sk_confusion_matrix(labels, preds, labels=range(5)),
    )
    accuracy = jax.jit(metrics.top_k_accuracy, static_argnums=2)
    np.testing.assert_allclose(accuracy(LOGITS, LABELS, 2), 3 / 4)


def test_mean_accumulates_weighted_batches():
    # Batch means 0.5 over 2 examples and 1.0 over 6: (1 + 6) / 8.
    mean = metrics.Mean().update(0.5, count=2).update(jnp.float32(1.0), count=jnp.int32(6))
    assert mean.compute() == pytest.approx(7 / 8)
    assert mean.merge(metrics.Mean(total=1.0, count=2)).compute() == pytest.approx(8 / 10)
    assert math.isnan(metrics.Mean().compute())


def test_named_means():
    means = metrics.update_means({}, {"loss": 2.0, "accuracy": 0.5}, count=4)
    means = metrics.update_means(means, {"loss": jnp.float32(1.0), "accuracy": 1.0}, count=1)
    result = metrics.compute_means(means)
    assert result == pytest.approx({"loss": 9 / 5, "accuracy": 3 / 5})
    assert all(isinstance(v, float) for v in result.values())
