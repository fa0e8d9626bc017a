"""Vision Transformer classifier: images [B, H, W, C] -> logits [B, num_classes] float32.

Patches come from a strided Conv (`patch_embed`), then an optional class token, learned
position embeddings, the pre-LayerNorm `Block`s of the decoder LM (non-causal here), a final
LayerNorm `ln_f`, pooling ("cls" token or "mean" over patches) and the `head` Dense. ViT-B/16
at 224x224 with 1000 classes has 86,567,656 parameters, as in the original model. The layout
is timm's and torchvision's (LayerNorm eps 1e-6, exact GELU, the position table covering the
class token), so their weights import unchanged (`jaxdl.interop.vit`); `resample_posemb`
fits a position table to another image size.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError
from jaxdl.models.registry import register
from jaxdl.models.transformer import (
    ATTENTION_IMPLS,
    INIT_STD,
    Block,
    check_choice,
    check_heads,
    resolve_size,
)

# "tiny" is for tests and 8x8 digits (patch 4 -> 4 patches); the others are the ViT paper's
# Ti/S/B widths with 16x16 patches.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, num_heads=2, embed_dim=32, mlp_ratio=2, patch_size=4),
    "Ti": dict(num_layers=12, num_heads=3, embed_dim=192, mlp_ratio=4, patch_size=16),
    "S": dict(num_layers=12, num_heads=6, embed_dim=384, mlp_ratio=4, patch_size=16),
    "B": dict(num_layers=12, num_heads=12, embed_dim=768, mlp_ratio=4, patch_size=16),
}


@register("vit")
class ViT(nn.Module):
    """ViT classifier. x: [B, H, W, C] float -> logits [B, num_classes] float32.

    `size` picks a preset from SIZES; num_layers, num_heads, embed_dim, mlp_ratio and
    patch_size override it when set. The position table's length follows the image size
    seen at init. The head starts at zero, as in big_vision (a fresh head predicts uniform).
    """

    num_classes: int = 10
    size: str = "tiny"
    patch_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    embed_dim: int | None = None
    mlp_ratio: float | None = None
    pool: str = "cls"  # "cls" | "mean"
    dropout_rate: float = 0.0
    dtype: Any = "float32"  # compute dtype; parameters stay float32
    attention_impl: str | None = None  # None (einsum on CPU, else auto) | xla | cudnn | einsum
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = resolve_size(
            SIZES,
            self.size,
            dict(
                patch_size=self.patch_size,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                embed_dim=self.embed_dim,
                mlp_ratio=self.mlp_ratio,
            ),
        )
        check_choice("pool", self.pool, ("cls", "mean"))
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_heads(cfg["embed_dim"], cfg["num_heads"])
        if x.ndim != 4:
            raise UserError(f"x: expected images [B, H, W, C], found shape {tuple(x.shape)}.")
        patch, dim = cfg["patch_size"], cfg["embed_dim"]
        if x.shape[1] % patch or x.shape[2] % patch:
            raise UserError(
                f"model.patch_size: expected a divisor of the image size "
                f"{x.shape[1]}x{x.shape[2]}, found {patch}. Fix: set model.patch_size or "
                "data.image_size so the patches tile the image."
            )
        dtype = jnp.dtype(self.dtype)

        h = nn.Conv(
            dim,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=dtype,
            name="patch_embed",
        )(x)
        h = h.reshape(h.shape[0], -1, dim)  # [B, N, D]
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, dim))
            h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, dim)).astype(dtype), h], 1)
        pos = self.param("pos_embed", nn.initializers.normal(INIT_STD), (1, h.shape[1], dim))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h + pos.astype(dtype))

        block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        positions = jnp.arange(h.shape[1])
        for i in range(cfg["num_layers"]):
            h = block_cls(
                num_heads=cfg["num_heads"],
                mlp_dim=int(cfg["mlp_ratio"] * dim),
                gelu_approximate=False,  # ViT uses the exact GELU
                causal=False,
                dropout_rate=self.dropout_rate,
                attention_impl=self.attention_impl,
                dtype=dtype,
                name=f"block_{i}",
            )(h, positions, train)
        h = nn.LayerNorm(dtype=dtype, name="ln_f")(h)
        h = h[:, 0] if self.pool == "cls" else h.mean(axis=1)
        logits = nn.Dense(
            self.num_classes, dtype=dtype, kernel_init=nn.initializers.zeros, name="head"
        )(h)
        return logits.astype(jnp.float32)


def resample_posemb(table: np.ndarray, shape: tuple[int, ...], num_prefix: int) -> np.ndarray:
    """A ViT position table [1, P + G*G, D] resized to `shape` [1, P + g*g, D].

    As big_vision's ``resample_posemb``: the patch rows form a G x G grid, resized bilinearly
    (`jax.image.resize`, antialiased when shrinking) to g x g; the first `num_prefix` rows
    (P: 1 for the class token, 0 for mean pooling) are kept as they are. Fine-tuning at
    another image size needs this (224 -> 32 pixels with 16-pixel patches: 14x14 -> 2x2).
    Raises UserError when either table is not of that form.
    """
    grid_old = math.isqrt(max(table.shape[1] - num_prefix, 0))
    grid_new = math.isqrt(max(shape[1] - num_prefix, 0))
    if (
        table.ndim != 3
        or len(shape) != 3
        or table.shape[2] != shape[2]
        or grid_old**2 + num_prefix != table.shape[1]
        or grid_new**2 + num_prefix != shape[1]
        or not grid_old * grid_new
    ):
        raise UserError(
            f"pos_embed: expected position tables [1, {num_prefix} + G*G, D] to resample, found "
            f"{tuple(table.shape)} -> {tuple(shape)}. Fix: keep the patch grid square and "
            "embed_dim unchanged, or add the table to init_from.reinit."
        )
    grid = table[0, num_prefix:].reshape(grid_old, grid_old, -1)
    resized = jax.image.resize(grid, (grid_new, grid_new, grid.shape[-1]), "bilinear")
    rows = np.asarray(resized, table.dtype).reshape(1, grid_new * grid_new, -1)
    return np.concatenate([table[:, :num_prefix], rows], axis=1)
