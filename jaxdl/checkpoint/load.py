"""A trained (or imported) workdir as a model you can call: config, model, variables.

    model, variables = jaxdl.load_model("runs/cnn")
    logits = model.apply(variables, images)          # images: [B, H, W, C]

Everything here reads; nothing builds an optimizer, a data pipeline or a mesh.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_collections

from jaxdl import config as config_lib
from jaxdl.checkpoint.read import load_variables
from jaxdl.errors import UserError


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config of a workdir (its config.json)."""
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"--workdir: no config.json in {workdir}. "
            "Fix: pass the --workdir of a `jaxdl train` or `jaxdl import` run."
        )
    return config_lib.load_config(config_path)


def load_model(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` of a workdir's checkpoint (``step`` None = the latest).

    ``model`` is the Flax module its config names; ``variables`` are numpy arrays
    (``{"params": ..., "batch_stats"?: ...}``) with LoRA adapters merged into their
    kernels, so ``model.apply(variables, x)`` gives the logits (``train=False`` default).
    """
    from jaxdl.models import create_model

    cfg = load_run_config(workdir)
    return create_model(cfg.model), load_variables(workdir, step, config_key="--workdir")
