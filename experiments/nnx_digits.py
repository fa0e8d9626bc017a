"""A user's own Flax NNX model, registered by name in its config file, on digits.

    jaxdl train --config experiments/nnx_digits.py --workdir runs/nnx_digits
    jaxdl evaluate --workdir runs/nnx_digits          # a new process: imports this file again
    jaxdl export --workdir runs/nnx_digits --out runs/nnx_digits/model.jaxexport

The model is the article's 3.1 MLP (512-256-128, ReLU) with BatchNorm before each
activation and Dropout after it, written as an ``nnx.Module``: jaxdl builds it as
``NnxMLP(**model fields, rngs=nnx.Rngs(params=..., dropout=...))`` and calls it as
``model(x, train=...)``. Everything else (jitted steps, BatchNorm statistics, dropout keys
from the step, exact resume, partition rules and LoRA on its ``nnx.Linear`` kernels, export,
``jaxdl.load_model``) is what a built-in Linen model gets. The resolved config records this
file as ``model_file``, so `jaxdl evaluate`, `load_model` and `export` find the class again.
The same training settings as experiments/digits_mlp.py, for comparing the two.
"""

from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

import jaxdl


@jaxdl.register_model("nnx_mlp")
class NnxMLP(nnx.Module):
    """x [B, ...] (flattened) -> Linear -> BatchNorm -> ReLU -> Dropout per hidden width,
    then a Linear head -> logits [B, num_classes]."""

    def __init__(
        self,
        num_classes: int,
        in_features: int = 64,
        hidden: Sequence[int] = (512, 256, 128),
        dropout_rate: float = 0.1,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_features, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.norms = nnx.List([nnx.BatchNorm(w, rngs=rngs) for w in hidden])
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for linear, norm in zip(self.hidden, self.norms, strict=True):
            x = nnx.relu(norm(linear(x), use_running_average=not train))
            x = self.dropout(x, deterministic=not train)
        return self.head(x)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "nnx_mlp", "num_classes": 10, "hidden": (512, 256, 128)}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 20
    c.log_every = 20
    return c
