"""Many small runs: a 16-member vmapped sweep against 16 runs one after another.

    python benchmarks/sweep_throughput.py --out benchmarks/results/sweep_throughput.json
    python benchmarks/sweep_throughput.py --smoke    # 2 members x 2 steps, K=1/8 of 8 (CI)

For each model (digits MLP, digits SimpleCNN) the same 16 trials (4 learning rates x 4
seeds, the same steps, evaluations and checkpoints) run three ways, wall clock end to end:

    vmapped      `jaxdl.runs.sweep.run_sweep`, all 16 in one vmapped group
    in-process   16 `jaxdl.training.trainer.train` calls in this process
    processes    16 `jaxdl train` subprocesses, one after another

Then steps_per_call 1 against 8 for the MLP and the small GPT: the trainer's median step
time (`summary.json` step_ms, compilation excluded) of the same run.

No persistent compilation cache is used (as a first run on a fresh machine): every way
compiles what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxdl import config as config_lib

MODELS = {"mlp": "experiments/digits_mlp.py", "simple_cnn": "experiments/digits_cnn.py"}
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = (0, 1, 2, 3)
SMOKE_GRID = ((1e-3,), (0, 1))  # --smoke: 1 learning rate x 2 seeds
# steps_per_call runs: (name, config, overrides); --smoke shrinks the GPT to one block
K_RUNS = (
    ("mlp", MODELS["mlp"], ()),
    ("gpt-small", "experiments/lm_stdlib_pretrain.py", ("--config.data.max_bytes=400000",)),
)
SMOKE_GPT = ("--config.data.max_bytes=40000", "--config.model.num_layers=1")


def _overrides(steps: int) -> list[str]:
    every = max(steps // 2, 1)
    return [
        "--config.num_epochs=0",
        f"--config.num_steps={steps}",
        f"--config.log_every={every}",
        f"--config.eval_every={every}",
    ]


def _trial_overrides(lr: float, seed: int) -> list[str]:
    return [f"--config.optimizer.learning_rate={lr!r}", f"--config.seed={seed}"]


def time_vmapped(config: str, steps: int, root: Path, grid=(LRS, SEEDS)) -> float:
    from jaxdl.runs.sweep import run_sweep

    lrs, seeds = grid
    cfg = config_lib.load_config(config, _overrides(steps))
    params = [f"optimizer.learning_rate={list(lrs)}", f"seed={list(seeds)}"]
    start = time.perf_counter()
    run_sweep(cfg, root / "vmapped", params, parallel=len(lrs) * len(seeds), echo=lambda s: None)
    return time.perf_counter() - start


def time_in_process(config: str, steps: int, root: Path, grid=(LRS, SEEDS)) -> float:
    from jaxdl.training.trainer import train

    start = time.perf_counter()
    for lr in grid[0]:
        for seed in grid[1]:
            cfg = config_lib.load_config(config, _overrides(steps) + _trial_overrides(lr, seed))
            train(cfg, root / f"inproc_{lr}_{seed}", progress=False, echo=lambda s: None)
    return time.perf_counter() - start


def time_processes(config: str, steps: int, root: Path, grid=(LRS, SEEDS)) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    start = time.perf_counter()
    for lr in grid[0]:
        for seed in grid[1]:
            args = ["train", "--config", config, "--workdir", str(root / f"proc_{lr}_{seed}")]
            args += ["--no-progress", *_overrides(steps), *_trial_overrides(lr, seed)]
            subprocess.run(
                [sys.executable, "-m", "jaxdl.cli", *args],
                check=True,
                env=env,
                capture_output=True,
            )
    return time.perf_counter() - start


def step_ms(config: str, steps: int, k: int, root: Path, extra=()) -> float:
    from jaxdl.training.trainer import train

    overrides = [
        "--config.num_epochs=0",
        f"--config.num_steps={steps}",
        f"--config.log_every={steps // 4}",
        f"--config.eval_every={steps}",
        f"--config.steps_per_call={k}",
        *extra,
    ]
    cfg = config_lib.load_config(config, overrides)
    summary = train(cfg, root / f"k{k}_{Path(config).stem}", progress=False, echo=lambda s: None)
    return summary["step_ms"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="train steps per trial")
    parser.add_argument("--models", default="mlp,simple_cnn", help="sweep models ('' for none)")
    parser.add_argument("--k-steps", type=int, default=400, help="steps of the K=1 / K=8 runs")
    parser.add_argument("--k-trials", type=int, default=3, help="interleaved K=1 / K=8 pairs")
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="2 members, a few steps (CI)")
    args = parser.parse_args(argv)
    grid, k_runs = (LRS, SEEDS), K_RUNS
    if args.smoke:
        args.steps, args.models, args.k_steps, args.k_trials = 2, "mlp", 8, 1
        grid = SMOKE_GRID
        k_runs = tuple((n, c, SMOKE_GPT if n == "gpt-small" else x) for n, c, x in K_RUNS)
    if not args.smoke:  # a smoke run checks the code, not first-run compile times
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    members = len(grid[0]) * len(grid[1])
    results: dict = {"steps": args.steps, "members": members, "sweep": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in filter(None, args.models.split(",")):
            config = MODELS[name]
            row = {
                "vmapped_s": time_vmapped(config, args.steps, root / name, grid),
                "in_process_s": time_in_process(config, args.steps, root / name, grid),
                "processes_s": time_processes(config, args.steps, root / name, grid),
            }
            row["x_vs_in_process"] = row["in_process_s"] / row["vmapped_s"]
            row["x_vs_processes"] = row["processes_s"] / row["vmapped_s"]
            results["sweep"][name] = row
            print(name, json.dumps(row), flush=True)
        results["steps_per_call"] = {}
        for name, config, extra in k_runs:
            ones, eights = [], []
            for trial in range(args.k_trials):  # interleaved, so load drifts hit both alike
                ones.append(step_ms(config, args.k_steps, 1, root / f"t{trial}", extra))
                eights.append(step_ms(config, args.k_steps, 8, root / f"t{trial}", extra))
            ratios = [a / b for a, b in zip(ones, eights, strict=True)]
            results["steps_per_call"][name] = {
                "k1_step_ms": statistics.median(ones),
                "k8_step_ms": statistics.median(eights),
                "speedup": statistics.median(ratios),
                "trials": args.k_trials,
            }
            print(name, json.dumps(results["steps_per_call"][name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
