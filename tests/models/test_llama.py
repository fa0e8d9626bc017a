"""The Llama-family decoder: parameter counts, grouped-query attention against repeated K/V,
rope scaling, KV-cache decoding, scanned layers, packed rows, sliding window, the inference
layout, errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.core import tree
from jaxdl.errors import UserError
from jaxdl.models import create_model
from jaxdl.models import llama as L

X = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
FULL = dict(name="llama", size="tiny", qkv_bias=True, o_bias=True, qk_norm=True)


def init(cfg, x=X):
    model = create_model(cfg)
    return model, jax.jit(model.init)(jax.random.key(0), x)


def jitted(module, **static):
    """module.apply compiled as one program (run eagerly, every op would compile on its own,
    in every process)."""
    return jax.jit(functools.partial(module.apply, **static))


def empty_cache(decoder):
    return jax.jit(decoder.init)(jax.random.key(0), X[:, :1])["cache"]


def decode_in_chunks(decoder, variables):
    """Logits of X decoded as a 5-token chunk, then one token at a time."""
    step, cache, outs = jitted(decoder, mutable=["cache"]), empty_cache(decoder), []
    for chunk in (X[:, :5], *[X[:, t : t + 1] for t in range(5, 12)]):
        logits, updates = step({**variables, "cache": cache}, chunk)
        cache = updates["cache"]
        outs.append(logits)
    return jnp.concatenate(outs, 1)


def n_params(variables):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


@pytest.mark.parametrize(
    "fields",
    [dict(), dict(tie_embeddings=False), dict(qkv_bias=True, qk_norm=True, head_dim=8)],
    ids=["tied", "untied", "bias-qknorm-headdim"],
)
def test_param_count_matches_formula(fields):
    cfg = dict(name="llama", size="tiny", **fields)
    _, variables = init(cfg)
    assert n_params(variables) == L.count_params(L.llama_spec(cfg))


def test_presets_have_their_published_sizes():
    shapes = lambda cfg: jax.eval_shape(
        create_model(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    )
    # SmolLM2-135M: 134,515,008 parameters (its model card's figure)
    assert n_params(shapes({"name": "llama", "size": "smollm2-135m"})) == 134_515_008
    assert L.count_params(L.llama_spec({"name": "llama", "size": "llama3-8b"})) == 8_030_261_248
    assert L.count_params(L.llama_spec({"name": "llama", "size": "llama3-1b"})) == 1_235_814_400


def test_grouped_attention_equals_repeated_kv_heads():
    """GQA as grouped einsums = ordinary multi-head attention on K/V repeated per group."""
    q = jax.random.normal(jax.random.key(0), (2, 7, 6, 8))
    k = jax.random.normal(jax.random.key(1), (2, 7, 2, 8))
    v = jax.random.normal(jax.random.key(2), (2, 7, 2, 8))
    index = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = L.attention_mask(index, index, None)
    got = jax.jit(L.grouped_attention)(q, k, v, mask)
    k_rep, v_rep = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
    reference = functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation="xla"
    )
    ref = jax.jit(reference)(q, k_rep, v_rep)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_rope_frequencies():
    base = L.resolve_spec("tiny", dict(head_dim=8, rope_base=10000.0))
    np.testing.assert_allclose(L.rope_frequencies(base), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    linear = L.resolve_spec("tiny", dict(head_dim=8, rope_scaling="linear", rope_factor=4.0))
    np.testing.assert_allclose(L.rope_frequencies(linear), [0.25, 0.025, 0.0025, 0.00025], 1e-6)
    # llama3: wavelengths 2*pi/f = 6.3, 63, 628, 6283 against old_len 64 / high 4 = 16 and
    # old_len / low 1 = 64: short ones stay, long ones / factor, the middle one smoothed
    spec = L.resolve_spec(
        "tiny",
        dict(head_dim=8, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64),
    )
    smooth = (64 / (2 * math.pi / 0.1) - 1.0) / (4.0 - 1.0)
    expected = [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]
    np.testing.assert_allclose(L.rope_frequencies(spec), expected, rtol=1e-5)


def test_cached_decoding_equals_full_sequence():
    model, variables = init(FULL)
    full = jitted(model)(variables, X)
    decoded = decode_in_chunks(model.clone(decode=True, cache_len=16), variables)
    np.testing.assert_allclose(decoded, full, atol=2e-5)


def test_a_decoding_call_with_explicit_positions_advances_the_cache_index():
    """A chunk decoded with its positions given, then steps without: the steps start where
    the chunk ended (the model's cache index advances either way)."""
    model, variables = init(FULL)
    decoder = model.clone(decode=True, cache_len=16)
    decode = jitted(decoder, mutable=["cache"])
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    first, updates = decode(
        {**variables, "cache": empty_cache(decoder)}, X[:, :5], positions=positions
    )
    assert int(updates["cache"]["cache_index"]) == 5
    step, _ = decode({**variables, **updates}, X[:, 5:6])
    full = jitted(model)(variables, X[:, :6])
    np.testing.assert_allclose(jnp.concatenate([first, step], 1), full, atol=2e-5)


@pytest.mark.parametrize("impl", [None, "xla"])  # the CPU einsum; dot_product_attention
def test_prefill_from_an_empty_cache_equals_appending_to_it(impl):
    """prefill=True (generate's prefill) attends within the call and starts at position 0;
    the cache it leaves, and the tokens decoded after it, are those of the general path."""
    model, variables = init(FULL)
    decoder = model.clone(decode=True, cache_len=16, attention_impl=impl)
    empty, decode, run = empty_cache(decoder), jitted(decoder, mutable=["cache"]), {}
    for prefill in (False, True):
        first = jitted(decoder.clone(prefill=prefill), mutable=["cache"])
        logits, updates = first({**variables, "cache": empty}, X[:, :5])
        step, _ = decode({**variables, **updates}, X[:, 5:6])
        run[prefill] = (logits, updates["cache"], step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), run[False], run[True])
    assert int(run[True][1]["cache_index"]) == 5
    np.testing.assert_allclose(run[True][0], jitted(model)(variables, X[:, :5]), atol=2e-5)


