"""torchvision and timm ResNets -> jaxdl's ``resnet`` model (`jaxdl.models.resnet`).

Both libraries name a ResNet's state dict alike (``conv1``, ``bn1``, ``layer{1-4}.{j}.conv{k}``,
``downsample.{0,1}``, ``fc``) and compute alike (v1.5: the stride on the bottleneck's 3x3
conv, BatchNorm eps 1e-5), so one table serves both. BatchNorm running statistics go to
``batch_stats``; ``num_batches_tracked`` is ignored (jaxdl's BatchNorm has no counter).

The KIND names the depth (``timm:resnet50``); a timm hub folder's ``config.json`` may carry
``model_args`` as `timm.create_model` takes them (``layers``, ``channels``),
which override the depth's preset, so narrow test variants import through the same path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop.mapping import Rule, convert, oihw_to_hwio, transpose
from jaxdl.interop.vision import import_vision, target_tree
from jaxdl.interop.workdir import Imported

KINDS = tuple(f"{lib}:resnet{d}" for lib in ("torchvision", "timm") for d in (18, 34, 50, 101, 152))

_BN = [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")]


def _bn_rules(target: str, source: str) -> list[Rule]:
    """A BatchNorm: affine to params, running statistics to batch_stats."""
    return [
        Rule(
            f"{'params' if ours in ('scale', 'bias') else 'batch_stats'}/{target}/{ours}",
            f"{source}.{theirs}",
        )
        for ours, theirs in _BN
    ]


BLOCK = r"layer(\d)_(\d+)"
RULES: list[Rule] = [
    Rule("params/stem_conv/kernel", "conv1.weight", oihw_to_hwio),
    *_bn_rules("stem_bn", "bn1"),
    Rule(rf"params/{BLOCK}/conv(\d)/kernel", "layer{0}.{1}.conv{2}.weight", oihw_to_hwio),
    *_bn_rules(rf"{BLOCK}/bn(\d)", "layer{0}.{1}.bn{2}"),
    Rule(
        rf"params/{BLOCK}/downsample_conv/kernel", "layer{0}.{1}.downsample.0.weight", oihw_to_hwio
    ),
    *_bn_rules(rf"{BLOCK}/downsample_bn", "layer{0}.{1}.downsample.1"),
    Rule("params/head/kernel", "fc.weight", transpose),
    Rule("params/head/bias", "fc.bias"),
]
IGNORE = [r".*\.num_batches_tracked"]

# timm.create_model keyword arguments a config.json's model_args may set.
MODEL_ARGS = ("layers", "channels", "num_classes")


def model_config(kind: str, state: Mapping[str, np.ndarray], model_args: Mapping[str, Any]) -> dict:
    """The jaxdl model section for `kind` (+ timm `model_args`); num_classes from ``fc``."""
    match = re.fullmatch(r"(torchvision|timm):resnet(\d+)", kind)
    if match is None or kind not in KINDS:
        raise UserError(f"KIND: expected one of {list(KINDS)}, found {kind!r}. Fix: pick one.")
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise UserError(
            f"config.json model_args: jaxdl's resnet cannot reproduce {unknown}; it takes "
            f"{list(MODEL_ARGS)}. Fix: import a standard {kind} checkpoint."
        )
    needed = [k for k in ("conv1.weight", "layer1.0.conv1.weight", "fc.weight") if k not in state]
    if needed:
        raise UserError(
            f"--from: expected a ResNet state dict with {needed}, found keys "
            f"{sorted(state)[:4]}... Fix: pass the state_dict of a {kind} model."
        )
    cfg: dict[str, Any] = {
        "name": "resnet",
        "depth": int(match.group(2)),
        "num_classes": int(state["fc.weight"].shape[0]),
    }
    if "layers" in model_args:
        cfg["stage_sizes"] = [int(n) for n in model_args["layers"]]
    if "channels" in model_args:
        channels = [int(c) for c in model_args["channels"]]
        if channels != [channels[0] * 2**i for i in range(4)]:
            raise UserError(
                f"config.json model_args: jaxdl's resnet doubles its width per stage, found "
                f"channels {channels}. Fix: import a standard checkpoint."
            )
        # timm's 7x7 stem stays 64 wide whatever the stage widths (stem_width only sizes
        # its deep stems, which jaxdl does not have).
        cfg["num_filters"], cfg["stem_filters"] = channels[0], 64
    return cfg


# (blocks per stage, block) -> depth, to name the KIND that fits a state dict.
_DEPTHS = {
    ((2, 2, 2, 2), "basic"): 18,
    ((3, 4, 6, 3), "basic"): 34,
    ((3, 4, 6, 3), "bottleneck"): 50,
    ((3, 4, 23, 3), "bottleneck"): 101,
    ((3, 8, 36, 3), "bottleneck"): 152,
}


def _architecture(keys: list[str], stem: int, width: int, sep: str) -> tuple:
    """(blocks per stage, block type, description) of a ResNet from its leaf names and the
    stem's and first stage's widths. sep: "." for torch names (``layer1.0.conv1.weight``),
    "_" for jaxdl paths (``layer1_0/conv1/kernel``)."""
    blocks = tuple(
        len({k.split(sep)[1].split("/")[0] for k in keys if k.startswith(f"layer{i}{sep}")})
        for i in range(1, 5)
    )
    block = "bottleneck" if any("conv3" in k for k in keys) else "basic"
    text = (
        f"{'-'.join(map(str, blocks))} {block} blocks per stage, a {stem}-wide stem and a "
        f"{width}-wide first stage"
    )
    return blocks, block, text


def check_architecture(kind: str, state: Mapping[str, np.ndarray], target: Any) -> None:
    """One short UserError when the state dict is another ResNet than the model (say
    ResNet-50 weights for a ResNet-18), before the key-by-key comparison of `convert`."""
    flat = tree_lib.flatten(target)
    theirs = _architecture(
        [k for k in state if k.startswith("layer")],
        int(state["conv1.weight"].shape[0]),
        int(state["layer1.0.conv1.weight"].shape[0]),
        ".",
    )
    ours = _architecture(
        [k.split("/", 1)[1] for k in flat if k.startswith("params/layer")],
        int(flat["params/stem_conv/kernel"].shape[-1]),
        int(flat["params/layer1_0/conv1/kernel"].shape[-1]),
        "_",
    )
    if theirs != ours:
        depth = _DEPTHS.get(theirs[:2])
        fix = f"import it as {kind.split(':')[0]}:resnet{depth}" if depth else "check the file"
        raise UserError(
            f"--from: the state dict is a ResNet with {theirs[2]}; {kind} expects {ours[2]}. "
            f"Fix: {fix}."
        )


def convert_state(
    kind: str,
    state: Mapping[str, np.ndarray],
    model_args: Mapping[str, Any] | None = None,
    image_size: int = 224,
) -> tuple[dict, int, dict, dict]:
    """A torchvision/timm ResNet state dict -> (model config, image size, variables, report).

    variables: {"params", "batch_stats"} as float32 numpy, the tree of
    ``create_model(model config)`` on [1, image_size, image_size, 3] inputs.
    """
    cfg = model_config(kind, state, model_args or {})
    target = target_tree(cfg, image_size)
    check_architecture(kind, state, target)
    variables, report = convert(state, target, RULES, ignore=IGNORE)
    return cfg, image_size, variables, report


def import_resnet(kind: str, path: str | Path, out: Path | None = None) -> Imported:
    """`jaxdl import torchvision:resnet50 --from model.pth` (a state dict file or folder).

    `out` (the final workdir) goes unused: no file travels with a vision model.
    """
    return import_vision(kind, path, convert_state, normalize="normalize(imagenet)")
