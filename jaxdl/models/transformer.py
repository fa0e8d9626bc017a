"""GPT-style decoder language model: tokens [B, T] int32 -> logits [B, T, vocab_size] float32.

Pre-LayerNorm blocks (x + attn(ln1(x)), x + mlp(ln2(x))), learned or rotary positions,
GELU or SwiGLU MLP, and the output projection tied to the token embedding (`embed.attend`).
The projections are plain 2-D `nn.Dense` layers (`query`, `key`, `value`, `out`, `fc1`,
`fc2`, `gate`) so LoRA and partition rules can find them by path, e.g.
``params/block_0/attn/query/kernel``. With ``scan_layers=True`` the blocks live under
``params/blocks/...`` with a leading layer axis instead.

``head="classify"`` makes it a sequence classifier (the article's 3.2 on a language
model): the final hidden states are pooled over the non-padding tokens (``pooling``:
"last" token or "mean"; ``pad_id`` pads on the right: PAD_ID = 0 for bytes, a tokenizer's
vocab_size for its ids) and a new Dense layer
``classifier`` maps them to ``num_classes`` logits [B, num_classes]. Every LM parameter
keeps its path, so a pretrained LM restores into it with
``init_from.reinit=["params/classifier/.*"]``.

``decode=True`` turns on the KV cache (Flax's "cache" collection): each call appends the
new tokens' keys and values and reads positions from the cache index, so a prompt chunk
then one token at a time reproduces the full-sequence logits. See jaxdl/generate.py.
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

from jaxdl.errors import UserError
from jaxdl.models import matmul
from jaxdl.models.registry import register

# Named sizes; explicit fields on the module override them. "gpt2-124m" carries GPT-2's
# vocabulary (50,257) because its pinned count (124,439,808) is only meaningful with it.
# The "1b" size has 1,213,321,216 parameters with the byte vocabulary (1,315,723,264 with 50,257).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, num_heads=2, embed_dim=32, mlp_ratio=4, max_len=64),
    "small": dict(num_layers=4, num_heads=4, embed_dim=128, mlp_ratio=4, max_len=128),
    "gpt2-124m": dict(
        num_layers=12, num_heads=12, embed_dim=768, mlp_ratio=4, max_len=1024, vocab_size=50257
    ),
    "1b": dict(num_layers=24, num_heads=16, embed_dim=2048, mlp_ratio=4, max_len=2048),
}
BYTE_VOCAB = 256
PAD_ID = 0  # right padding of classified sequences (NUL never occurs in text)
INIT_STD = 0.02  # GPT-2's initializer scale


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The resolved hyper-parameters of a `Transformer` (size preset + overrides)."""

    vocab_size: int
    num_layers: int
    num_heads: int
    embed_dim: int
    mlp_ratio: float
    max_len: int
    positions: str
    mlp: str

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)


def resolve_size(sizes: Mapping[str, Mapping[str, Any]], size: str, overrides: Mapping[str, Any]):
    """Preset `size` from `sizes` with the non-None `overrides` on top -> dict."""
    if size not in sizes:
        raise UserError(
            f"model.size: expected one of {sorted(sizes)}, found {size!r}. "
            "Fix: pick a named size and override fields (num_layers, embed_dim, ...) as needed."
        )
    return {**sizes[size], **{k: v for k, v in overrides.items() if v is not None}}


def check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise UserError(f"model.{field}: expected one of {list(choices)}, found {value!r}.")


def check_pad_id(pad_id: int, vocab_size: int) -> None:
    """A classifier's pad id is 0 (bytes) or its tokenizer's vocab_size, which is then at most
    the model's: a larger one means the tokenizer emits ids the embedding does not have."""
    if pad_id > vocab_size:
        raise UserError(
            f"data.tokenizer: its vocabulary has {pad_id} ids, model.vocab_size is {vocab_size}. "
            "Fix: use the tokenizer that came with the model (the imported workdir's "
            "tokenizer.json) or raise model.vocab_size."
        )


def check_heads(embed_dim: int, num_heads: int) -> None:
    if embed_dim % num_heads:
        raise UserError(
            f"model.num_heads: expected a divisor of model.embed_dim={embed_dim}, found "
            f"{num_heads}. Fix: change num_heads or embed_dim."
        )


# ------------------------------------------------------------------ building blocks


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form). x: [B, T, H, Dh], positions: [T]."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, half]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # [T, 1, half]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")


