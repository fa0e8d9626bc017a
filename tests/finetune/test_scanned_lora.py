"""LoRA and QLoRA on a Llama whose layers nn.scan stacks (``scan_layers=True``).

A scanned layer's kernels are one ``[L, in, out]`` array; each layer must still get its own
adapter (``A: [L, in, r]``, ``B: [L, r, out]``, as PEFT stores them) and its own
quantization, so the scanned model trains exactly as the same model unscanned would.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.core import adapters, heads, quant, steps
from jaxdl.core import tree as tree_lib
from jaxdl.core.state import TrainState
from jaxdl.finetune import lora, partition
from jaxdl.models import create_model

RANK, ALPHA, LAYERS = 4, 8.0, 2
TARGETS = ".*(q_proj|v_proj|gate_proj|down_proj)/kernel"
TOKENS = jnp.zeros((1, 16), jnp.int32)


def _models():
    fields = {"name": "llama", "size": "tiny"}
    return create_model({**fields, "scan_layers": True}), create_model(fields)


def _unstack(flat_scanned: dict) -> dict:
    """A scanned model's flat params ("params/layers/x": [L, ...]) as the unscanned model's
    ("params/layer_i/x")."""
    out = {}
    for path, leaf in flat_scanned.items():
        if path.startswith("params/layers/"):
            rest = path.removeprefix("params/layers/")
            for i in range(LAYERS):
                out[f"params/layer_{i}/{rest}"] = leaf[i]
        else:
            out[path] = leaf
    return out


def _setup(scanned, kind):
    """(state, lora_cfg) of ``scanned`` with random adapters (B too, so they count)."""
    variables = jax.jit(functools.partial(scanned.init, train=False))(jax.random.PRNGKey(0), TOKENS)
    params = {"params": variables["params"]}
    axes = adapters.layer_axes(lambda v: scanned.apply(v, TOKENS, train=False), params)
    params["lora"] = lora.init_adapters(
        jax.random.PRNGKey(1), params, rank=RANK, targets=TARGETS, layer_axes=axes
    )
    params["lora"] = jax.tree.map(  # nonzero B: the low-rank term shows in the output
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(4), x.shape), params["lora"]
    )
    trainable, frozen = partition.split(
        params, partition.make_plan(params, partition.default_rules(lora=True))
    )
    if kind is not None:
        frozen = quant.quantize_kernels(frozen, kind, layer_axes=axes)
    state = TrainState.create(trainable, optax.sgd(1.0), jax.random.PRNGKey(2), frozen=frozen)
    return state, axes, {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "quantize": kind}


def _as_unscanned(state: TrainState) -> TrainState:
    """The same state laid out for the unscanned model: every stacked leaf split per layer
    (quantized ones too: each layer's slice is that layer's quantization)."""
    params = tree_lib.unflatten(
        {
            f"lora/{k}": v
            for k, v in _unstack(
                {k.removeprefix("lora/"): v for k, v in tree_lib.flatten(state.params).items()}
            ).items()
        }
    )
    frozen = tree_lib.unflatten(_unstack(tree_lib.flatten(state.frozen)))
    return state.replace(params=params, frozen=frozen, opt_state=optax.sgd(1.0).init(params))


def test_layer_axes_names_the_stacked_kernels_only():
    scanned, _ = _models()
    shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), TOKENS, train=False))
    axes = adapters.layer_axes(lambda v: scanned.apply(v, TOKENS, train=False), shapes)
    stacked = {p for p, x in tree_lib.flatten(shapes).items() if p.startswith("params/layers/")}
    assert set(axes) == {p for p in stacked if p.endswith("/kernel")} and axes
    assert set(axes.values()) == {1}


def test_scanned_adapters_are_one_per_layer():
    scanned, _ = _models()
    state, _, _ = _setup(scanned, None)
    flat = tree_lib.flatten(state.params)
    a = flat["lora/params/layers/attn/q_proj/kernel/a"]
    b = flat["lora/params/layers/attn/q_proj/kernel/b"]
    assert a.shape == (LAYERS, 64, RANK) and b.shape == (LAYERS, RANK, 64)
    down_a = flat["lora/params/layers/mlp/down_proj/kernel/a"]
    assert down_a.shape == (LAYERS, 128, RANK)


@pytest.mark.parametrize("kind", [None, "int8", "nf4"])
def test_scanned_step_equals_the_unscanned_model(kind):
    """Loss and adapter gradients of the scanned model's jitted step (factored LoRA, base
    multiplied quantized) equal the unscanned model's with the same weights."""
    scanned, unscanned = _models()
    state, _, lora_cfg = _setup(scanned, kind)
    if kind is not None:  # the stacked layer kernels are stored quantized, not float
        stored = quant.quantized_kernels(state.frozen)
        assert "params/layers/attn/o_proj/kernel" in stored
        assert "params/layers/mlp/up_proj/kernel" in stored
    head = heads.make_head("lm", {}, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 17), 0, 256, jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    tx = optax.sgd(1.0)
    results, quantized_calls, low_rank_calls = [], [], []
    multiply, low_rank = quant._dense_call, adapters.low_rank
    for model, st in ((scanned, state), (unscanned, _as_unscanned(state))):
        with pytest.MonkeyPatch.context() as patch:  # count what the scanned layers ran
            if model is scanned:
                patch.setattr(
                    quant, "_dense_call", lambda *a: (quantized_calls.append(1), multiply(*a))[1]
                )
                patch.setattr(
                    adapters, "low_rank", lambda *a: (low_rank_calls.append(1), low_rank(*a))[1]
                )
            step = steps.make_train_step(model, head, tx, lora_cfg=lora_cfg)
            new, metrics = step(jax.tree.map(jnp.copy, st), batch)
        grads = jax.tree.map(jnp.subtract, st.params, new.params)
        results.append((float(metrics["loss"]), tree_lib.flatten(grads)))
    # the scanned layers ran factored (x W + s (x A) B) over their quantized kernels
    assert low_rank_calls and (kind is None) == (not quantized_calls)
    (loss_s, grads_s), (loss_u, grads_u) = results
    assert loss_s == pytest.approx(loss_u, rel=1e-5)
    grads_s = _unstack({k.removeprefix("lora/"): v for k, v in grads_s.items()})
    grads_u = {k.removeprefix("lora/"): v for k, v in grads_u.items()}
    chex.assert_trees_all_close(grads_s, grads_u, rtol=1e-4, atol=1e-6)