def test_rope_of_a_call_from_position_0_is_a_host_table():
    """Positions known when traced give constant cos/sin: XLA evaluated the in-graph ones
    inside every layer's q and k rotation, once per element of each head."""
    spec = L.resolve_spec("tiny", {})
    table = L.rope_table(spec, 12)
    traced = L.rope_angles(spec, jnp.arange(12)[None])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), table, traced)
    model, variables = init(FULL)
    hlo = jax.jit(model.apply).lower(variables, X).compile().as_text()
    assert "cosine(" not in hlo and "sine(" not in hlo


def test_scanned_layers_equal_unrolled():
    model, variables = init(FULL)
    scanned = model.clone(scan_layers=True, remat=True)
    params = dict(variables["params"])
    layers = [params.pop(f"layer_{i}") for i in range(2)]
    params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(scanned.init, jax.random.key(0), X)["params"]
    )
    np.testing.assert_allclose(
        jitted(scanned)({"params": params}, X), jitted(model)(variables, X), atol=2e-5
    )


def test_packed_row_equals_separate_examples():
    model, variables = init(FULL)
    a, b = X[0, :5], X[0, 5:12]
    row = jnp.concatenate([a, b])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    apply = jitted(model)
    packed = apply(variables, row, positions=positions, segment_ids=segments)
    separate = jnp.concatenate([apply(variables, t[None]) for t in (a, b)], axis=1)
    np.testing.assert_allclose(packed, separate, atol=2e-5)


def test_sliding_window_limits_attention():
    """With window w the logits at t depend on tokens t-w+1..t only."""
    model, variables = init(dict(FULL, sliding_window=3))
    changed = X.at[:, 0].set((X[:, 0] + 1) % 256)
    one_layer = model.clone(num_layers=1)
    params = {k: v for k, v in variables["params"].items() if k != "layer_1"}
    apply = jitted(one_layer)
    before = apply({"params": params}, X)
    after = apply({"params": params}, changed)
    np.testing.assert_allclose(before[:, 3:], after[:, 3:], atol=1e-6)  # token 0 out of reach
    assert np.abs(before[:, 1:3] - after[:, 1:3]).max() > 1e-4


@pytest.mark.parametrize(
    "fields",
    [FULL, dict(FULL, tie_embeddings=False), dict(FULL, scan_layers=True)],
    ids=["tied", "untied", "scanned"],
)
def test_inference_layout_is_the_same_function(fields):
    """to_inference_layout: q/k/v and gate/up fused, every kernel transposed; the tree a
    module with inference_layout=True inits, and its logits, cached ones included."""
    model, variables = init(fields)
    fused_model = model.clone(inference_layout=True)
    host = jax.tree.map(np.asarray, variables["params"])
    want = jitted(model)(variables, X)
    expected = jax.eval_shape(fused_model.init, jax.random.key(0), X)["params"]
    apply_fused = jitted(fused_model)
    for params in (variables["params"], host):
        fused = L.to_inference_layout(params)
        assert L.in_inference_layout(fused) and not L.in_inference_layout(params)
        assert jax.tree.map(np.shape, fused) == jax.tree.map(np.shape, expected)
        assert L.to_inference_layout(fused).keys() == fused.keys()  # idempotent
        np.testing.assert_allclose(apply_fused({"params": fused}, X), want, atol=1e-6)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(L.to_inference_layout(host)))
    assert ("lm_head" in fused) != fields.get("tie_embeddings", True)
    assert not any(p.endswith("/kernel") for p in tree.flatten(fused))  # all transposed
    decoded = decode_in_chunks(fused_model.clone(decode=True, cache_len=16), {"params": fused})
    np.testing.assert_allclose(decoded, want, atol=2e-5)


def test_bfloat16_compute_keeps_float32_params():
    model, variables = init(dict(FULL, dtype="bfloat16"))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    logits = jitted(model)(variables, X)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_layer_names_are_huggingface_names():
    _, variables = init(dict(FULL, tie_embeddings=False))
    paths = set(tree.flatten(variables))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"params/layer_0/attn/{name}/kernel" in paths
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"params/layer_1/mlp/{name}/kernel" in paths
    assert {"params/lm_head/kernel", "params/norm/scale", "params/embed/embedding"} <= paths


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_kv_heads=3), r"^model\.num_kv_heads: expected a divisor of num_heads=4"),
        (dict(rope_scaling="yarn"), r"^model\.rope_scaling: expected one of"),
        (dict(head_dim=7), r"^model\.head_dim: rotary positions need an even"),
        (dict(size="huge"), r"^model\.size: expected one of"),
    ],
)
def test_bad_fields_are_one_line_errors(fields, message):
    with pytest.raises(UserError, match=message):
        init(dict(name="llama", size="tiny") | fields)
