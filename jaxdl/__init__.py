"""jaxdl: a JAX/Flax functional training and fine-tuning pipeline.

The public surface, re-exported explicitly::

    cfg = jaxdl.load_config("experiments/digits_cnn.py", ["--config.num_epochs=5"])
    summary = jaxdl.train(cfg, "runs/cnn")

    setup = jaxdl.training.build(cfg, kind="classification", example_spec=..., num_classes=10,
                        total_steps=1000)
    train_step = jaxdl.make_train_step(setup.model, setup.head, setup.tx)
    state, metrics = train_step(setup.state, batch)
"""

from jaxdl.checkpoint.manager import Checkpointer, load_params, load_variables, restore_pretrained
from jaxdl.config import default_config, load_config
from jaxdl.core.state import TrainState
from jaxdl.core.steps import make_eval_step, make_predict, make_train_step
from jaxdl.models import create_model, model_names, register
from jaxdl.training.build import Setup, build
from jaxdl.training.trainer import train

__version__ = "0.1.0"

__all__ = [
    "Checkpointer",
    "Setup",
    "TrainState",
    "build",
    "create_model",
    "default_config",
    "load_config",
    "load_params",
    "load_variables",
    "make_eval_step",
    "make_predict",
    "make_train_step",
    "model_names",
    "register",
    "restore_pretrained",
    "train",
]
