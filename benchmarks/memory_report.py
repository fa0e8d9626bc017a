"""Memory of train steps from XLA itself: the GPT under data parallelism vs FSDP, and a
Llama's full fine-tune vs LoRA vs QLoRA (NF4 base) on one device.

    python benchmarks/memory_report.py                        # gpt2-124m and 1b, 8 devices;
                                                              # smollm2-135m and llama3-1b
    python benchmarks/memory_report.py --models gpt2-124m --seq-len 512 --batch 16
    python benchmarks/memory_report.py --models= --finetune llama3-1b --finetune-batch 1
    python benchmarks/memory_report.py --models= --finetune llama3-1b --finetune-dtype bfloat16
    python benchmarks/memory_report.py --smoke     # the tiny GPT and Llama, 16 tokens (CI)

Nothing is allocated: the TrainState comes from `jax.eval_shape`, gets its shardings from
`jaxdl.parallel.sharding` (the rules `jaxdl train` uses), and the step is only lowered and compiled
(`jax.jit(...).lower(...).compile().memory_analysis()`), on simulated CPU devices unless
the machine has `--devices` real ones. Per device, in the table:

- params, optimizer state: the bytes of each leaf's shard (its sharding's shard shape);
- temp: XLA's scratch for the step: activations kept for the backward pass, gradients,
  all-gather / reduce-scatter buffers;
- peak ~ arguments (state + batch) + temp + outputs not aliased to donated arguments.

Prints markdown tables. Parameter and optimizer bytes are exact; temp is the backend's
own buffer plan (the CPU one when devices are simulated; a GPU's differs).

The fine-tuning table (`--finetune`) builds the state as `jaxdl train` does: LoRA rank 16
on every attention and MLP projection with the rest frozen, and for QLoRA the frozen
projections stored NF4 (`jaxdl.core.quant`), dequantized inside the step. "weights" is the
bytes of trainable + frozen params as the state holds them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `jaxdl` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = {"data parallel": {"data": -1}, "FSDP": {"fsdp": -1}}
FINETUNE_MODES = ("full", "LoRA", "QLoRA nf4")
LLAMA_TARGETS = r"params/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-124m,1b", help="transformer sizes")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument(
        "--finetune", default="smollm2-135m,llama3-1b", help="Llama sizes: full, LoRA, QLoRA"
    )
    parser.add_argument("--finetune-batch", type=int, default=4, help="sequences, one device")
    parser.add_argument("--finetune-seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument(
        "--finetune-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the Llama's compute dtype (its params stay float32)",
    )
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT, 2 devices, 2 x 16 (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.devices, args.batch, args.seq_len = "tiny", 2, 2, 16
        args.finetune, args.finetune_batch, args.finetune_seq_len, args.rank = "tiny", 2, 16, 4
    return args


def abstract_run(size: str, args: argparse.Namespace):
    """(model, task, tx, abstract TrainState) of a GPT size; shapes only, nothing allocated."""
    import jax
    import jax.numpy as jnp

    from jaxdl.core.state import TrainState
    from jaxdl.models import create_model

    task, tx = lm_task(args)
    model = create_model({"name": "transformer", "size": size})
    tokens = jnp.zeros((1, args.seq_len), jnp.int32)

    def init():
        variables = model.init(jax.random.PRNGKey(0), tokens, train=False)
        params = {"params": variables["params"]}
        return TrainState.create(params, tx, jax.random.PRNGKey(1))

    return model, task, tx, jax.eval_shape(init)


def lm_task(args: argparse.Namespace):
    """(the "lm" head, the optimizer `--optimizer` names): what every measured step trains."""
    from jaxdl.config import default_config
    from jaxdl.core import heads
    from jaxdl.core.optim import make_optimizer

    cfg = default_config()
    cfg.optimizer.name = args.optimizer
    cfg.optimizer.weight_decay = 0.1 if args.optimizer == "adamw" else 0.0
    return heads.make_head("lm", cfg.loss, 0), make_optimizer(cfg.optimizer, total_steps=1000)


def peak_bytes(mem) -> int:
    """arguments + temp + outputs not aliased to donated arguments (XLA's memory analysis)."""
    return int(
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (the largest shard of each leaf)."""
    import jax

    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, tree, shardings
    )
    return int(sum(jax.tree.leaves(sizes)))


def measure(size: str, strategy: str, devices, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdl.core import steps, tree
    from jaxdl.parallel import sharding

    model, task, tx, state = abstract_run(size, args)
    mesh = sharding.make_mesh(STRATEGIES[strategy], devices)
    layout = sharding.make_layout(state, mesh)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, layout.state
    )
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=layout.batch)
    batch = {"inputs": tokens, "targets": tokens}
    step = steps.make_train_step(model, task, tx, layout=layout)
    mem = step.lower(placed, batch).compile().memory_analysis()
    return {
        "model": size,
        "strategy": strategy,
        "platform": devices[0].platform,
        "params": tree.num_params(state.params),
        "param_bytes": shard_bytes(state.params, layout.state.params),
        "opt_bytes": shard_bytes(state.opt_state, layout.state.opt_state),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": peak_bytes(mem),
    }


def finetune_run(size: str, mode: str, args: argparse.Namespace):
    """(model, task, tx, lora config, abstract TrainState) of a Llama fine-tune: shapes only."""
    import jax
    import jax.numpy as jnp

    from jaxdl.core import quant
    from jaxdl.core.state import TrainState
    from jaxdl.finetune import lora, partition
    from jaxdl.models import create_model

    task, tx = lm_task(args)
    model = create_model({"name": "llama", "size": size, "dtype": args.finetune_dtype})
    tokens = jnp.zeros((1, args.finetune_seq_len), jnp.int32)
    quantize = "nf4" if mode.startswith("QLoRA") else None
    lora_cfg = None
    if mode != "full":
        lora_cfg = {"rank": args.rank, "alpha": 2.0 * args.rank, "targets": LLAMA_TARGETS}
        lora_cfg["quantize"] = quantize

    def init():
        params = {"params": model.init(jax.random.PRNGKey(0), tokens, train=False)["params"]}
        if lora_cfg is not None:
            params["lora"] = lora.init_adapters(
                jax.random.PRNGKey(1), params, rank=args.rank, targets=LLAMA_TARGETS
            )
        plan = partition.make_plan(params, partition.default_rules(lora=lora_cfg is not None))
        trainable, frozen = partition.split(params, plan)
        if quantize is not None:
            frozen = quant.quantize_kernels(frozen, quantize)
        return TrainState.create(trainable, tx, jax.random.PRNGKey(2), frozen=frozen)

    return model, task, tx, lora_cfg, jax.eval_shape(init)


def tree_bytes(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure_finetune(size: str, mode: str, device, args: argparse.Namespace) -> dict:
    """XLA's memory plan of one fine-tuning step on ``device``; nothing allocated."""
    import jax
    import jax.numpy as jnp

    from jaxdl.core import steps, tree

    model, task, tx, lora_cfg, state = finetune_run(size, mode, args)
    one = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
    shape = (args.finetune_batch, args.finetune_seq_len)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=one)
    full_params = lambda p, f: steps.model_params(p, f, lora_cfg)  # noqa: E731
    step = steps.make_train_step(model, task, tx, lora_cfg=lora_cfg)
    mem = step.lower(placed, {"inputs": tokens, "targets": tokens}).compile().memory_analysis()
    return {
        "model": size,
        "mode": mode,
        "dtype": args.finetune_dtype,
        "platform": device.platform,
        "params": tree.num_params(jax.eval_shape(full_params, state.params, state.frozen)),
        "trainable_params": tree.num_params(state.params),
        "weight_bytes": tree_bytes(state.params) + tree_bytes(state.frozen),
        "opt_bytes": tree_bytes(state.opt_state),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": peak_bytes(mem),
    }


def finetune_table(rows: list[dict], args: argparse.Namespace) -> str:
    gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
    lines = [
        f"GiB on one {rows[0]['platform']} device, batch {args.finetune_batch} x "
        f"{args.finetune_seq_len} tokens, {args.optimizer}, LoRA rank {args.rank} on every "
        f"projection, {args.finetune_dtype} compute (float32 params):",
        "",
        "| model | params | mode | trainable | weights | optimizer state | temp | peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.1f}M | {r['mode']} | "
            f"{r['trainable_params'] / 1e6:,.2f}M | {gib(r['weight_bytes'])} | "
            f"{gib(r['opt_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        f"Per-device GiB, {args.devices} {rows[0]['platform']} devices, global batch "
        f"{args.batch} x {args.seq_len} tokens, {args.optimizer}, float32:",
        "",
        "| model | params | strategy | params | optimizer state | temp | peak |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r['strategy']} | "
            f"{gib(r['param_bytes'])} | {gib(r['opt_bytes'])} | {gib(r['temp_bytes'])} | "
            f"{gib(r['peak_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _args(argv)
    if "jax" not in sys.modules:  # simulated devices: the flag must precede the jax import
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    # The accelerator's own compiler when it has the devices, else simulated CPU ones.
    devices = jax.devices() if jax.device_count() >= args.devices else jax.devices("cpu")
    if len(devices) < args.devices:
        raise SystemExit(f"--devices: asked for {args.devices}, found {len(devices)}.")
    rows = [
        measure(size, strategy, devices[: args.devices], args)
        for size in filter(None, args.models.split(","))
        for strategy in STRATEGIES
    ]
    if rows:
        print(table(rows, args))
    finetune = [
        measure_finetune(size, mode, devices[0], args)
        for size in filter(None, args.finetune.split(","))
        for mode in FINETUNE_MODES
    ]
    if finetune:
        print("\n" + finetune_table(finetune, args))
    if args.out:
        record = {"parallel": rows, "finetune": finetune}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
