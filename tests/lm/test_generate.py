"""Generation: cached decoding equals full recomputation; sampling rules; errors; bytes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.lm import generate as gen
from jaxdl.lm import tokenizer as tok
from jaxdl.models import llama as L
from jaxdl.models.llama import Llama
from jaxdl.models.transformer import Transformer

PROMPT = jnp.array([[72, 101, 108, 108, 111], [1, 2, 3, 250, 7]], jnp.int32)


def greedy_by_recomputation(model, params, prompt, steps):
    """Reference: run the model on the whole sequence for every new token.

    The sequence is right-padded to its final length so that one compilation serves every
    step; causality (tested in test_transformer.py) makes the padding invisible.
    """
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    length = prompt.shape[1]
    tokens = jnp.pad(prompt, ((0, 0), (0, steps)))
    for i in range(steps):
        next_token = jnp.argmax(apply(tokens)[:, length + i - 1], axis=-1)
        tokens = tokens.at[:, length + i].set(next_token)
    return tokens


@functools.partial(jax.jit, static_argnums=0)
def lively_params(model):
    """Random params scaled up so greedy decoding wanders instead of repeating one byte."""
    params = model.init(jax.random.key(0), PROMPT)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize(
    "fields",
    [dict(), dict(positions="rope", mlp="swiglu"), dict(scan_layers=True, remat=True)],
    ids=["learned-gelu", "rope-swiglu", "scan"],
)
def test_cached_greedy_equals_recomputation(fields):
    model = Transformer(size="tiny", max_len=32, **fields)
    params = lively_params(model)
    steps = 16
    tokens = gen.generate(
        model, params, PROMPT, max_new_tokens=steps, rng=jax.random.key(1), greedy=True
    )
    assert tokens.shape == (2, 5 + steps) and tokens.dtype == jnp.int32
    expected = greedy_by_recomputation(model, params, PROMPT, steps)
    np.testing.assert_array_equal(tokens, expected)
    assert len(set(np.asarray(tokens[:, 5:]).ravel().tolist())) > 4  # not a constant run


@pytest.mark.parametrize(
    "tied, scan", [(True, False), (False, False), (True, True)], ids=["tied", "untied", "scan"]
)
def test_llama_greedy_equals_recomputation_in_both_layouts(tied, scan):
    """generate and stream on a Llama's checkpoint layout and on `decoding_params`' fused
    one (host or device params in): the same tokens as recomputing the whole sequence."""
    model = Llama(size="tiny", max_len=64, qkv_bias=True, tie_embeddings=tied, scan_layers=scan)
    params = lively_params(model)
    steps = 12
    expected = greedy_by_recomputation(model, params, PROMPT, steps)
    fused = gen.decoding_params(model, jax.tree.map(np.asarray, params))
    assert L.in_inference_layout(fused) and not L.in_inference_layout(params)
    for weights in (params, {"params": params}, fused):
        tokens = gen.generate(
            model, weights, PROMPT, max_new_tokens=steps, rng=jax.random.key(1), greedy=True
        )
        np.testing.assert_array_equal(tokens, expected)
        streamed = gen.stream(
            model, weights, PROMPT[1], max_new_tokens=steps, rng=jax.random.key(1), greedy=True
        )
        assert list(streamed) == np.asarray(expected[1, 5:]).tolist()
    assert len(set(np.asarray(expected[:, 5:]).ravel().tolist())) > 4  # not a constant run


def test_sampling_reproducible_and_compiled_once():
    cfg = {"name": "transformer", "size": "tiny"}
    params = jax.jit(Transformer(size="tiny").init)(jax.random.key(0), PROMPT)
    run = lambda prompt, seed: gen.generate(
        cfg, params, prompt, max_new_tokens=8, rng=jax.random.key(seed), top_k=20, top_p=0.9
    )
    before = gen._prefill._cache_size()
    a, b, c = run(PROMPT, 3), run(PROMPT, 3), run(PROMPT[::-1], 4)
    assert gen._prefill._cache_size() == before + 1  # one bucket, one compilation
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :5], PROMPT)
    assert not np.array_equal(a[::-1, 5:], c[:, 5:])


def test_sample_logits_greedy_top_k_top_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 4000))
    key = jax.random.key(7)
    assert set(np.asarray(gen.sample_logits(logits, key, greedy=True)).tolist()) == {1}
    assert set(np.asarray(gen.sample_logits(logits, key, top_k=1)).tolist()) == {1}
    assert set(np.asarray(gen.sample_logits(logits, key, top_k=2)).tolist()) == {1, 3}
    # top_p=0.75: 0.5 then 0.3 reach it; 0.15 and 0.05 are dropped.
    assert set(np.asarray(gen.sample_logits(logits, key, top_p=0.75)).tolist()) == {1, 3}
    assert set(np.asarray(gen.sample_logits(logits, key, top_p=1e-6)).tolist()) == {1}
    counts = np.bincount(gen.sample_logits(logits, key), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.5, 0.15, 0.3], atol=0.03)
    # temperature 0.5 squares the probabilities before renormalizing
    hot = np.array([0.05, 0.5, 0.15, 0.3]) ** 2
    counts = np.bincount(gen.sample_logits(logits, key, temperature=0.5), minlength=4) / 4000
    np.testing.assert_allclose(counts, hot / hot.sum(), atol=0.03)


def test_errors():
    model = Transformer(size="tiny")
    params = jax.jit(model.init)(jax.random.key(0), PROMPT)["params"]
    with pytest.raises(ValueError, match=r"^prompt: expected at least 1 byte, found 0"):
        gen.generate(
            model, params, jnp.zeros((1, 0), jnp.int32), max_new_tokens=4, rng=jax.random.key(0)
        )
    with pytest.raises(
        ValueError,
        match=r"^--max-new-tokens: .* = 65 exceeds .* max_len 64\. "
        r"Fix: set --max-new-tokens to at most 59",
    ):
        gen.generate(model, params, PROMPT, max_new_tokens=60, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"^--temperature: expected > 0, found 0"):
        gen.generate(model, params, PROMPT, max_new_tokens=4, rng=jax.random.key(0), temperature=0)
    with pytest.raises(ValueError, match=r"^model\.name: expected .transformer. or .llama."):
        gen.generate({"name": "vit"}, params, PROMPT, max_new_tokens=4, rng=jax.random.key(0))


def test_encode_decode_bytes():
    tokens = tok.encode("héllo ✓")
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [104, 195, 169, 108, 108, 111, 32, 226, 156, 147]
    assert tok.decode(tokens) == "héllo ✓"
    assert tok.decode(jnp.array([[104, 105, 0xFF]])) == "hi\ufffd"  # invalid UTF-8 is replaced
    assert tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match=r"^tokens: expected bytes in \[0, 255\]"):
        tok.decode([300])


@pytest.mark.parametrize("name", ["transformer", "llama"])
def test_logits_at_is_the_full_logits_at_those_positions(name):
    from jaxdl.models import create_model

    model = create_model({"name": name, "size": "tiny", "max_len": 32})
    params = lively_params(model)
    apply = jax.jit(model.apply)
    full = apply({"params": params}, PROMPT)
    at = jnp.array([4, 2])
    picked = apply({"params": params}, PROMPT, logits_at=at)
    assert picked.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), at], rtol=1e-6, atol=1e-6)
