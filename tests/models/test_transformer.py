"""The GPT-style decoder: parameter counts, causality, KV cache, variants, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.core.tree import flatten, num_params
from jaxdl.models import create_model
from jaxdl.models.transformer import (
    SIZES,
    Transformer,
    apply_rope,
    count_params,
    einsum_attention,
    flops_per_token,
    transformer_spec,
)

TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 256, dtype=jnp.int32)


def init(model, x=TOKENS, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), x)["params"]


def apply(model, params, x=TOKENS, **kwargs):
    """model's logits, compiled as one program (eagerly, every op compiles on its own)."""
    return jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, x)


def test_tiny_parameter_count_by_hand():
    d, hidden, vocab, max_len, layers = 32, 4 * 32, 256, 64, 2
    per_block = (
        2 * (2 * d)  # ln1, ln2: scale + bias
        + 4 * (d * d + d)  # query, key, value, out
        + (d * hidden + hidden)
        + (hidden * d + d)  # fc1, fc2
    )
    expected = vocab * d + max_len * d + layers * per_block + 2 * d  # + ln_f
    assert expected == 35_712
    model = create_model({"name": "transformer", "size": "tiny"})
    shapes = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
    assert num_params(shapes["params"]) == expected


def test_gpt2_124m_parameter_count():
    model = Transformer(size="gpt2-124m")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert num_params(shapes["params"]) == 124_439_808
    assert shapes["params"]["embed"]["embedding"].shape == (50257, 768)


@pytest.mark.parametrize(
    "fields",
    [
        dict(size="small"),
        dict(size="tiny", positions="rope", mlp="swiglu"),
        dict(size="tiny", num_layers=3, embed_dim=48, num_heads=4, mlp_ratio=2, vocab_size=100),
    ],
)
def test_count_formula_matches_tree(fields):
    model = Transformer(**fields)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert num_params(shapes["params"]) == count_params(model.spec)


def test_named_size_counts():
    assert count_params(transformer_spec({"name": "transformer", "size": "small"})) == 842_496
    assert count_params(Transformer(size="1b").spec) == 1_213_321_216
    assert count_params(Transformer(size="1b", vocab_size=50257).spec) == 1_315_723_264


def test_flops_per_token_gpt2():
    # N without the position table: 124,439,808 - 1024 * 768 = 123,653,376.
    # 6 N + 12 L T d = 741,920,256 + 12 * 12 * 1024 * 768 = 855,166,464.
    assert flops_per_token({"name": "transformer", "size": "gpt2-124m"}) == 855_166_464.0
    assert flops_per_token(Transformer(size="tiny"), seq_len=32) == 6 * 33_664 + 12 * 2 * 32 * 32


def test_lora_visible_layer_names():
    paths = flatten(init(Transformer(size="tiny", mlp="swiglu")))
    for name in ["query", "key", "value", "out"]:
        assert paths[f"block_1/attn/{name}/kernel"].shape == (32, 32)
    assert paths["block_0/mlp/fc1/kernel"].shape == (32, 128)
    assert paths["block_0/mlp/gate/kernel"].shape == (32, 128)
    assert paths["block_0/mlp/fc2/kernel"].shape == (128, 32)
    assert "ln_f/scale" in paths and "pos_embed" in paths


def test_unknown_size_and_choices():
    with pytest.raises(ValueError, match=r"model\.size: .*'gpt2-124m'.*'tiny'.*found 'huge'"):
        init(Transformer(size="huge"))
    with pytest.raises(ValueError, match=r"model\.mlp: expected one of \['gelu', 'swiglu'\]"):
        init(Transformer(size="tiny", mlp="relu"))
    with pytest.raises(ValueError, match=r"model\.num_heads: expected a divisor"):
        init(Transformer(size="tiny", num_heads=3))
    with pytest.raises(ValueError, match=r"model\.max_len=64 tokens, found 65"):
        init(Transformer(size="tiny"), jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causal(positions):
    model = Transformer(size="tiny", positions=positions)
    params = init(model)
    t = 7
    changed = TOKENS.at[:, t].set((TOKENS[:, t] + 1) % 256)
    a, b = apply(model, params), apply(model, params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.all(np.abs(a[:, t:] - b[:, t:]).max(axis=-1) > 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masking", ["causal", "mask", "none"])
def test_einsum_attention_matches_dot_product_attention(dtype, masking):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, 3, 8), dtype) for i in range(3))
    mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 1, 7, 7)).at[..., 0].set(True)
    kwargs = {"causal": {"is_causal": True}, "mask": {"mask": mask}, "none": {}}[masking]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, **kwargs).astype(jnp.float32) ** 2)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)

    ours, ref = value_and_grads(einsum_attention), value_and_grads(jax.nn.dot_product_attention)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


