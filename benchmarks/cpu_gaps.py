"""Where JAX trails PyTorch on CPU: the ops behind the gaps, each against its torch twin.

    python benchmarks/cpu_gaps.py                      # all probes
    python benchmarks/cpu_gaps.py --probes attention-step,attention-step-vit  # whole steps
    python benchmarks/cpu_gaps.py --probes lora-step,lora-step-mlp --steps 10
    python benchmarks/cpu_gaps.py --probes matmul     # bf16 vs float32 (the CPU's bf16 units)
    python benchmarks/cpu_gaps.py --probes matvec     # batch-1 decoding's products
    python benchmarks/cpu_gaps.py --probes prefill-gemm   # a 64-token prefill's products
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/cpu_gaps.py --probes conv
    python benchmarks/cpu_gaps.py --smoke     # every probe at tiny shapes, one trial (CI)

Each probe times forward + backward of one op (shapes from the cpu-quick cases) in JAX
variants and in torch, interleaved in one process like throughput.py, and prints the median
per-call time and the paired ratio to torch (> 1: slower than torch). XLA flags are
per-process: run the script once per XLA_FLAGS value and compare the ratios. Without torch
(`pip install -e ".[bench]"`) only the JAX variants run, against the last of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see throughput.py

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None


def _jax(name: str, fn: Callable, *args) -> _timing.Runner:
    fn = jax.jit(fn)

    def run(k: int) -> None:
        jax.block_until_ready([fn(*args) for _ in range(k)])

    return _timing.Runner(name, lambda: {}, run)


def _torch(name: str, make: Callable[[], Callable]) -> list[_timing.Runner]:
    """[the torch twin], or [] without torch; ``make()`` builds the loss closure."""
    if torch is None:
        return []
    fn = make()

    def run(k: int) -> None:
        for _ in range(k):
            fn().backward()

    return [_timing.Runner(name, lambda: {}, run)]


def _torch_forward(name: str, make: Callable[[], Callable]) -> list[_timing.Runner]:
    """[the torch twin, forward only under no_grad], or [] without torch."""
    if torch is None:
        return []
    fn = make()

    def run(k: int) -> None:
        with torch.no_grad():
            for _ in range(k):
                fn()

    return [_timing.Runner(name, lambda: {}, run)]


def conv_probe(small: bool = False) -> list[_timing.Runner]:
    """SimpleCNN's second conv: 3x3, 64 -> 128 channels at 16x16, batch 32."""
    b, h, cin, cout = (2, 4, 4, 8) if small else (32, 16, 64, 128)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout))

    def loss(layout):
        dims = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")

        def conv(x, w):
            return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

        return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))

    def twin():
        xt = torch.randn(b, cin, h, h, requires_grad=True)
        wt = torch.randn(cout, cin, 3, 3, requires_grad=True)
        return lambda: (F.conv2d(xt, wt, padding=1) ** 2).sum()

    return [
        _jax("jax conv NHWC", loss("NHWC"), x, w),
        _jax(
            "jax conv NCHW",
            loss("NCHW"),
            jnp.transpose(x, (0, 3, 1, 2)),
            jnp.transpose(w, (3, 2, 0, 1)),
        ),
        *_torch("torch conv2d", twin),
    ]


def pool_probe(small: bool = False) -> list[_timing.Runner]:
    """SimpleCNN's first 2x2 max-pool: [32, 32, 32, 64]."""
    b, h, c = (2, 4, 4) if small else (32, 32, 64)
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, c))
    flax_pool = lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) ** 2)
    # Non-overlapping windows as a reshape + max: the gradient is a compare and select
    # instead of XLA's select_and_scatter.
    reshape_pool = lambda x: jnp.sum(x.reshape(b, h // 2, 2, h // 2, 2, c).max(axis=(2, 4)) ** 2)

    def twin():
        xt = torch.randn(b, c, h, h, requires_grad=True)
        return lambda: (F.max_pool2d(xt, 2) ** 2).sum()

    return [
        _jax("jax nn.max_pool", jax.grad(flax_pool), x),
        _jax("jax reshape+max", jax.grad(reshape_pool), x),
        *_torch("torch max_pool2d", twin),
    ]


def attention_probe(small: bool = False) -> list[_timing.Runner]:
    """gpt-small's causal attention: batch 8, 128 tokens, 4 heads of 32."""
    b, t, heads, d = (2, 8, 2, 4) if small else (8, 128, 4, 32)
    q = jax.random.normal(jax.random.PRNGKey(0), (b, t, heads, d))
    dpa = lambda q: jnp.sum(jax.nn.dot_product_attention(q, q, q, is_causal=True))

    def einsum(q):
        s = jnp.einsum("bthd,bshd->bhts", q, q) / np.sqrt(d)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        return jnp.sum(jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), q))

    def twin():
        qt = torch.randn(b, heads, t, d, requires_grad=True)
        return lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True).sum()

    return [
        _jax("jax dot_product_attention", jax.grad(dpa), q),
        _jax("jax einsum+softmax", jax.grad(einsum), q),
        *_torch("torch sdpa", twin),
    ]


