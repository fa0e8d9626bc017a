"""Each CPU case's train step against its own GEMM roofline: its matmuls and convolutions
timed alone in XLA.

    python benchmarks/roofline.py                      # the cpu-quick cases
    python benchmarks/roofline.py --models gpt-small --trials 9 --out /tmp/roofline.json
    python benchmarks/roofline.py --smoke              # the smoke cases, one trial (CI)

For a case of throughput.py the jaxdl train step is traced (`jax.make_jaxpr`, forward and
backward, nested jaxprs included, a scan body counted `length` times) and every
`dot_general` and `conv_general_dilated` it runs is collected with its operand shapes and
parameters. Each distinct one is then compiled alone and timed; the roofline is the sum over
the step's ops of their times alone, what the step would take if it did nothing but its GEMMs,
each at the speed XLA reaches on it in isolation. `roofline / step` is the share of the step
those GEMMs account for: the rest is what the step spends elsewhere (elementwise fusions,
softmax, norms, layout copies, the optimizer update) or loses by running the GEMMs fused into
a larger program. Rounds interleave the step and the ops (one trial of each per round), so
load from other processes hits both; an op's time includes one dispatch (a few us).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks import _timing, throughput
from jaxdl.core import steps

GEMMS = ("dot_general", "conv_general_dilated")


def _subjaxprs(params: dict[str, Any]) -> Iterator[jax.extend.core.Jaxpr]:
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def gemms(jaxpr: jax.extend.core.Jaxpr, times: int = 1, out: Counter | None = None) -> Counter:
    """Counter of (primitive, operand avals, params) -> how often the program runs it."""
    out = Counter() if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in GEMMS:
            avals = tuple(v.aval for v in eqn.invars)
            out[(eqn.primitive, avals, tuple(sorted(eqn.params.items())))] += times
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        assert eqn.primitive.name != "while", "a while loop's trip count is unknown"
        for sub in _subjaxprs(eqn.params):
            gemms(sub, times * repeat, out)
    return out


def gemm_flops(primitive, avals, params: dict) -> float:
    """2 x multiply-adds of one dot_general or convolution."""
    if primitive.name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = params["dimension_numbers"]
        lhs, rhs = avals
        (_, rhs_contract), (_, rhs_batch) = params["dimension_numbers"]
        free_rhs = [d for i, d in enumerate(rhs.shape) if i not in (*rhs_contract, *rhs_batch)]
        return 2.0 * float(np.prod(lhs.shape)) * float(np.prod(free_rhs))
    lhs, rhs = avals
    out = jax.eval_shape(lambda a, b: primitive.bind(a, b, **params), lhs, rhs)
    spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    per_output = np.prod([rhs.shape[d] for d in spec[1:]])  # in features x window
    return 2.0 * float(np.prod(out.shape)) * float(per_output)


def op_runner(name: str, primitive, avals, params: dict) -> _timing.Runner:
    """One GEMM alone, jitted, on random operands."""
    fn = jax.jit(lambda *xs: primitive.bind(*xs, **params))
    rng = np.random.default_rng(0)
    args = [jax.device_put(rng.standard_normal(a.shape).astype(a.dtype)) for a in avals]

    def run(k: int) -> None:
        jax.block_until_ready([fn(*args) for _ in range(k)])

    return _timing.Runner(name, lambda: {}, run)


def measure(name: str, trials: int, target_s: float) -> dict[str, Any]:
    case = throughput.CASES[name]
    setup = throughput.jax_setup(case, "full", "float32")
    batch = throughput.host_batch(case)
    step = throughput.jax_runner(setup, batch)
    fn = steps.make_train_step(setup.model, setup.head, setup.tx, lora_cfg=setup.lora_cfg)
    closed = jax.make_jaxpr(fn)(setup.state, batch)  # the step throughput.py times
    ops = gemms(closed.jaxpr)
    step.prepare()
    runners = [op_runner(f"op{i}", p, a, dict(kw)) for i, (p, a, kw) in enumerate(ops)]
    per_call = {}
    for r in [step, *runners]:  # compile, warm up, pick calls per trial
        r.run(1)
        per_call[r.framework] = _timing.time_call(lambda r=r: r.run(2)) / 2
    calls = {f: _timing.pick_steps_per_trial(t, target_s, 1000) for f, t in per_call.items()}
    times: dict[str, list[float]] = {r.framework: [] for r in [step, *runners]}
    for _ in range(trials):
        for r in [step, *runners]:
            elapsed = _timing.time_call(lambda r=r: r.run(calls[r.framework]))
            times[r.framework].append(elapsed / calls[r.framework])
    step_s = float(np.median(times["jax"]))
    rows = []
    for r, ((primitive, avals, kw), count) in zip(runners, ops.items(), strict=True):
        alone = float(np.median(times[r.framework]))
        flops = gemm_flops(primitive, avals, dict(kw))
        rows.append(
            {
                "op": primitive.name,
                "shapes": [list(a.shape) for a in avals],
                "count": count,
                "flops": flops,
                "alone_s": alone,
                "gflop_per_s": flops / alone / 1e9,
            }
        )
    roofline_s = sum(r["alone_s"] * r["count"] for r in rows)
    gemm_total = sum(r["flops"] * r["count"] for r in rows)
    return {
        "model": name,
        "batch": case.batch,
        "step_s": step_s,
        "roofline_s": roofline_s,
        "roofline_share": roofline_s / step_s,
        "gemm_flops": gemm_total,
        "gemm_count": sum(r["count"] for r in rows),
        "step_gflop_per_s": gemm_total / step_s / 1e9,
        "roofline_gflop_per_s": gemm_total / roofline_s / 1e9,
        "trials": trials,
        "ops": sorted(rows, key=lambda r: -r["alone_s"] * r["count"]),
    }


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(throughput.PRESETS["cpu-quick"].models))
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--target-trial-s", type=float, default=0.1, help="seconds per trial")
    p.add_argument("--out", help="write the records as JSON here")
    p.add_argument("--smoke", action="store_true", help="the smoke cases, one short trial (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models = ",".join(throughput.PRESETS["smoke"].models)
        args.trials, args.target_trial_s = 1, 0.0
    jax.config.update("jax_default_prng_impl", "rbg")  # as throughput.py: fast CPU inits
    env = _timing.environment()
    print(f"env: {env['device']} jax {env['jax']} load {env['load_avg']}")
    records = []
    for name in args.models.split(","):
        r = measure(name, args.trials, args.target_trial_s)
        records.append(r)
        print(
            f"{name:12s} step {r['step_s'] * 1e3:8.2f} ms  GEMM roofline "
            f"{r['roofline_s'] * 1e3:8.2f} ms ({r['gemm_count']} GEMMs, "
            f"{r['gemm_flops'] / 1e9:.3f} GFLOP)  roofline / step {r['roofline_share']:.0%}",
            flush=True,
        )
    if args.out:
        env["load_avg_end"] = list(os.getloadavg())
        Path(args.out).write_text(json.dumps({"env": env, "results": records}, indent=2) + "\n")
    return records


if __name__ == "__main__":
    main()