def einsum_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False, mask=None
) -> jax.Array:
    """Softmax attention as two einsums: q [B, T, H, Dh], k, v [B, S, H, Dh] -> [B, T, H, Dh].

    The numerics of `jax.nn.dot_product_attention`'s "xla" path (float32 logits and softmax,
    the output in v's dtype) without its per-group vmap and mask plumbing, which on XLA:CPU
    cost 1.4-1.6x in forward+backward (`python benchmarks/cpu_gaps.py --probes attention`).
    """
    logits = matmul.einsum("bthd,bshd->bhts", q, k)
    logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        length = q.shape[1]
        causal = jnp.tril(jnp.ones((length, k.shape[1]), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return matmul.einsum("bhts,bshd->bthd", weights, v).astype(v.dtype)


def attention(q, k, v, *, is_causal: bool = False, mask=None, impl: str | None = None):
    """Dispatch on `impl`: None is "einsum" on CPU, else `jax.nn.dot_product_attention`'s own
    choice (cuDNN's fused kernel on GPU when the shapes allow it, else XLA)."""
    if impl == "einsum" or (impl is None and jax.default_backend() == "cpu"):
        return einsum_attention(q, k, v, is_causal=is_causal, mask=mask)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=impl
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention over x: [B, T, D] -> [B, T, D].

    Attention through `attention` (implementation = `attention_impl`). With
    `decode=True` keys and values are appended to a [B, max_len, H, Dh] cache; the queries
    attend to every cached position up to their own.
    """

    num_heads: int
    causal: bool = True
    rope: bool = False
    decode: bool = False
    max_len: int = 0
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    out_std: float = INIT_STD

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        dense = functools.partial(
            nn.Dense, dim, dtype=self.dtype, kernel_init=nn.initializers.normal(INIT_STD)
        )
        split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
        q = split(dense(name="query")(x))
        k = split(dense(name="key")(x))
        v = split(dense(name="value")(x))
        if self.rope:
            q, k = apply_rope(q, positions), apply_rope(k, positions)

        if self.decode and self.has_variable("cache", "cached_key"):
            k, v, mask = self._extend_cache(k, v)
            # Decoding attends 1 query (or a prompt chunk) to a masked cache: flash kernels
            # buy nothing there, and cuDNN rejects arbitrary masks, so never ask for cuDNN.
            impl = None if self.attention_impl == "cudnn" else self.attention_impl
            y = attention(q, k, v, mask=mask, impl=impl)
        else:
            if self.decode:  # init: create the empty cache, compute as usual
                self._extend_cache(k, v)
            y = attention(q, k, v, is_causal=self.causal, impl=self.attention_impl)
        y = y.reshape(batch, length, dim)
        return nn.Dense(
            dim, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_std), name="out"
        )(y)

    def _extend_cache(self, k: jax.Array, v: jax.Array):
        """Write k, v [B, T, H, Dh] at the cache index; -> full k, v and the [1, 1, T, S] mask."""
        initialized = self.has_variable("cache", "cached_key")
        shape = (k.shape[0], self.max_len, *k.shape[2:])
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return k, v, None
        start = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
        cache_index.value = start + k.shape[1]
        query_pos = start + jnp.arange(k.shape[1])
        mask = jnp.arange(self.max_len)[None, :] <= query_pos[:, None]  # [T, S]
        return cached_key.value, cached_value.value, mask[None, None]


class Mlp(nn.Module):
    """x: [..., D] -> [..., D]. "gelu": fc2(gelu(fc1 x)); "swiglu": fc2(silu(gate x) * fc1 x)."""

    hidden_dim: int
    kind: str = "gelu"
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    out_std: float = INIT_STD

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(INIT_STD)
        dense = functools.partial(nn.Dense, self.hidden_dim, dtype=self.dtype, kernel_init=init)
        h = dense(name="fc1")(x)
        if self.kind == "swiglu":
            h = nn.silu(dense(name="gate")(x)) * h
        else:
            h = nn.gelu(h, approximate=self.gelu_approximate)
        return nn.Dense(
            x.shape[-1],
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(self.out_std),
            name="fc2",
        )(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block, shared by the decoder LM and the ViT encoder.

    x: [B, T, D], positions: [T] int32 (used by rope) -> [B, T, D].
    """

    num_heads: int
    mlp_dim: int
    mlp: str = "gelu"
    gelu_approximate: bool = True
    causal: bool = True
    rope: bool = False
    decode: bool = False
    max_len: int = 0
    dropout_rate: float = 0.0
    attention_impl: str | None = None
    dtype: Any = jnp.float32
    out_std: float = INIT_STD  # residual-branch output init (GPT-2 scales it by 1/sqrt(2L))
    layernorm_eps: float = 1e-6  # Flax's default (GPT-2 uses 1e-5)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, train: bool = False) -> jax.Array:
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="ln1")(x)
        h = SelfAttention(
            num_heads=self.num_heads,
            causal=self.causal,
            rope=self.rope,
            decode=self.decode,
            max_len=self.max_len,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            out_std=self.out_std,
            name="attn",
        )(h, positions)
        x = x + drop(h)
        h = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="ln2")(x)
        h = Mlp(
            self.mlp_dim,
            kind=self.mlp,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            out_std=self.out_std,
            name="mlp",
        )(h)
        return x + drop(h)


