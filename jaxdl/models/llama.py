"""Llama-family decoder: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2, TinyLlama.

    tokens [B, T] int32 -> logits [B, T, vocab_size] float32

Pre-RMSNorm blocks ``x + attn(attn_norm(x))``, ``x + mlp(mlp_norm(x))``; rotary positions
(rope base and ``linear`` / ``llama3`` scaling); grouped-query attention (``num_kv_heads``
divides ``num_heads``; keys and values are never repeated: the queries are grouped
instead); a SwiGLU MLP ``down(silu(gate x) * up x)``; optional q/k/v biases (Qwen2) and
per-head q/k RMSNorms (Qwen3); the output projection tied to the embedding or its own
``lm_head``. Layer names follow Hugging Face's (``q_proj``, ``gate_proj``, ...) so LoRA
targets and PEFT adapters read the same: ``params/layer_3/attn/q_proj/kernel``. With
``scan_layers=True`` the layers are stacked under ``params/layers/...`` (leading layer
axis, one compiled layer).

``segment_ids`` [B, T] (packed rows: several examples per row) keep attention inside each
example; ``positions`` [B, T] restart per example. ``decode=True`` keeps a KV cache
("cache" collection) of ``cache_len`` slots; each call appends its tokens. ``prefill=True``
(with ``decode``) says the cache passed in is empty: the call's tokens start at position
0 and attend to each other only, as an ordinary forward pass does.

`LlamaSpec` is the resolved architecture; `PRESETS` names a few (``size``), and every
field set on the module overrides its preset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError
from jaxdl.models import matmul
from jaxdl.models.matmul import (
    dense_dot_general,
    embedding_lookup,
    head_dot_general,
    tied_logits,
)
from jaxdl.models.registry import register

INIT_STD = 0.02  # Hugging Face's initializer_range for these families

PRESETS: dict[str, dict[str, Any]] = {
    # for tests and smoke runs: every feature on a few thousand parameters
    "tiny": dict(
        vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
        max_len=512,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, num_layers=30, embed_dim=576, num_heads=9, num_kv_heads=3,
        mlp_dim=1536, max_len=8192, rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
    "llama3-1b": dict(  # Llama 3.2 1B's shape
        vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
        mlp_dim=8192, max_len=131072, rope_base=500000.0, rope_scaling="llama3",
        rope_factor=32.0, norm_eps=1e-5, tie_embeddings=True,
    ),
    "llama3-8b": dict(  # Llama 3.1 8B's shape
        vocab_size=128256, num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=8,
        mlp_dim=14336, max_len=131072, rope_base=500000.0, rope_scaling="llama3",
        rope_factor=8.0, norm_eps=1e-5, tie_embeddings=False,
    ),
}  # fmt: skip
ROPE_SCALINGS = (None, "linear", "llama3")
ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")
ARCH_FIELDS = (
    "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
    "max_len", "rope_base", "rope_scaling", "rope_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_len", "norm_eps", "tie_embeddings", "qkv_bias",
    "o_bias", "qk_norm", "sliding_window",
)  # fmt: skip
DEFAULTS = dict(
    rope_base=10000.0,
    rope_scaling=None,
    rope_factor=1.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
    norm_eps=1e-5,
    tie_embeddings=True,
    qkv_bias=False,
    o_bias=False,
    qk_norm=False,
    sliding_window=None,
)


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The resolved architecture (preset + overrides, checked)."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    rope_base: float
    rope_scaling: str | None
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_len: int
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None


def resolve_spec(size: str | None, overrides: Mapping[str, Any]) -> LlamaSpec:
    """`PRESETS[size]` (or nothing) with the non-None `overrides` on top, checked."""
    if size is not None and size not in PRESETS:
        raise UserError(
            f"model.size: expected one of {sorted(PRESETS)} or None, found {size!r}. "
            "Fix: pick a preset, or leave size unset and give every field."
        )
    fields = {**DEFAULTS, **PRESETS.get(size, {})}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_len"):
        if fields.get(name) is None:
            raise UserError(
                f"model.{name}: the llama model needs it, found nothing. Fix: set "
                f"--config.model.{name}=N or pick a preset with --config.model.size."
            )
    fields.setdefault("num_kv_heads", fields["num_heads"])
    if fields["num_heads"] % fields["num_kv_heads"]:
        raise UserError(
            f"model.num_kv_heads: expected a divisor of num_heads={fields['num_heads']}, found "
            f"{fields['num_kv_heads']}. Fix: change num_kv_heads."
        )
    if fields.get("head_dim") is None:
        if fields["embed_dim"] % fields["num_heads"]:
            raise UserError(
                f"model.num_heads: expected a divisor of embed_dim={fields['embed_dim']}, found "
                f"{fields['num_heads']}. Fix: change num_heads, or set head_dim."
            )
        fields["head_dim"] = fields["embed_dim"] // fields["num_heads"]
    if fields["head_dim"] % 2:
        raise UserError(
            f"model.head_dim: rotary positions need an even head dimension, found "
            f"{fields['head_dim']}. Fix: change num_heads or head_dim."
        )
    if fields["rope_scaling"] not in ROPE_SCALINGS:
        raise UserError(
            f"model.rope_scaling: expected one of {list(ROPE_SCALINGS)}, found "
            f"{fields['rope_scaling']!r}. Fix: use 'linear', 'llama3' or None."
        )
    return LlamaSpec(**{k: fields[k] for k in ARCH_FIELDS})


def rope_frequencies(spec: LlamaSpec) -> np.ndarray:
    """inv_freq [head_dim / 2] float32, as Hugging Face's rope initializers compute it."""
    dim = spec.head_dim
    inv_freq = 1.0 / (
        np.float32(spec.rope_base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    )
    if spec.rope_scaling == "linear":
        return (inv_freq / np.float32(spec.rope_factor)).astype(np.float32)
    if spec.rope_scaling == "llama3":
        factor, low, high = spec.rope_factor, spec.rope_low_freq_factor, spec.rope_high_freq_factor
        old_len = spec.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq.astype(np.float32)


def rope_angles(spec: LlamaSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, Dh/2] float32 of positions [B, T], computed once per call of the
    model and shared by its layers, as Hugging Face's position_embeddings are."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(spec))
    return jnp.cos(angles), jnp.sin(angles)


def rope_table(spec: LlamaSpec, length: int) -> tuple[jax.Array, jax.Array]:
    """`rope_angles` of positions 0..length-1 ([1, T, Dh/2]), computed on the host: the
    positions of a call that starts at 0 are known when it is traced. As constants the
    layers read them; computed in the graph, XLA fuses the cos and sin into each layer's
    q and k rotation and evaluates them once per element of every head there
    (benchmarks/README.md)."""
    angles = np.arange(length, dtype=np.float32)[None, :, None] * rope_frequencies(spec)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half rotary embedding. x: [B, T, H, Dh], rope: `rope_angles` -> [B, T, H, Dh]."""
    cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(
    q_index: jax.Array, k_index: jax.Array, window: int | None, segments=None
) -> jax.Array:
    """[B, 1, 1, T, S] bool: causal over row indices, inside the sliding window, same segment.

    q_index [B, T], k_index [B, S]: each token's index in its row (or cache slot).
    segments: (q_segment_ids [B, T], k_segment_ids [B, S]) or None.
    """
    mask = k_index[:, None, :] <= q_index[:, :, None]
    if window is not None:
        mask &= q_index[:, :, None] - k_index[:, None, :] < window
    if segments is not None:
        q_seg, k_seg = segments
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None, None]


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with K/V heads shared by groups of query heads, as two einsums.

    q [B, T, H, Dh], k/v [B, S, KV, Dh], mask [B, 1, 1, T, S] -> [B, T, H, Dh]. Logits and
    softmax in float32; the output in v's dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = matmul.einsum("btkgd,bskd->bkgts", q, k)
    logits = jnp.where(mask, logits * (1.0 / math.sqrt(head_dim)), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = matmul.einsum("bkgts,bskd->btkgd", weights, v)
    return out.astype(v.dtype).reshape(batch, length, heads, head_dim)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in float32."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


class TransposedDense(nn.Module):
    """`nn.Dense` with its kernel stored transposed: ``kernel_t`` [features, in], as Hugging
    Face and torch store it (`to_inference_layout`). For decoding: a low-precision product
    of a few rows reads such a kernel at bf16's memory traffic (`matmul.contract`), where
    the [in, features] kernel's would be half as fast."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_dtype: Any = None  # default: the compute dtype (the head asks for float32)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_t = self.param(
            "kernel_t",
            nn.initializers.normal(INIT_STD),
            (self.features, x.shape[-1]),
            self.param_dtype,
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel_t, bias = nn.dtypes.promote_dtype(x, kernel_t, bias, dtype=self.dtype)
        y = matmul.contract(x, kernel_t, -1, 1, out_dtype=self.out_dtype)
        return y if bias is None else y + bias


def _dense(inference_layout: bool, dtype: Any, param_dtype: Any) -> Any:
    """The projection class of a layer: `TransposedDense` in the inference layout, else
    `nn.Dense` (bf16 products accumulated in float32)."""
    if inference_layout:
        return functools.partial(TransposedDense, dtype=dtype, param_dtype=param_dtype)
    return functools.partial(
        nn.Dense,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(INIT_STD),
        dot_general=dense_dot_general,
    )


class Attention(nn.Module):
    """Grouped-query self-attention with rope. x [B, T, D] -> [B, T, D]."""

    spec: LlamaSpec
    decode: bool = False
    cache_len: int = 0
    attention_impl: str | None = None
    # one qkv_proj instead of q_proj, k_proj, v_proj, kernels transposed (`to_inference_layout`)
    inference_layout: bool = False
    prefill: bool = False  # decode from an empty cache: attend within this call's tokens
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, segment_ids):
        s = self.spec
        batch, length, _ = x.shape
        dense = _dense(self.inference_layout, self.dtype, self.param_dtype)
        q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        if self.inference_layout:
            qkv = dense(q_width + 2 * kv_width, use_bias=s.qkv_bias, name="qkv_proj")(x)
            q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
        else:
            q = dense(q_width, use_bias=s.qkv_bias, name="q_proj")(x)
            k = dense(kv_width, use_bias=s.qkv_bias, name="k_proj")(x)
            v = dense(kv_width, use_bias=s.qkv_bias, name="v_proj")(x)
        q = q.reshape(batch, length, s.num_heads, s.head_dim)
        k = k.reshape(batch, length, s.num_kv_heads, s.head_dim)
        v = v.reshape(batch, length, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            norm = functools.partial(
                RMSNorm, s.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
            )
            q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        index = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if self.decode and not self.prefill and self.has_variable("cache", "cached_key"):
            start, k, v = self._extend_cache(k, v)
            slots = jnp.broadcast_to(jnp.arange(self.cache_len), (batch, self.cache_len))
            mask = attention_mask(start + index, slots, s.sliding_window)
            y = grouped_attention(q, k, v, mask)
        else:  # a forward pass; in decode, init (an empty cache) or a prefill (from slot 0)
            if self.decode:
                self._extend_cache(k, v, start=0)
            segments = None if segment_ids is None else (segment_ids, segment_ids)
            y = self._attend(q, k, v, index, segments)
        y = y.reshape(batch, length, s.num_heads * s.head_dim)
        return dense(x.shape[-1], use_bias=s.o_bias, name="o_proj")(y)

    def _attend(self, q, k, v, index, segments):
        s = self.spec
        use_einsum = self.attention_impl == "einsum" or (
            self.attention_impl is None and jax.default_backend() == "cpu"
        )
        if use_einsum:
            return grouped_attention(
                q, k, v, attention_mask(index, index, s.sliding_window, segments)
            )
        if segments is None and s.sliding_window is None:  # plain causal: flash kernels apply
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=self.attention_impl
            )
        mask = attention_mask(index, index, s.sliding_window, segments)[:, 0]  # [B, 1, T, S]
        impl = None if self.attention_impl == "cudnn" else self.attention_impl
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    def _extend_cache(self, k, v, start=None):
        """Write k, v [B, T, KV, Dh] at `start` (default: the cache index) -> (start, full
        k, full v)."""
        initialized = self.has_variable("cache", "cached_key")
        shape = (k.shape[0], self.cache_len, *k.shape[2:])
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        start = cache_index.value if start is None else start
        if initialized:
            cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
            cached_value.value = jax.lax.dynamic_update_slice(
                cached_value.value, v, (0, start, 0, 0)
            )
            cache_index.value = jnp.asarray(start + k.shape[1], jnp.int32)
        return start, cached_key.value, cached_value.value


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). x [..., D] -> [..., D]."""

    mlp_dim: int
    # one gate_up_proj instead of gate_proj, up_proj, kernels transposed (`to_inference_layout`)
    inference_layout: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(
            _dense(self.inference_layout, self.dtype, self.param_dtype), use_bias=False
        )
        if self.inference_layout:
            gate, up = jnp.split(dense(2 * self.mlp_dim, name="gate_up_proj")(x), 2, axis=-1)
        else:
            gate = dense(self.mlp_dim, name="gate_proj")(x)
            up = dense(self.mlp_dim, name="up_proj")(x)
        return dense(x.shape[-1], name="down_proj")(nn.silu(gate) * up)


class Layer(nn.Module):
    """One decoder layer. x [B, T, D], rope `rope_angles`, segment_ids [B, T] | None."""

    spec: LlamaSpec
    decode: bool = False
    cache_len: int = 0
    dropout_rate: float = 0.0
    attention_impl: str | None = None
    inference_layout: bool = False
    prefill: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, segment_ids, train: bool = False):
        s = self.spec
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = RMSNorm(s.norm_eps, **kinds, name="attn_norm")(x)
        attention = Attention(
            s,
            self.decode,
            self.cache_len,
            self.attention_impl,
            self.inference_layout,
            self.prefill,
            **kinds,
            name="attn",
        )
        h = attention(h, rope, segment_ids)
        x = x + drop(h)
        h = RMSNorm(s.norm_eps, **kinds, name="mlp_norm")(x)
        return x + drop(Mlp(s.mlp_dim, self.inference_layout, **kinds, name="mlp")(h))


class _ScanLayer(Layer):
    """`Layer` with nn.scan's (carry, out) signature; same parameters."""

    @nn.compact
    def __call__(self, x, rope, segment_ids, train: bool = False):
        return super().__call__(x, rope, segment_ids, train), None