def matmul_probe(small: bool = False) -> list[_timing.Runner]:
    """A SmolLM2 MLP projection over a 4 x 256 batch: [1024, 576] x [576, 1536], forward +
    input gradient (a frozen base's backward), in float32, in bf16 as `jnp.dot` computes it
    (bf16 result), and in bf16 as jaxdl's Dense does (float32 accumulation,
    `jaxdl.models.matmul`), against torch's float32 and bf16."""
    from jaxdl.models.matmul import dense_dot_general

    m, k, n = (16, 16, 32) if small else (1024, 576, 1536)
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n)) / np.sqrt(k)
    dims = (((1,), (0,)), ((), ()))

    def loss(dtype, dot):
        def f(x, w):
            y = dot(x.astype(dtype), w.astype(dtype), dims)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(f)  # d/dx only: w frozen

    def twin(dtype):
        def make():
            xt = torch.randn(m, k, dtype=dtype, requires_grad=True)
            wt = torch.randn(n, k, dtype=dtype)
            return lambda: (F.linear(xt, wt).float() ** 2).sum()

        return make

    return [
        _jax("jax float32", loss(jnp.float32, jax.lax.dot_general), x, w),
        _jax("jax bf16 (bf16 result)", loss(jnp.bfloat16, jax.lax.dot_general), x, w),
        _jax("jax bf16 (jaxdl, f32 acc.)", loss(jnp.bfloat16, dense_dot_general), x, w),
        *_torch("torch bf16", twin(torch.bfloat16) if torch else None),
        *_torch("torch float32", twin(torch.float32) if torch else None),
    ]


def _twin_step(case, mode: str, batch, label: str) -> list[_timing.Runner]:
    """[torch eager's train step of `case`], or [] without torch."""
    from benchmarks import throughput

    if torch is None:
        return []
    (runner,) = throughput.torch_runners(
        case, mode, "float32", batch, ["torch-eager"], channels_last=False
    )
    return [dataclasses.replace(runner, framework=label)]


def attention_step_probe(model: str = "gpt-small") -> list[_timing.Runner]:
    """The whole train step of `model` with each attention implementation, and torch eager."""
    from benchmarks import throughput

    case = throughput.CASES[model]
    batch = throughput.host_batch(case)
    runners = []
    for impl in ("xla", "einsum"):
        impl_case = dataclasses.replace(case, model={**case.model, "attention_impl": impl})
        runner = throughput.jax_runner(throughput.jax_setup(impl_case, "full", "float32"), batch)
        runners.append(dataclasses.replace(runner, framework=f"jax {model} attention={impl}"))
    return [*runners, *_twin_step(case, "full", batch, f"torch {model}")]


def lora_step_probe(model: str = "gpt-small") -> list[_timing.Runner]:
    """`model`'s train step: full, LoRA merged, LoRA factored (`jaxdl.core.steps.train_step`'s
    `factored_lora`), and torch eager's LoRA step as the reference."""
    from benchmarks import throughput

    case = throughput.CASES[model]
    batch = throughput.host_batch(case)
    runners = []
    variants = (
        ("full", "full", True),
        ("lora merged", "lora", False),
        ("lora factored", "lora", True),
    )
    for name, mode, factored in variants:
        setup = throughput.jax_setup(case, mode, "float32")
        runner = throughput.jax_runner(setup, batch, factored_lora=factored)
        runners.append(dataclasses.replace(runner, framework=f"jax {model} {name}"))
    return [*runners, *_twin_step(case, "lora", batch, f"torch {model} lora")]


