"""Hugging Face Llama-family checkpoints (llama, mistral, qwen2, qwen3) <-> jaxdl's `llama`.

One table (`TABLE`) names every weight both ways, in KerasHub's manner: the jaxdl path
under ``params/``, the Hugging Face key, and how the array moves (``linear``: torch's
[out, in] weight is the transpose of Flax's [in, out] kernel; ``copy``: as it is). Import
builds `mapping.Rule`s from it; export walks it backwards.

    llama.model_config(hf_config) -> the config's model section (or one UserError naming
                                     the field jaxdl cannot reproduce)
    llama.convert_state(state, model_cfg) -> (variables, report); leaves are Deferred
                                     (converted as the checkpoint writes them)
                                     where the source reads tensors on access
    llama.to_state_dict(params, model_cfg) -> {HF key: array}           (export-hf)
    llama.hf_config(model_cfg, special_ids) -> config.json for transformers   (export-hf)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.checkpoint.deferred import split_layers
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop.mapping import Rule, convert, transpose
from jaxdl.models.llama import Llama, LlamaSpec, llama_spec

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# (jaxdl path under params/, Hugging Face key, how); {i} is the layer. Rows whose weight a
# model lacks (biases, q/k norms, an untied head) are dropped by `table_for`.
TABLE = [
    ("embed/embedding", "model.embed_tokens.weight", "copy"),
    ("norm/scale", "model.norm.weight", "copy"),
    ("lm_head/kernel", "lm_head.weight", "linear"),
    ("layer_{i}/attn_norm/scale", "model.layers.{i}.input_layernorm.weight", "copy"),
    ("layer_{i}/mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    ("layer_{i}/attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", "linear"),
    ("layer_{i}/attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", "linear"),
    ("layer_{i}/attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", "linear"),
    ("layer_{i}/attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", "linear"),
    ("layer_{i}/attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", "copy"),
    ("layer_{i}/attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", "copy"),
    ("layer_{i}/attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", "copy"),
    ("layer_{i}/attn/o_proj/bias", "model.layers.{i}.self_attn.o_proj.bias", "copy"),
    ("layer_{i}/attn/q_norm/scale", "model.layers.{i}.self_attn.q_norm.weight", "copy"),
    ("layer_{i}/attn/k_norm/scale", "model.layers.{i}.self_attn.k_norm.weight", "copy"),
    ("layer_{i}/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", "linear"),
    ("layer_{i}/mlp/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", "linear"),
    ("layer_{i}/mlp/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", "linear"),
]
STACKED = Llama.STACKED
HOW = {"copy": lambda x, shape: x, "linear": transpose}


def _refuse(field: str, found: Any, why: str) -> UserError:
    return UserError(
        f"config.json: {field}={found!r} is not supported ({why}). Fix: import a checkpoint "
        "of a standard Llama, Mistral, Qwen2 or Qwen3 architecture."
    )


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """rope base and scaling from transformers v5's ``rope_parameters`` or v4's
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_base": float(base)}
    if kind in ("default", None):
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params["original_max_position_embeddings"]),
        }
    raise _refuse("rope_type", kind, "jaxdl implements default, linear and llama3 rope")


def _field(hf: Mapping[str, Any], name: str) -> Any:
    if hf.get(name) is None:
        raise UserError(
            f"config.json: expected the field {name!r}, found nothing. Fix: restore the "
            "config.json that save_pretrained wrote with these weights."
        )
    return hf[name]


def model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A Llama-family config.json -> the jaxdl model section that rebuilds it."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise _refuse("model_type", model_type, f"hf:auto imports {MODEL_TYPES} and gpt2")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf.get("hidden_act"), "jaxdl's Llama MLP is SwiGLU (silu)")
    if hf.get("mlp_bias", False):
        raise _refuse("mlp_bias", True, "jaxdl's Llama MLP has no biases")
    if hf.get("use_sliding_window", False):
        raise _refuse("use_sliding_window", True, "per-layer sliding windows are not implemented")
    heads = int(_field(hf, "num_attention_heads"))
    embed_dim = int(_field(hf, "hidden_size"))
    attention_bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if model_type == "mistral" else None
    return {
        "name": "llama",
        "vocab_size": int(_field(hf, "vocab_size")),
        "num_layers": int(_field(hf, "num_hidden_layers")),
        "embed_dim": embed_dim,
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or embed_dim // heads),
        "mlp_dim": int(_field(hf, "intermediate_size")),
        "max_len": int(hf.get("max_position_embeddings", 2048)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always biases q, k and v; Llama's and Qwen3's attention_bias covers o too
        "qkv_bias": model_type == "qwen2" or attention_bias,
        "o_bias": model_type != "qwen2" and attention_bias,
        "qk_norm": model_type == "qwen3",
        "sliding_window": None if window is None else int(window),
        **_rope(hf),
    }


def table_for(spec: LlamaSpec) -> list[tuple[str, str, str]]:
    """The TABLE rows this architecture has weights for."""

    def has(path: str) -> bool:
        leaf = path.rsplit("/", 2)
        if path == "lm_head/kernel":
            return not spec.tie_embeddings
        if leaf[-1] == "bias":
            return spec.o_bias if leaf[-2] == "o_proj" else spec.qkv_bias
        if leaf[-2] in ("q_norm", "k_norm"):
            return spec.qk_norm
        return True

    return [row for row in TABLE if has(row[0])]


def rules(spec: LlamaSpec) -> list[Rule]:
    """`mapping.Rule`s (per-layer target paths; scanned models go through STACKED)."""
    out = []
    for path, key, how in table_for(spec):
        target = "params/" + re.escape(path).replace(r"\{i\}", r"(\d+)")
        out.append(Rule(target, key.replace("{i}", "{0}"), HOW[how]))
    return out


def target_shapes(model_cfg: Mapping[str, Any]) -> dict:
    """The model's variables as ShapeDtypeStructs (no weights computed)."""
    from jaxdl.models import create_model

    model = create_model(model_cfg)
    x = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda r, t: model.init(r, t), jax.random.PRNGKey(0), x)


