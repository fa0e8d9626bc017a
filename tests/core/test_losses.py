"""Losses against the article's chapter-4 worked examples (corrected) and hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.core import losses


def test_mse_article_example_is_0_01():
    # Article 4.1.1 prints 0.02; every error is 0.1, so the mean square is 0.01.
    target = jnp.array([2.0, 3.0, 4.0, 5.0, 6.0])
    pred = jnp.array([2.1, 3.1, 4.1, 5.1, 6.1])
    per_example = losses.mse(pred, target)
    assert per_example.shape == (5,)
    np.testing.assert_allclose(per_example.mean(), 0.01, rtol=1e-5)


def test_mse_averages_trailing_axes_per_example():
    pred = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    target = jnp.array([[0.0, 0.0], [3.0, 1.0]])
    np.testing.assert_allclose(losses.mse(pred, target), [(1 + 4) / 2, (9 + 1) / 2])
    with pytest.raises(ValueError, match="mse"):
        losses.mse(pred, target[:, :1])


def test_binary_cross_entropy_article_example():
    labels = jnp.array([1.0, 0.0, 1.0])
    probs = jnp.array([0.6, 0.4, 0.9])
    logits = jnp.log(probs / (1 - probs))  # sigmoid(logits) == probs
    per_element = losses.sigmoid_binary_cross_entropy(logits, labels)
    # Full BCE: -(y ln p + (1 - y) ln(1 - p)); the negative label costs -ln(1 - 0.4).
    np.testing.assert_allclose(
        per_element, [-math.log(0.6), -math.log(0.6), -math.log(0.9)], rtol=1e-5
    )
    np.testing.assert_allclose(per_element, [0.5108, 0.5108, 0.1054], atol=1e-4)
    np.testing.assert_allclose(per_element.sum(), 1.1270, atol=1e-4)
    # The article's 4.1.2 formula -sum(y ln p) keeps only the positive-label terms:
    # -(ln 0.6 + ln 0.9) = 0.6162 nats (it prints 0.415), or 0.2054 averaged over 3.
    positive_only = (labels * per_element).sum()
    np.testing.assert_allclose(positive_only, 0.6162, atol=1e-4)
    np.testing.assert_allclose(positive_only / 3, 0.2054, atol=1e-4)


def test_sigmoid_values_from_the_binary_cross_entropy():
    # Article 4.2.2 (corrected): with label 1 the loss is -ln sigmoid(x).
    x = jnp.array([-3.0, -1.0, 0.0, 1.0, 3.0])
    sigmoid = jnp.exp(-losses.sigmoid_binary_cross_entropy(x, jnp.ones(5)))
    np.testing.assert_allclose(sigmoid, [0.0474, 0.2689, 0.5, 0.7311, 0.9526], atol=1e-4)


def test_gradient_descent_step_article_example():
    # Article 4.3: J(theta) = (theta - 1)^2, alpha = 0.1, theta_0 = 2 -> theta_1 = 1.8.
    def loss(theta):
        return losses.mse(theta, jnp.ones(1)).sum()

    theta = jnp.array([2.0])
    grad = jax.grad(loss)(theta)
    np.testing.assert_allclose(grad, [2.0])  # 2 (theta - 1)
    updates, _ = optax.sgd(0.1).update(grad, optax.sgd(0.1).init(theta))
    np.testing.assert_allclose(optax.apply_updates(theta, updates), [1.8], rtol=1e-6)


def test_softmax_cross_entropy_integer_and_one_hot_labels():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([2, 0])
    # -log softmax: log(e + e^2 + e^3) - 3, and log 3 for uniform logits.
    expected = [math.log(math.e + math.e**2 + math.e**3) - 3.0, math.log(3.0)]
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)
    one_hot = jax.nn.one_hot(labels, 3)
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, one_hot), expected, rtol=1e-6)


def test_softmax_cross_entropy_label_smoothing_by_hand():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    alpha = 0.1
    log_p = np.array([1.0, 2.0, 3.0]) - math.log(math.e + math.e**2 + math.e**3)
    # Smoothed target for class 2 of 3: [a/3, a/3, 1 - a + a/3].
    target = np.array([alpha / 3, alpha / 3, 1 - alpha + alpha / 3])
    expected = -(target * log_p).sum()
    np.testing.assert_allclose(expected, 0.5076, atol=1e-4)
    for labels in (jnp.array([2]), jnp.array([[0.0, 0.0, 1.0]])):
        got = losses.softmax_cross_entropy(logits, labels, label_smoothing=alpha)
        np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_softmax_cross_entropy_is_jittable_and_rejects_bad_labels():
    fn = jax.jit(losses.softmax_cross_entropy, static_argnames="label_smoothing")
    logits = jnp.zeros((4, 5))
    np.testing.assert_allclose(fn(logits, jnp.arange(4)), [math.log(5.0)] * 4, rtol=1e-6)
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        losses.softmax_cross_entropy(logits, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        losses.softmax_cross_entropy(logits, jnp.zeros((4, 3)))


def test_penalties_cover_kernels_not_biases():
    params = {
        "dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, -4.0]]), "bias": jnp.array([10.0, 10.0])},
        "conv": {"kernel": -jnp.ones((1, 1, 1, 2))},
    }
    np.testing.assert_allclose(losses.l1_penalty(params), 1 + 2 + 3 + 4 + 2)
    np.testing.assert_allclose(losses.l2_penalty(params), 0.5 * (1 + 4 + 9 + 16 + 2))
    # d/dw of 0.5 * sum w^2 is w itself: weight decay with rate lambda.
    grads = jax.grad(losses.l2_penalty)(params)
    np.testing.assert_allclose(grads["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_allclose(grads["dense"]["bias"], [0.0, 0.0])
    assert losses.l2_penalty({}) == 0.0
