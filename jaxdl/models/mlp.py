"""MLP classifier (article 3.1): flatten -> Dense 512 -> 256 -> 128 -> head."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.errors import UserError
from jaxdl.models.registry import register

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "gelu": nn.gelu,
}


@register("mlp")
class MLP(nn.Module):
    """Fully connected classifier over flattened inputs.

    x: [B, ...] (any trailing shape, flattened) -> logits [B, num_classes] float32.
    Hidden layers are named ``hidden_0``, ``hidden_1``, ...; the classifier is ``head``.
    Dropout (rate ``dropout_rate``, "dropout" RNG stream) follows every hidden activation.
    """

    num_classes: int
    hidden: Sequence[int] = (512, 256, 128)
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        # Checked at construction so create_model fails before any init work.
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"model.activation: expected one of {sorted(ACTIVATIONS)}, "
                f"found {self.activation!r}. Fix: set --config.model.activation=relu."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=f"hidden_{i}")(x)
            x = act(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
        return x.astype(jnp.float32)
