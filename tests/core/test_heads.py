"""The binary, multilabel and regression heads and class weights: losses with known values."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.core import heads
from jaxdl.errors import UserError

DEFAULT = {"name": "softmax_cross_entropy", "label_smoothing": 0.0}


def test_binary_loss_is_sigmoid_cross_entropy_of_one_logit():
    logits = jnp.asarray([[0.4], [-0.4], [2.2]])
    batch = {"label": jnp.asarray([1, 0, 1])}
    loss, metrics = heads.binary(DEFAULT).loss(logits, batch)
    p = 1 / (1 + np.exp(-np.array([0.4, -0.4, 2.2])))
    expected = -np.mean(np.log([p[0], 1 - p[1], p[2]]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["accuracy"]) == 1.0


def test_balanced_class_weights_follow_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    counts = [30, 10]
    y = np.repeat([0, 1], counts)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    got = heads.class_weights("balanced", counts, 2)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    weighted = heads.binary({**DEFAULT, "class_weights": "balanced"}, class_counts=counts)
    logits, batch = jnp.zeros((2, 1)), {"label": jnp.asarray([0, 1])}
    loss, _ = weighted.loss(logits, batch)  # both examples lose log 2, weighted 2/3 and 2
    assert float(loss) == pytest.approx(np.log(2) * (expected[0] + expected[1]) / 2, rel=1e-6)


def test_list_class_weights_scale_the_classification_loss():
    head = heads.classification({**DEFAULT, "class_weights": [1.0, 3.0]}, 2)
    loss, _ = head.loss(jnp.zeros((2, 2)), {"label": jnp.asarray([1, 1])})
    assert float(loss) == pytest.approx(3 * np.log(2), rel=1e-6)
    with pytest.raises(UserError, match="class_weights"):
        heads.classification({**DEFAULT, "class_weights": [1.0]}, 2)
    with pytest.raises(UserError, match="balanced"):
        heads.classification({**DEFAULT, "class_weights": "balanced"}, 2)


def test_regression_trains_on_standardized_targets():
    head = heads.regression({"name": "huber"}, target_mean=[10.0], target_std=[2.0])
    outputs = jnp.asarray([[0.0], [3.0]])
    batch = {"label": jnp.asarray([[11.0], [10.0]])}  # standardized: 0.5 and 0
    loss, _ = head.loss(outputs, batch)
    expected = optax.losses.huber_loss(jnp.asarray([0.0, 3.0]), jnp.asarray([0.5, 0.0])).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss) == pytest.approx((0.125 + 2.5) / 2, rel=1e-6)
    sums = head.eval_sums(outputs, {**batch, "mask": jnp.ones(2)})
    np.testing.assert_allclose(np.asarray(sums["per_example"]["pred"]), [[10.0], [16.0]])


def test_task_losses_are_checked():
    assert heads.regression(DEFAULT, target_mean=[0.0], target_std=[1.0]).kind == "regression"
    with pytest.raises(UserError, match="regression task takes one of"):
        heads.regression({"name": "sigmoid_cross_entropy"}, target_mean=[0.0], target_std=[1.0])
    with pytest.raises(UserError, match="binary task"):
        heads.binary({"name": "mse"})
    with pytest.raises(UserError, match="a multilabel task has none"):
        heads.multilabel({**DEFAULT, "class_weights": "balanced"})


def test_multilabel_loss_averages_labels():
    logits = jnp.asarray([[0.0, 0.0, 0.0]])
    loss, metrics = heads.multilabel(DEFAULT).loss(logits, {"label": jnp.asarray([[1.0, 0, 1]])})
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)
    assert float(metrics["label_accuracy"]) == pytest.approx(1 / 3)


def test_language_model_bits_are_per_byte_of_text_whatever_the_tokenizer():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]]))  # [1, 2, 3]
    batch = {"targets": jnp.array([[0, 0]]), "mask": jnp.array([1.0])}
    nats = -(np.log(0.5) + np.log(0.25))  # two tokens
    for bytes_per_token in (1.0, 3.5):
        head = heads.language_model(bytes_per_token=bytes_per_token)
        out = heads.finalize(head.eval_sums(logits, batch), "lm")
        np.testing.assert_allclose(out["loss"], nats / 2, rtol=1e-6)
        np.testing.assert_allclose(out["bits_per_byte"], nats / 2 / np.log(2) / bytes_per_token)
        _, train = head.loss(logits, batch)
        np.testing.assert_allclose(train["bits_per_byte"], out["bits_per_byte"], rtol=1e-6)
