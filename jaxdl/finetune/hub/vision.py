"""What the ResNet and ViT importers share: the source's config.json and its preprocessing.

A timm hub folder (what ``save_pretrained``/``push_to_hub`` write) holds ``config.json``
beside the weights: ``model_args`` (`timm.create_model` keywords that change the preset) and
``pretrained_cfg`` (``mean``, ``std``, ``input_size`` the weights were trained with). A bare
state dict file has none, and the library's defaults hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError


def source_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` beside the weights (or in the folder), {} when there is none."""
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not config.is_file():
        return {}
    try:
        out = json.loads(config.read_text())
    except ValueError as err:
        raise UserError(
            f"--from: {config} is not valid JSON ({err}). Fix: remove it or save it again "
            "with the library that made the weights."
        ) from err
    if not isinstance(out, dict) or not isinstance(out.get("model_args") or {}, dict):
        raise UserError(
            f"--from: {config}: expected a JSON object (with an optional model_args object), "
            "found something else. Fix: remove it or save it again with timm."
        )
    return out


def data_config(source: Mapping[str, Any], *, image_size: int, normalize: str) -> dict[str, Any]:
    """The workdir's data section: 3 channels, the source's input size and normalization
    (its pretrained_cfg when given, else `image_size` and the `normalize` transform)."""
    pre = source.get("pretrained_cfg") or {}
    if "mean" in pre and "std" in pre:
        normalize = f"normalize(mean={tuple(pre['mean'])}, std={tuple(pre['std'])})"
    if "input_size" in pre:
        image_size = int(pre["input_size"][-1])
    return {"image_size": image_size, "channels": 3, "transforms": [normalize]}