def test_scanned_merge_equals_the_unscanned_merge():
    scanned, unscanned = _models()
    state, _, lora_cfg = _setup(scanned, None)
    merged = tree_lib.flatten({"params": steps.model_params(state.params, state.frozen, lora_cfg)})
    other = _as_unscanned(state)
    want = tree_lib.flatten({"params": steps.model_params(other.params, other.frozen, lora_cfg)})
    chex.assert_trees_all_close(_unstack(merged), want, rtol=1e-6, atol=1e-6)
    # and the merged scanned model computes what the merged unscanned one does
    out_s = jax.jit(scanned.apply)({"params": tree_lib.unflatten(merged)["params"]}, TOKENS)
    out_u = jax.jit(unscanned.apply)({"params": tree_lib.unflatten(want)["params"]}, TOKENS)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_stacked_quantization_is_each_layers_own(kind):
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 48))
    stored = quant.quantize_kernels({"kernel": w}, kind, layer_axes={"kernel": 1})["kernel"]
    for i in range(3):
        alone = quant.quantize_kernels({"kernel": w[i]}, kind)["kernel"]
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], stored), alone)
    np.testing.assert_array_equal(
        quant.dequantize(stored)[1],
        quant.dequantize(quant.quantize_kernels({"kernel": w[1]}, kind)["kernel"]),
    )
