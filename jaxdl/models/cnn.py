"""SimpleCNN (article 5.2.2): two 3x3 conv + ReLU + 2x2 max-pool blocks, then two Dense."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.errors import UserError
from jaxdl.models.registry import register


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID: [B, H, W, C] -> [B, H//2, W//2, C].

    Written as a reshape and a max, equal to ``nn.max_pool(x, (2, 2), strides=(2, 2))`` in
    values and gradients; XLA's CPU backward of the windowed form (select-and-scatter) is
    much slower (measured in benchmarks/README.md).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]  # VALID: an odd last row/column is dropped
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@register("simple_cnn")
class SimpleCNN(nn.Module):
    """conv3x3 -> ReLU -> maxpool2x2 per entry of ``features``; flatten; Dense ``hidden``; head.

    x: [B, H, W, C] float32 (NHWC) -> logits [B, num_classes] float32.

    The article writes conv3x3(3->64), conv3x3(64->128) with padding 1 and then
    fc(128*56*56 -> 128). With a 224x224 input and no pooling the flattened size would be
    128*224*224; the article's 128*56*56 only holds with a 2x2 max-pool after each conv
    (224 -> 112 -> 56), so this model pools. The fc input size follows the image size,
    so the same module serves 8x8 digits (-> 2*2*128), 32x32 and 224x224 images.
    Layers: ``conv_0``, ``conv_1``, ..., ``fc``, ``head``.
    """

    num_classes: int
    features: Sequence[int] = (64, 128)
    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(
                width,
                (3, 3),
                padding="SAME",
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv_{i}",
            )(x)
            x = nn.relu(x)
            x = max_pool_2x2(x)
        if x.shape[1] == 0 or x.shape[2] == 0:
            raise UserError(
                f"simple_cnn input: expected images of at least {2 ** len(self.features)} pixels "
                f"a side for {len(self.features)} 2x2 pools, found {x.shape}. "
                "Fix: resize the images (data.image_size) or use fewer model.features."
            )
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        x = nn.relu(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
        return x.astype(jnp.float32)
