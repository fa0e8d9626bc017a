"""Recurrent sequence classifier (article 2.3): stacked LSTM or GRU, last hidden state -> head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.errors import UserError
from jaxdl.models.registry import register

CELLS: dict[str, type[nn.RNNCellBase]] = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


@register("rnn")
class RNNClassifier(nn.Module):
    """Reads x: [B, T, F] left to right -> logits [B, num_classes] float32.

    An image [B, H, W, C] is read as H time steps of W*C features (8x8x1 digits: T=8,
    F=8). ``num_layers`` recurrent layers (parameters under ``lstm_0``, ``lstm_1``, ... or
    ``gru_0``, ...) feed the next one their whole output sequence; the top layer's hidden state
    after the last step goes to ``head``.
    """

    num_classes: int
    cell: str = "lstm"
    hidden: int = 128
    num_layers: int = 1
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.cell not in CELLS:
            raise UserError(
                f"model.cell: expected one of {sorted(CELLS)}, found {self.cell!r}. "
                "Fix: set --config.model.cell=lstm."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim == 4:
            x = x.reshape(x.shape[0], x.shape[1], -1)
        if x.ndim != 3:
            raise UserError(
                f"rnn input: expected [B, T, F] or an image [B, H, W, C], found shape "
                f"{x.shape}. Fix: reshape the batch to one of those layouts."
            )
        x = x.astype(self.dtype)
        for i in range(self.num_layers):
            cell = CELLS[self.cell](
                self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name=f"{self.cell}_{i}"
            )
            x = nn.RNN(cell)(x)
        # Each cell's output is its hidden state h, so the last output is the final h.
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(
            x[:, -1]
        )
        return x.astype(jnp.float32)
