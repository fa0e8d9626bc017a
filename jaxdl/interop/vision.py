"""What the ResNet and ViT importers share: the import itself, the source's config.json and
its preprocessing; each family module brings only its mapping table (`convert_state`).

A timm hub folder (what ``save_pretrained``/``push_to_hub`` write) holds ``config.json``
beside the weights: ``model_args`` (`timm.create_model` keywords that change the preset) and
``pretrained_cfg`` (``mean``, ``std``, ``input_size`` the weights were trained with), and
``label_names`` when the model has them. A bare state dict file has none, and the library's
defaults hold.

The workdir's data section is the model's own input and nothing else: data.source "none"
(no examples: the weights came without a dataset), 3-channel 8-bit pixels at the input
size, the normalization above and the class names. `jaxdl export` and `predict` use it;
`evaluate` refuses, and fine-tuning configs name their own data.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError
from jaxdl.interop.readers import read_state_dict
from jaxdl.interop.workdir import Imported
from jaxdl.models import create_model

# (kind, state dict, model_args) -> (model config, image size, variables, report)
Converter = Callable[
    [str, Mapping[str, np.ndarray], Mapping[str, Any]], tuple[dict, int, dict, dict]
]


def import_vision(
    kind: str, path: str | Path, convert_state: Converter, *, normalize: str
) -> Imported:
    """Import an image classifier's weights (a state dict file or a hub folder) as `kind`.

    The folder's config.json (when there is one) must name the same architecture; its
    ``model_args`` go to `convert_state` and its ``pretrained_cfg`` and ``label_names`` set
    the data section, else `normalize` (the transform the family's weights were trained
    with) does.
    """
    path = Path(path)
    source = source_config(path)
    check_source_architecture(kind, source)
    model_args = dict(source.get("model_args") or {})
    state, files = read_state_dict(path)
    model_cfg, image_size, variables, report = convert_state(kind, state, model_args)
    data = data_config(
        source, image_size=image_size, normalize=normalize, num_classes=model_cfg["num_classes"]
    )
    return Imported(
        config={"model": model_cfg, "data": data},
        variables=variables,
        report=report,
        files=files,
        provenance={"model_args": model_args} if model_args else {},
    )


def target_tree(model_cfg: Mapping[str, Any], image_size: int) -> Any:
    """The variables tree (shapes only, nothing computed) of ``create_model(model_cfg)`` on
    [1, image_size, image_size, 3] inputs: what a state dict must fill."""
    model = create_model(model_cfg)
    sample = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), sample)


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


def check_source_architecture(kind: str, source: Mapping[str, Any]) -> None:
    """A config.json naming another architecture than KIND (timm's ``architecture``) is
    refused: its model_args and normalization belong to that one."""
    name = kind.split(":", 1)[1]
    if source.get("architecture", name) != name:
        raise UserError(
            f"KIND: {kind} names {name!r}, the source's config.json says "
            f"{source['architecture']!r}. Fix: import it as {kind.split(':')[0]}:"
            f"{source['architecture']} (if jaxdl supports it) or pass the right folder."
        )


def data_config(
    source: Mapping[str, Any], *, image_size: int, normalize: str, num_classes: int
) -> dict[str, Any]:
    """The workdir's data section: no examples, 3 channels, the source's input size and
    normalization (its pretrained_cfg when given, else `image_size` and the `normalize`
    transform), and its label_names when there is one per class."""
    pre = source.get("pretrained_cfg") or {}
    if not isinstance(pre, Mapping):
        raise UserError(
            f"--from: config.json's pretrained_cfg: expected an object, found {pre!r}. Fix: "
            "remove it or save the model again with timm."
        )
    given = [key for key in ("mean", "std") if key in pre]
    if given:
        stats = [pre.get(key) for key in ("mean", "std")]
        if len(given) != 2 or not all(_numbers(v, (1, 3)) for v in stats):
            raise UserError(
                f"--from: config.json's pretrained_cfg: expected mean and std, 3 numbers each "
                f"(or 1), found mean={pre.get('mean')!r}, std={pre.get('std')!r}. Fix: give "
                "both, as the weights were trained with, or remove both (the family's default)."
            )
        normalize = f"normalize(mean={tuple(stats[0])}, std={tuple(stats[1])})"
    if "input_size" in pre:
        if not _numbers(pre["input_size"], (3,)):
            raise UserError(
                f"--from: config.json's pretrained_cfg.input_size: expected [channels, height, "
                f"width], found {pre['input_size']!r}. Fix: e.g. [3, 224, 224]."
            )
        image_size = int(pre["input_size"][-1])
    names = source.get("label_names") or []
    if names and len(names) != num_classes:
        raise UserError(
            f"--from: config.json's label_names has {len(names)} names, the weights' head "
            f"has {num_classes} classes. Fix: correct label_names or remove it."
        )
    return {
        "source": "none",
        "image_size": image_size,
        "channels": 3,
        "transforms": [normalize],
        "class_names": [str(n) for n in names],
    }


def _numbers(value: Any, lengths: tuple[int, ...]) -> bool:
    """A JSON list of `lengths` numbers."""
    return (
        isinstance(value, list)
        and len(value) in lengths
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def imported_workdir(checkpoint: str | Path) -> Path | None:
    """The imported workdir (one holding import_report.json) that an init_from.checkpoint
    names: the workdir, its checkpoints/ folder or a step folder; None for any other."""
    root = Path(checkpoint).expanduser()
    for folder in (root, root.parent, root.parent.parent):
        if (folder / "import_report.json").is_file() and (folder / "config.json").is_file():
            return folder
    return None


def with_source_preprocessing(cfg: Any) -> Any:
    """`cfg` (a ConfigDict) with the preprocessing of the imported model it fine-tunes.

    When init_from.checkpoint names an imported workdir, its ``data.transforms`` (the
    normalization the weights expect) and ``data.channels`` fill those keys where `cfg`
    leaves them unset ([] and 0); a config that sets its own keeps them. Returns a copy.
    """
    if not cfg.init_from.checkpoint:
        return cfg
    folder = imported_workdir(cfg.init_from.checkpoint)
    if folder is None:
        return cfg
    source = json.loads((folder / "config.json").read_text()).get("data", {})
    cfg = copy.deepcopy(cfg)
    if not cfg.data.transforms and source.get("transforms"):
        cfg.data.transforms = list(source["transforms"])
    if not cfg.data.channels and source.get("channels"):
        cfg.data.channels = int(source["channels"])
    return cfg
