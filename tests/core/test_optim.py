"""Optimizers and schedules built from config, checked against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.config import default_config
from jaxdl.core.optim import OPTIMIZERS, make_optimizer, make_schedule


def opt_cfg(**kw):
    cfg = default_config().optimizer
    cfg.update(kw)
    return cfg


def test_schedules_at_known_steps():
    lr = 0.1
    step = make_schedule(
        opt_cfg(learning_rate=lr, schedule="step", step_every=10, decay_rate=0.5), 100
    )
    assert [float(step(s)) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cosine = make_schedule(opt_cfg(learning_rate=lr, schedule="cosine"), 100)
    assert float(cosine(0)) == pytest.approx(lr)
    assert float(cosine(50)) == pytest.approx(lr / 2)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
    warm = make_schedule(opt_cfg(learning_rate=lr, schedule="warmup_cosine", warmup_steps=10), 110)
    assert float(warm(0)) == 0.0
    assert float(warm(5)) == pytest.approx(0.05)
    assert float(warm(10)) == pytest.approx(lr)
    expo = make_schedule(opt_cfg(learning_rate=lr, schedule="exponential", decay_rate=0.1), 100)
    assert float(expo(100)) == pytest.approx(0.01)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="optimizer.name: expected one of"):
        make_optimizer(opt_cfg(name="adagradx"), 10)
    with pytest.raises(ValueError, match="optimizer.schedule: expected one of"):
        make_schedule(opt_cfg(schedule="linearish"), 10)


PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.1])}
GRADS = {"w": jnp.array([[0.2, 0.4], [-0.6, 0.8]]), "b": jnp.array([1.0, -1.0])}


def one_update(tx, params=PARAMS, grads=GRADS):
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return updates


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_descends(name):
    updates = one_update(make_optimizer(opt_cfg(name=name, learning_rate=0.01), 10))
    # each update points against the gradient
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(GRADS), strict=True):
        assert np.all(np.sign(u) == -np.sign(g))


def test_sgd_and_adam_first_steps_closed_form():
    sgd = one_update(make_optimizer(opt_cfg(name="sgd", learning_rate=0.5), 10))
    np.testing.assert_allclose(sgd["w"], -0.5 * GRADS["w"])
    adam = one_update(make_optimizer(opt_cfg(name="adam", learning_rate=0.01, eps=0.0), 10))
    # Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v))
    np.testing.assert_allclose(adam["w"], -0.01 * np.sign(GRADS["w"]), rtol=1e-4)


def test_adamw_decoupled_decay_skips_biases():
    tx = make_optimizer(opt_cfg(name="adamw", learning_rate=0.1, weight_decay=0.5), 10)
    updates = one_update(tx, grads=jax.tree.map(jnp.zeros_like, GRADS))
    # zero gradients: the Adam direction is 0, so the update is the decay alone
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * PARAMS["w"], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)


def test_global_norm_clipping():
    tx = make_optimizer(opt_cfg(name="sgd", learning_rate=1.0, grad_clip_norm=0.1), 10)
    updates = one_update(tx)
    assert float(optax.global_norm(updates)) == pytest.approx(0.1, rel=1e-5)


def test_per_leaf_lr_multipliers_and_unfreeze_schedule():
    def mults(step):
        return {"w": jnp.where(step >= 1, 1.0, 0.0), "b": 0.5}

    tx = make_optimizer(opt_cfg(name="sgd", learning_rate=1.0), 10, lr_mults=mults)
    state = tx.init(PARAMS)
    first, state = tx.update(GRADS, state, PARAMS)
    second, _ = tx.update(GRADS, state, PARAMS)
    np.testing.assert_array_equal(first["w"], 0.0)
    np.testing.assert_allclose(first["b"], -0.5 * GRADS["b"])
    np.testing.assert_allclose(second["w"], -GRADS["w"])