def matvec_probe(small: bool = False) -> list[_timing.Runner]:
    """Batch-1 decoding's products: one row times each of 90 [576, 1536] weights (SmolLM2's
    MLP projections of 30 layers, 318 MB in float32, 159 MB in bf16), forward only, in
    float32, in bf16 as a plain one-row product (XLA:CPU upcasts it to float32 math), in
    bf16 as jaxdl computes it for the checkpoint's [in, out] kernels (two rows: the library
    kernels) and for the inference layout's [out, in] ones (matrix-first,
    `matmul._weight_first_product`), and in torch. Bytes over time is the memory bandwidth
    a decode step gets."""
    from jaxdl.models.matmul import contract, dense_dot_general

    count, k, n = (4, 16, 32) if small else (90, 576, 1536)
    ws = [jax.random.normal(jax.random.PRNGKey(i), (k, n)) / np.sqrt(k) for i in range(count)]
    dims = (((1,), (0,)), ((), ()))

    def products(dot):
        return lambda x, ws: [dot(x, w, dims) for w in ws]

    def plain(x, w, dims):
        return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    def twin(dtype):
        def make():
            xt = torch.randn(1, k, dtype=dtype)
            wts = [torch.randn(n, k, dtype=dtype) for _ in range(count)]
            return lambda: [F.linear(xt, w) for w in wts]

        return make

    bf16 = [w.astype(jnp.bfloat16) for w in ws]
    bf16_t = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in bf16]  # [out, in]
    row = jnp.ones((1, k))
    row16 = row.astype(jnp.bfloat16)

    def transposed(x, ws):
        return [contract(x, w, 1, 1) for w in ws]

    return [
        _jax("jax float32", products(jax.lax.dot_general), row, ws),
        _jax("jax bf16 (one row)", products(plain), row16, bf16),
        _jax("jax bf16 (jaxdl, [in,out])", products(dense_dot_general), row16, bf16),
        _jax("jax bf16 (jaxdl, [out,in])", transposed, row16, bf16_t),
        *_torch_forward("torch bf16", twin(torch.bfloat16) if torch else None),
        *_torch_forward("torch float32", twin(torch.float32) if torch else None),
    ]


def prefill_gemm_probe(small: bool = False) -> list[_timing.Runner]:
    """A 64-token prefill's projections: 64 rows times each of SmolLM2's 30 layers' [out, in]
    kernels (fused q/k/v [960, 576], o [576, 576], fused gate/up [3072, 576], down [576,
    1536]; 212 MB in bf16), forward only and independent of each other, as jaxdl runs them
    (`matmul.contract`: bf16 x bf16 with float32 accumulation), in float32, and in torch
    (oneDNN's `F.linear`). These products are most of a prefill's time, so their time
    bounds it (benchmarks/README)."""
    from jaxdl.models.matmul import contract

    rows, layers, d, kv, ff = (8, 2, 16, 4, 24) if small else (64, 30, 576, 192, 1536)
    shapes = [(d + 2 * kv, d), (d, d), (2 * ff, d), (d, ff)] * layers
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal(s, dtype=np.float32) / np.sqrt(s[1])) for s in shapes]
    widths = sorted({s[1] for s in shapes})

    def jax_products(name, dtype):
        kernels = [jnp.asarray(w, dtype) for w in ws]
        xs = {k: jnp.ones((rows, k), dtype) for k in widths}

        def products(xs, kernels):
            return [contract(xs[w.shape[1]], w, -1, 1, out_dtype=jnp.float32) for w in kernels]

        return _jax(name, products, xs, kernels)

    def twin(dtype):
        def make():
            kernels = [torch.from_numpy(w).to(dtype) for w in ws]
            xs = {k: torch.ones(rows, k, dtype=dtype) for k in widths}
            return lambda: [F.linear(xs[w.shape[1]], w) for w in kernels]

        return make

    return [
        jax_products("jax bf16 (jaxdl, rows @ W.T)", jnp.bfloat16),
        jax_products("jax float32", jnp.float32),
        *_torch_forward("torch float32", twin(torch.float32) if torch else None),
        *_torch_forward("torch bf16", twin(torch.bfloat16) if torch else None),
    ]


