"""Autoregressive sampling from a `transformer` model with its KV cache.

`generate` prefills the cache with the whole prompt in one call, then decodes one token per
step inside a `jax.lax.fori_loop`; the whole thing is one jitted function, compiled once per
(model, batch, prompt length, max_new_tokens, sampling mode). `jaxdl.lm.tokenizer` converts
text.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import load_tokenizer
from jaxdl.models.registry import create_model
from jaxdl.models.transformer import Transformer


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Draw one token per row. logits: [B, V] -> tokens [B] int32.

    greedy: argmax. Otherwise logits / temperature, keep the top_k largest, then the smallest
    set of most likely tokens whose probability reaches top_p (the top token always stays),
    and sample from what is left.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:  # 1.0 keeps everything; skip the float round-off
        sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a one-line ValueError for sampling settings that make no sense."""
    if not temperature > 0:
        raise UserError(
            f"--temperature: expected > 0, found {temperature}. Fix: use --greedy for argmax."
        )
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k: expected an integer >= 1, found {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p: expected a value in (0, 1], found {top_p}.")


def decoding_model(model: Transformer | Mapping[str, Any]) -> Transformer:
    """The model (a module or its config) switched to KV-cache decoding, without dropout."""
    if isinstance(model, Mapping):
        model = create_model(model)
    if not isinstance(model, Transformer):
        raise UserError(
            f"model.name: expected 'transformer' for generation, found {type(model).__name__}. "
            "Fix: generate from a checkpoint of a transformer language model."
        )
    return model.clone(decode=True, remat=False, dropout_rate=0.0)


def init_cache(module: Transformer, batch_size: int) -> Any:
    """An empty KV cache (all zeros, index 0) for `module` (decode=True) and a batch size."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def generate(
    model: Transformer | Mapping[str, Any],
    params: Any,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Continue each prompt. prompt_tokens: [B, P] int32 -> tokens [B, P + max_new_tokens].

    `model` is a transformer module or its config; `params` its "params" collection.
    """
    module = decoding_model(model)
    prompt = jnp.asarray(prompt_tokens, dtype=jnp.int32)
    if prompt.ndim != 2:
        raise UserError(f"prompt_tokens: expected shape [B, P], found {tuple(prompt.shape)}.")
    batch, length = prompt.shape
    if length == 0:
        raise UserError("prompt: expected at least 1 byte, found 0. Fix: pass a non-empty prompt.")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected an integer >= 1, found {max_new_tokens}.")
    max_len = module.spec.max_len
    if length + max_new_tokens > max_len:
        raise UserError(
            f"--max-new-tokens: prompt ({length} tokens) + --max-new-tokens ({max_new_tokens}) "
            f"= {length + max_new_tokens} exceeds the model's max_len {max_len}. Fix: set "
            f"--max-new-tokens to at most {max_len - length} or shorten the prompt."
        )
    if not greedy:
        check_sampling(temperature, top_k, top_p)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return _generate(
        module,
        params,
        init_cache(module, batch),
        prompt,
        rng,
        jnp.float32(temperature),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
    )


@functools.partial(
    jax.jit, static_argnames=("module", "max_new_tokens", "top_k", "top_p", "greedy")
)
def _generate(
    module, params, cache, prompt, rng, temperature, *, max_new_tokens, top_k, top_p, greedy
):
    batch, length = prompt.shape
    sample = functools.partial(
        sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    def step(tokens_in, cache):
        logits, updates = module.apply(
            {"params": params, "cache": cache}, tokens_in, mutable=["cache"]
        )
        return logits[:, -1], updates["cache"]

    logits, cache = step(prompt, cache)  # prefill: the whole prompt in one call
    tokens = jnp.zeros((batch, length + max_new_tokens), jnp.int32)
    tokens = tokens.at[:, :length].set(prompt)
    tokens = tokens.at[:, length].set(sample(logits, jax.random.fold_in(rng, 0)))

    def body(i, carry):
        tokens, cache = carry
        last = jax.lax.dynamic_slice_in_dim(tokens, length + i - 1, 1, axis=1)  # [B, 1]
        logits, cache = step(last, cache)
        new = sample(logits, jax.random.fold_in(rng, i))
        return jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], length + i, 1), cache

    tokens, _ = jax.lax.fori_loop(1, max_new_tokens, body, (tokens, cache))
    return tokens


def generate_text(
    workdir: str,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` with the language model trained in ``workdir`` (LoRA merged)."""
    from jaxdl.checkpoint.load import load_run_config
    from jaxdl.checkpoint.read import load_params

    cfg = load_run_config(workdir)
    if cfg.model.name != "transformer":
        raise UserError(
            f"--workdir: {workdir} holds a {cfg.model.name!r} classifier; generate needs a "
            "language model (model.name='transformer'). Fix: pass the workdir of an LM run."
        )
    if not prompt:
        raise UserError("--prompt: expected at least 1 byte, found 0. Fix: pass a prompt.")
    tokenizer = load_tokenizer(cfg.data.get("tokenizer"))
    params = load_params(workdir)
    tokens = generate(
        dict(cfg.model),
        params,
        tokenizer.encode(prompt)[None, :],
        max_new_tokens=max_new_tokens,
        rng=jax.random.PRNGKey(seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
    )
    return tokenizer.decode(np.asarray(tokens)[0])
