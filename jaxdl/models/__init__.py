"""Flax Linen models by name. Importing this package registers every model."""

from jaxdl.models import cnn, mlp, resnet, rnn, transformer, vit  # noqa: F401  (registers them)
from jaxdl.models.registry import create_model, model_names, register

__all__ = ["create_model", "model_names", "register"]
