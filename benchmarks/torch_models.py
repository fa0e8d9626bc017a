"""PyTorch baselines of the jaxdl architectures, and their timed training loops.

Each model mirrors its jaxdl counterpart layer for layer (same widths, depths, heads, tied LM
output, zero-init residual BN scale does not matter for speed) and names its submodules as
jaxdl names its parameters, so the benchmark's partition regexes ("params/head/.*") and LoRA
targets (".*kernel") select the same layers in both frameworks: a torch parameter
``block_3.attn.query.weight`` is matched as ``params/block_3/attn/query/kernel``.

Images are NCHW here (PyTorch's native layout; ``channels_last=True`` tries NHWC). bf16 is
autocast over float32 parameters, as jaxdl's ``dtype=bfloat16`` computes in bf16 over
float32 parameters. The optimizer is Adam (lr 1e-3, eps 1e-8) over the trainable
parameters only, as in jaxdl.

Only the benchmarks import this file; jaxdl never imports torch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from benchmarks._timing import Runner

LN_EPS = 1e-6  # flax.linen.LayerNorm's default


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden=(512, 256, 128)):
        super().__init__()
        widths = [in_features, *hidden]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            self.add_module(f"hidden_{i}", nn.Linear(a, b))
        self.head = nn.Linear(widths[-1], num_classes)
        self.depth = len(hidden)

    def forward(self, x):
        x = x.flatten(1)
        for i in range(self.depth):
            x = F.relu(getattr(self, f"hidden_{i}")(x))
        return self.head(x)


class SimpleCNN(nn.Module):
    def __init__(self, image_shape, num_classes: int, features=(64, 128), hidden: int = 128):
        super().__init__()
        h, w, c = image_shape
        for i, width in enumerate(features):
            self.add_module(f"conv_{i}", nn.Conv2d(c, width, 3, padding=1))
            h, w, c = h // 2, w // 2, width
        self.num_convs = len(features)
        self.fc = nn.Linear(h * w * c, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        for i in range(self.num_convs):
            x = F.max_pool2d(F.relu(getattr(self, f"conv_{i}")(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # flax momentum 0.9 == torch 0.1


class ResBlock(nn.Module):
    """BasicBlock (two 3x3) or BottleneckBlock (1x1, strided 3x3, 1x1 -> 4x), v1.5."""

    def __init__(self, cin: int, filters: int, stride: int, bottleneck: bool):
        super().__init__()
        self.bottleneck = bottleneck
        out = 4 * filters if bottleneck else filters
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv2d(cin, filters, 1, bias=False), _bn(filters)
            self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
            self.bn2 = _bn(filters)
            self.conv3, self.bn3 = nn.Conv2d(filters, out, 1, bias=False), _bn(out)
        else:
            self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
            self.bn1 = _bn(filters)
            self.conv2, self.bn2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False), _bn(filters)
        self.has_downsample = stride != 1 or cin != out
        if self.has_downsample:
            self.downsample_conv = nn.Conv2d(cin, out, 1, stride, bias=False)
            self.downsample_bn = _bn(out)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        shortcut = self.downsample_bn(self.downsample_conv(x)) if self.has_downsample else x
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    def __init__(self, image_shape, model_cfg: dict):
        super().__init__()
        from jaxdl.models.resnet import resnet_spec

        spec = resnet_spec(model_cfg)
        bottleneck = spec.block == "bottleneck"
        filters, cin = spec.filters, image_shape[-1]
        self.small_inputs = spec.small_inputs
        if spec.small_inputs:
            self.stem_conv = nn.Conv2d(cin, spec.stem_filters, 3, 1, 1, bias=False)
        else:
            self.stem_conv = nn.Conv2d(cin, spec.stem_filters, 7, 2, 3, bias=False)
        self.stem_bn = _bn(spec.stem_filters)
        c, names = spec.stem_filters, []
        for i, num_blocks in enumerate(spec.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                block = ResBlock(c, filters * 2**i, stride, bottleneck)
                self.add_module(f"layer{i + 1}_{j}", block)
                names.append(f"layer{i + 1}_{j}")
                c = filters * 2**i * (4 if bottleneck else 1)
        self.block_names = names
        self.head = nn.Linear(c, model_cfg["num_classes"])

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        if not self.small_inputs:
            x = F.max_pool2d(x, 3, 2, 1)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln1 x), x + mlp(ln2 x)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool, approximate: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=LN_EPS), nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, causal)
        self.mlp = Mlp(dim, mlp_dim, approximate)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, image_shape, num_classes: int, **fields):
        super().__init__()
        from jaxdl.models.transformer import resolve_size
        from jaxdl.models.vit import SIZES

        keys = ("patch_size", "num_layers", "num_heads", "embed_dim", "mlp_ratio")
        cfg = resolve_size(SIZES, fields.get("size", "tiny"), {k: fields.get(k) for k in keys})
        h, w, c = image_shape
        p, d = cfg["patch_size"], cfg["embed_dim"]
        self.patch_embed = nn.Conv2d(c, d, p, p)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, (h // p) * (w // p) + 1, d) * 0.02)
        for i in range(cfg["num_layers"]):
            block = Block(d, cfg["num_heads"], int(cfg["mlp_ratio"] * d), False, "none")
            self.add_module(f"block_{i}", block)
        self.num_layers = cfg["num_layers"]
        self.ln_f = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        for i in range(self.num_layers):
            h = getattr(self, f"block_{i}")(h)
        return self.head(self.ln_f(h)[:, 0])


class GPT(nn.Module):
    def __init__(self, model_cfg: Mapping[str, Any]):
        super().__init__()
        from jaxdl.models.transformer import transformer_spec

        spec = transformer_spec(model_cfg)
        assert (spec.positions, spec.mlp) == ("learned", "gelu"), "only GPT-2's shape is mirrored"
        d = spec.embed_dim
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.randn(spec.max_len, d) * 0.02)
        for i in range(spec.num_layers):
            self.add_module(f"block_{i}", Block(d, spec.num_heads, spec.mlp_dim, True, "tanh"))
        self.num_layers = spec.num_layers
        self.ln_f = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for i in range(self.num_layers):
            h = getattr(self, f"block_{i}")(h)
        return self.ln_f(h) @ self.embed.weight.T  # tied output projection


def make_model(model_cfg: Mapping[str, Any], input_shape: Sequence[int]) -> nn.Module:
    """The torch twin of ``jaxdl.models.create_model(model_cfg)`` for inputs of ``input_shape``."""
    cfg = {k: v for k, v in model_cfg.items() if k not in ("name", "dtype")}
    name = model_cfg["name"]
    if name == "mlp":
        hidden = tuple(cfg.get("hidden", (512, 256, 128)))
        return MLP(math.prod(input_shape), cfg["num_classes"], hidden)
    if name == "simple_cnn":
        return SimpleCNN(
            input_shape,
            cfg["num_classes"],
            tuple(cfg.get("features", (64, 128))),
            cfg.get("hidden", 128),
        )
    if name == "resnet":
        return ResNet(input_shape, cfg)
    if name == "vit":
        return ViT(input_shape, cfg.pop("num_classes"), **cfg)
    if name == "transformer":
        return GPT(model_cfg)
    raise ValueError(
        f"model.name: no PyTorch twin for {name!r}; expected one of mlp, "
        "simple_cnn, resnet, vit, transformer."
    )


# ------------------------------------------------------------------ modes


def jax_path(torch_name: str) -> str:
    """``block_3.attn.query.weight`` -> ``params/block_3/attn/query/kernel`` (jaxdl's name)."""
    path = "params/" + torch_name.replace(".", "/")
    return re.sub(r"/weight$", "/kernel", path)


class LoraDelta(nn.Module):
    """Parametrization W -> W + (alpha / rank) * reshape(A @ B), as `jaxdl.finetune.lora.apply`.

    A: [in, rank] uniform(+-1/sqrt(in)), B: [rank, out] zeros, with in = prod of the kernel's
    input axes; the delta is laid out as torch's [out, in(, kh, kw)] weight.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        self.a = nn.Parameter(torch.empty(fan_in, rank).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(rank, out))
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + self.scale * (self.a @ self.b).T.reshape(weight.shape)


def apply_mode(model: nn.Module, mode: str, frozen_trains: str, lora: Mapping | None) -> None:
    """Set requires_grad (and add LoRA parametrizations) as jaxdl's partition/LoRA would."""
    if mode == "full":
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "frozen":
        for name, p in model.named_parameters():
            if re.fullmatch(frozen_trains, jax_path(name)):
                p.requires_grad_(True)
        return
    assert mode == "lora" and lora is not None, mode
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear | nn.Conv2d) and re.fullmatch(
            lora["targets"], jax_path(f"{name}.weight")
        ):
            delta = LoraDelta(module.weight, int(lora["rank"]), float(lora["alpha"]))
            parametrize.register_parametrization(module, "weight", delta)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("weight.0.a", "weight.0.b")))


