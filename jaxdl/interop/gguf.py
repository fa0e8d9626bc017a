"""GGUF (llama.cpp, Ollama) <-> jaxdl's `llama`: weights, config and tokenizer.

Import reads the file with the ``gguf`` package (memory-mapped) and presents it as a
Hugging Face state dict (`HfView`: HF key -> float32 array in torch's layout, dequantized
when read, llama.cpp's row permutation of the Q and K projections undone), so the one
table in `jaxdl.interop.llama` maps it, tensor by tensor. The architecture comes from the
metadata (``{arch}.block_count``, ...), the tokenizer from ``tokenizer.ggml.*`` (written
as a ``tokenizer.json`` the ``tokenizers`` package loads, with the chat template and
special tokens beside it). Export writes the reverse with ``gguf.GGUFWriter`` (F16 or Q8_0
matrices, F32 norms), so llama.cpp, Ollama and transformers' GGUF loader read it.

Key and tensor names come from ``gguf.constants`` (`Keys`, `TENSOR_NAMES`): never
spelled here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.errors import UserError
from jaxdl.interop import llama, lm_files
from jaxdl.interop.workdir import Imported

ARCHS = ("llama", "qwen2", "qwen3")  # Mistral's GGUFs say "llama"
PERMUTED_ARCHS = ("llama",)  # llama.cpp permutes Q/K rows of these (its rope layout)
# what gguf-py dequantizes and transformers' GGUF loader reads too (the live tests compare
# the two, bit for bit), Q5_0 and Q5_1 (gguf-py alone); other types are refused by name
DEQUANTIZED = (
    *("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"),
)
EXPORT_TYPES = ("f16", "q8_0")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-dimension rope factors (Llama 3.1 and on)
ROW_CHUNK = 4096


def _gguf():
    try:
        import gguf
    except ImportError as err:  # a declared dependency; only a broken install lacks it
        raise UserError("gguf: the `gguf` package is not installed. Fix: pip install gguf") from err
    return gguf


def hf_to_gguf() -> list[tuple[str, Any, str]]:
    """(HF key template, gguf MODEL_TENSOR, suffix) for every Llama-family weight."""
    t = _gguf().MODEL_TENSOR
    layer = "model.layers.{i}."
    rows = [
        ("model.embed_tokens.weight", t.TOKEN_EMBD, "weight"),
        ("model.norm.weight", t.OUTPUT_NORM, "weight"),
        ("lm_head.weight", t.OUTPUT, "weight"),
        (layer + "input_layernorm.weight", t.ATTN_NORM, "weight"),
        (layer + "post_attention_layernorm.weight", t.FFN_NORM, "weight"),
        (layer + "self_attn.q_norm.weight", t.ATTN_Q_NORM, "weight"),
        (layer + "self_attn.k_norm.weight", t.ATTN_K_NORM, "weight"),
        (layer + "mlp.gate_proj.weight", t.FFN_GATE, "weight"),
        (layer + "mlp.up_proj.weight", t.FFN_UP, "weight"),
        (layer + "mlp.down_proj.weight", t.FFN_DOWN, "weight"),
    ]
    for proj, tensor in (("q", t.ATTN_Q), ("k", t.ATTN_K), ("v", t.ATTN_V), ("o", t.ATTN_OUT)):
        for suffix in ("weight", "bias"):
            rows.append((f"{layer}self_attn.{proj}_proj.{suffix}", tensor, suffix))
    return rows


def gguf_name(tensor: Any, suffix: str, layer: int | None) -> str:
    return _gguf().TENSOR_NAMES[tensor].format(bid=layer) + "." + suffix


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (convert_hf_to_gguf's LlamaModel.permute):
    per head, the rotate-half pairs (i, i + d/2) become adjacent (i, i+1)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rows`."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# ------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in the file and how it is stored: all an import needs of gguf's
    ReaderTensor, which holds numpy views of the file and of its parsed header."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order (the reverse of numpy's)
    data_offset: int
    stored_shape: tuple[int, ...]  # of the stored items (bytes for quantized types)
    stored_dtype: np.dtype  # with the file's byte order

    @classmethod
    def of(cls, t: Any) -> StoredTensor:
        shape = tuple(int(d) for d in t.shape)
        return cls(t.name, t.tensor_type, shape, int(t.data_offset), t.data.shape, t.data.dtype)


class GgufFile:
    """An open GGUF: metadata values by key, tensors by name (memory-mapped)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"--from: {path} is not a readable GGUF file ({reason}). Fix: download or "
                "convert it again."
            ) from err
        self.tensors = {t.name: StoredTensor.of(t) for t in self.reader.tensors}
        self.dropped = False
        self.arch = self.get(gguf.Keys.General.ARCHITECTURE)

    def get(self, key: str, default: Any = None, arch: bool = True) -> Any:
        """The value of metadata `key` ("{arch}" filled), or `default`."""
        assert not self.dropped, "GgufFile.get after drop_metadata"
        key = key.format(arch=getattr(self, "arch", None)) if arch else key
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def drop_metadata(self) -> None:
        """Free the parsed file (gguf keeps a numpy array per token and merge: 90 MB for a
        49k vocabulary, and its tensor records hold more) once the config and tokenizer are
        read; tensors stay readable (`StoredTensor` says where)."""
        self.reader, self.dropped = None, True

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(
                f"--from: {self.path} lacks the metadata {key.format(arch=self.arch)!r}. Fix: "
                "convert the model again with llama.cpp's convert_hf_to_gguf.py."
            )
        return value

    def _stored(self, tensor: StoredTensor) -> np.ndarray:
        """The stored (quantized) data of `tensor`, read from the file rather than through
        the reader's memory map: mapped pages stay resident once touched, so the whole file
        (98 MB for SmolLM2) would sit on the import's peak; a read buffer goes with the
        tensor."""
        out = np.empty(tensor.stored_shape, tensor.stored_dtype)
        try:  # an import reads tensors long after it opened the file (as each is written)
            with open(self.path, "rb") as f:
                f.seek(tensor.data_offset)
                got = f.readinto(memoryview(out).cast("B"))
        except OSError as err:
            raise self._unreadable(tensor.name, err) from err
        if got != out.nbytes:
            raise UserError(
                f"--from: {self.path} ends inside tensor {tensor.name} (read {got} of "
                f"{out.nbytes} bytes). Fix: the file is truncated; download or convert it again."
            )
        return out

    def _unreadable(self, name: str, err: OSError) -> UserError:
        return UserError(
            f"--from: reading tensor {name} of {self.path} failed ({err.strerror or err}). Fix: "
            "the file changed or went away during the import; check it and import again."
        )

    def stand_in(self, name: str) -> np.ndarray:
        """What `array(name)` will be (float32 of its shape) as a zero-memory stand-in,
        after the checks that reading it would fail: its type and that the file holds it."""
        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in DEQUANTIZED:
            raise UserError(
                f"--from: {self.path}: tensor {name} is stored as {kind}, which jaxdl does not "
                f"dequantize (it reads {', '.join(DEQUANTIZED)}). Fix: requantize the file "
                "with llama.cpp's llama-quantize to one of them."
            )
        stored = int(np.prod(tensor.stored_shape)) * tensor.stored_dtype.itemsize
        try:
            size = self.path.stat().st_size
        except OSError as err:
            raise self._unreadable(name, err) from err
        if tensor.data_offset + stored > size:
            raise UserError(
                f"--from: {self.path} ends inside tensor {name} (it needs bytes up to "
                f"{tensor.data_offset + stored}, the file has {size}). Fix: the file is "
                "truncated; download or convert it again."
            )
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return np.broadcast_to(np.zeros((), np.float32), shape)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy's (torch's) axis order, dequantized."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        shape = self.stand_in(name).shape
        data = self._stored(tensor)
        data = data.reshape(shape[0], -1) if len(shape) > 1 else data
        out = np.empty(shape, np.float32)
        # row chunks: gguf's numpy dequantizers make several temporaries of their input's size
        for start in range(0, shape[0], ROW_CHUNK):
            rows = dequantize(data[start : start + ROW_CHUNK], tensor.tensor_type)
            out[start : start + ROW_CHUNK] = rows.reshape(out[start : start + ROW_CHUNK].shape)
        return out


