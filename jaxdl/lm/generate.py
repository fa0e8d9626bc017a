"""Autoregressive sampling from a decoder LM (`transformer` or `llama`) with its KV cache.

The prompt is prefilled in one call, right-padded to a power-of-two bucket so that prompts
of nearby lengths share one compilation: the padding's keys are written to cache slots
that no query reaches before the real tokens overwrite them (a query at position p
attends slots <= p), and the cache index is then set back to the real length. Decoding
is one token per step: inside a `jax.lax.while_loop` for `generate` (stopping when every
row has produced an end token), or one jitted step per token for `stream` (chat). Each is
compiled once per (model, batch, bucket, sampling mode). `jaxdl.lm.tokenizer` converts
text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import load_tokenizer
from jaxdl.models import llama
from jaxdl.models.llama import Llama
from jaxdl.models.registry import create_model
from jaxdl.models.transformer import Transformer

DECODERS = (Transformer, Llama)
MIN_BUCKET = 16


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


def bucket(n: int, cap: int) -> int:
    """The power of two >= n (at least MIN_BUCKET), or `cap` when that is smaller."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), cap)


def _decoder(model: nn.Module | Mapping[str, Any]) -> nn.Module:
    if isinstance(model, Mapping):
        model = create_model(model)
    if not isinstance(model, DECODERS):
        raise UserError(
            f"model.name: expected 'transformer' or 'llama' for generation, found "
            f"{type(model).__name__}. Fix: generate from a checkpoint of a decoder language model."
        )
    return model


def decoding_model(
    model: nn.Module | Mapping[str, Any], total: int, params: Mapping[str, Any] | None = None
) -> nn.Module:
    """The model (a module or its config) switched to KV-cache decoding without dropout,
    its cache long enough for `total` tokens; a Llama reads `params` in the layout they
    are in (`decoding_params`'s, or the checkpoint's)."""
    model = _decoder(model)
    if isinstance(model, Llama):  # rope: the cache may be shorter than max_len
        cache_len = bucket(total, model.spec.max_len)
        layout = params is not None and llama.in_inference_layout(params)
        return model.clone(
            decode=True, remat=False, dropout_rate=0.0, cache_len=cache_len, inference_layout=layout
        )
    return model.clone(decode=True, remat=False, dropout_rate=0.0)


def _collection(params: Any) -> Any:
    """The "params" collection, whether given alone or as {"params": ...}."""
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return params["params"]
    return params


def decoding_params(model: nn.Module | Mapping[str, Any], params: Any) -> Any:
    """`params` ("params" collection) in the layout that decodes fastest: a Llama's in
    `jaxdl.models.llama.to_inference_layout`'s (q/k/v and gate/up fused, every kernel
    stored [out, in]); others unchanged. `generate` and `stream` take either layout; converting
    once and dropping the checkpoint's layout keeps one copy of the weights. Host (numpy)
    params are converted on the host and then placed on the device."""
    params = _collection(params)
    if isinstance(_decoder(model), Llama):
        params = llama.to_inference_layout(params)
    return jax.device_put(params)


def cache_len(module: nn.Module) -> int:
    return module.cache_len if isinstance(module, Llama) else module.spec.max_len


def init_cache(module: nn.Module, batch_size: int) -> Any:
    """An empty KV cache (all zeros, index 0) for `module` (decode=True) and a batch size."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(module, batch_size))


@functools.lru_cache(maxsize=32)
def _cache_shapes(module: nn.Module, batch_size: int) -> Any:
    """The cache's shapes, traced once per (module, batch size): tracing a 30-layer init
    costs about as much as the prefill itself."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32))
    return shapes["cache"]


def _check(module: nn.Module, prompt: jax.Array, max_new_tokens: int) -> None:
    if prompt.ndim != 2:
        raise UserError(f"prompt_tokens: expected shape [B, P], found {tuple(prompt.shape)}.")
    length = prompt.shape[1]
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


def _apply(module, params, cache, tokens, **kwargs):
    logits, updates = module.apply(
        {"params": params, "cache": cache}, tokens, mutable=["cache"], **kwargs
    )
    return logits, updates["cache"]


@functools.partial(jax.jit, static_argnames=("module",))
def _prefill(module, params, padded, length):
    """Run the right-padded prompt [B, bucket] from an empty cache; -> (logits of its last
    real token [B, V], the cache with its index at `length`). The empty cache is made
    here, inside the compiled function: made outside, its ~90 zero arrays (SmolLM2's) were
    as many dispatched ops, 15 ms of a 76 ms bf16 prefill."""
    last = jnp.full((padded.shape[0],), length - 1)  # the head runs on this token only
    cache = init_cache(module, padded.shape[0])
    if isinstance(module, Llama):  # attends within the prompt, not over the whole cache
        module = module.clone(prefill=True)
    logits, cache = _apply(module, params, cache, padded, logits_at=last)
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, length) if path[-1].key == "cache_index" else x, cache
    )
    return logits[:, 0], cache


def prefill(module, params, prompt: jax.Array) -> tuple[jax.Array, Any]:
    """The prompt [B, P] through the model; -> (last logits [B, V], the filled cache)."""
    length = prompt.shape[1]
    padded = bucket(length, cache_len(module))
    tokens = jnp.pad(prompt, ((0, 0), (0, padded - length)))
    return _prefill(module, params, tokens, jnp.int32(length))