def test_attention_impls_give_the_same_model():
    logits = {}
    for impl in ("einsum", "xla", None):
        model = create_model({"name": "transformer", "size": "tiny", "attention_impl": impl})
        logits[impl] = apply(model, init(model))
    np.testing.assert_allclose(logits["einsum"], logits["xla"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[None], logits["einsum"])  # the CPU default


def test_kv_cache_matches_full_forward():
    model = Transformer(size="tiny", positions="rope", mlp="swiglu")
    params = init(model)
    full = apply(model, params)

    decoder = model.clone(decode=True)
    cache = jax.jit(decoder.init)(jax.random.key(0), TOKENS[:, :1])["cache"]
    assert cache["block_0"]["attn"]["cached_key"].shape == (2, 64, 2, 16)
    step = jax.jit(
        lambda cache, chunk: decoder.apply(
            {"params": params, "cache": cache}, chunk, mutable=["cache"]
        )
    )
    pieces = []
    for chunk in [TOKENS[:, :5], TOKENS[:, 5:6], TOKENS[:, 6:9], TOKENS[:, 9:10], TOKENS[:, 10:]]:
        logits, state = step(cache, chunk)
        cache = state["cache"]
        pieces.append(logits)
    assert int(cache["cache_index"]) == 12
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)


def test_bf16_keeps_float32_params():
    model = Transformer(size="tiny", dtype="bfloat16")
    params = init(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = apply(model, params)
    assert logits.dtype == jnp.float32
    reference = apply(Transformer(size="tiny"), params)
    assert float(jnp.abs(logits - reference).max()) < 0.05  # bf16 rounding, same function
    assert float(jnp.abs(logits - reference).max()) > 0  # but really computed in bf16


def test_rope_and_swiglu_variants_differ():
    outputs = {}
    for positions, mlp in [("learned", "gelu"), ("rope", "gelu"), ("learned", "swiglu")]:
        model = Transformer(size="tiny", positions=positions, mlp=mlp)
        outputs[positions, mlp] = apply(model, init(model))
        assert outputs[positions, mlp].shape == (2, 12, 256)
    base = outputs["learned", "gelu"]
    assert float(jnp.abs(outputs["rope", "gelu"] - base).max()) > 1e-3
    assert float(jnp.abs(outputs["learned", "swiglu"] - base).max()) > 1e-3


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(2), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(3), (1, 1, 1, 8))

    def score(m, n):
        return jnp.vdot(apply_rope(q, jnp.array([m])), apply_rope(k, jnp.array([n])))

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    assert abs(float(score(5, 2) - score(5, 4))) > 1e-4
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, jnp.array([9]))), jnp.linalg.norm(q), rtol=1e-6
    )


def test_scan_layers_equals_unrolled_blocks():
    unrolled = Transformer(size="tiny")
    params = init(unrolled)
    blocks = [params[f"block_{i}"] for i in range(SIZES["tiny"]["num_layers"])]
    stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    scanned = Transformer(size="tiny", scan_layers=True)
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), TOKENS)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
    np.testing.assert_allclose(apply(scanned, stacked), apply(unrolled, params), atol=1e-5)


def test_remat_same_loss_and_grads():
    plain = Transformer(size="tiny")
    params = init(plain)

    def loss(model, p):
        return model.apply({"params": p}, TOKENS).mean()

    remat = Transformer(size="tiny", remat=True)
    g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for path, value in flatten(g_plain).items():
        np.testing.assert_allclose(flatten(g_remat)[path], value, atol=1e-6, err_msg=path)


def test_dropout_only_in_training():
    model = Transformer(size="tiny", dropout_rate=0.5)
    params = init(model)
    eval_a = apply(model, params)
    np.testing.assert_array_equal(eval_a, apply(model, params))
    train = apply(model, params, train=True, rngs={"dropout": jax.random.key(4)})
    assert float(jnp.abs(train - eval_a).max()) > 1e-3
