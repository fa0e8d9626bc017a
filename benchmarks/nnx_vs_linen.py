"""The train step of a user's NNX model next to the same network written in Linen.

    nice -n 0 python benchmarks/nnx_vs_linen.py        # both cases, 15 interleaved trials
    python benchmarks/nnx_vs_linen.py --smoke          # tiny widths, one trial (CI; writes nothing)

The NNX model is experiments/nnx_digits.py's ``NnxMLP`` (Linear -> BatchNorm -> ReLU ->
Dropout per hidden width, a Linear head), run through `jaxdl.models.nnx_module.NnxModule`;
the Linen twin here is the same network layer for layer (same initializers, BatchNorm
momentum and epsilon), and the script first checks that with equal weights the two give
equal logits. Both train with jaxdl's own step (`jaxdl.build` + `make_train_step`: Adam,
softmax cross-entropy, dropout keys from the step, BatchNorm statistics updated), on one
synthetic batch kept on the device. Cases:

    digits   64 -> 512 -> 256 -> 128 -> 10, batch 32 (the experiment's shape: dispatch-bound)
    wide     784 -> 2048 -> 2048 -> 1024 -> 10, batch 256 (compute-bound)

The trials of the two alternate (the order rotating), K steps each; the table gives the
median step time of each, the median of per-trial ratios NNX / Linen, and compile time
(the NNX object is rebuilt while tracing, which costs trace time, not step time) and XLA's
FLOP count of each compiled step (equal but for NNX's dropout-stream bookkeeping). Writes
benchmarks/results/nnx_vs_linen.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `jaxdl` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdl  # noqa: E402
from benchmarks import _report, _timing  # noqa: E402
from jaxdl.core import steps, tree  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NNX_CONFIG = ROOT / "experiments" / "nnx_digits.py"


@dataclasses.dataclass(frozen=True)
class Case:
    in_features: int
    hidden: tuple[int, ...]
    batch: int
    steps_per_trial: int


CASES = {
    "digits": Case(64, (512, 256, 128), 32, 50),
    "wide": Case(784, (2048, 2048, 1024), 256, 3),
    "smoke": Case(16, (8,), 4, 1),
}


@jaxdl.register_model("linen_bn_mlp")
class LinenMLP(nn.Module):
    """experiments/nnx_digits.py's NnxMLP in Linen: Dense -> BatchNorm -> ReLU -> Dropout per
    hidden width (``hidden_<i>``, ``norm_<i>``), then ``head``."""

    num_classes: int
    in_features: int = 64
    hidden: Sequence[int] = (512, 256, 128)
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"hidden_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99, name=f"norm_{i}")(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.num_classes, name="head")(x)


def linen_paths(nnx_variables) -> dict:
    """NnxMLP's variables under LinenMLP's names: hidden/0/kernel -> hidden_0/kernel,
    norms/0/scale -> norm_0/scale."""
    rename = lambda path: re.sub(r"(hidden|norm)s?/(\d+)/", r"\1_\2/", path)
    return tree.unflatten({rename(p): v for p, v in tree.flatten(nnx_variables).items()})


def setups(case: Case):
    """{"nnx": Setup, "linen": Setup} of jaxdl.build for the two twins."""
    jaxdl.load_config(NNX_CONFIG)  # registers nnx_mlp
    spec = {"image": ((case.in_features,), jnp.float32), "label": ((), jnp.int32)}
    out = {}
    for framework, name in (("nnx", "nnx_mlp"), ("linen", "linen_bn_mlp")):
        cfg = jaxdl.default_config()
        cfg.model = {"name": name, "num_classes": 10, "in_features": case.in_features,
                     "hidden": case.hidden}  # fmt: skip
        cfg.num_steps = 10_000
        out[framework] = jaxdl.build(
            cfg, kind="classification", example_spec=spec, num_classes=10, total_steps=10_000
        )
    return out


def check_equal(built, batch) -> float:
    """Largest |logit difference| of the two models on the NNX model's weights."""
    nnx_vars = {"params": built["nnx"].state.params["params"], **built["nnx"].state.model_state}
    linen_vars = linen_paths(nnx_vars)
    a = built["nnx"].model.apply(nnx_vars, batch["image"], train=False)
    b = built["linen"].model.apply(linen_vars, batch["image"], train=False)
    return float(jnp.max(jnp.abs(a - b)))