class _ScanBlock(Block):
    """`Block` with nn.scan's (carry, out) signature; same parameters."""

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, train: bool = False):
        return super().__call__(x, positions, train), None


# ------------------------------------------------------------------ the model


@register("transformer")
class Transformer(nn.Module):
    """GPT-style decoder LM. x: [B, T] int32 tokens -> logits [B, T, vocab_size] float32.

    `size` picks a preset from SIZES; num_layers, num_heads, embed_dim, mlp_ratio, max_len and
    vocab_size override it when set. vocab_size defaults to the preset's, else 256 (bytes).
    For "swiglu" the hidden width is mlp_ratio * embed_dim, like "gelu" (so 1.5x MLP params).
    """

    # scan_layers' stacked parameters ("params/blocks/...", a leading layer axis) and their
    # per-layer names otherwise: a checkpoint of either layout restores into both
    STACKED: ClassVar[dict[str, str]] = {"params/blocks": "params/block_{}"}

    vocab_size: int | None = None
    size: str = "small"
    num_layers: int | None = None
    num_heads: int | None = None
    embed_dim: int | None = None
    mlp_ratio: float | None = None
    max_len: int | None = None
    positions: str = "learned"  # "learned" | "rope"
    mlp: str = "gelu"  # "gelu" | "swiglu"
    dropout_rate: float = 0.0
    dtype: Any = "float32"  # compute dtype; parameters stay float32
    attention_impl: str | None = None  # None (einsum on CPU, else auto) | xla | cudnn | einsum
    remat: bool = False
    scan_layers: bool = False
    decode: bool = False
    layernorm_eps: float = 1e-6  # every LayerNorm's epsilon (GPT-2: 1e-5)
    gelu_approximate: bool = True  # the tanh GELU (GPT-2's gelu_new); False: the exact erf form
    head: str = "lm"  # "lm" | "classify"
    num_classes: int | None = None  # classify: the number of classes
    pooling: str = "last"  # classify: "last" non-padding token | "mean" over them
    pad_id: int = PAD_ID  # classify: the id that right-pads (a tokenizer's vocab_size; bytes: 0)

    @property
    def spec(self) -> TransformerSpec:
        fields = resolve_size(
            SIZES,
            self.size,
            dict(
                vocab_size=self.vocab_size,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                embed_dim=self.embed_dim,
                mlp_ratio=self.mlp_ratio,
                max_len=self.max_len,
            ),
        )
        fields.setdefault("vocab_size", BYTE_VOCAB)
        check_choice("positions", self.positions, ("learned", "rope"))
        check_choice("mlp", self.mlp, ("gelu", "swiglu"))
        check_choice("head", self.head, ("lm", "classify"))
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_heads(fields["embed_dim"], fields["num_heads"])
        if self.positions == "rope" and (fields["embed_dim"] // fields["num_heads"]) % 2:
            raise UserError(
                "model.positions: 'rope' needs an even head dimension (embed_dim / num_heads), "
                f"found {fields['embed_dim'] // fields['num_heads']}. Fix: change num_heads."
            )
        return TransformerSpec(**fields, positions=self.positions, mlp=self.mlp)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, logits_at: jax.Array | None = None
    ) -> jax.Array:
        """logits_at [B]: the position of each row whose LM logits alone are computed ([B, 1,
        V]; a prefill needs its last token's only)."""
        spec = self.spec
        dtype = jnp.dtype(self.dtype)
        length = x.shape[1]
        positions = self._positions(length, spec.max_len)

        embed = nn.Embed(
            spec.vocab_size,
            spec.embed_dim,
            dtype=dtype,
            embedding_init=nn.initializers.normal(INIT_STD),
            name="embed",
        )
        if self.head == "classify":
            check_pad_id(self.pad_id, spec.vocab_size)
            # padding may lie past the vocabulary; it sits after the text under a causal
            # mask and is pooled away, so whatever row it reads changes nothing
            h = matmul.embedding_lookup(
                embed.embedding.astype(dtype), jnp.where(x == self.pad_id, 0, x)
            )
        else:
            h = matmul.embedding_lookup(embed.embedding.astype(dtype), x)
        if spec.positions == "learned":
            table = self.param(
                "pos_embed", nn.initializers.normal(INIT_STD), (spec.max_len, spec.embed_dim)
            )
            h = h + jnp.take(table, positions, axis=0).astype(dtype)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)

        block_fields = dict(
            num_heads=spec.num_heads,
            mlp_dim=spec.mlp_dim,
            mlp=spec.mlp,
            gelu_approximate=self.gelu_approximate,
            causal=True,
            rope=spec.positions == "rope",
            decode=self.decode,
            max_len=spec.max_len,
            dropout_rate=self.dropout_rate,
            attention_impl=self.attention_impl,
            dtype=dtype,
            out_std=INIT_STD / math.sqrt(2 * spec.num_layers),
            layernorm_eps=self.layernorm_eps,
        )
        if self.scan_layers:
            block_cls = _ScanBlock
            if self.remat:
                block_cls = nn.remat(block_cls, static_argnums=(3,), prevent_cse=False)
            blocks = nn.scan(
                block_cls,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=spec.num_layers,
            )
            h, _ = blocks(**block_fields, name="blocks")(h, positions, train)
        else:
            block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
            for i in range(spec.num_layers):
                h = block_cls(**block_fields, name=f"block_{i}")(h, positions, train)

        h = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=dtype, name="ln_f")(h)
        if self.head == "classify":
            return self._classify(x, h)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, None, None].astype(jnp.int32), axis=1)
        return embed.attend(h).astype(jnp.float32)

    def _classify(self, tokens: jax.Array, h: jax.Array) -> jax.Array:
        """Pool h [B, T, D] over the non-padding tokens -> logits [B, num_classes]."""
        check_choice("pooling", self.pooling, ("last", "mean"))
        if not self.num_classes:
            raise UserError(
                "model.num_classes: head='classify' needs the number of classes, found "
                f"{self.num_classes!r}. Fix: set --config.model.num_classes=C."
            )
        real = (tokens != self.pad_id).astype(jnp.float32)  # [B, T]
        if self.pooling == "last":
            last = jnp.maximum(real.sum(axis=1).astype(jnp.int32) - 1, 0)
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        else:
            pooled = (h * real[..., None]).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1.0)[:, None]
        classifier = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(INIT_STD), name="classifier"
        )
        return classifier(pooled.astype(jnp.float32)).astype(jnp.float32)

    def _positions(self, length: int, max_len: int) -> jax.Array:
        """[T] absolute positions: 0..T-1, or continuing from the cache index when decoding."""
        if length > max_len:
            raise UserError(
                f"x: expected at most model.max_len={max_len} tokens, found {length}. "
                "Fix: shorten the sequence (data.seq_len) or raise model.max_len."
            )
        if not self.decode:
            return jnp.arange(length)
        initialized = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        start = index.value if initialized else 0
        if initialized:
            index.value = start + length
        return start + jnp.arange(length)


