"""GGUF (llama.cpp, Ollama) <-> jaxdl's `llama`: weights, config and tokenizer.

Import reads the file with the ``gguf`` package (memory-mapped) and presents it as a
Hugging Face state dict (`HfView`: HF key -> float32 array in torch's layout, dequantized
when read, llama.cpp's row permutation of the Q and K projections undone), so the one
table in `jaxdl.interop.llama` maps it, tensor by tensor. The architecture comes from the
metadata (``{arch}.block_count``, ...), the tokenizer from ``tokenizer.ggml.*``
(`jaxdl.interop.gguf_tokenizer`: a ``tokenizer.json`` the ``tokenizers`` package loads,
with the chat template and special tokens beside it). Export writes the reverse with
``gguf.GGUFWriter`` (F16 or Q8_0 matrices, F32 norms, llama3 rope as rope_freqs.weight),
so llama.cpp, Ollama and transformers' GGUF loader read it.

Key and tensor names come from ``gguf.constants`` (`Keys`, `TENSOR_NAMES`): never
spelled here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.errors import UserError
from jaxdl.interop import llama, lm_files
from jaxdl.interop.gguf_tokenizer import add_tokenizer, gguf_package, gguf_vocab, tokenizer_files
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


def hf_to_gguf() -> list[tuple[str, Any, str]]:
    """(HF key template, gguf MODEL_TENSOR, suffix) for every Llama-family weight."""
    t = gguf_package().MODEL_TENSOR
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
    return gguf_package().TENSOR_NAMES[tensor].format(bid=layer) + "." + suffix


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
        gguf = gguf_package()
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
    keys = gguf_package().Keys
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
    if factor <= 1:  # no dimension is scaled down: no band to fit
        return []
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


def export_gguf(workdir: str | os.PathLike, out: str | os.PathLike, kind: str = "f16") -> dict:
    """Write a Llama-family workdir (LoRA merged) as one GGUF file `out`; -> summary."""
    from jaxdl.checkpoint.load import load_run_config
    from jaxdl.checkpoint.read import load_params
    from jaxdl.fileio import atomic_path

    gguf = gguf_package()
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
        add_tokenizer(w, vocab, lm)
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


def _add_tensor(w: Any, name: str, value: np.ndarray, qtype: Any) -> None:
    """Matrices in `qtype` (Q8_0 needs rows of whole 32-blocks, else F16); vectors F32, as
    llama.cpp's converter writes them."""
    from gguf.quants import quantize

    gguf = gguf_package()
    if value.ndim == 1:
        w.add_tensor(name, value.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and value.shape[-1] % 32 == 0:
        w.add_tensor(name, quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, value.astype(np.float16))
