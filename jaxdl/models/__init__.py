"""Flax Linen models by name. Importing this package registers every model."""

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
from jaxdl.models.registry import create_model, model_names, register

__all__ = ["create_model", "model_names", "register"]
