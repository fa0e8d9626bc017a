"""load_variables / load_params (checkpoint.read) and restore_pretrained (finetune.surgery) on
real checkpoints of a tiny model."""

import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.checkpoint.deferred import Deferred
from jaxdl.checkpoint.manager import Checkpointer
from jaxdl.checkpoint.read import load_params, load_variables
from jaxdl.core import tree as tree_lib
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError
from jaxdl.finetune.surgery import format_report, restore_pretrained


class Net(nn.Module):
    """backbone Dense(8) -> BatchNorm -> head Dense(classes); optional extra layer."""

    classes: int = 3
    backbone: str = "backbone"
    extra: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name=self.backbone)(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        if self.extra:
            x = nn.Dense(8, name="extra")(x)
        return nn.Dense(self.classes, name="head")(x)


def init(seed: int = 0, **kw) -> dict:
    return Net(**kw).init(jax.random.PRNGKey(seed), jnp.ones((1, 4)))


def save_run(workdir, variables, *, step=10, trainable=None, save_frozen=True, config=None):
    """Write a checkpoint the way the trainer does: trainable/frozen split, adam state."""
    params = {"params": variables["params"]}
    flat = tree_lib.flatten(params)
    keep = trainable or (lambda path: True)
    train = tree_lib.unflatten({p: v for p, v in flat.items() if keep(p)})
    frozen = tree_lib.unflatten({p: v for p, v in flat.items() if not keep(p)})
    state = TrainState(
        step=jnp.int32(step),
        params=train,
        frozen=frozen,
        model_state={k: v for k, v in variables.items() if k != "params"},
        opt_state=optax.adam(1e-3).init(train),
        rng=jax.random.PRNGKey(0),
    )
    with Checkpointer(workdir, save_frozen=save_frozen) as ckpt:
        ckpt.save(step, state, data_state=None, config=config or {"lora": None})
    return state


def numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_equal_trees(a, b):
    fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=path)


def test_load_params_from_workdir_checkpoints_dir_and_step_dir(tmp_path):
    pretrained = init(seed=1)
    save_run(tmp_path, pretrained, step=10, trainable=lambda p: "head" in p)
    save_run(tmp_path, init(seed=2), step=20)
    variables = load_variables(tmp_path, step=10)
    assert sorted(variables) == ["batch_stats", "params"]
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))
    assert_equal_trees(variables, pretrained)  # trainable head + frozen rest merged
    assert_equal_trees(load_params(tmp_path / "checkpoints" / "10"), pretrained["params"])
    assert_equal_trees(load_params(tmp_path / "checkpoints"), init(seed=2)["params"])
    with pytest.raises(ValueError, match=r"step 11 not found .*available steps: \[10, 20\]"):
        load_params(tmp_path, step=11)


def test_exact_load_reports_every_leaf(tmp_path):
    pretrained = init(seed=1)
    save_run(tmp_path, pretrained)
    variables, report = restore_pretrained({"checkpoint": str(tmp_path)}, init(seed=5))
    assert_equal_trees(variables, pretrained)
    # backbone/head kernel+bias, bn scale+bias, batch_stats mean+var
    assert len(report["loaded"]) == 8
    assert report["step"] == 10 and report["source"] == str(tmp_path / "checkpoints" / "10")
    for key in (
        "renamed",
        "reinitialized",
        "missing",
        "unexpected",
        "shape_mismatch",
        "dtype_cast",
    ):
        assert not report[key], key
    json.dumps(report)


def test_head_size_change_fails_strict_with_both_shapes(tmp_path):
    save_run(tmp_path, init(seed=1, classes=3))
    with pytest.raises(ValueError) as err:
        restore_pretrained({"checkpoint": str(tmp_path), "step": None}, init(classes=5))
    msg = str(err.value)
    assert "\n" not in msg
    assert "params/head/kernel checkpoint (8, 3) vs model (8, 5)" in msg
    assert "params/head/bias checkpoint (3,) vs model (5,)" in msg
    assert "init_from.reinit (e.g. 'params/head/.*')" in msg and "init_from.strict=False" in msg


def test_reinit_head_keeps_fresh_init_and_loads_the_rest(tmp_path):
    pretrained = init(seed=1, classes=3)
    save_run(tmp_path, pretrained)
    fresh = init(seed=7, classes=5)
    variables, report = restore_pretrained(
        {"checkpoint": str(tmp_path), "reinit": ["params/head/.*"]}, fresh
    )
    assert_equal_trees(variables["params"]["head"], fresh["params"]["head"])
    assert_equal_trees(variables["params"]["backbone"], pretrained["params"]["backbone"])
    assert_equal_trees(variables["batch_stats"], pretrained["batch_stats"])
    assert report["reinitialized"] == ["params/head/bias", "params/head/kernel"]
    assert len(report["loaded"]) == 6 and not report["shape_mismatch"]
    table = format_report(report)
    assert "reinitialized       2" in table and "params/head/kernel" in table
    assert "loaded              6" in table