# ------------------------------------------------------------------ runner


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def torch_runner(
    model_cfg: Mapping[str, Any],
    *,
    kind: str,
    batch: Mapping[str, np.ndarray],
    mode: str,
    dtype: str,
    frozen_trains: str,
    lora: Mapping | None,
    compiled: bool,
    channels_last: bool = False,
    seed: int = 0,
) -> Runner:
    """A `Runner` for one (model, mode, dtype): eager, or the model under torch.compile.

    ``batch`` is the JAX side's host batch (NHWC images or [B, T] tokens); it is moved to the
    device once (in NCHW), as the JAX side keeps its batch on the device.
    """
    torch.manual_seed(seed)
    dev = device()
    if kind == "lm":
        x = torch.from_numpy(np.asarray(batch["inputs"])).long().to(dev)
        y = torch.from_numpy(np.asarray(batch["targets"])).long().to(dev)
        input_shape = tuple(x.shape[1:])
    else:
        images = np.asarray(batch["image"])
        input_shape = tuple(images.shape[1:])
        x = torch.from_numpy(images).to(dev)
        if x.ndim == 4:
            x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.asarray(batch["label"])).long().to(dev)
    model = make_model(model_cfg, input_shape).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    apply_mode(model, mode, frozen_trains, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    forward = torch.compile(model) if compiled else model
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[dtype]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()

    def run(k: int) -> None:
        for _ in range(k):
            step()
        _sync(dev)

    def prepare() -> dict[str, Any]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(1)  # torch.compile compiles here (forward and, via AOTAutograd, backward)
        return {"compile_s": time.perf_counter() - start}

    def peak_memory() -> int | None:
        return int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None

    def state_bytes() -> int:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        opt_state = sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v)
        )
        return params + buffers + opt_state

    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
        "state_bytes": state_bytes,  # callable: the optimizer state exists after prepare()
    }
    framework = "torch-compile" if compiled else "torch-eager"
    return Runner(framework, prepare, run, info=info, peak_memory=peak_memory)