def runner(framework: str, setup, batch) -> _timing.Runner:
    step = steps.make_train_step(setup.model, setup.head, setup.tx)
    device_batch = jax.device_put(batch)
    holder = {"state": jax.tree.map(jnp.copy, setup.state)}

    def prepare() -> dict:
        start = time.perf_counter()
        compiled = step.lower(holder["state"], device_batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return {"compile_s": time.perf_counter() - start, "xla_flops": float(cost["flops"])}

    def run(k: int) -> None:
        state = holder["state"]
        for _ in range(k):
            state, _ = step(state, device_batch)
        holder["state"] = jax.block_until_ready(state)

    return _timing.Runner(framework, prepare, run)


def measure(case: Case, trials: int) -> dict:
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((case.batch, case.in_features), np.float32),
        "label": rng.integers(0, 10, case.batch).astype(np.int32),
    }
    built = setups(case)
    record = {"case": dataclasses.asdict(case), "max_abs_logit_diff": check_equal(built, batch)}
    runs = [runner(f, built[f], batch) for f in ("nnx", "linen")]
    for r in runs:
        record[r.framework] = r.prepare()
        r.run(2)  # first calls: allocations, caches
    times = _timing.interleaved_trials(runs, trials=trials, steps_per_trial=case.steps_per_trial)
    for r in runs:
        record[r.framework]["step_time_s"] = _timing.step_stats(times[r.framework])
        record[r.framework]["trials_s"] = times[r.framework]
    record["nnx_over_linen"] = _timing.paired_ratio(times["nnx"], times["linen"])
    return record


def markdown(record: dict) -> str:
    env = record["env"]
    rows = [
        f"jaxdl's train step (Adam, BatchNorm, dropout), float32, {env['device']} "
        f"({env['cpu']}, {env['cpu_count']} cores), {record['args']['trials']} interleaved "
        f"trials, load average {env['load_avg'][0]:.1f} at the start; NNX / Linen = median of "
        "per-trial ratios\n",
        "| case | widths | batch | NNX step ms | Linen step ms | NNX / Linen | CV % NNX / Linen "
        "| compile s NNX / Linen | XLA MFLOP/step NNX / Linen | max logit diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in record["cases"].items():
        c, a, b = r["case"], r["nnx"], r["linen"]
        widths = "-".join(str(w) for w in (c["in_features"], *c["hidden"], 10))
        rows.append(
            f"| {name} | {widths} | {c['batch']} | {a['step_time_s']['median'] * 1e3:.3f} "
            f"| {b['step_time_s']['median'] * 1e3:.3f} | {r['nnx_over_linen']:.3f} "
            f"| {a['step_time_s']['cv'] * 100:.1f} / {b['step_time_s']['cv'] * 100:.1f} "
            f"| {a['compile_s']:.2f} / {b['compile_s']:.2f} "
            f"| {a['xla_flops'] / 1e6:,.2f} / {b['xla_flops'] / 1e6:,.2f} "
            f"| {r['max_abs_logit_diff']:.1e} |"
        )
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits,wide", help=f"comma list of {list(CASES)}")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--out", help="default: benchmarks/results/nnx_vs_linen.json")
    parser.add_argument("--smoke", action="store_true", help="tiny widths, one trial")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.trials = "smoke", 1
    elif args.out is None:
        args.out = str(RESULTS / "nnx_vs_linen.json")
    record = {"args": vars(args), "env": _timing.environment(), "cases": {}}
    for name in args.cases.split(","):
        record["cases"][name] = result = measure(CASES[name], args.trials)
        assert result["max_abs_logit_diff"] < 1e-4, f"{name}: the twins differ: {result}"
    record["env"]["load_avg_end"] = list(os.getloadavg())
    if args.out:
        _report.write_record(args.out, record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
