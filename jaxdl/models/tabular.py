"""`tabular_mlp`: numeric features and embedded categorical columns -> an MLP.

Input: the rows `jaxdl.data.tabular` makes, x [B, num_numeric + len(vocab_sizes)] float32:
standardized numeric columns, then one vocabulary index per categorical column (0 =
unknown/missing). Each categorical column gets its own embedding table; the embeddings
are concatenated with the numeric features and fed to Dense -> activation -> dropout
layers, then a linear head with ``num_classes`` outputs (1 for binary, K for regression).
The data fills num_numeric, vocab_sizes and num_classes (`Data.task_fields`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.errors import UserError
from jaxdl.models.mlp import check_activation, dense_stack
from jaxdl.models.registry import register


@register("tabular_mlp")
class TabularMLP(nn.Module):
    """x [B, F] -> outputs [B, num_classes] float32. Layers: embed_<j>, hidden_<i>, head."""

    num_classes: int
    num_numeric: int = 0
    vocab_sizes: Sequence[int] = ()
    embed_dim: int = 8
    hidden: Sequence[int] = (128, 64)
    activation: str = "relu"
    dropout_rate: float = 0.0

    def __post_init__(self):
        check_activation(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        width = self.num_numeric + len(self.vocab_sizes)
        if x.shape[-1] != width:
            raise UserError(
                f"model: tabular_mlp was built for {width} columns ({self.num_numeric} numeric, "
                f"{len(self.vocab_sizes)} categorical), found inputs of shape {x.shape}. "
                "Fix: feed rows prepared by the same data config."
            )
        x = x.astype(jnp.float32)
        parts = [x[:, : self.num_numeric]]
        for j, size in enumerate(self.vocab_sizes):
            ids = x[:, self.num_numeric + j].astype(jnp.int32)
            parts.append(nn.Embed(size, self.embed_dim, name=f"embed_{j}")(ids))
        return dense_stack(
            jnp.concatenate(parts, axis=-1),
            hidden=self.hidden,
            num_classes=self.num_classes,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            train=train,
        )