@register("llama")
class Llama(nn.Module):
    """Llama-family decoder LM. x: [B, T] int32 -> logits [B, T, vocab_size] float32.

    `size` picks a preset from PRESETS (None: every architecture field must be given); the
    architecture fields set here override it. dtype is the compute dtype; param_dtype that
    of the parameters (float32 unless memory demands bfloat16).
    """

    # scan_layers' stacked parameters ("params/layers/...", a leading layer axis) and their
    # per-layer names otherwise: a checkpoint of either layout restores into both
    STACKED: ClassVar[dict[str, str]] = {"params/layers": "params/layer_{}"}

    size: str | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    max_len: int | None = None
    rope_base: float | None = None
    rope_scaling: str | None = None  # None | "linear" | "llama3"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_len: int | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    qkv_bias: bool | None = None  # Qwen2 (and Llama's attention_bias)
    o_bias: bool | None = None  # Llama's attention_bias, Qwen3's
    qk_norm: bool | None = None  # Qwen3
    sliding_window: int | None = None  # Mistral v0.1
    dropout_rate: float = 0.0  # on each residual branch
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: str | None = None  # None (einsum on CPU, else auto) | xla | cudnn | einsum
    remat: bool = False
    scan_layers: bool = False
    decode: bool = False
    cache_len: int | None = None  # decode: KV-cache slots (default max_len)
    inference_layout: bool = False  # parameters as `to_inference_layout` arranges them
    prefill: bool = False  # decode: the cache passed in is empty (`generate`'s prefill)

    @property
    def spec(self) -> LlamaSpec:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(
                f"model.attention_impl: expected one of {list(ATTENTION_IMPLS)}, found "
                f"{self.attention_impl!r}."
            )
        return resolve_spec(self.size, {k: getattr(self, k) for k in ARCH_FIELDS})

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        logits_at: jax.Array | None = None,
    ) -> jax.Array:
        """logits_at [B]: the position of each row whose logits alone are computed ([B, 1,
        V]; a prefill needs its last token's only, and the head is a fifth of a small
        model's FLOPs)."""
        spec = self.spec
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        batch, length = x.shape
        cache_len = self.cache_len or spec.max_len
        start = self._start(length)  # advances a decoding cache's index, positions or not
        if positions is not None:
            rope = rope_angles(spec, positions)
        elif isinstance(start, int):  # 0: known now
            rope = rope_table(spec, length)
        else:
            rope = rope_angles(spec, start + jnp.arange(length)[None])
        embed = nn.Embed(
            spec.vocab_size,
            spec.embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nn.initializers.normal(INIT_STD),
            name="embed",
        )
        h = embedding_lookup(embed.embedding.astype(dtype), x)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        layer_fields = dict(
            spec=spec,
            decode=self.decode,
            cache_len=cache_len,
            dropout_rate=self.dropout_rate,
            attention_impl=self.attention_impl,
            inference_layout=self.inference_layout,
            prefill=self.prefill,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if self.scan_layers:
            layer_cls = _ScanLayer
            if self.remat:
                layer_cls = nn.remat(layer_cls, static_argnums=(4,), prevent_cse=False)
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=spec.num_layers,
            )
            h, _ = layers(**layer_fields, name="layers")(h, rope, segment_ids, train)
        else:
            layer_cls = nn.remat(Layer, static_argnums=(4,)) if self.remat else Layer
            for i in range(spec.num_layers):
                h = layer_cls(**layer_fields, name=f"layer_{i}")(h, rope, segment_ids, train)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, None, None].astype(jnp.int32), axis=1)
        h = RMSNorm(spec.norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(h)
        if spec.tie_embeddings:
            return tied_logits(h, embed.embedding.astype(dtype))
        if self.inference_layout:  # float32 logits from a [V, D] kernel, as a tied table's
            head_t = TransposedDense(
                spec.vocab_size,
                dtype=dtype,
                param_dtype=param_dtype,
                out_dtype=jnp.float32,
                name="lm_head",
            )
            return head_t(h)
        head = nn.Dense(
            spec.vocab_size,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nn.initializers.normal(INIT_STD),
            dot_general=head_dot_general,
            name="lm_head",
        )
        return head(h).astype(jnp.float32)

    def _start(self, length: int) -> int | jax.Array:
        """Where this call's tokens start: 0 (an int), or the KV cache's fill when
        decoding (traced), which this call advances by `length`."""
        if not self.decode:
            return 0
        initialized = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return 0
        start = 0 if self.prefill else index.value
        index.value = jnp.asarray(start + length, jnp.int32)
        return start


# ------------------------------------------------------------------ inference layout

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def to_inference_layout(params: Mapping[str, Any]) -> dict:
    """A Llama's "params" rearranged for `Llama(inference_layout=True)`: each layer's q/k/v
    kernels (and biases) concatenated into one ``qkv_proj``, gate and up into one
    ``gate_up_proj``, and every kernel stored transposed, ``kernel_t`` [out, in] (the lm_head
    included; a tied embedding is [V, D] already). The same function, with fewer and
    wider products read the fast way: a batch-1 decode step is a chain of matrix-vector
    products bound by memory traffic; on XLA:CPU four products a layer stream faster than
    seven, and a bf16 one reads a [out, in] kernel at twice the speed of an [in, out] one
    (`jaxdl.models.matmul`, benchmarks/README.md). Numpy leaves stay numpy (host memory,
    no device copy of both layouts); a tree already in this layout comes back unchanged.
    """
    return _transposed_kernels(_fused_projections(params))


def _fused_projections(tree: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "kernel" and isinstance(value, Mapping):  # a bug: decoding takes merged params
            raise TypeError("to_inference_layout takes float kernels; dequantize them first")
        out[key] = _fused_projections(value) if isinstance(value, Mapping) else value
    for fused, parts in FUSED.items():
        if all(p in out for p in parts):
            pieces = [out.pop(p) for p in parts]
            out[fused] = {leaf: _concatenate([p[leaf] for p in pieces]) for leaf in pieces[0]}
    return out


def _transposed_kernels(tree: Mapping[str, Any]) -> dict:
    """Each Dense's kernel [..., in, out] (a scanned one has a leading layer axis) as
    ``kernel_t`` [..., out, in]."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "kernel":
            xp = np if isinstance(value, np.ndarray) else jnp
            out["kernel_t"] = xp.swapaxes(value, -1, -2)
        else:
            out[key] = _transposed_kernels(value) if isinstance(value, Mapping) else value
    return out


def _concatenate(arrays: list) -> Any:
    """Along the output (last) axis; in numpy when every piece is a host array."""
    xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
    return xp.concatenate(arrays, axis=-1)


def in_inference_layout(params: Mapping[str, Any]) -> bool:
    """Whether a Llama's "params" are in `to_inference_layout`'s arrangement."""
    return any(
        key in FUSED or (isinstance(value, Mapping) and in_inference_layout(value))
        for key, value in params.items()
    )


# ------------------------------------------------------------------ counting


def llama_spec(model: Llama | Mapping[str, Any]) -> LlamaSpec:
    """The resolved spec of a module or of its model config ({"name": "llama", ...})."""
    if isinstance(model, Mapping):
        model = Llama(**{k: v for k, v in model.items() if k != "name"})
    return model.spec


def count_params(spec: LlamaSpec) -> int:
    """Parameter count by formula (a test checks it against the initialized tree)."""
    d, q, kv = spec.embed_dim, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if spec.qkv_bias else 0)
    attn += d if spec.o_bias else 0
    attn += 2 * spec.head_dim if spec.qk_norm else 0
    layer = attn + 3 * d * spec.mlp_dim + 2 * d
    head = 0 if spec.tie_embeddings else spec.vocab_size * d
    return spec.vocab_size * d + spec.num_layers * layer + d + head


def flops_per_token(model: Llama | Mapping[str, Any], seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * L * T * H * Dh, N without
    the embedding lookup (the tied embedding counts once, as the output projection)."""
    spec = llama_spec(model)
    n = count_params(spec) - (0 if spec.tie_embeddings else spec.vocab_size * spec.embed_dim)
    return float(6 * n + 12 * spec.num_layers * seq_len * spec.num_heads * spec.head_dim)
