"""Per-device memory of the GPT train step under data parallelism vs FSDP, from XLA itself.

    python benchmarks/memory_report.py                        # gpt2-124m and 1b, 8 devices
    python benchmarks/memory_report.py --models gpt2-124m --seq-len 512 --batch 16
    python benchmarks/memory_report.py --smoke     # the tiny GPT, 2 devices, 16 tokens (CI)

Nothing is allocated: the TrainState comes from `jax.eval_shape`, gets its shardings from
`jaxdl.parallel.sharding` (the rules `jaxdl train` uses), and the step is only lowered and compiled
(`jax.jit(...).lower(...).compile().memory_analysis()`), on simulated CPU devices unless
the machine has `--devices` real ones. Per device, in the table:

- params, optimizer state: the bytes of each leaf's shard (its sharding's shard shape);
- temp: XLA's scratch for the step: activations kept for the backward pass, gradients,
  all-gather / reduce-scatter buffers;
- peak ~ arguments (state + batch) + temp + outputs not aliased to donated arguments.

Prints a markdown table. Parameter and optimizer bytes are exact; temp is the backend's
own buffer plan (the CPU one when devices are simulated; a GPU's differs).
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


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-124m,1b", help="transformer sizes")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT, 2 devices, 2 x 16 (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.devices, args.batch, args.seq_len = "tiny", 2, 2, 16
    return args


def abstract_run(size: str, args: argparse.Namespace):
    """(model, task, tx, abstract TrainState) of a GPT size; shapes only, nothing allocated."""
    import jax
    import jax.numpy as jnp

    from jaxdl.config import default_config
    from jaxdl.core import heads
    from jaxdl.core.optim import make_optimizer
    from jaxdl.core.state import TrainState
    from jaxdl.models import create_model

    cfg = default_config()
    cfg.optimizer.name = args.optimizer
    cfg.optimizer.weight_decay = 0.1 if args.optimizer == "adamw" else 0.0
    model = create_model({"name": "transformer", "size": size})
    tx = make_optimizer(cfg.optimizer, total_steps=1000)
    tokens = jnp.zeros((1, args.seq_len), jnp.int32)

    def init():
        variables = model.init(jax.random.PRNGKey(0), tokens, train=False)
        params = {"params": variables["params"]}
        return TrainState.create(params, tx, jax.random.PRNGKey(1))

    task = heads.make_head("lm", cfg.loss, 0)
    return model, task, tx, jax.eval_shape(init)


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
        "peak_bytes": int(
            mem.argument_size_in_bytes
            + mem.temp_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        ),
    }


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
        for size in args.models.split(",")
        for strategy in STRATEGIES
    ]
    print(table(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