def convert_state(
    state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any]
) -> tuple[dict, dict]:
    """A Llama-family state dict -> (variables, report) for the model `model_cfg` describes.
    A tied model's stored ``lm_head.weight`` must equal the embedding; it is then ignored."""
    spec = llama_spec(model_cfg)
    ignore = []
    if spec.tie_embeddings and "lm_head.weight" in state:
        if not np.array_equal(state["lm_head.weight"], state.get("model.embed_tokens.weight")):
            raise _refuse("tie_word_embeddings", True, "lm_head.weight differs from the embedding")
        ignore.append(r"lm_head\.weight")
    ignore.append(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older files' buffer
    # deferred leaves where the source reads tensors on access: each is read and converted
    # as the workdir's checkpoint writes it, so the import holds one leaf, not the model
    shapes = target_shapes(model_cfg)
    return convert(state, shapes, rules(spec), ignore=ignore, stacked=STACKED, defer=True)


def per_layer(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat {"params/...": array} with scanned layers split into ``layer_{i}`` paths."""
    return split_layers(tree_lib.flatten({"params": params}), STACKED)


def to_state_dict(
    params: Mapping[str, Any], model_cfg: Mapping[str, Any], dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """jaxdl params (the "params" collection's content) -> the CausalLM's state dict."""
    spec = llama_spec(model_cfg)
    flat = per_layer(params)
    out = {}
    for path, key, how in table_for(spec):
        for i in range(spec.num_layers) if "{i}" in path else [None]:
            value = np.asarray(flat.pop("params/" + path.format(i=i)), np.float32)
            value = value.T if how == "linear" else value
            out[key.format(i=i)] = np.ascontiguousarray(value.astype(dtype))
    assert not flat, sorted(flat)
    return out


def model_type_for(spec: LlamaSpec, preferred: str | None = None) -> str:
    """The transformers architecture that has this spec's layers: `preferred` (the source's
    model_type) when it fits, else the one its biases, norms and window imply."""
    fits = {
        "llama": not spec.qk_norm and spec.qkv_bias == spec.o_bias and not spec.sliding_window,
        "mistral": not spec.qk_norm and not spec.qkv_bias and not spec.o_bias,
        "qwen2": not spec.qk_norm and spec.qkv_bias and not spec.o_bias,
        "qwen3": spec.qk_norm and spec.qkv_bias == spec.o_bias and not spec.sliding_window,
    }
    if preferred in fits and fits[preferred]:
        return preferred
    for model_type in ("llama", "qwen2", "qwen3", "mistral"):
        if fits[model_type]:
            return model_type
    raise UserError(
        f"--workdir: the model has qk_norm={spec.qk_norm}, qkv_bias={spec.qkv_bias}, "
        f"o_bias={spec.o_bias}, sliding_window={spec.sliding_window}, which no transformers "
        "architecture combines. Fix: export a model with Llama's, Mistral's, Qwen2's or Qwen3's "
        "layout."
    )


def hf_config(
    model_cfg: Mapping[str, Any], special: Mapping[str, Any], preferred: str | None = None
) -> dict:
    """The jaxdl model section -> a transformers config.json (`special`: bos/eos/pad ids)."""
    spec = llama_spec(model_cfg)
    model_type = model_type_for(spec, preferred)
    rope: dict[str, Any] = {"rope_theta": spec.rope_base, "rope_type": "default"}
    if spec.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=spec.rope_factor)
    elif spec.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=spec.rope_factor,
            low_freq_factor=spec.rope_low_freq_factor,
            high_freq_factor=spec.rope_high_freq_factor,
            original_max_position_embeddings=spec.rope_original_max_len,
        )
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.embed_dim,
        "intermediate_size": spec.mlp_dim,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_len,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": spec.rope_base,  # transformers v4 reads this one
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        **{k: v for k, v in special.items() if v is not None},
    }
    if rope["rope_type"] != "default":
        config["rope_scaling"] = rope  # v4's name
    if model_type in ("llama", "qwen3"):
        config["attention_bias"] = spec.qkv_bias
        config["mlp_bias"] = False
    if model_type == "mistral":
        config["sliding_window"] = spec.sliding_window
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    return config