def test_rename_rule_maps_checkpoint_paths(tmp_path):
    pretrained = init(seed=1, backbone="encoder")
    save_run(tmp_path, pretrained)
    init_from = {
        "checkpoint": str(tmp_path),
        "rename": [("params/encoder/(.*)", r"params/backbone/\1")],
    }
    variables, report = restore_pretrained(init_from, init(seed=3))
    assert_equal_trees(variables["params"]["backbone"], pretrained["params"]["encoder"])
    assert report["renamed"] == {
        "params/encoder/bias": "params/backbone/bias",
        "params/encoder/kernel": "params/backbone/kernel",
    }
    assert "params/encoder/kernel -> params/backbone/kernel" in format_report(report)


def test_missing_and_unexpected_are_reported_and_strict_false_loads_the_rest(tmp_path):
    pretrained = init(seed=1, extra=True)  # has params/extra, lacks nothing
    save_run(tmp_path, pretrained)
    fresh = init(seed=4, backbone="trunk")  # no extra; trunk instead of backbone
    with pytest.raises(ValueError) as err:
        restore_pretrained({"checkpoint": str(tmp_path)}, fresh)
    msg = str(err.value)
    assert "2 missing from the checkpoint: params/trunk/bias, params/trunk/kernel" in msg
    assert (
        "4 unexpected (in the checkpoint, not the model): params/backbone/bias, "
        "params/backbone/kernel, params/extra/bias, params/extra/kernel"
    ) in msg
    variables, report = restore_pretrained({"checkpoint": str(tmp_path), "strict": False}, fresh)
    assert report["missing"] == ["params/trunk/bias", "params/trunk/kernel"]
    assert len(report["unexpected"]) == 4
    assert_equal_trees(variables["params"]["trunk"], fresh["params"]["trunk"])
    assert_equal_trees(variables["params"]["head"], pretrained["params"]["head"])
    assert "missing             2" in format_report(report)


def test_dtype_is_cast_to_the_model_and_reported(tmp_path):
    pretrained = init(seed=1)
    save_run(tmp_path, pretrained)
    fresh = init(seed=2)
    fresh["params"]["head"]["kernel"] = fresh["params"]["head"]["kernel"].astype(jnp.bfloat16)
    variables, report = restore_pretrained({"checkpoint": str(tmp_path)}, fresh)
    assert report["dtype_cast"] == [["params/head/kernel", "float32", "bfloat16"]]
    kernel = variables["params"]["head"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        kernel, np.asarray(pretrained["params"]["head"]["kernel"]).astype(jnp.bfloat16)
    )


def test_bad_init_from_values_name_the_key(tmp_path):
    with pytest.raises(UserError, match="init_from.checkpoint: no checkpoint found at"):
        restore_pretrained({"checkpoint": str(tmp_path / "none")}, init())
    save_run(tmp_path, init())
    with pytest.raises(ValueError, match="init_from.reinit: expected a list of regexes"):
        restore_pretrained({"checkpoint": str(tmp_path), "reinit": ["("]}, init())
    with pytest.raises(ValueError, match=r"init_from.step: step 3 not found .*\[10\]"):
        restore_pretrained({"checkpoint": str(tmp_path), "step": 3}, init())


def test_lora_checkpoint_loads_base_and_merges_adapters(tmp_path):
    lora = pytest.importorskip("jaxdl.finetune.lora")
    base = init(seed=1)
    save_run(tmp_path / "base", base, step=5)
    rank, alpha = 2, 4.0
    adapters = lora.init_adapters(
        jax.random.PRNGKey(3),
        {"params": base["params"]},
        rank=rank,
        targets="params/backbone/kernel",
    )
    b = jax.random.normal(jax.random.PRNGKey(4), (rank, 8))
    adapters["params"]["backbone"]["kernel"]["b"] = b  # as if trained
    tuned_head = jax.tree.map(lambda x: x + 1.0, base["params"]["head"])
    state = TrainState(
        step=jnp.int32(3),
        params={"params": {"head": tuned_head}, "lora": adapters},
        frozen={"params": {"backbone": base["params"]["backbone"], "bn": base["params"]["bn"]}},
        model_state={"batch_stats": base["batch_stats"]},
        opt_state=(),
        rng=jax.random.PRNGKey(0),
    )
    config = {
        "init_from": {"checkpoint": str(tmp_path / "base"), "step": -1},
        "lora": {"rank": rank, "alpha": alpha, "targets": "params/backbone/kernel"},
    }
    with Checkpointer(tmp_path / "lora", save_frozen=False) as ckpt:
        ckpt.save(3, state, data_state=None, config=config)
    params = load_params(tmp_path / "lora")
    a = np.asarray(adapters["params"]["backbone"]["kernel"]["a"])
    expected = np.asarray(base["params"]["backbone"]["kernel"]) + alpha / rank * (a @ np.asarray(b))
    np.testing.assert_allclose(params["backbone"]["kernel"], expected, rtol=1e-6)
    assert_equal_trees(params["head"], numpy(tuned_head))
    assert_equal_trees(params["bn"], base["params"]["bn"])
    # A fine-tune of the LoRA run loads the merged weights.
    variables, report = restore_pretrained({"checkpoint": str(tmp_path / "lora")}, init(seed=9))
    np.testing.assert_allclose(variables["params"]["backbone"]["kernel"], expected, rtol=1e-6)
    assert len(report["loaded"]) == 8
    # merging needs the whole base: a deferred restore of adapters loads it as arrays
    lazily, _ = restore_pretrained(
        {"checkpoint": str(tmp_path / "lora")}, init(seed=9), deferred=True
    )
    assert not any(isinstance(v, Deferred) for v in tree_lib.flatten(lazily).values())
    assert_equal_trees(lazily, variables)


