"""jaxdl: a JAX/Flax functional training and fine-tuning pipeline.

The public surface, loaded lazily (``import jaxdl`` costs nothing until a name is used, so
serving code that imports ``jaxdl.deploy.predict`` never pays for the training stack)::

    cfg = jaxdl.load_config("experiments/digits_cnn.py", ["--config.num_epochs=5"])
    summary = jaxdl.train(cfg, "runs/cnn")                 # the whole loop
    model, variables = jaxdl.load_model("runs/cnn")        # any workdir, trained or imported

    setup = jaxdl.build(cfg, kind="classification", example_spec=..., num_classes=10,
                        total_steps=1000)
    train_step = jaxdl.make_train_step(setup.model, setup.head, setup.tx)
    state, metrics = train_step(setup.state, batch)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Checkpointer": "jaxdl.checkpoint.manager",
    "Setup": "jaxdl.training.build",
    "TrainState": "jaxdl.core.state",
    "UserError": "jaxdl.errors",
    "build": "jaxdl.training.build",
    "create_model": "jaxdl.models",
    "default_config": "jaxdl.config",
    "load_config": "jaxdl.config",
    "load_model": "jaxdl.checkpoint.load",
    "load_tokenizer": "jaxdl.lm.tokenizer",
    "load_params": "jaxdl.checkpoint.read",
    "load_variables": "jaxdl.checkpoint.read",
    "make_eval_step": "jaxdl.core.steps",
    "make_predict": "jaxdl.core.steps",
    "make_train_step": "jaxdl.core.steps",
    "model_names": "jaxdl.models",
    "register": "jaxdl.models",
    "register_model": "jaxdl.models",
    "restore_pretrained": "jaxdl.finetune.surgery",
    "train": "jaxdl.training.trainer",
}

__all__ = [
    "Checkpointer",
    "Setup",
    "TrainState",
    "UserError",
    "build",
    "create_model",
    "default_config",
    "load_config",
    "load_model",
    "load_params",
    "load_tokenizer",
    "load_variables",
    "make_eval_step",
    "make_predict",
    "make_train_step",
    "model_names",
    "register",
    "register_model",
    "restore_pretrained",
    "train",
]
assert set(__all__) == set(_EXPORTS)

if TYPE_CHECKING:
    from jaxdl.checkpoint.load import load_model
    from jaxdl.checkpoint.manager import Checkpointer
    from jaxdl.checkpoint.read import load_params, load_variables
    from jaxdl.config import default_config, load_config
    from jaxdl.core.state import TrainState
    from jaxdl.core.steps import make_eval_step, make_predict, make_train_step
    from jaxdl.errors import UserError
    from jaxdl.finetune.surgery import restore_pretrained
    from jaxdl.lm.tokenizer import load_tokenizer
    from jaxdl.models import create_model, model_names, register, register_model
    from jaxdl.training.build import Setup, build
    from jaxdl.training.trainer import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxdl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
