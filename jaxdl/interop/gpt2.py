"""Hugging Face GPT-2 (gpt2, -medium, -large, -xl, distilgpt2) <-> jaxdl's Transformer.

GPT-2 is jaxdl's decoder exactly: pre-LayerNorm blocks, learned positions, tanh-GELU MLP
(``gelu_new``), the output projection tied to the token embedding, LayerNorm epsilon from
config.json (1e-5). GPT-2's ``Conv1D`` stores weights as [in, out], already Flax's kernel
layout; the fused ``c_attn`` [D, 3D] splits into query, key, value in that order. The
``attn.bias``/``attn.masked_bias`` buffers are causal masks, not weights (ignored).

    gpt2.model_config(hf_config) -> the config's model section (or a UserError saying
                                    which flag jaxdl cannot reproduce)
    gpt2.convert_state(state, model_cfg) -> (variables, report)
    gpt2.import_gpt2(kind, path, out) -> workdir.Imported      (the `jaxdl import` entry)
    gpt2.to_state_dict(params, model_cfg) -> {HF key: array}   (`jaxdl export-hf`)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop import lm_files, readers
from jaxdl.interop.mapping import Renamed, Rule, convert, split
from jaxdl.interop.workdir import Imported
from jaxdl.models.transformer import Transformer, transformer_spec

# Target paths are per layer; scanned models reach them through convert(stacked=...).
RULES = [
    Rule(r"params/embed/embedding", "wte.weight"),
    Rule(r"params/pos_embed", "wpe.weight"),
    Rule(r"params/ln_f/scale", "ln_f.weight"),
    Rule(r"params/ln_f/bias", "ln_f.bias"),
    Rule(r"params/block_(\d+)/ln1/scale", "h.{0}.ln_1.weight"),
    Rule(r"params/block_(\d+)/ln1/bias", "h.{0}.ln_1.bias"),
    Rule(r"params/block_(\d+)/ln2/scale", "h.{0}.ln_2.weight"),
    Rule(r"params/block_(\d+)/ln2/bias", "h.{0}.ln_2.bias"),
    Rule(r"params/block_(\d+)/attn/query/kernel", "h.{0}.attn.c_attn.weight", split(1, 0, 3)),
    Rule(r"params/block_(\d+)/attn/key/kernel", "h.{0}.attn.c_attn.weight", split(1, 1, 3)),
    Rule(r"params/block_(\d+)/attn/value/kernel", "h.{0}.attn.c_attn.weight", split(1, 2, 3)),
    Rule(r"params/block_(\d+)/attn/query/bias", "h.{0}.attn.c_attn.bias", split(0, 0, 3)),
    Rule(r"params/block_(\d+)/attn/key/bias", "h.{0}.attn.c_attn.bias", split(0, 1, 3)),
    Rule(r"params/block_(\d+)/attn/value/bias", "h.{0}.attn.c_attn.bias", split(0, 2, 3)),
    Rule(r"params/block_(\d+)/attn/out/kernel", "h.{0}.attn.c_proj.weight"),
    Rule(r"params/block_(\d+)/attn/out/bias", "h.{0}.attn.c_proj.bias"),
    Rule(r"params/block_(\d+)/mlp/fc1/kernel", "h.{0}.mlp.c_fc.weight"),
    Rule(r"params/block_(\d+)/mlp/fc1/bias", "h.{0}.mlp.c_fc.bias"),
    Rule(r"params/block_(\d+)/mlp/fc2/kernel", "h.{0}.mlp.c_proj.weight"),
    Rule(r"params/block_(\d+)/mlp/fc2/bias", "h.{0}.mlp.c_proj.bias"),
]
# HF names its LayerNorm and Conv1D parameters weight/bias; Flax says scale/bias, kernel/bias.
_HF_NAME = {"scale": "weight", "kernel": "weight", "bias": "bias"}
IGNORE = [r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"]
STACKED = Transformer.STACKED
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the same function, two implementations


def _refuse(field: str, found: Any, why: str) -> UserError:
    return UserError(
        f"config.json: {field}={found!r} is not supported ({why}). Fix: import a standard "
        "GPT-2 checkpoint (gpt2, gpt2-medium/-large/-xl, distilgpt2)."
    )


def model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A GPT-2 config.json -> the jaxdl model section that rebuilds the architecture."""
    if hf.get("model_type") != "gpt2":
        raise _refuse("model_type", hf.get("model_type"), "hf:gpt2 imports GPT-2 models only")
    checks = [
        ("tie_word_embeddings", True, "jaxdl ties the output projection to the embedding"),
        ("scale_attn_weights", True, "jaxdl always scales attention by 1/sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, "jaxdl has no per-layer attention scale"),
        ("reorder_and_upcast_attn", False, "jaxdl has no reordered attention upcast"),
        ("add_cross_attention", False, "jaxdl's decoder has no cross-attention"),
    ]
    for field, want, why in checks:
        if bool(hf.get(field, want)) != want:
            raise _refuse(field, hf.get(field), why)
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise _refuse("activation_function", act, "jaxdl's GPT-2 MLP is the tanh GELU, gelu_new")
    sizes = ("vocab_size", "n_layer", "n_head", "n_embd", "n_positions")
    bad = {k: hf.get(k) for k in sizes if type(hf.get(k)) is not int or hf[k] < 1}
    if bad:
        raise UserError(
            f"config.json: expected positive integers {list(sizes)}, found {bad} "
            "(None: missing). Fix: use the config.json saved with the weights."
        )
    if hf["n_embd"] % hf["n_head"]:
        raise _refuse("n_head", hf["n_head"], f"n_embd={hf['n_embd']} is not a multiple of it")
    embed_dim, inner = int(hf["n_embd"]), hf.get("n_inner")
    if inner is not None and int(int(inner) / embed_dim * embed_dim) != int(inner):
        raise _refuse(
            "n_inner", inner, f"not a width jaxdl's mlp_ratio reaches from n_embd={embed_dim}"
        )
    return {
        "name": "transformer",
        "size": "small",  # every field below overrides the preset
        "vocab_size": int(hf["vocab_size"]),
        "num_layers": int(hf["n_layer"]),
        "num_heads": int(hf["n_head"]),
        "embed_dim": embed_dim,
        "mlp_ratio": 4 if inner is None else int(inner) / embed_dim,
        "max_len": int(hf["n_positions"]),
        "positions": "learned",
        "mlp": "gelu",
        "layernorm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        # jaxdl drops out the embedding and each residual branch (GPT-2's embd/resid_pdrop)
        "dropout_rate": float(hf.get("resid_pdrop", 0.0)),
    }


def target_shapes(model_cfg: Mapping[str, Any]) -> dict:
    """The model's variables as ShapeDtypeStructs (no weights computed)."""
    from jaxdl.models import create_model

    model = create_model(model_cfg)
    x = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda r, t: model.init(r, t), jax.random.PRNGKey(0), x)


