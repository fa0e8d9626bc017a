"""timm and torchvision Vision Transformers -> jaxdl's ``vit`` model (`jaxdl.models.vit`).

Both compute what jaxdl's ViT computes (patch conv, class token, position table over class
token and patches, pre-LayerNorm blocks with eps 1e-6, exact GELU, final LayerNorm, head on
the class token); they differ in names and in the fused attention input projection
(``attn.qkv`` / ``in_proj_weight``: q, k, v stacked on the output axis), which the tables
split into jaxdl's separate ``query``/``key``/``value`` Dense layers.

The KIND names the preset (``timm:vit_base_patch16_384``: width, depth, heads, patch, image
size). A ``config.json`` beside the weights may carry ``model_args``, the constructor's
keyword arguments (`timm.create_model`'s ``img_size``, ``embed_dim``...; for torchvision,
``VisionTransformer``'s ``image_size``, ``hidden_dim``...), which override the preset, and
timm's ``pretrained_cfg`` (``mean``/``std``) which sets the normalization.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop.mapping import Rule, chain, convert, oihw_to_hwio, split, transpose
from jaxdl.interop.vision import import_vision, target_tree
from jaxdl.interop.workdir import Imported

_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # width, heads (12 layers)
_PRESETS = {"tiny": "Ti", "small": "S", "base": "B", "b": "B"}  # jaxdl.models.vit.SIZES
KINDS = (
    *(f"timm:vit_{s}_patch16_{px}" for s in _SIZES for px in (224, 384)),
    "torchvision:vit_b_16",
)
_QKV = ("query", "key", "value")
BLOCK = r"params/block_(\d+)"


def _qkv_rules(weight: str, bias: str) -> list[Rule]:
    """q, k, v Dense layers from one fused [3D, D] weight and [3D] bias (q, k, v stacked)."""
    rules = []
    for i, name in enumerate(_QKV):
        rules.append(Rule(f"{BLOCK}/attn/{name}/kernel", weight, chain(split(0, i, 3), transpose)))
        rules.append(Rule(f"{BLOCK}/attn/{name}/bias", bias, split(0, i, 3)))
    return rules


def _dense(target: str, source: str) -> list[Rule]:
    return [
        Rule(f"{target}/kernel", f"{source}.weight", transpose),
        Rule(f"{target}/bias", f"{source}.bias"),
    ]


def _norm(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}/scale", f"{source}.weight"), Rule(f"{target}/bias", f"{source}.bias")]


TIMM_RULES: list[Rule] = [
    Rule("params/patch_embed/kernel", "patch_embed.proj.weight", oihw_to_hwio),
    Rule("params/patch_embed/bias", "patch_embed.proj.bias"),
    Rule("params/cls", "cls_token"),
    Rule("params/pos_embed", "pos_embed"),
    *_norm(f"{BLOCK}/ln1", "blocks.{0}.norm1"),
    *_qkv_rules("blocks.{0}.attn.qkv.weight", "blocks.{0}.attn.qkv.bias"),
    *_dense(f"{BLOCK}/attn/out", "blocks.{0}.attn.proj"),
    *_norm(f"{BLOCK}/ln2", "blocks.{0}.norm2"),
    *_dense(f"{BLOCK}/mlp/fc1", "blocks.{0}.mlp.fc1"),
    *_dense(f"{BLOCK}/mlp/fc2", "blocks.{0}.mlp.fc2"),
    *_norm("params/ln_f", "norm"),
    *_dense("params/head", "head"),
]

_TV_LAYER = "encoder.layers.encoder_layer_{0}"
TORCHVISION_RULES: list[Rule] = [
    Rule("params/patch_embed/kernel", "conv_proj.weight", oihw_to_hwio),
    Rule("params/patch_embed/bias", "conv_proj.bias"),
    Rule("params/cls", "class_token"),
    Rule("params/pos_embed", "encoder.pos_embedding"),
    *_norm(f"{BLOCK}/ln1", f"{_TV_LAYER}.ln_1"),
    *_qkv_rules(
        f"{_TV_LAYER}.self_attention.in_proj_weight", f"{_TV_LAYER}.self_attention.in_proj_bias"
    ),
    *_dense(f"{BLOCK}/attn/out", f"{_TV_LAYER}.self_attention.out_proj"),
    *_norm(f"{BLOCK}/ln2", f"{_TV_LAYER}.ln_2"),
    *_dense(f"{BLOCK}/mlp/fc1", f"{_TV_LAYER}.mlp.0"),
    *_dense(f"{BLOCK}/mlp/fc2", f"{_TV_LAYER}.mlp.3"),
    *_norm("params/ln_f", "encoder.ln"),
    *_dense("params/head", "heads.head"),
]

# The constructors' keyword arguments a config.json's model_args may set -> jaxdl fields.
TIMM_ARGS = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "depth": "num_layers",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "num_classes": "num_classes",
}
TORCHVISION_ARGS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_dim": "embed_dim",
    "num_layers": "num_layers",
    "num_heads": "num_heads",
    "mlp_dim": "mlp_dim",
    "num_classes": "num_classes",
}


def architecture(kind: str, model_args: Mapping[str, Any]) -> dict[str, Any]:
    """{image_size, patch_size, embed_dim, num_layers, num_heads, mlp_ratio} of `kind`."""
    if kind not in KINDS:
        raise UserError(f"KIND: expected one of {list(KINDS)}, found {kind!r}. Fix: pick one.")
    if kind == "torchvision:vit_b_16":
        arch = dict(image_size=224, patch_size=16, embed_dim=768, num_layers=12, num_heads=12)
        names = TORCHVISION_ARGS
    else:
        size, px = re.fullmatch(r"timm:vit_(\w+)_patch16_(\d+)", kind).groups()
        width, heads = _SIZES[size]
        arch = dict(
            image_size=int(px), patch_size=16, embed_dim=width, num_layers=12, num_heads=heads
        )
        names = TIMM_ARGS
    arch["mlp_ratio"] = 4.0
    unknown = sorted(set(model_args) - set(names))
    if unknown:
        raise UserError(
            f"config.json model_args: jaxdl's vit cannot reproduce {unknown}; it takes "
            f"{sorted(names)}. Fix: import a standard {kind} checkpoint."
        )
    for theirs, value in model_args.items():
        arch[names[theirs]] = value
    _check_sizes(kind, arch, names, model_args)
    if "mlp_dim" in arch:
        arch["mlp_ratio"] = arch.pop("mlp_dim") / arch["embed_dim"]
    arch.pop("num_classes", None)  # read from the head's weight
    return arch


def _check_sizes(
    kind: str, arch: Mapping[str, Any], names: Mapping[str, str], model_args: Mapping[str, Any]
) -> None:
    """Refuse sizes that are no positive integers, or heads that do not divide the width,
    naming the source's own keyword (model_args or the KIND's preset)."""
    theirs = {ours: key for key, ours in names.items()}

    def where(field: str) -> str:
        key = theirs[field]
        origin = "config.json model_args" if key in model_args else f"{kind}'s preset"
        return f"{key}={arch[field]!r} ({origin})"

    for field in ("image_size", "patch_size", "embed_dim", "num_layers", "num_heads"):
        if type(arch[field]) is not int or arch[field] < 1:
            raise UserError(
                f"--from: {where(field)}: expected a positive integer. Fix: use the "
                "model_args the weights were saved with."
            )
    if arch["embed_dim"] % arch["num_heads"]:
        raise UserError(
            f"--from: {where('num_heads')} does not divide {where('embed_dim')}: each head "
            "takes an equal share of the width. Fix: use the model_args the weights were "
            "saved with (or the KIND that matches them)."
        )


# torchvision's released ViT weights predate its MLP rename (pytorch/vision#6053) and name
# the MLP's layers linear_1/linear_2; torchvision's own loader maps them to 0/3, as here.
_LEGACY_MLP = re.compile(r"\.mlp\.linear_([12])\.")

# Leaves that pin a ViT's shape, by library (and the prefix of its blocks).
_TIMM_NAMES = {
    "head": "head.weight",
    "cls": "cls_token",
    "patch": "patch_embed.proj.weight",
    "pos": "pos_embed",
    "fc1": "blocks.0.mlp.fc1.weight",
    "blocks": r"blocks\.(\d+)\.",
}
_TORCHVISION_NAMES = {
    "head": "heads.head.weight",
    "cls": "class_token",
    "patch": "conv_proj.weight",
    "pos": "encoder.pos_embedding",
    "fc1": "encoder.layers.encoder_layer_0.mlp.0.weight",
    "blocks": r"encoder\.layers\.encoder_layer_(\d+)\.",
}


def _describe(layers: int, width: int, hidden: int, patch: int, positions: int) -> str:
    return (
        f"{layers} layers {width} wide (MLP {hidden}), {patch}x{patch} patches, {positions} "
        "positions"
    )


def check_architecture(
    kind: str, state: Mapping[str, np.ndarray], target: Any, names: Mapping[str, str]
) -> None:
    """One short UserError when the state dict is another ViT than the model (depth, width,
    patch or image size), before the key-by-key comparison of `convert`."""
    flat = tree_lib.flatten(target)
    blocks = re.compile(names["blocks"])
    theirs = _describe(
        len({m.group(1) for k in state if (m := blocks.match(k))}),
        int(state[names["cls"]].shape[-1]),
        int(state[names["fc1"]].shape[0]),
        int(state[names["patch"]].shape[-1]),
        int(state[names["pos"]].shape[1]),
    )
    ours = _describe(
        len({k.split("/")[1] for k in flat if k.startswith("params/block_")}),
        int(flat["params/cls"].shape[-1]),
        int(flat["params/block_0/mlp/fc1/kernel"].shape[-1]),
        int(flat["params/patch_embed/kernel"].shape[0]),
        int(flat["params/pos_embed"].shape[1]),
    )
    if theirs != ours:
        raise UserError(
            f"--from: the state dict is a ViT of {theirs}; {kind} expects {ours}. Fix: pass the "
            "KIND of the weights (config.json model_args for a non-standard timm model)."
        )


def convert_state(
    kind: str, state: Mapping[str, np.ndarray], model_args: Mapping[str, Any] | None = None
) -> tuple[dict, int, dict, dict]:
    """A timm/torchvision ViT state dict -> (model config, image size, variables, report)."""
    arch = architecture(kind, model_args or {})
    torchvision = kind.startswith("torchvision:")
    if torchvision:
        state = {
            _LEGACY_MLP.sub(lambda m: f".mlp.{3 * (int(m[1]) - 1)}.", k): v
            for k, v in state.items()
        }
    names = _TORCHVISION_NAMES if torchvision else _TIMM_NAMES
    head = names["head"]
    needed = [names[k] for k in ("head", "cls", "patch", "pos", "fc1") if names[k] not in state]
    if needed:
        raise UserError(
            f"--from: expected a ViT state dict with {needed}, found keys {sorted(state)[:4]}... "
            f"Fix: pass the state_dict of a {kind} model with its classification head."
        )
    image_size = int(arch.pop("image_size"))
    cfg = {
        "name": "vit",
        "size": _PRESETS[re.search(r"vit_(tiny|small|base|b)_", kind).group(1)],
        # Every architecture field, so model_args overrides and the config read alike.
        **{k: (float(v) if k == "mlp_ratio" else int(v)) for k, v in arch.items()},
        "num_classes": int(state[head].shape[0]),
        "pool": "cls",
    }
    target = target_tree(cfg, image_size)
    check_architecture(kind, state, target, names)
    rules = TORCHVISION_RULES if torchvision else TIMM_RULES
    variables, report = convert(state, target, rules)
    return cfg, image_size, variables, report


def import_vit(kind: str, path: str | Path, out: Path | None = None) -> Imported:
    """`jaxdl import timm:vit_base_patch16_224 --from DIR_OR_FILE` (also torchvision:vit_b_16).

    `out` (the final workdir) goes unused: no file travels with a vision model.
    """
    # timm's augreg ViTs were trained on [-1, 1] inputs, torchvision's on ImageNet mean/std.
    default = "normalize(imagenet)" if kind.startswith("torchvision:") else "normalize(symmetric)"
    return import_vision(kind, path, convert_state, normalize=default)
