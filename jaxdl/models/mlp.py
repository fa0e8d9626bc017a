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


def check_activation(name: str) -> None:
    """Refuse an unknown ``model.activation`` (at construction, before any init work)."""
    if name not in ACTIVATIONS:
        raise UserError(
            f"model.activation: expected one of {sorted(ACTIVATIONS)}, "
            f"found {name!r}. Fix: set --config.model.activation=relu."
        )


def dense_stack(
    x: jax.Array,
    *,
    hidden: Sequence[int],
    num_classes: int,
    activation: str,
    dropout_rate: float,
    train: bool,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """x [B, F] -> Dense -> activation -> dropout per width of `hidden`, then a linear head
    -> [B, num_classes] float32. Call it inside a compact method: the layers belong to the
    calling module, named ``hidden_0``, ``hidden_1``, ... and ``head``."""
    act = ACTIVATIONS[activation]
    for i, width in enumerate(hidden):
        x = nn.Dense(width, dtype=dtype, param_dtype=jnp.float32, name=f"hidden_{i}")(x)
        x = act(x)
        x = nn.Dropout(dropout_rate, deterministic=not train)(x)
    x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="head")(x)
    return x.astype(jnp.float32)


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
        check_activation(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return dense_stack(
            x.reshape(x.shape[0], -1).astype(self.dtype),
            hidden=self.hidden,
            num_classes=self.num_classes,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            train=train,
            dtype=self.dtype,
        )
