"""Models by name (Flax Linen, or NNX through the bridge). Importing this package registers
every built-in model."""

from jaxdl.models import (  # noqa: F401  (registers them)
    cnn,
    llama,
    mlp,
    resnet,
    rnn,
    tabular,
    transformer,
    vit,
)
from jaxdl.models.registry import create_model, model_names, register, register_model

__all__ = ["create_model", "model_names", "register", "register_model"]