# ------------------------------------------------------------------ counting


def transformer_spec(model: Transformer | Mapping[str, Any]) -> TransformerSpec:
    """The resolved spec of a module or of a model config ({"name": "transformer", ...})."""
    if isinstance(model, Mapping):
        model = Transformer(**{k: v for k, v in model.items() if k != "name"})
    return model.spec


def count_params(spec: TransformerSpec, *, include_pos_embed: bool = True) -> int:
    """Parameter count by formula (tests check it against the initialized tree)."""
    d, h = spec.embed_dim, spec.mlp_dim
    attn = 4 * (d * d + d)
    mlp = (d * h + h) * (2 if spec.mlp == "swiglu" else 1) + (h * d + d)
    block = 2 * (2 * d) + attn + mlp
    pos = spec.max_len * d if spec.positions == "learned" and include_pos_embed else 0
    return spec.vocab_size * d + pos + spec.num_layers * block + 2 * d


def flops_per_token(cfg: Transformer | Mapping[str, Any], seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT convention.

    6 * N + 12 * L * T * d, where N counts every parameter except the learned position
    table (a lookup, no matmul; the tied embedding counts once, as the output projection),
    and the attention term covers QK^T and AV at context T (default max_len), causal
    masking ignored.
    """
    spec = transformer_spec(cfg)
    seq_len = spec.max_len if seq_len is None else seq_len
    n = count_params(spec, include_pos_embed=False)
    return float(6 * n + 12 * spec.num_layers * seq_len * spec.embed_dim)