def decode_chain_probe(small: bool = False) -> list[_timing.Runner]:
    """A batch-1 float32 decode step's products alone, as one dependent chain through
    SmolLM2's 30 layers and its tied head (538 MB): as jaxdl runs them (q, k, v, o, gate,
    up, down: seven products a layer, the head against the [V, D] embedding), with q/k/v
    and gate/up fused into one product each (four a layer), and with the head against a
    [D, V] copy. What separates the step from streaming its bytes at full speed is the
    count of products and the head's layout, not the rest of the step."""
    layers, d, kv, f, v = (2, 16, 8, 32, 64) if small else (30, 576, 192, 1536, 49152)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 8 * layers + 1))

    def w(*shape):
        return jax.random.normal(next(keys), shape) / np.sqrt(shape[0])

    sep = [
        dict(q=w(d, d), k=w(d, kv), v=w(d, kv), o=w(d, d), g=w(d, f), u=w(d, f), down=w(f, d))
        for _ in range(layers)
    ]
    fused = [
        dict(
            qkv=jnp.concatenate([p["q"], p["k"], p["v"]], 1),
            o=p["o"],
            gu=jnp.concatenate([p["g"], p["u"]], 1),
            down=p["down"],
        )
        for p in sep
    ]
    embedding = w(v, d)

    def attend(q, k, v_):  # stands in for attention: mixes q with the new k and v
        return q + jnp.pad(k + v_, ((0, 0), (0, d - kv)))

    def seven(x, layers):
        for p in layers:
            x = x + attend(x @ p["q"], x @ p["k"], x @ p["v"]) @ p["o"]
            x = x + (jax.nn.silu(x @ p["g"]) * (x @ p["u"])) @ p["down"]
        return x

    def four(x, layers):
        for p in layers:
            qkv = x @ p["qkv"]
            x = x + attend(qkv[:, :d], qkv[:, d : d + kv], qkv[:, d + kv :]) @ p["o"]
            gu = x @ p["gu"]
            x = x + (jax.nn.silu(gu[:, :f]) * gu[:, f:]) @ p["down"]
        return x

    x = jnp.ones((1, d))
    head_t = jnp.asarray(np.ascontiguousarray(np.asarray(embedding).T))  # [D, V]
    runners = [
        _jax("jax 7/layer, head [V,D]", lambda x, ls, e: seven(x, ls) @ e.T, x, sep, embedding),
        _jax("jax 7/layer, head [D,V]", lambda x, ls, h: seven(x, ls) @ h, x, sep, head_t),
        _jax("jax 4/layer, head [V,D]", lambda x, ls, e: four(x, ls) @ e.T, x, fused, embedding),
        _jax("jax 4/layer, head [D,V]", lambda x, ls, h: four(x, ls) @ h, x, fused, head_t),
    ]
    if torch is None:
        return runners
    # transformers' layout: nn.Linear weights [out, in], the tied head the [V, D] embedding
    tw = [{k: torch.from_numpy(np.asarray(a).T.copy()) for k, a in p.items()} for p in sep]
    te, tx = torch.from_numpy(np.array(embedding)), torch.ones(1, d)

    def torch_chain(steps: int) -> None:
        with torch.no_grad():
            for _ in range(steps):
                h = tx
                for p in tw:
                    q, k_, v_ = F.linear(h, p["q"]), F.linear(h, p["k"]), F.linear(h, p["v"])
                    h = h + F.linear(q + F.pad(k_ + v_, (0, d - kv)), p["o"])
                    h = h + F.linear(F.silu(F.linear(h, p["g"])) * F.linear(h, p["u"]), p["down"])
                F.linear(h, te)

    return [*runners, _timing.Runner("torch 7/layer, head [V,D]", lambda: {}, torch_chain)]


# name -> probe(small): small = tiny shapes (--smoke)
PROBES: dict[str, Callable[[bool], list[_timing.Runner]]] = {
    "conv": conv_probe,
    "pool": pool_probe,
    "attention": attention_probe,
    "matmul": matmul_probe,
    "matvec": matvec_probe,
    "decode-chain": decode_chain_probe,
    "prefill-gemm": prefill_gemm_probe,
    "attention-step": lambda small: attention_step_probe("smoke-gpt" if small else "gpt-small"),
    "attention-step-vit": lambda small: attention_step_probe("smoke-vit" if small else "vit-tiny"),
    "lora-step": lambda small: lora_step_probe("smoke-gpt" if small else "gpt-small"),
    "lora-step-mlp": lambda small: lora_step_probe("smoke-mlp" if small else "mlp"),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", default=",".join(PROBES), help=f"comma list of {list(PROBES)}")
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="calls per trial")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one trial of 1 call (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials, args.steps = 1, 1
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    threads = "none (JAX only)" if torch is None else torch.get_num_threads()
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} torch threads {threads} "
        f"load {os.getloadavg()[0]:.1f}"
    )
    for name in args.probes.split(","):
        runners = PROBES[name](args.smoke)
        for r in runners:
            r.prepare()
            r.run(1)  # compile / warm up
        times = _timing.interleaved_trials(runners, trials=args.trials, steps_per_trial=args.steps)
        ref = runners[-1].framework  # torch's, when it is installed
        for r in runners:
            t = times[r.framework]
            print(
                f"  {name:9s} {r.framework:28s} {np.median(t) * 1e3:8.1f} ms   "
                f"x{_timing.paired_ratio(t, times[ref]):.2f} vs {ref}"
            )


if __name__ == "__main__":
    main()
