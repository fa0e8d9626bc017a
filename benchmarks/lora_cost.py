"""What a LoRA train step costs against full fine-tuning: XLA's analysis and measured time
of full fine-tuning, LoRA merged and LoRA factored, per model, in one process.

    nice -n 0 python benchmarks/lora_cost.py                  # gpt-small and gpt2-124m, timed
    python benchmarks/lora_cost.py --models gpt2-124m --trials 0   # XLA's analysis only
    python benchmarks/lora_cost.py --render benchmarks/results/lora_cost.json
    python benchmarks/lora_cost.py --smoke      # a one-block GPT, one trial (CI; writes nothing)

Models (float32, Adam, LoRA rank 8 alpha 16 on every Dense kernel: query, key, value, out,
fc1, fc2; the tied embedding and LM head stay frozen):

    gpt-small   4 layers, width 128, byte vocabulary, batch 8 x 128 tokens
    gpt2-124m   GPT-2's shape, 50,257-word vocabulary, batch 4 x 256 tokens (issue 13's)

Each step is compiled once; XLA's FLOP count (`compiled.cost_analysis()`) and peak bytes
(`memory_analysis()`: arguments + outputs - aliased + temp) come from the compiled step. A
merged adapter makes the backward pass form the full weight gradient x^T g of every adapted
kernel; the factored one (`jaxdl.core.adapters.low_rank_dense`) never does. Timing: the three
variants of a model run in the same process with their trials interleaved (one trial of each
per round, the order rotating), each trial K steps back to back; the table gives medians over
trials and the median of per-trial ratios to full fine-tuning, so load from other processes
hits every variant alike. Writes benchmarks/results/lora_cost.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `jaxdl` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import _report, _timing, throughput  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {  # name: (case, steps per trial: about a second or more per trial)
    "gpt-small": (throughput.CASES["gpt-small"], 10),
    "gpt2-124m": (
        dataclasses.replace(throughput.CASES["gpt2-124m"], input_shape=(256,), batch=4),
        1,
    ),
    "smoke-gpt": (throughput.CASES["smoke-gpt"], 1),  # --smoke
}
VARIANTS = {  # name: (throughput mode, factored_lora)
    "full": ("full", True),
    "LoRA merged": ("lora", False),
    "LoRA factored (default)": ("lora", True),
}


def runners(case) -> list[_timing.Runner]:
    """The variants' train steps as Runners."""
    batch = throughput.host_batch(case)
    out = []
    for name, (mode, factored) in VARIANTS.items():
        setup = throughput.jax_setup(case, mode, "float32")
        runner = throughput.jax_runner(setup, batch, factored_lora=factored)
        out.append(dataclasses.replace(runner, framework=name))
        del setup  # the runner holds its own copy of the state
    return out


def measure(name: str, case, trials: int, steps: int) -> dict:
    runs = runners(case)
    variants = {}
    for r in runs:
        facts = r.prepare()
        variants[r.framework] = {**r.info, **facts}
        print(f"{name} {r.framework}: compiled {json.dumps(facts)}", flush=True)
    if trials:
        for r in runs:
            r.run(1)  # first call: allocations, caches
        times = _timing.interleaved_trials(runs, trials=trials, steps_per_trial=steps)
        for r in runs:
            r.check()
            variants[r.framework]["trials_s"] = times[r.framework]
            variants[r.framework]["step_time_s"] = _timing.step_stats(times[r.framework])
            variants[r.framework]["x_full"] = _timing.paired_ratio(
                times[r.framework], times["full"]
            )
    tokens = case.batch * case.input_shape[0]
    return {"batch": case.batch, "seq_len": case.input_shape[0], "tokens": tokens,
            "steps_per_trial": steps, "variants": variants}  # fmt: skip


def markdown(record: dict) -> str:
    a, env = record["args"], record["env"]
    rows = [
        f"float32, Adam, LoRA rank 8 on every Dense kernel, {env['device']} "
        f"({env['cpu']}, {env['cpu_count']} cores), {a['trials']} interleaved trials per model, "
        f"load average {env['load_avg'][0]:.1f} at the start; x full = median of per-trial "
        "ratios\n",
        "| model | batch | steps/trial | variant | trainable params | XLA GFLOP/step | XLA peak MB "
        "| step ms (median) | min | CV % | x full |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, m in record["models"].items():
        for name, v in m["variants"].items():
            t = v.get("step_time_s")
            timed = (
                f"{t['median'] * 1e3:,.1f} | {t['min'] * 1e3:,.1f} | {t['cv'] * 100:.1f} "
                f"| {v['x_full']:.2f}"
                if t
                else "- | - | - | -"
            )
            rows.append(
                f"| {model} | {m['batch']} x {m['seq_len']} | {m['steps_per_trial']} | {name} "
                f"| {v['trainable_params']:,} | {v['xla_flops'] / 1e9:,.1f} "
                f"| {v['xla_peak_bytes'] / 2**20:,.0f} | {timed} |"
            )
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="gpt-small,gpt2-124m", help=f"comma list of {list(MODELS)}"
    )
    parser.add_argument("--trials", type=int, default=7, help="0: XLA's analysis only")
    parser.add_argument("--steps", type=int, help="steps per trial (default: per model)")
    parser.add_argument("--out", help="default: benchmarks/results/lora_cost.json")
    parser.add_argument("--render", metavar="FILE.json", help="rewrite FILE.md from FILE.json")
    parser.add_argument("--smoke", action="store_true", help="smoke-gpt, one trial of one step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.trials, args.steps = "smoke-gpt", 1, 1
    elif args.out is None:
        args.out = str(RESULTS / "lora_cost.json")
    if args.render:
        record = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(record))
        return print(markdown(record))
    jax.config.update("jax_default_prng_impl", "rbg")  # fast init compiles on CPU
    record = {"args": vars(args), "env": _timing.environment(), "models": {}}
    for name in args.models.split(","):
        case, steps = MODELS[name]
        record["models"][name] = measure(name, case, args.trials, args.steps or steps)
    if args.out:
        _report.write_record(args.out, record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