def test_deferred_restore_reads_each_leaf_when_made_and_equals_the_eager_one(tmp_path):
    pretrained = init(seed=1)
    save_run(tmp_path / "run", pretrained, trainable=lambda path: "head" in path)
    fresh = init(seed=2)
    fresh["params"]["head"]["kernel"] = fresh["params"]["head"]["kernel"].astype(jnp.bfloat16)
    init_from = {"checkpoint": str(tmp_path / "run")}
    eager, eager_report = restore_pretrained(init_from, fresh)
    lazily, report = restore_pretrained(init_from, fresh, deferred=True)
    assert report == eager_report and report["dtype_cast"]
    flat = tree_lib.flatten(lazily)
    # every leaf (trainable, frozen, batch stats; the cast one too) is read when made
    assert all(isinstance(v, Deferred) for v in flat.values()), flat
    kernel = flat["params/head/kernel"]
    assert (kernel.shape, kernel.dtype) == ((8, 3), np.dtype(jnp.bfloat16))
    assert_equal_trees({p: v.make() for p, v in flat.items()}, eager)
    # made again (each group hands a leaf out once): read again, the same values
    np.testing.assert_array_equal(
        flat["params/backbone/kernel"].make(), eager["params"]["backbone"]["kernel"]
    )

    again, _ = restore_pretrained(init_from, fresh, deferred=True)
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(UserError, match="cannot be read, it is corrupt or incomplete"):
        tree_lib.flatten(again)["params/bn/scale"].make()


def _llama(scan: bool):
    from jaxdl.models import create_model

    model = create_model({"name": "llama", "size": "tiny", "scan_layers": scan})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 7)), jnp.int32)
    init = jax.jit(functools.partial(model.init, train=False))
    return model, tokens, init(jax.random.PRNGKey(0), tokens)


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_checkpoint_restores_into_the_other_layer_layout(tmp_path, saved_scanned, deferred):
    """A per-layer checkpoint (an import's) into a scan_layers model, a scanned run's into an
    unscanned one: the layers are stacked or split, and the logits are the checkpoint's."""
    saved_model, tokens, saved = _llama(saved_scanned)
    model, _, fresh = _llama(not saved_scanned)
    save_run(tmp_path / "run", saved)
    shapes = jax.eval_shape(lambda: fresh)
    variables, report = restore_pretrained(
        {"checkpoint": str(tmp_path / "run")}, shapes, deferred=deferred, stacked=model.STACKED
    )
    if deferred:
        variables = jax.tree.map(lambda v: v.make() if isinstance(v, Deferred) else v, variables)
    scanned_form, layer_form = ["params/layers", "params/layer_{i}"]
    assert report["restacked"] == (
        [[scanned_form, layer_form]] if saved_scanned else [[layer_form, scanned_form]]
    )
    assert not report["missing"] and not report["unexpected"]
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, tokens),
        jax.jit(saved_model.apply)(saved, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    assert "restacked" in format_report(report)


def test_a_per_layer_checkpoint_short_of_a_layer_is_refused_by_name(tmp_path):
    _, _, saved = _llama(False)
    del saved["params"]["layer_1"]  # the scanned model has two layers
    save_run(tmp_path / "run", saved)
    model, _, fresh = _llama(True)
    with pytest.raises(UserError, match=r"missing from the checkpoint: params/layers/") as err:
        restore_pretrained(
            {"checkpoint": str(tmp_path / "run")},
            jax.eval_shape(lambda: fresh),
            stacked=model.STACKED,
        )
    assert "unexpected (in the checkpoint, not the model): params/layer_0/" in str(err.value)
    # without the model's layout the same checkpoint is refused, as before
    with pytest.raises(UserError, match=r"missing from the checkpoint: params/layers/"):
        restore_pretrained({"checkpoint": str(tmp_path / "run")}, jax.eval_shape(lambda: fresh))
