"""Flax Linen models by name. Importing this package registers every model."""

from jaxdl.models.registry import create_model, model_names, register
from jaxdl.models import cnn, mlp, resnet, rnn  # noqa: F401  (importing registers them)
from jaxdl.models import transformer, vit  # noqa: F401  (importing registers them)

__all__ = ["create_model", "model_names", "register"]