def _canonical(state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Keys without GPT2LMHeadModel's "transformer." prefix (a view: nothing is read). An
    lm_head.weight (older pytorch_model.bin files hold the tied copy) must equal wte.weight;
    IGNORE lists it."""
    out = Renamed(state, lambda k: k.removeprefix("transformer."))
    if "lm_head.weight" in out and "wte.weight" in out:
        if not np.array_equal(out["lm_head.weight"], out["wte.weight"]):
            raise _refuse("lm_head.weight", "untied", "jaxdl ties the output projection")
    return out


def convert_state(
    state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any]
) -> tuple[dict, dict]:
    """A GPT-2 state dict -> (variables, report) for the Transformer `model_cfg` describes
    (``scan_layers=True`` gives the stacked layout)."""
    shapes = target_shapes(model_cfg)
    return convert(_canonical(state), shapes, RULES, ignore=IGNORE, stacked=STACKED, defer=True)


def to_state_dict(params: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """jaxdl params (the "params" collection's content) -> GPT2LMHeadModel's state dict
    (float32, contiguous; the tied lm_head.weight left to transformers)."""
    flat = tree_lib.flatten({"params": params})
    for stacked_prefix, layer in STACKED.items():
        for path in [p for p in flat if p.startswith(stacked_prefix + "/")]:
            rest = path[len(stacked_prefix) :]
            for i, value in enumerate(np.asarray(flat.pop(path))):
                flat[layer.format(i) + rest] = value
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        parts = path.split("/")
        if parts[1].startswith("block_"):
            i, module, *rest = parts[1].removeprefix("block_"), *parts[2:]
            leaf = rest[-1]
            if module == "attn" and rest[0] in ("query", "key", "value"):
                qkv.setdefault(f"h.{i}.attn.c_attn.{_HF_NAME[leaf]}", {})[rest[0]] = value
                continue
            hf_module = {
                ("ln1",): "ln_1",
                ("ln2",): "ln_2",
                ("attn", "out"): "attn.c_proj",
                ("mlp", "fc1"): "mlp.c_fc",
                ("mlp", "fc2"): "mlp.c_proj",
            }[(module, *rest[:-1])]
            out[f"h.{i}.{hf_module}.{_HF_NAME[leaf]}"] = value
        elif parts[1] == "embed":
            out["wte.weight"] = value
        elif parts[1] == "pos_embed":
            out["wpe.weight"] = value
        else:
            assert parts[1] == "ln_f", path
            out[f"ln_f.{_HF_NAME[parts[2]]}"] = value
    for key, pieces in qkv.items():
        axis = 1 if key.endswith("weight") else 0
        out[key] = np.concatenate([pieces[n] for n in ("query", "key", "value")], axis=axis)
    expected = set(_canonical_keys(transformer_spec(model_cfg).num_layers))
    assert set(out) == expected, sorted(set(out) ^ expected)
    return {f"transformer.{k}": np.ascontiguousarray(v) for k, v in sorted(out.items())}


def _canonical_keys(num_layers: int) -> list[str]:
    keys = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
    for i in range(num_layers):
        for name in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"h.{i}.{name}.weight", f"h.{i}.{name}.bias"]
    return keys


def hf_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The jaxdl model section -> a GPT-2 config.json (inverse of `model_config`)."""
    if model_cfg.get("name") != "transformer":
        raise UserError(
            f"--workdir: model.name={model_cfg.get('name')!r}, expected 'transformer'. "
            "Fix: export-hf writes GPT-2 models only."
        )
    spec = transformer_spec(model_cfg)
    gelu_tanh = model_cfg.get("gelu_approximate", True)
    if spec.positions != "learned" or spec.mlp != "gelu" or not gelu_tanh:
        raise UserError(
            f"--workdir: model.positions={spec.positions!r}, model.mlp={spec.mlp!r}, "
            f"model.gelu_approximate={gelu_tanh}; GPT-2 needs 'learned', 'gelu' and the tanh "
            "GELU. Fix: export-hf writes GPT-2-shaped models only."
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.max_len,
        "n_embd": spec.embed_dim,
        "n_layer": spec.num_layers,
        "n_head": spec.num_heads,
        "n_inner": spec.mlp_dim,
        "layer_norm_epsilon": float(model_cfg.get("layernorm_eps", 1e-6)),
        # jaxdl drops out the embedding and each residual branch, never attention weights
        "resid_pdrop": float(model_cfg.get("dropout_rate", 0.0)),
        "embd_pdrop": float(model_cfg.get("dropout_rate", 0.0)),
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "bos_token_id": spec.vocab_size - 1,
        "eos_token_id": spec.vocab_size - 1,
    }


def read_config(path: Path) -> dict[str, Any]:
    """config.json next to the weights (the folder given, or the weights file's folder)."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"--from: no config.json in {folder} (hf:gpt2 reads the architecture from it). "
            "Fix: pass the folder save_pretrained wrote."
        )
    try:
        hf = json.loads(config_path.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
        return hf
    except ValueError as err:
        raise UserError(
            f"--from: {config_path} is not valid JSON ({err}). Fix: restore it."
        ) from err


def import_gpt2(kind: str, path: Path, out: Path) -> Imported:
    """`jaxdl import hf:gpt2`: a save_pretrained folder (or weights file) -> Imported."""
    hf = read_config(path)
    model_cfg = model_config(hf)
    state, files = readers.stream_state_dict(path)
    variables, report = convert_state(state, model_cfg)
    del state
    folder = path if path.is_dir() else path.parent
    lm = lm_files.from_hf_folder(folder, hf)
    return Imported(
        config={
            "model": model_cfg,
            "data": {
                **lm.data_config(out, model_cfg["max_len"]),
                "seq_len": min(128, model_cfg["max_len"]),
            },
            "best_metric": "val_loss",
        },
        variables=variables,
        report=report,
        files=[folder / "config.json", *files],
        assets=lm.assets(),
        provenance={"hf_config": hf, **lm.provenance()},
    )
