"""jaxdl.testing: every helper passes on a good case and FAILS on a bad one.

States come from `jaxdl.training.build` of a tiny digits MLP with its first layer frozen, stepped
by the real train step; the bad cases are that state with one thing wrong.
"""

from concurrent.futures import ThreadPoolExecutor

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl import config as config_lib
from jaxdl import testing
from jaxdl.core import steps
from jaxdl.core import tree as tree_lib
from jaxdl.finetune import lora
from jaxdl.models import create_model
from jaxdl.training.build import build

SPEC = {"image": ((8, 8, 1), np.dtype(np.float32)), "label": ((), np.dtype(np.int32))}
FROZEN_FIRST = [("params/hidden_0/.*", {"trainable": False}), (".*", {})]


@pytest.fixture(scope="module")
def stepped():
    """(state before, state after one train step), both copied to the host."""
    cfg = config_lib.load_config(
        "experiments/digits_mlp.py",
        ["--config.model.hidden=(16, 8)", "--config.num_epochs=0", "--config.num_steps=1"],
    )
    cfg.partition = FROZEN_FIRST
    setup = build(cfg, kind="classification", example_spec=SPEC, num_classes=10, total_steps=1)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((4, 8, 8, 1), np.float32)),
        "label": jnp.asarray([0, 1, 2, 3], jnp.int32),
    }
    before = jax.device_get(setup.state)  # the step donates its input state
    train_step = steps.make_train_step(setup.model, setup.head, setup.tx)
    after, _ = train_step(setup.state, batch)
    return before, jax.device_get(after), setup


def test_frozen_unchanged_passes_after_a_real_step(stepped):
    before, after, _ = stepped
    assert tree_lib.flatten(before.frozen).keys() == {
        "params/hidden_0/kernel",
        "params/hidden_0/bias",
    }
    testing.assert_frozen_unchanged(before, after)
    # ... while the trainable leaves did move, so the step really ran.
    assert not np.array_equal(
        before.params["params"]["head"]["kernel"], after.params["params"]["head"]["kernel"]
    )


def test_frozen_unchanged_fails_on_a_one_ulp_change(stepped):
    before, after, _ = stepped
    frozen = tree_lib.flatten(after.frozen)
    kernel = frozen["params/hidden_0/kernel"].copy()
    kernel[0, 0] = np.nextafter(kernel[0, 0], np.float32(np.inf))
    bad = after.replace(frozen=tree_lib.unflatten({**frozen, "params/hidden_0/kernel": kernel}))
    with pytest.raises(AssertionError):
        testing.assert_frozen_unchanged(before, bad)


def test_no_opt_state_for_frozen_passes_on_a_built_state(stepped):
    _, after, _ = stepped
    testing.assert_no_opt_state_for_frozen(after)


def test_no_opt_state_for_frozen_fails_when_the_optimizer_covers_everything(stepped):
    _, after, _ = stepped
    everything = tree_lib.merge(after.params, after.frozen)
    bad = after.replace(opt_state=optax.adam(1e-3).init(everything))
    with pytest.raises(AssertionError, match="frozen leaves"):
        testing.assert_no_opt_state_for_frozen(bad)


def _trained_adapters(params_tree):
    """Adapters with B != 0, as after some training (B = 0 would make merge a no-op)."""
    adapters = lora.init_adapters(
        jax.random.PRNGKey(0), params_tree, rank=2, targets="params/.*/kernel"
    )
    return jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), adapters)


def test_lora_merge_equivalent_passes_and_catches_a_wrong_scale(stepped, monkeypatch):
    before, _, _ = stepped
    model = create_model({"name": "mlp", "num_classes": 10, "hidden": (16, 8)})
    params_tree = {"params": tree_lib.merge(before.params, before.frozen)["params"]}
    adapters = _trained_adapters(params_tree)
    x = jnp.asarray(np.random.default_rng(1).random((3, 8, 8, 1), np.float32))
    testing.assert_lora_merge_equivalent(model, params_tree, adapters, x, rank=2, alpha=4.0)

    apply = lora.apply  # a merge that forgets alpha / rank, the classic export bug
    monkeypatch.setattr(lora, "merge", lambda p, a, rank, alpha: apply(p, a, rank=rank, alpha=rank))
    with pytest.raises(AssertionError):
        testing.assert_lora_merge_equivalent(model, params_tree, adapters, x, rank=2, alpha=4.0)


def test_no_retrace_passes_for_one_shape_and_fails_for_a_second():
    chex.clear_trace_counter()

    def double(x):
        return 2 * x

    fn = jax.jit(testing.assert_no_retrace(double))
    fn(jnp.ones(3))
    fn(jnp.zeros(3))  # same shape and dtype: served from the cache
    with pytest.raises(AssertionError, match="traced > 1 times"):
        fn(jnp.ones(4))


QUICK_MLP = ["--config.model.hidden=(16,)", "--config.data.batch_size=16"]


def test_resume_exact_passes_on_a_real_run_and_fails_when_the_schedule_changes(tmp_path):
    """Good: 3 steps, a new process, 3 more == 6 straight. Bad: with a cosine schedule over
    the run's num_steps, "3 steps, then extend to 6" follows another learning rate than 6
    straight steps, so the resumed run is not exact and the helper must say so."""

    def check(name, overrides):
        testing.assert_resume_exact(
            "experiments/digits_mlp.py", tmp_path / name, steps=3, overrides=overrides
        )

    with ThreadPoolExecutor(2) as pool:  # the two checks' subprocesses share the 2 cores
        good = pool.submit(check, "constant", QUICK_MLP)
        bad = pool.submit(check, "cosine", [*QUICK_MLP, "--config.optimizer.schedule=cosine"])
    good.result()
    with pytest.raises(AssertionError, match="losses differ"):
        bad.result()
