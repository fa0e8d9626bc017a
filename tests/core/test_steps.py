"""The jitted steps: hand-checked updates, no retracing, determinism, frozen leaves, BN."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.config import default_config
from jaxdl.core import steps, tree
from jaxdl.training.build import build

SPEC = {"image": ((3,), jnp.float32), "label": ((), jnp.int32)}


def make_setup(spec=SPEC, num_classes=4, **overrides):
    cfg = default_config()
    cfg.num_steps = 10
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return build(
        cfg, kind="classification", example_spec=spec, num_classes=num_classes, total_steps=10
    )


def batch_of(n=8, seed=0, features=3, num_classes=4):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, features)).astype(np.float32),
        "label": rng.integers(0, num_classes, size=n).astype(np.int32),
    }


def test_one_sgd_step_equals_hand_computed_update():
    setup = make_setup(
        **{
            "model": {"name": "mlp", "num_classes": 4, "hidden": ()},
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 0.1,
        }
    )
    w = np.asarray(setup.state.params["params"]["head"]["kernel"])
    b = np.asarray(setup.state.params["params"]["head"]["bias"])
    batch = batch_of()
    x, y = batch["image"], batch["label"]
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(4)[y]) / len(y)  # d(mean CE)/d logits
    expected_w, expected_b = w - 0.1 * x.T @ delta, b - 0.1 * delta.sum(0)
    expected_loss = -np.mean(np.log(p[np.arange(len(y)), y]))

    train_step = steps.make_train_step(setup.model, setup.head, setup.tx)
    state, metrics = train_step(setup.state, batch)
    np.testing.assert_allclose(
        state.params["params"]["head"]["kernel"], expected_w, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        state.params["params"]["head"]["bias"], expected_b, rtol=1e-5, atol=1e-6
    )
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert int(state.step) == 1


def test_no_retrace_over_many_steps_and_bitwise_determinism():
    setup = make_setup(
        **{"model": {"name": "mlp", "num_classes": 4, "hidden": (16,), "dropout_rate": 0.5}}
    )

    def step_fn(state, batch):
        return steps.train_step(state, batch, model=setup.model, head=setup.head, tx=setup.tx)

    train_step = jax.jit(chex.assert_max_traces(step_fn, n=1), donate_argnums=0)

    def run(state):
        losses = []
        batch = batch_of(n=32)  # one fixed batch: the loss must fall as it is memorised
        for _ in range(25):
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    copy = jax.tree.map(jnp.copy, setup.state)
    state_a, losses_a = run(setup.state)
    chex.clear_trace_counter()
    state_b, losses_b = run(copy)
    assert losses_a == losses_b
    chex.assert_trees_all_equal(state_a.params, state_b.params)
    assert losses_a[-1] < losses_a[0]


def test_dropout_key_depends_on_step():
    setup = make_setup(
        **{
            "model": {"name": "mlp", "num_classes": 4, "hidden": (64,), "dropout_rate": 0.5},
            "optimizer.learning_rate": 1e-9,
        }
    )
    train_step = steps.make_train_step(setup.model, setup.head, setup.tx)
    batch = batch_of()
    state, m1 = train_step(setup.state, batch)
    _, m2 = train_step(state, batch)
    assert float(m1["loss"]) != float(m2["loss"])  # new dropout mask at the next step


def test_frozen_leaves_get_no_gradient_and_no_optimizer_state():
    setup = make_setup(
        **{
            "model": {"name": "mlp", "num_classes": 4, "hidden": (8,)},
            "partition": [("params/head/.*", {"trainable": True}), (".*", {"trainable": False})],
        }
    )
    assert set(tree.flatten(setup.state.params)) == {"params/head/kernel", "params/head/bias"}
    opt_leaves = jax.tree.leaves(setup.state.opt_state)
    head_size = 8 * 4 + 4
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * head_size  # adam mu + nu, head only
    frozen_before = jax.tree.map(np.array, setup.state.frozen)
    train_step = steps.make_train_step(setup.model, setup.head, setup.tx)
    state = setup.state
    for i in range(5):
        state, _ = train_step(state, batch_of(seed=i))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.frozen), frozen_before)


def test_batchnorm_statistics_update_in_training_and_serve_evaluation():
    spec = {"image": ((8, 8, 1), jnp.float32), "label": ((), jnp.int32)}
    setup = make_setup(
        spec,
        **{"model": {"name": "resnet", "num_classes": 4, "depth": "tiny", "small_inputs": True}},
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(2.0, 1.0, (8, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 4, 8).astype(np.int32),
    }
    before = jax.tree.map(np.array, setup.state.model_state)
    train_step = steps.make_train_step(setup.model, setup.head, setup.tx)
    state, _ = train_step(setup.state, batch)
    after = jax.tree.map(np.asarray, state.model_state)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    ]
    assert all(changed)
    eval_batch = {**batch, "mask": np.ones(8, np.float32)}
    eval_step = steps.make_eval_step(setup.model, setup.head)
    sums_1 = eval_step(state, eval_batch)
    zeroed = state.replace(model_state=jax.tree.map(jnp.zeros_like, state.model_state))
    sums_2 = eval_step(zeroed, eval_batch)
    assert float(sums_1["loss"]) != float(sums_2["loss"])  # eval reads the running stats


def test_wrong_batch_shape_is_a_clear_error():
    setup = make_setup(**{"model": {"name": "mlp", "num_classes": 4, "hidden": ()}})
    train_step = steps.make_train_step(
        setup.model, setup.head, setup.tx, batch_spec=setup.batch_spec
    )
    with pytest.raises(
        ValueError, match=r"batch 'image' \(train_step\) has shape \(8, 5\), expected \[B, 3\]"
    ):
        train_step(setup.state, batch_of(features=5))