def model_config(f: GgufFile) -> dict[str, Any]:
    """The jaxdl model section from the GGUF metadata."""
    keys = _gguf().Keys
    if f.arch not in ARCHS:
        raise UserError(
            f"--from: {f.path} holds a {f.arch!r} model; jaxdl imports GGUF architectures "
            f"{list(ARCHS)}. Fix: import a Llama-family GGUF, or its Hugging Face folder."
        )
    scaling = f.get(keys.Rope.SCALING_TYPE, "none")
    if scaling not in ("none", "linear"):
        raise UserError(
            f"--from: {f.path}: rope scaling {scaling!r} is not supported (jaxdl reads none and "
            "linear from GGUF). Fix: import the model's Hugging Face folder instead."
        )
    heads = int(f.require(keys.Attention.HEAD_COUNT))
    embed_dim = int(f.require(keys.LLM.EMBEDDING_LENGTH))
    vocab = f.get(keys.LLM.VOCAB_SIZE) or len(f.get(keys.Tokenizer.LIST, arch=False) or [])
    head_dim = f.get(keys.Attention.KEY_LENGTH) or f.get(keys.Rope.DIMENSION_COUNT)
    has_bias = "blk.0.attn_q.bias" in f.tensors
    cfg = {
        "name": "llama",
        "vocab_size": int(vocab or f.tensors["token_embd.weight"].shape[1]),
        "num_layers": int(f.require(keys.LLM.BLOCK_COUNT)),
        "embed_dim": embed_dim,
        "num_heads": heads,
        "num_kv_heads": int(f.get(keys.Attention.HEAD_COUNT_KV) or heads),
        "head_dim": int(head_dim or embed_dim // heads),
        "mlp_dim": int(f.require(keys.LLM.FEED_FORWARD_LENGTH)),
        "max_len": int(f.get(keys.LLM.CONTEXT_LENGTH, 2048)),
        "rope_base": float(f.get(keys.Rope.FREQ_BASE, 10000.0)),
        "norm_eps": float(f.get(keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        "tie_embeddings": "output.weight" not in f.tensors,
        "qkv_bias": has_bias,
        "o_bias": "blk.0.attn_output.bias" in f.tensors,
        "qk_norm": "blk.0.attn_q_norm.weight" in f.tensors,
    }
    if scaling == "linear":
        cfg.update(rope_scaling="linear", rope_factor=float(f.require(keys.Rope.SCALING_FACTOR)))
    if (window := f.get(keys.Attention.SLIDING_WINDOW)) is not None:
        cfg["sliding_window"] = int(window)
    if ROPE_FREQS in f.tensors:
        if scaling != "none":
            raise UserError(
                f"--from: {f.path} has both {ROPE_FREQS} and rope scaling {scaling!r}, which "
                "jaxdl does not combine. Fix: import the model's Hugging Face folder instead."
            )
        cfg.update(llama3_rope(f.array(ROPE_FREQS), cfg, f"--from: {f.path}: {ROPE_FREQS}"))
    return cfg


# Llama 3's own (low_freq_factor, high_freq_factor, original_max_position_embeddings)
LLAMA3_ROPE = (1.0, 4.0, 8192)


def rope_factors(model_cfg: Mapping[str, Any]) -> np.ndarray:
    """llama.cpp's per-dimension rope factors [head_dim / 2] of a llama3-scaled model (its
    converter's rope_freqs.weight: each frequency is divided by its factor)."""
    from jaxdl.models.llama import llama_spec, rope_frequencies

    spec = llama_spec(model_cfg)
    plain = rope_frequencies(dataclasses.replace(spec, rope_scaling=None))
    return (plain / rope_frequencies(spec)).astype(np.float32)


def llama3_rope(factors: np.ndarray, model_cfg: Mapping[str, Any], where: str) -> dict:
    """The llama3 rope parameters that give these per-dimension factors (rope_freqs.weight).

    A GGUF keeps only the factors; the config fields that made them are recovered and
    checked: the factor is the largest, and the wavelength band in which factors move
    between 1 and it gives the band's edges (original_max_position_embeddings /
    low_freq_factor and / high_freq_factor; one pair of many equivalent ones, with
    low_freq_factor 1). Llama 3's own values are tried first. Factors none of them
    reproduce within 1e-5 are refused in one line."""
    from jaxdl.models.llama import llama_spec, rope_frequencies

    factors = np.asarray(factors, np.float64).reshape(-1)
    plain = rope_frequencies(dataclasses.replace(llama_spec(model_cfg), rope_scaling=None))
    if factors.shape != plain.shape:
        raise UserError(
            f"{where}: expected {plain.size} factors (head_dim / 2), found {factors.size}. "
            "Fix: convert the model again with llama.cpp's convert_hf_to_gguf.py."
        )
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return {}
    factor = float(factors.max())
    candidates = [LLAMA3_ROPE, *_band_edges(plain, factors, factor)]
    for low, high, original in candidates:
        rope = {
            "rope_scaling": "llama3",
            "rope_factor": factor,
            "rope_low_freq_factor": low,
            "rope_high_freq_factor": high,
            "rope_original_max_len": original,
        }
        if np.allclose(rope_factors({**model_cfg, **rope}), factors, rtol=1e-5, atol=0):
            return rope
    raise UserError(
        f"{where}: per-dimension rope factors that no llama3 rope setting reproduces (largest "
        f"{factor:g}); jaxdl implements default, linear and llama3 rope. Fix: import the model's "
        "Hugging Face folder with `jaxdl import hf:auto`."
    )


def _band_edges(plain: np.ndarray, factors: np.ndarray, factor: float) -> list[tuple]:
    """(low_freq_factor 1, high_freq_factor, original_max_position_embeddings) candidates
    whose band of wavelengths [original / high, original / low] fits the factors: fitted
    through the factors inside it (two or more), else through the one inside it with
    Llama 3's high / low ratio of 4, else spread over the gap between the unscaled and the
    scaled dimensions."""
    wavelen = 2 * np.pi / plain
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 1: unscaled, 0: divided by `factor`
    band = (s > 1e-6) & (s < 1 - 1e-6)
    if band.sum() >= 2:  # s is linear in 1 / wavelength inside the band
        slope, intercept = np.polyfit(1 / wavelen[band], s[band], 1)
        inv_low, inv_high = -intercept / slope, -intercept / slope + 1 / slope  # 1 / edge
    elif band.sum() == 1:
        inv_low = 1 / (wavelen[band][0] * (1 + 3 * s[band][0]))
        inv_high = 4 * inv_low
    elif (s >= 1 - 1e-6).any() and (s <= 1e-6).any():  # short wavelengths unscaled, long scaled
        below, above = wavelen[s >= 1 - 1e-6].max(), wavelen[s <= 1e-6].min()
        gap = above / below
        inv_low, inv_high = 1 / (below * gap ** (2 / 3)), 1 / (below * gap ** (1 / 3))
    else:
        return []
    if not 0 < inv_low < inv_high:
        return []
    high, original = float(inv_high / inv_low), int(round(1 / inv_low))
    # the factors are float32: the fit's round figure first, as configs write them
    return [(1.0, round(high, digits), original) for digits in (3, 6)]


class HfView(Mapping):
    """The GGUF's tensors under Hugging Face keys, each read (and dequantized) on access.
    Tensors of no known role keep their GGUF name, so the mapping reports them unused."""

    def __init__(self, f: GgufFile, model_cfg: Mapping[str, Any]):
        self.f, self.cfg = f, model_cfg
        self.names: dict[str, str] = {}
        known = {}
        for hf_key, tensor, suffix in hf_to_gguf():
            for i in range(model_cfg["num_layers"]) if "{i}" in hf_key else [None]:
                known[gguf_name(tensor, suffix, i)] = hf_key.format(i=i)
        for name in f.tensors:
            if name != ROPE_FREQS:  # read into the config (model_config)
                self.names[known.get(name, name)] = name

    def __getitem__(self, key: str) -> np.ndarray:
        w = self.f.array(self.names[key])
        if self.f.arch in PERMUTED_ARCHS:
            if ".self_attn.q_proj." in key:
                w = unpermute_rows(w, self.cfg["num_heads"])
            elif ".self_attn.k_proj." in key:
                w = unpermute_rows(w, self.cfg["num_kv_heads"])
        return w

    def stand_in(self, key: str) -> np.ndarray:
        """`self[key]`'s shape and dtype without reading it (undoing the row permutation
        keeps the shape), for `mapping.convert(defer=True)`."""
        return self.f.stand_in(self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------ tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells tokens in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by tokenizer.ggml.pre
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (  # Mistral's tekken (Mistral Nemo, Small 3), as transformers' GGUF loader splits
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_FAMILIES = {
    "gpt2": ("gpt2", "default"),
    "digits+gpt2": ("smollm", "starcoder", "refact", "codeshell", "command-r"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"),
    "qwen2": ("qwen2", "deepseek-r1-qwen"),
    "tekken": ("tekken",),
}
SPLITS = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "tekken": TEKKEN_SPLIT}


def pre_tokenizer(family: str):
    """The `tokenizers` pre-tokenizer of a PRE_FAMILIES family."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        return byte_level
    if family == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = SPLITS[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_files(f: GgufFile) -> lm_files.LmFiles:
    """tokenizer.json + tokenizer_config.json + generation_config.json from the metadata:
    a byte-level BPE (``tokenizer.ggml.model`` 'gpt2': Llama 3, Qwen, SmolLM) or a
    SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama), each built as transformers'
    GGUF loader builds it."""
    keys = _gguf().Keys.Tokenizer
    tokens = f.get(keys.LIST, arch=False)
    if not tokens:
        return lm_files.LmFiles(None, {}, {})
    kind, pre = f.get(keys.MODEL, arch=False), f.get(keys.PRE, "default", arch=False)
    types = _per_token(f, keys.TOKEN_TYPE, tokens) or [1] * len(tokens)  # absent: all normal
    ids = {
        "bos_token": f.get(keys.BOS_ID, arch=False),
        "eos_token": f.get(keys.EOS_ID, arch=False),
        "unk_token": f.get(keys.UNK_ID, arch=False),
        "pad_token": f.get(keys.PAD_ID, arch=False),
    }
    specials = {k: None if i is None else tokens[i] for k, i in ids.items()}
    merges = [tuple(m.split(" ", 1)) for m in f.get(keys.MERGES, [], arch=False)]
    if kind == "gpt2":
        tok = _byte_level_tokenizer(f, tokens, types, merges, pre)
        add_bos = bool(f.get(keys.ADD_BOS, False, arch=False))
    elif kind == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos = bool(f.get(keys.ADD_BOS, True, arch=False))
        scores = _per_token(f, keys.SCORES, tokens)
        if not merges and not scores:
            raise UserError(
                f"--from: {f.path}: a SentencePiece vocabulary with neither "
                f"{keys.MERGES} nor {keys.SCORES}, so its merge order is unknown. Fix: import "
                "the model's Hugging Face folder, or convert it again with llama.cpp."
            )
        tok = _sentencepiece_tokenizer(tokens, scores, types, merges, specials, add_bos)
    else:
        raise UserError(
            f"--from: {f.path}: tokenizer model {kind!r}; jaxdl converts GGUF byte-level BPE "
            "('gpt2': Llama 3, Qwen, SmolLM) and SentencePiece BPE ('llama': Llama 2, Mistral, "
            "TinyLlama) tokenizers. Fix: import the model's Hugging Face folder, whose "
            "tokenizer.json jaxdl reads as it is."
        )
    tokenizer_config = dict(specials)
    tokenizer_config["chat_template"] = f.get(keys.CHAT_TEMPLATE, arch=False)
    tokenizer_config["add_bos_token"] = add_bos
    tokenizer_config["add_eos_token"] = bool(f.get(keys.ADD_EOS, False, arch=False))
    tokenizer_config["gguf_pre"] = pre  # export-gguf writes it back
    eos = [i for i in (ids["eos_token"], f.get(keys.EOT_ID, arch=False)) if i is not None]
    generation = {"bos_token_id": ids["bos_token"], "eos_token_id": list(dict.fromkeys(eos))}
    if ids["pad_token"] is not None:
        generation["pad_token_id"] = ids["pad_token"]
    generation = {k: v for k, v in generation.items() if v not in (None, [])}
    return lm_files.LmFiles(tok.to_str().encode("utf-8"), tokenizer_config, generation)


def _per_token(f: GgufFile, key: str, tokens: list) -> list:
    """A per-token metadata list (token types, scores): [] when absent, else one a token."""
    values = f.get(key, [], arch=False)
    if values and len(values) != len(tokens):
        raise UserError(
            f"--from: {f.path}: {key} has {len(values)} entries for {len(tokens)} tokens. "
            "Fix: the file's tokenizer is inconsistent; convert it again with llama.cpp."
        )
    return values


def _byte_level_tokenizer(f: GgufFile, tokens, types, merges, pre: str):
    """GPT-2 style byte-level BPE, split by the pre-tokenizer family llama.cpp names."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    family = next((name for name, pres in PRE_FAMILIES.items() if pre in pres), None)
    if family is None:
        known = sorted(p for pres in PRE_FAMILIES.values() for p in pres)
        raise UserError(
            f"--from: {f.path}: pre-tokenizer {pre!r} is not one jaxdl knows ({', '.join(known)}),"
            " and guessing it would split text differently from the model's training. Fix: "
            "import the model's Hugging Face folder (its tokenizer.json says how)."
        )
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers
    # skips them too): adding them would grow the vocabulary past the model's
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3 and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4 and t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def _sentencepiece_tokenizer(tokens, scores, types, merges, specials, add_bos: bool):
    """A SentencePiece BPE vocabulary (pieces spelled with U+2581 for spaces, <0xXX> byte
    tokens) as transformers' LlamaTokenizer builds it from a GGUF: byte-fallback BPE, a
    Metaspace pre-tokenizer that prepends U+2581 to the first word (transformers does so
    whatever ``tokenizer.ggml.add_space_prefix`` says), merges from the file or else
    derived from the pieces' scores (`merges_from_scores`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if not merges:
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    bos = specials["bos_token"]
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    named = [t for t in (specials[k] for k in ("unk_token", "bos_token", "eos_token")) if t]
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4]
    added = list(dict.fromkeys([*named, *control]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list:
    """BPE merges implied by a SentencePiece vocabulary, as transformers'
    ``generate_merges`` derives them: every split of a piece into two pieces of the
    vocabulary, ordered by the merged piece's score (best first), then by the parts'
    lengths; ties keep the vocabulary's order (both sorts are stable)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def import_gguf(kind: str, path: Path, out: Path) -> Imported:
    """`jaxdl import gguf --from F.gguf`: -> Imported (weights float32, dequantized)."""
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise UserError(
                f"--from: {path} holds {len(found)} .gguf files, expected one. Fix: pass the "
                "file itself."
            )
        path = found[0]
    f = GgufFile(path)
    model_cfg = model_config(f)
    lm = tokenizer_files(f)
    meta = {k: f.get(k, arch=False) for k in ("general.name", "general.license")}
    f.drop_metadata()  # before the weights, so the peak holds one of the two
    variables, report = llama.convert_state(HfView(f, model_cfg), model_cfg)
    report["source_types"] = dict(
        sorted({name: t.tensor_type.name for name, t in f.tensors.items()}.items())
    )
    data = lm.data_config(out, model_cfg["max_len"])
    return Imported(
        config={"model": model_cfg, "data": data, "best_metric": "val_loss"},
        variables=variables,
        report=report,
        files=[path],
        assets=lm.assets(),
        provenance={"gguf": {"architecture": f.arch, **meta}, **lm.provenance()},
    )


# ------------------------------------------------------------------ writing


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """A tokenizer.json as GGUF's ``tokenizer.ggml.*`` lists: `model` 'gpt2' (byte-level BPE,
    split by `pre`) or 'llama' (SentencePiece BPE, with `scores`)."""

    model: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None = None  # a PRE_FAMILIES family ('gpt2' vocabularies)
    scores: list[float] | None = None  # ('llama' vocabularies)


def gguf_vocab(
    tokenizer_json: bytes, tokenizer_config: Mapping[str, Any], vocab_size: int | None = None
) -> GgufVocab:
    """The GGUF lists of a workdir's tokenizer.json: a byte-level BPE (Llama 3, Qwen, SmolLM)
    or a SentencePiece-style byte-fallback BPE (Llama 2, Mistral, TinyLlama); refuses other
    kinds in one line. `vocab_size`: the model's embedding rows, which GGUF readers expect
    one token for each of: ids the tokenizer lacks (Qwen2.5 pads its embedding to a multiple
    of 128) become unused [PADn] tokens, as llama.cpp's converter writes them."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_json)
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    sentencepiece = _is_sentencepiece(spec)
    if model.get("type") != "BPE" or not (decoder == "ByteLevel" or sentencepiece):
        raise UserError(
            f"--workdir: its tokenizer.json is a {model.get('type')!r} model with a "
            f"{decoder!r} decoder, neither a byte-level BPE nor a SentencePiece-style "
            "byte-fallback BPE with U+2581 spaces, the two GGUF vocabularies export-gguf "
            "writes. Fix: export with `jaxdl export-hf` and convert with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise UserError(
            f"--workdir: its tokenizer has {size} tokens, more than the model's vocab_size "
            f"{vocab_size}, so ids past {vocab_size - 1} have no embedding. Fix: export the "
            "tokenizer the model was trained with."
        )
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    size = size if vocab_size is None else vocab_size
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    added = {a["content"]: a.get("special", False) for a in spec.get("added_tokens", [])}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    types = [5 if i not in by_id else k for i, k in enumerate(types)]  # UNUSED
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    if sentencepiece:
        if spaced := next((m for m in pairs if " " in m[0] or " " in m[1]), None):
            raise UserError(
                f"--workdir: its tokenizer merges {spaced} holds a literal space, which "
                "GGUF's 'left right' merge strings cannot spell. Fix: export with `jaxdl "
                "export-hf` and convert with llama.cpp's convert_hf_to_gguf.py."
            )
        ids = {t: i for i, t in enumerate(tokens)}
        unk = tokenizer_config.get("unk_token") or model.get("unk_token")
        for i, t in enumerate(tokens):
            if t == unk:
                types[i] = 2  # UNKNOWN
            elif BYTE_TOKEN.fullmatch(t):
                types[i] = 6  # BYTE
        # llama.cpp merges SentencePiece pieces by their score, best first: a piece scores
        # minus the rank of the first merge that makes it, so its order is the merges'
        scores = [0.0] * size
        made = set()
        for rank, (left, right) in enumerate(pairs):
            piece = left + right
            if piece in ids and piece not in made:
                made.add(piece)
                scores[ids[piece]] = -float(rank + 1)
        merges = [f"{left} {right}" for left, right in pairs]
        return GgufVocab("llama", tokens, types, merges, scores=scores)
    merges = [" ".join(m) for m in pairs]
    pre = _split_key(spec.get("pre_tokenizer"))
    family = next((name for name in PRE_FAMILIES if _pre_json(name) == pre), None)
    if family is None:
        names = ", ".join(pres[0] for pres in PRE_FAMILIES.values())
        raise UserError(
            "--workdir: its tokenizer's pre-tokenizer matches none of the llama.cpp ones "
            f"jaxdl writes ({names}). Fix: export with `jaxdl export-hf` and convert with "
            "llama.cpp's convert_hf_to_gguf.py, which identifies it by hash."
        )
    return GgufVocab("gpt2", tokens, types, merges, pre=family)


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _is_sentencepiece(spec: Mapping[str, Any]) -> bool:
    """Whether a tokenizer.json is a SentencePiece BPE as GGUF's 'llama' vocabulary means
    it: byte fallback, spaces spelled U+2581 with one prepended to the text, by a Metaspace
    pre-tokenizer (transformers' current form) or a Prepend + Replace normalizer (the
    legacy one, TinyLlama's). GGUF readers prepend by their own rule (transformers: at the
    start of the text), so a 'legacy' prefix after each special token is not kept."""
    model, pre, norm = spec.get("model", {}), spec.get("pre_tokenizer"), spec.get("normalizer")
    decoders = [d.get("type") for d in (spec.get("decoder") or {}).get("decoders", [])]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    if "ByteFallback" not in decoders:
        return False
    if pre and pre.get("type") == "Metaspace":
        prepends = pre.get("prepend_scheme") in ("first", "always")
        return pre.get("replacement") == "\u2581" and prepends
    steps = (norm or {}).get("normalizers", [norm] if norm else [])
    return pre is None and steps == [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]


def _pre_json(family: str) -> str:
    """The pre-tokenizer of `family` as `_split_key` spells it."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(family)
    return _split_key(json.loads(tok.to_str())["pre_tokenizer"])


def _split_key(pre: Any) -> str:
    """A tokenizer.json pre-tokenizer as JSON with sorted keys, without ByteLevel's
    trim_offsets: it changes the offsets, not the tokens (Llama 3's and SmolLM's are true,
    Qwen2's false, and their GGUF families say nothing of it)."""

    def tokens_only(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: tokens_only(v) for k, v in value.items() if k != "trim_offsets"}
        if isinstance(value, list):
            return [tokens_only(v) for v in value]
        return value

    return json.dumps(tokens_only(pre), sort_keys=True)


def export_gguf(workdir: str | os.PathLike, out: str | os.PathLike, kind: str = "f16") -> dict:
    """Write a Llama-family workdir (LoRA merged) as one GGUF file `out`; -> summary."""
    from jaxdl.checkpoint.load import load_run_config
    from jaxdl.checkpoint.read import load_params
    from jaxdl.fileio import atomic_path

    gguf = _gguf()
    if kind not in EXPORT_TYPES:
        raise UserError(f"--type: expected one of {list(EXPORT_TYPES)}, found {kind!r}.")
    workdir, out = Path(workdir), Path(out)
    cfg = load_run_config(workdir)
    if cfg.model.name != "llama":
        raise UserError(
            f"--workdir: model.name={cfg.model.name!r}; export-gguf writes Llama-family models "
            "(model.name='llama'). Fix: pass an imported or fine-tuned Llama-family workdir."
        )
    model_cfg = cfg.model.to_dict()
    spec = llama.llama_spec(model_cfg)
    lm = lm_files.from_workdir(workdir, cfg.data.tokenizer)
    if lm.tokenizer is None:
        raise UserError(
            f"--workdir: {workdir} has no tokenizer (imported weights-only), and a GGUF without "
            "one is of no use to llama.cpp. Fix: import the model again with its tokenizer."
        )
    vocab = gguf_vocab(lm.tokenizer, lm.tokenizer_config, spec.vocab_size)
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[
        llama.model_type_for(spec)
    ]
    state = llama.to_state_dict(load_params(workdir), model_cfg)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(workdir.absolute().name)
        w.add_file_type(file_type[kind])
        w.add_vocab_size(spec.vocab_size)
        w.add_context_length(spec.max_len)
        w.add_embedding_length(spec.embed_dim)
        w.add_block_count(spec.num_layers)
        w.add_feed_forward_length(spec.mlp_dim)
        w.add_head_count(spec.num_heads)
        w.add_head_count_kv(spec.num_kv_heads)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_freq_base(spec.rope_base)
        w.add_layer_norm_rms_eps(spec.norm_eps)
        if spec.rope_scaling == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(spec.rope_factor)
        elif spec.rope_scaling == "llama3":  # as llama.cpp's converter writes it
            w.add_tensor(ROPE_FREQS, rope_factors(model_cfg))
        if spec.sliding_window is not None:
            w.add_sliding_window(spec.sliding_window)
        w.add_tokenizer_model(vocab.model)
        if vocab.model == "gpt2":
            w.add_tokenizer_pre(lm.tokenizer_config.get("gguf_pre") or PRE_FAMILIES[vocab.pre][0])
        else:
            w.add_add_space_prefix(True)
            w.add_token_scores(vocab.scores)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        _add_special_ids(w, lm, vocab.tokens)
        if lm.tokenizer_config.get("chat_template"):
            w.add_chat_template(lm.tokenizer_config["chat_template"])
        for hf_key, tensor, suffix in hf_to_gguf():
            for i in range(spec.num_layers) if "{i}" in hf_key else [None]:
                key = hf_key.format(i=i)
                if key not in state:
                    continue
                value = state.pop(key)
                if arch in PERMUTED_ARCHS and ".self_attn.q_proj." in key:
                    value = permute_rows(value, spec.num_heads)
                elif arch in PERMUTED_ARCHS and ".self_attn.k_proj." in key:
                    value = permute_rows(value, spec.num_kv_heads)
                _add_tensor(w, gguf_name(tensor, suffix, i), value, qtype)
        assert not state, sorted(state)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"file": str(out), "bytes": out.stat().st_size, "type": kind, "architecture": arch}


def _add_special_ids(w: Any, lm: lm_files.LmFiles, tokens: list[str]) -> None:
    ids = {t: i for i, t in enumerate(tokens)}
    config, generation = lm.tokenizer_config, lm.generation_config
    for key, add in (("bos_token", w.add_bos_token_id), ("unk_token", w.add_unk_token_id)):
        if config.get(key) in ids:
            add(ids[config[key]])
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if config.get("eos_token") in ids:
        eos.insert(0, ids[config["eos_token"]])
    if eos:
        w.add_eos_token_id(eos[0])
        if len(eos) > 1 and eos[1] != eos[0]:
            w.add_eot_token_id(eos[1])
    pad = generation.get("pad_token_id", ids.get(config.get("pad_token")))
    if pad is not None:
        w.add_pad_token_id(int(pad))
    first, last = _template_ends(lm.tokenizer)
    adds_bos = first is not None and first == config.get("bos_token")
    adds_eos = last is not None and last == config.get("eos_token")
    w.add_add_bos_token(bool(config.get("add_bos_token", adds_bos)))
    w.add_add_eos_token(bool(config.get("add_eos_token", adds_eos)))


def _template_ends(tokenizer_json: bytes) -> tuple[str | None, str | None]:
    """The special tokens a tokenizer.json's post-processor puts before and after a single
    text (Llama 3's adds <|begin_of_text|> so), which a tokenizer_config.json without
    add_bos_token / add_eos_token leaves in charge, as transformers and llama.cpp's
    converter read it."""
    post = json.loads(tokenizer_json).get("post_processor") or {}
    for step in post.get("processors", [post]):
        if step.get("type") == "TemplateProcessing" and len(step.get("single", [])) > 1:
            ends = [step["single"][i].get("SpecialToken", {}).get("id") for i in (0, -1)]
            return ends[0], ends[1]
    return None, None


def _add_tensor(w: Any, name: str, value: np.ndarray, qtype: Any) -> None:
    """Matrices in `qtype` (Q8_0 needs rows of whole 32-blocks, else F16); vectors F32, as
    llama.cpp's converter writes them."""
    from gguf.quants import quantize

    gguf = _gguf()
    if value.ndim == 1:
        w.add_tensor(name, value.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and value.shape[-1] % 32 == 0:
        w.add_tensor(name, quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, value.astype(np.float16))