@functools.partial(
    jax.jit, static_argnames=("module", "max_new_tokens", "top_k", "top_p", "greedy")
)
def _generate(
    module, params, cache, logits, rng, temperature, eos, *, max_new_tokens, top_k, top_p, greedy
):
    """Decode up to max_new_tokens after a prefill; rows that produced an id in `eos` [E]
    repeat it. -> new tokens [B, max_new_tokens]."""
    batch = logits.shape[0]
    sample = functools.partial(
        sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    first = sample(logits, jax.random.fold_in(rng, 0))
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(carry):
        i, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, done = carry
        last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        logits, cache = _apply(module, params, cache, last)
        new = sample(logits[:, -1], jax.random.fold_in(rng, i))
        new = jnp.where(done, last[:, 0], new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
        return i + 1, out, cache, done | jnp.isin(new, eos)

    _, out, _, done = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done))
    # rows cut short by the loop's stop keep their end token to the end
    index = jnp.arange(max_new_tokens)[None, :]
    first_end = jnp.argmax(jnp.isin(out, eos), axis=1)[:, None]
    ended = jnp.any(jnp.isin(out, eos), axis=1)[:, None]
    return jnp.where(ended & (index > first_end), jnp.take_along_axis(out, first_end, 1), out)


def _begin(model, params, prompt, max_new_tokens, temperature, top_k, top_p, greedy):
    """Checks, the decoding module and the prefill: -> (module, params, last logits, cache)."""
    params = _collection(params)
    module = decoding_model(model, prompt.shape[-1] + max_new_tokens, params)
    _check(module, prompt, max_new_tokens)
    if not greedy:
        check_sampling(temperature, top_k, top_p)
    # Host (numpy) params would be copied to the device at every jitted call: a streamed
    # reply's every token (about 0.1 s for SmolLM2's 538 MB here). Arrays already on the
    # device pass through.
    params = jax.device_put(params)
    return (module, params, *prefill(module, params, prompt))


def generate(
    model: nn.Module | Mapping[str, Any],
    params: Any,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_ids: Sequence[int] = (),
) -> jax.Array:
    """Continue each prompt. prompt_tokens: [B, P] int32 -> tokens [B, P + max_new_tokens].

    `model` is a decoder module or its config; `params` its "params" collection. A row that
    samples an id of `eos_ids` stops there (the rest of the row repeats it); decoding ends
    when every row has stopped.
    """
    prompt = jnp.asarray(prompt_tokens, dtype=jnp.int32)
    module, params, logits, cache = _begin(
        model, params, prompt, max_new_tokens, temperature, top_k, top_p, greedy
    )
    new = _generate(
        module,
        params,
        cache,
        logits,
        rng,
        jnp.float32(temperature),
        jnp.asarray(list(eos_ids) or [-1], jnp.int32),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
    )
    return jnp.concatenate([prompt, new], axis=1)


@functools.partial(
    jax.jit, static_argnames=("module", "top_k", "top_p", "greedy"), donate_argnums=(2,)
)
def _step(module, params, cache, last, rng, temperature, *, top_k, top_p, greedy):
    logits, cache = _apply(module, params, cache, last[:, None])
    token = sample_logits(
        logits[:, -1], rng, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    return token, cache


def stream(
    model: nn.Module | Mapping[str, Any],
    params: Any,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield the new token ids of one prompt [P] (or [1, P]) as they are decoded; stops after
    an id of `eos_ids` (not yielded) or max_new_tokens."""
    prompt = jnp.asarray(prompt_tokens, dtype=jnp.int32).reshape(1, -1)
    module, params, logits, cache = _begin(
        model, params, prompt, max_new_tokens, temperature, top_k, top_p, greedy
    )
    token = sample_logits(
        logits,
        jax.random.fold_in(rng, 0),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
    )
    temperature = jnp.float32(temperature)
    for i in range(max_new_tokens):
        value = int(token[0])
        if value in eos_ids:
            return
        yield value
        if i + 1 < max_new_tokens:
            token, cache = _step(
                module,
                params,
                cache,
                token,
                jax.random.fold_in(rng, i + 1),
                temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
            )


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
    if cfg.model.name not in ("transformer", "llama") or cfg.model.get("head") == "classify":
        raise UserError(
            f"--workdir: {workdir} holds a {cfg.model.name!r} classifier; generate needs a "
            "language model (model.name 'transformer' or 'llama'). Fix: pass the workdir of an "
            "LM run."
        )
    if not prompt:
        raise UserError("--prompt: expected at least 1 byte, found 0. Fix: pass a prompt.")
    tokenizer = load_tokenizer(cfg.data.get("tokenizer"))
    params = decoding_params(dict(cfg.model), load_params(workdir))
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
        eos_ids=getattr(tokenizer, "eos_ids", ()),
    )
    row = np.asarray(tokens)[0]
    length = len(row) - max_new_tokens
    new = until_end(row[length:], getattr(tokenizer, "eos_ids", ()))
    return tokenizer.decode(np.concatenate([row[:length], new]))


def until_end(tokens: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """New tokens [N] up to (not including) the first end id."""
    ends = np.flatnonzero(np.isin(tokens, list(eos_ids))) if len(eos_ids) else []
    return tokens[: ends[0]] if len(ends) else tokens
