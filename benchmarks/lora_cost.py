"""What LoRA's train step costs, from XLA's own analysis: full fine-tuning, LoRA with the
adapters merged into the kernels, and LoRA factored (jaxdl's default).

    python benchmarks/lora_cost.py                                   # gpt2-124m, 4 x 512 tokens
    python benchmarks/lora_cost.py --size small --batch 8 --seq-len 128

Nothing runs: each step is lowered and compiled once, and the table gives XLA's FLOP count
(`compiled.cost_analysis()`) and scratch bytes (`memory_analysis().temp_size_in_bytes`).
A merged adapter makes the backward pass form the full weight gradient x^T g of every
adapted kernel; the factored one (`jaxdl.core.adapters.low_rank_dense`) never does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `jaxdl` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from jaxdl.config import default_config
from jaxdl.core import steps
from jaxdl.training.build import build

VARIANTS = {  # name: (lora config or None, factored)
    "full fine-tuning": (None, True),
    "LoRA, merged": ({"rank": 8, "alpha": 16.0, "targets": ".*kernel"}, False),
    "LoRA, factored": ({"rank": 8, "alpha": 16.0, "targets": ".*kernel"}, True),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-124m", help="transformer size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_prng_impl", "rbg")  # fast init compiles on CPU
    spec = {k: ((args.seq_len,), jnp.int32) for k in ("inputs", "targets")}
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32) for k in spec}
    print(f"{args.size}, batch {args.batch} x {args.seq_len} tokens, adam, float32\n")
    print("| variant | trainable params | XLA GFLOP/step | XLA temp MB |\n|---|---:|---:|---:|")
    for name, (lora, factored) in VARIANTS.items():
        cfg = default_config()
        cfg.model = {"name": "transformer", "size": args.size, "max_len": args.seq_len}
        cfg.optimizer.name = "adam"
        cfg.lora = lora
        setup = build(cfg, kind="lm", example_spec=spec, num_classes=None, total_steps=100)
        step = steps.make_train_step(
            setup.model, setup.head, setup.tx, lora_cfg=setup.lora_cfg, factored_lora=factored
        )
        compiled = step.lower(setup.state, batch).compile()
        flops = compiled.cost_analysis()["flops"]
        temp = compiled.memory_analysis().temp_size_in_bytes
        trainable = sum(x.size for x in jax.tree.leaves(setup.state.params))
        print(f"| {name} | {trainable:,} | {flops / 1e9:,.1f} | {temp / 2**20:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
