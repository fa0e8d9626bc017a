"""ResNet v1.5 (He et al. 2016) in the Flax-examples shape, with BatchNorm in "batch_stats".

``ResNet(num_classes, depth)`` picks stage sizes and block type from ``depth``:
18/34 use BasicBlock, 50/101/152 BottleneckBlock (stride on the 3x3 conv, "v1.5"), and
"tiny" is one BasicBlock per stage with 8 base filters, for tests. Parameter names follow
torchvision so ported weights map by name: ``stem_conv``, ``stem_bn``, ``layer1_0`` ...
``layer4_2`` (each with ``conv1``/``bn1``... and ``downsample_conv``/``downsample_bn``),
``head``.

`resnet_spec(model)` resolves a module or a model config to its `ResNetSpec` (blocks per
stage, block type, base width, stem width), the shape benchmarks and FLOP counts need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdl.errors import UserError
from jaxdl.models.registry import register


class _Block(nn.Module):
    """What both residual blocks share: their fields and layer factories."""

    filters: int
    strides: int = 1
    dtype: Any = jnp.float32

    def layers(self, train: bool) -> tuple[Any, Any, tuple[int, int]]:
        """(bias-free conv, BatchNorm, strides) for this block's layers."""
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
        norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
        return conv, norm, (self.strides, self.strides)


class BasicBlock(_Block):
    """Two 3x3 convs; x: [B, H, W, C] -> [B, H/strides, W/strides, filters]."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, norm, s = self.layers(train)
        y = nn.relu(norm(name="bn1")(conv(self.filters, (3, 3), s, padding=1, name="conv1")(x)))
        y = conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        # Zero-init the last scale so each block starts as the identity (Goyal et al. 2017).
        y = norm(name="bn2", scale_init=nn.initializers.zeros_init())(y)
        return nn.relu(y + _shortcut(x, y.shape[-1], s, conv, norm))


class BottleneckBlock(_Block):
    """1x1 -> 3x3 (strided) -> 1x1 convs; output has 4 * filters channels."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, norm, s = self.layers(train)
        y = nn.relu(norm(name="bn1")(conv(self.filters, (1, 1), name="conv1")(x)))
        y = nn.relu(norm(name="bn2")(conv(self.filters, (3, 3), s, padding=1, name="conv2")(y)))
        y = conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = norm(name="bn3", scale_init=nn.initializers.zeros_init())(y)
        return nn.relu(y + _shortcut(x, y.shape[-1], s, conv, norm))


def _batch_norm(*, train: bool, dtype: Any, **kwargs) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        **kwargs,
    )


def _shortcut(x: jax.Array, channels: int, strides: tuple[int, int], conv, norm) -> jax.Array:
    """Identity, or a strided 1x1 conv + BN when the shape changes (torchvision "downsample")."""
    if x.shape[-1] == channels and strides == (1, 1):
        return x
    x = conv(channels, (1, 1), strides, name="downsample_conv")(x)
    return norm(name="downsample_bn")(x)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": BottleneckBlock}

# depth -> (blocks per stage, block type, default base filters)
DEPTHS: dict[str, tuple[tuple[int, ...], str, int]] = {
    "tiny": ((1, 1, 1, 1), "basic", 8),
    "18": ((2, 2, 2, 2), "basic", 64),
    "34": ((3, 4, 6, 3), "basic", 64),
    "50": ((3, 4, 6, 3), "bottleneck", 64),
    "101": ((3, 4, 23, 3), "bottleneck", 64),
    "152": ((3, 8, 36, 3), "bottleneck", 64),
}


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """The resolved layout of a `ResNet`: depth preset with the module's overrides on top.

    stage i (0-based) has `stage_sizes[i]` blocks of width `filters * 2**i` (x4 at the
    output of a "bottleneck" block); its first block strides 2 for i > 0.
    """

    stage_sizes: tuple[int, ...]
    block: str  # "basic" | "bottleneck"
    filters: int
    stem_filters: int
    small_inputs: bool


@register("resnet")
class ResNet(nn.Module):
    """ResNet classifier. x: [B, H, W, C] float32 (NHWC) -> logits [B, num_classes] float32.

    depth: 18, 34, 50, 101, 152 or "tiny" (an int or its string, as a CLI flag gives it).
    num_filters: width of the first stage, doubled per stage; None = 64 (8 for "tiny").
    small_inputs: a 3x3 stride-1 stem without max-pool, for 8x8 or 32x32 images; the
      default 7x7 stride-2 stem + 3x3 max-pool (ImageNet) shrinks the image 4x at once.
    stage_sizes, block ("basic" | "bottleneck"): override the depth's blocks per stage and
      block type (None = the depth's), e.g. a one-block-per-stage bottleneck net for tests.
    stem_filters: the stem conv's width; None = num_filters (timm keeps a 64-wide stem when
      it narrows the stages).
    """

    num_classes: int
    depth: int | str = 50
    num_filters: int | None = None
    small_inputs: bool = False
    stage_sizes: tuple[int, ...] | None = None
    block: str | None = None
    stem_filters: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if str(self.depth) not in DEPTHS:
            raise UserError(
                f"model.depth: expected one of 18, 34, 50, 101, 152, 'tiny', found "
                f"{self.depth!r}. Fix: set --config.model.depth=50."
            )
        if self.block is not None and self.block not in BLOCKS:
            raise UserError(
                f"model.block: expected one of {sorted(BLOCKS)}, found {self.block!r}. "
                "Fix: drop it to use the depth's block type."
            )
        super().__post_init__()

    @property
    def spec(self) -> ResNetSpec:
        stage_sizes, block, filters = DEPTHS[str(self.depth)]
        filters = self.num_filters or filters
        return ResNetSpec(
            stage_sizes=tuple(self.stage_sizes or stage_sizes),
            block=self.block or block,
            filters=filters,
            stem_filters=self.stem_filters or filters,
            small_inputs=self.small_inputs,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        spec = self.spec
        block_cls, filters = BLOCKS[spec.block], spec.filters
        x = x.astype(self.dtype)
        # 3x3 stride 1 for small images; 7x7 stride 2 (+ max-pool below) for ImageNet sizes.
        kernel, stride, pad = (3, 1, 1) if self.small_inputs else (7, 2, 3)
        x = nn.Conv(
            spec.stem_filters,
            (kernel, kernel),
            (stride, stride),
            padding=pad,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="stem_conv",
        )(x)
        x = nn.relu(_batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        if not self.small_inputs:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(spec.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(
                    filters * 2**i, strides=strides, dtype=self.dtype, name=f"layer{i + 1}_{j}"
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
        return x.astype(jnp.float32)


ResNetTiny = functools.partial(ResNet, depth="tiny")
ResNet18 = functools.partial(ResNet, depth=18)
ResNet34 = functools.partial(ResNet, depth=34)
ResNet50 = functools.partial(ResNet, depth=50)
ResNet101 = functools.partial(ResNet, depth=101)
ResNet152 = functools.partial(ResNet, depth=152)


def resnet_spec(model: ResNet | Mapping[str, Any]) -> ResNetSpec:
    """The resolved spec of a module or of a model config ({"name": "resnet", ...})."""
    if isinstance(model, Mapping):
        model = ResNet(**{k: v for k, v in model.items() if k != "name"})
    return model.spec
