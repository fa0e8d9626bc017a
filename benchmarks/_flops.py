"""Analytic model FLOPs of one training step, by layer, for the benchmarked architectures.

Convention (the one behind "6 * N * D", Kaplan et al. 2020; PaLM appendix B for attention):
- A layer's forward costs 2 FLOPs per weight per output position it is applied at (one
  multiply-add), biases included: a Dense layer 2 * params per example, a conv
  2 * params * H_out * W_out, an LM block 2 * params per token.
- Attention adds 2 * 2 * T * d per token and layer forward (QK^T and AV over the full
  context T; the causal mask is NOT discounted, as in PaLM and nanoGPT).
- Backward costs 2x forward: 1x for the gradient w.r.t. the layer's input, 1x w.r.t. its
  weights. So full training = 3 x forward = 6 * N * examples for a dense net.
- Not counted: normalization, activations, pooling, softmax, loss, the optimizer update,
  embedding lookups (an LM's tied embedding counts once, as the output projection).

Frozen and LoRA steps do less work (`train_flops`): a frozen layer needs no weight
gradient, and a layer before the first trainable one needs no input gradient either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Layers = list[tuple[str, float]]  # (layer name, forward FLOPs per example), in forward order


def mlp_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    widths = [math.prod(input_shape), *model.get("hidden", (512, 256, 128)), model["num_classes"]]
    names = [f"hidden_{i}" for i in range(len(widths) - 2)] + ["head"]
    return [(n, 2.0 * (a * b + b)) for n, a, b in zip(names, widths[:-1], widths[1:], strict=True)]


def _conv(h: int, w: int, k: int, cin: int, cout: int, bias: bool = False) -> float:
    return 2.0 * h * w * (k * k * cin + bias) * cout


def simple_cnn_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    h, w, c = input_shape
    layers: Layers = []
    for i, width in enumerate(model.get("features", (64, 128))):
        layers.append((f"conv_{i}", _conv(h, w, 3, c, width, bias=True)))
        h, w, c = h // 2, w // 2, width  # 2x2 max-pool
    hidden = model.get("hidden", 128)
    layers.append(("fc", 2.0 * (h * w * c + 1) * hidden))
    layers.append(("head", 2.0 * (hidden + 1) * model["num_classes"]))
    return layers


def resnet_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    from jaxdl.models.resnet import resnet_spec

    spec = resnet_spec(model)
    filters, bottleneck = spec.filters, spec.block == "bottleneck"
    h, w, c = input_shape
    if spec.small_inputs:
        layers = [("stem", _conv(h, w, 3, c, spec.stem_filters))]
    else:
        h, w = -(-h // 2), -(-w // 2)
        layers = [("stem", _conv(h, w, 7, c, spec.stem_filters))]
        h, w = -(-h // 2), -(-w // 2)  # 3x3 stride-2 max-pool
    c = spec.stem_filters
    for i, num_blocks in enumerate(spec.stage_sizes):
        f = filters * 2**i
        for j in range(num_blocks):
            s = 2 if i > 0 and j == 0 else 1
            ho, wo = -(-h // s), -(-w // s)
            out = 4 * f if bottleneck else f
            if bottleneck:
                flops = _conv(h, w, 1, c, f) + _conv(ho, wo, 3, f, f) + _conv(ho, wo, 1, f, out)
            else:
                flops = _conv(ho, wo, 3, c, f) + _conv(ho, wo, 3, f, f)
            if s != 1 or c != out:
                flops += _conv(ho, wo, 1, c, out)  # downsample shortcut
            layers.append((f"layer{i + 1}_{j}", flops))
            h, w, c = ho, wo, out
    layers.append(("head", 2.0 * (c + 1) * model["num_classes"]))
    return layers


def _block_params(d: int, mlp_dim: int, swiglu: bool = False) -> int:
    """Parameters of one pre-LN block; the two LayerNorms' 4d count too, as in the library's
    `flops_per_token` (negligible next to the d^2 terms)."""
    mlp = (d * mlp_dim + mlp_dim) * (2 if swiglu else 1) + mlp_dim * d + d
    return 4 * (d * d + d) + mlp + 4 * d


def vit_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    from jaxdl.models.transformer import resolve_size
    from jaxdl.models.vit import SIZES

    keys = ("patch_size", "num_layers", "num_heads", "embed_dim", "mlp_ratio")
    cfg = resolve_size(SIZES, model.get("size", "tiny"), {k: model.get(k) for k in keys})
    h, w, c = input_shape
    p, d = cfg["patch_size"], cfg["embed_dim"]
    patches = (h // p) * (w // p)
    tokens = patches + (model.get("pool", "cls") == "cls")
    per_token = 2.0 * _block_params(d, int(cfg["mlp_ratio"] * d)) + 4.0 * tokens * d
    layers = [("patch_embed", 2.0 * patches * (p * p * c + 1) * d)]
    layers += [(f"block_{i}", tokens * per_token) for i in range(cfg["num_layers"])]
    layers.append(("head", 2.0 * (d + 1) * model["num_classes"]))
    return layers


def transformer_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    """Per example = one sequence of T tokens; T from the input shape."""
    from jaxdl.models.transformer import transformer_spec

    spec = transformer_spec(model)
    (seq_len,) = input_shape
    d = spec.embed_dim
    per_token = 2.0 * _block_params(d, spec.mlp_dim, spec.mlp == "swiglu") + 4.0 * seq_len * d
    layers = [(f"block_{i}", seq_len * per_token) for i in range(spec.num_layers)]
    # ln_f's 2d parameters count as in `flops_per_token` (which counts every parameter).
    layers.append(("ln_f", seq_len * 2.0 * 2 * d))
    layers.append(("embed", seq_len * 2.0 * spec.vocab_size * d))  # tied output projection
    return layers


def llama_layers(model: Mapping[str, Any], input_shape: Sequence[int]) -> Layers:
    """Per example = one sequence of T tokens: each layer's q/k/v/o and SwiGLU matmuls plus
    attention (QK^T and AV over the full T, causal masking ignored), and the output head."""
    from jaxdl.models.llama import llama_spec

    spec = llama_spec(model)
    (seq_len,) = input_shape
    d, q = spec.embed_dim, spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    matmuls = d * q + 2 * d * kv + q * d + 3 * d * spec.mlp_dim
    per_token = 2.0 * matmuls + 4.0 * seq_len * q
    layers = [(f"layer_{i}", seq_len * per_token) for i in range(spec.num_layers)]
    layers.append(("lm_head", seq_len * 2.0 * spec.vocab_size * d))
    return layers


LAYERS: dict[str, Callable[[Mapping[str, Any], Sequence[int]], Layers]] = {
    "mlp": mlp_layers,
    "simple_cnn": simple_cnn_layers,
    "resnet": resnet_layers,
    "vit": vit_layers,
    "transformer": transformer_layers,
    "llama": llama_layers,
}


def train_flops(layers: Layers, mode: str, trains: Callable[[str], bool]) -> float:
    """FLOPs of one training step per example.

    mode "full": 3 x forward. "lora": forward + input gradients everywhere (adapters are
    tiny, their own FLOPs are not counted): the minimum, reached by a factored
    x W + s (x A) B. jaxdl merges W + s A B and differentiates the merged kernel, which
    costs a full weight gradient too (XLA's count shows ~3x forward). "frozen": forward,
    plus 2x for each layer that
    ``trains(name)``, plus 1x (input gradient only) for frozen layers after the first one
    that trains.
    """
    forward = sum(f for _, f in layers)
    if mode == "full":
        return 3.0 * forward
    if mode == "lora":
        return 2.0 * forward
    assert mode == "frozen", mode
    total, downstream = forward, False
    for name, flops in layers:
        if trains(name):
            total += 2.0 * flops
            downstream = True
        elif downstream:
            total += flops
    return total


def model_flops(
    model: Mapping[str, Any], input_shape: Sequence[int], batch: int, mode: str, trains
) -> float | None:
    """Analytic FLOPs of one training step on ``batch`` examples; None for unknown models."""
    fn = LAYERS.get(model["name"])
    if fn is None:
        return None
    return batch * train_flops(fn(model, input_shape), mode, trains)
