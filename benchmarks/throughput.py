"""Training throughput of jaxdl's train step, side by side with the same models in PyTorch.

    python benchmarks/throughput.py --preset cpu-quick --out benchmarks/results/cpu-quick.json
    python benchmarks/throughput.py --preset gpu --out benchmarks/results/h200.json
    python benchmarks/throughput.py --preset cpu-quick --models mlp,gpt --modes full,frozen,lora \
        --dtypes float32,bfloat16 --out /tmp/modes.json
    python benchmarks/throughput.py --smoke      # every model family, tiny, one trial (CI)

Per case (model x mode x dtype) the JAX step is built with the library
(`jaxdl.training.build.build`,
`jaxdl.core.steps.make_train_step`) and its PyTorch twin (benchmarks/torch_models.py) eagerly and
under torch.compile. Each is compiled, warmed up, then timed in trials of K steps issued back
to back with one sync, the frameworks' trials alternating in this one process. Writes FILE
(JSON), FILE.md (table) and FILE.png (JAX-vs-torch speedups). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _flops, _report, _timing
from jaxdl.config import default_config
from jaxdl.core import steps, tree
from jaxdl.models.llama import llama_spec
from jaxdl.models.transformer import transformer_spec
from jaxdl.training.build import build

MODES = ("full", "frozen", "lora")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FRAMEWORKS = ("jax", "torch-eager", "torch-compile")
LORA = {"rank": 8, "alpha": 16.0}

# Dense peak FLOP/s by device kind and compute dtype (datasheet). float32 matmuls on Hopper
# run as TF32 under JAX's default precision, so f32 MFU is against the TF32 tensor-core peak.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 494.7e12},
    "H100": {"bfloat16": 989e12, "float32": 494.7e12},
}
MEASURED_PEAK_FLOPS = {"H200": {"bfloat16": 790e12}}  # best dense bf16 matmul measured


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the table: what to build, what to feed, what trains when frozen."""

    name: str  # row label, e.g. "resnet50"
    model: dict[str, Any]  # jaxdl model config ("name" + fields, no dtype)
    input_shape: tuple[int, ...]  # per example: (64,), (H, W, C) or (T,) tokens
    batch: int
    kind: str = "classification"  # | "lm"
    frozen_trains: str = "params/head/.*"  # frozen mode: the one rule that trains
    lora_targets: str = ".*kernel"

    @property
    def num_classes(self) -> int:
        """Classes of a classifier; an LM's vocabulary."""
        if self.kind == "lm":
            if self.model["name"] == "llama":
                return llama_spec(self.model).vocab_size
            return transformer_spec(self.model).vocab_size
        return self.model["num_classes"]

    @property
    def examples_unit(self) -> str:
        return "tokens" if self.kind == "lm" else "examples"

    @property
    def items_per_step(self) -> int:
        return self.batch * (self.input_shape[0] if self.kind == "lm" else 1)


def _gpt(name: str, size: str, seq: int, batch: int, layers: int) -> Case:
    return Case(
        name,
        {"name": "transformer", "size": size, "max_len": seq},
        (seq,),
        batch,
        kind="lm",
        frozen_trains=f"params/(block_{layers - 1}|ln_f)/.*",  # the last block and final LN
    )


def _llama(name: str, size: str, seq: int, batch: int, layers: int, **fields) -> Case:
    return Case(
        name,
        {"name": "llama", "size": size, "max_len": seq, **fields},
        (seq,),
        batch,
        kind="lm",
        frozen_trains=f"params/(layer_{layers - 1}|norm)/.*",  # the last layer and final norm
    )


# Adding a model is one entry here (and, for the torch side, its twin in torch_models.py).
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", {"name": "mlp", "num_classes": 10}, (64,), 128),
        Case("simple_cnn", {"name": "simple_cnn", "num_classes": 10}, (32, 32, 3), 32),
        Case(
            "resnet-tiny",
            {"name": "resnet", "num_classes": 10, "depth": "tiny", "small_inputs": True},
            (32, 32, 3),
            32,
        ),
        Case("vit-tiny", {"name": "vit", "num_classes": 10, "size": "tiny"}, (32, 32, 3), 64),
        _gpt("gpt-small", "small", 128, 8, layers=4),
        Case("resnet50", {"name": "resnet", "num_classes": 1000, "depth": 50}, (224, 224, 3), 256),
        Case(
            "vit-b16",
            {"name": "vit", "num_classes": 1000, "size": "B", "patch_size": 16},
            (224, 224, 3),
            256,
        ),
        _gpt("gpt2-124m", "gpt2-124m", 1024, 16, layers=12),
        _gpt("gpt-1b", "1b", 2048, 4, layers=24),
        # Llama 3.2 1B and Llama 3.1 8B shapes (random weights, GQA 32/8, vocab 128,256);
        # the 8B keeps bf16 parameters (fp32 ones and Adam's moments would not fit 141 GB)
        _llama("llama-1b", "llama3-1b", 2048, 4, layers=16, remat=True),
        _llama("llama-8b", "llama3-8b", 2048, 2, layers=32, remat=True, param_dtype="bfloat16"),
        # --smoke: one tiny case per model family, so CI runs every family's code path
        Case("smoke-mlp", {"name": "mlp", "num_classes": 3, "hidden": (8,)}, (8,), 4),
        Case(
            "smoke-cnn",
            {"name": "simple_cnn", "num_classes": 3, "features": (4,), "hidden": 8},
            (8, 8, 1),
            4,
        ),
        Case(
            "smoke-resnet",
            {
                "name": "resnet",
                "num_classes": 3,
                "depth": "tiny",
                "stage_sizes": (1, 1),
                "num_filters": 4,
                "small_inputs": True,
            },
            (8, 8, 3),
            2,
        ),
        Case(
            "smoke-vit",
            {"name": "vit", "num_classes": 3, "size": "tiny", "num_layers": 1, "embed_dim": 16},
            (8, 8, 3),
            2,
        ),
        _llama("smoke-llama", "tiny", 16, 2, layers=2, num_layers=2),
        Case(
            "smoke-gpt",
            {"name": "transformer", "size": "tiny", "num_layers": 1, "max_len": 16},
            (16,),
            2,
            kind="lm",
            frozen_trains="params/(block_0|ln_f)/.*",
        ),
    ]
}


@dataclasses.dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    frameworks: tuple[str, ...] = FRAMEWORKS
    warmup: int = 10
    trials: int = 7
    target_trial_s: float = 0.25  # K is picked so one trial lasts about this long
    max_steps_per_trial: int = 50


PRESETS = {
    # Within 5 minutes on 2 CPU cores. torch.compile is left out by default because on 2
    # cores it compiles for 12-170 s per model (add --frameworks jax,torch-eager,torch-compile);
    # frozen/LoRA and bf16: add --modes / --dtypes.
    "cpu-quick": Preset(
        models=("mlp", "simple_cnn", "resnet-tiny", "vit-tiny", "gpt-small"),
        modes=("full",),
        dtypes=("float32",),
        frameworks=("jax", "torch-eager"),
    ),
    "gpu": Preset(
        models=("resnet50", "vit-b16", "gpt2-124m", "gpt-1b", "llama-1b", "llama-8b"),
        modes=("full", "frozen", "lora"),
        dtypes=("bfloat16",),
        warmup=10,
        trials=10,
        target_trial_s=1.0,
        max_steps_per_trial=100,
    ),
    # Seconds: it checks that every family builds, compiles, runs and reports, not speed.
    "smoke": Preset(
        models=("smoke-mlp", "smoke-cnn", "smoke-resnet", "smoke-vit", "smoke-gpt", "smoke-llama"),
        modes=("full",),
        dtypes=("float32",),
        frameworks=("jax", "torch-eager"),
        warmup=1,
        trials=1,
        target_trial_s=0.0,
        max_steps_per_trial=1,
    ),
}


# ------------------------------------------------------------------ JAX side


def host_batch(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic batch: N(0, 1) images and uniform labels, or uniform tokens."""
    rng = np.random.default_rng(seed)
    if case.kind == "lm":
        tokens = rng.integers(0, case.num_classes, (case.batch, case.input_shape[0] + 1))
        tokens = tokens.astype(np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return {
        "image": rng.standard_normal((case.batch, *case.input_shape), np.float32),
        "label": rng.integers(0, case.num_classes, (case.batch,)).astype(np.int32),
    }


def jax_config(case: Case, mode: str, dtype: str, total_steps: int):
    cfg = default_config()
    cfg.model = {**case.model, "dtype": DTYPES[dtype]}
    cfg.num_steps = total_steps
    cfg.optimizer.name = "adam"
    if mode == "frozen":
        cfg.partition = [(case.frozen_trains, {}), (".*", {"trainable": False})]
    elif mode == "lora":  # partition None: only the adapters train
        cfg.lora = {**LORA, "targets": case.lora_targets}
    return cfg


def jax_setup(case: Case, mode: str, dtype: str):
    if case.kind == "lm":
        spec = {k: (case.input_shape, jnp.int32) for k in ("inputs", "targets")}
    else:
        spec = {"image": (case.input_shape, jnp.float32), "label": ((), jnp.int32)}
    cfg = jax_config(case, mode, dtype, total_steps=10_000)
    return build(
        cfg, kind=case.kind, example_spec=spec, num_classes=case.num_classes, total_steps=10_000
    )


def _memory_facts(compiled) -> dict[str, int | None]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {"xla_peak_bytes": None}
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {"xla_peak_bytes": int(peak)}


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def jax_runner(
    setup, batch: dict[str, np.ndarray], *, scan_steps: int = 0, **step_kwargs
) -> _timing.Runner:
    """The library's jitted train step as a Runner; with ``scan_steps`` > 0, that many steps
    fused into one executable with `lax.scan` (framework "jax-scan")."""
    device_batch = jax.device_put(batch)
    holder = {"state": jax.tree.map(jnp.copy, setup.state)}  # own copy: the step donates it
    if scan_steps:
        one = functools.partial(
            steps.train_step,
            model=setup.model,
            head=setup.head,
            tx=setup.tx,
            lora_cfg=setup.lora_cfg,
        )

        def many(state, batch):
            def body(s, _):
                s, metrics = one(s, batch)
                return s, metrics["loss"]

            return jax.lax.scan(body, state, None, length=scan_steps)

        fn = jax.jit(many, donate_argnums=0)
    else:
        fn = steps.make_train_step(
            setup.model, setup.head, setup.tx, lora_cfg=setup.lora_cfg, **step_kwargs
        )
    per_call = max(scan_steps, 1)

    def prepare() -> dict[str, Any]:
        start = time.perf_counter()
        compiled = fn.lower(holder["state"], device_batch).compile()
        facts = {"compile_s": time.perf_counter() - start}
        facts["xla_flops"] = _xla_flops(compiled)  # of a scan: its body, i.e. one step
        facts.update(_memory_facts(compiled))
        return facts

    def run(k: int) -> None:
        assert k % per_call == 0, f"{k} steps is not a multiple of the scan length {per_call}"
        state = holder["state"]
        for _ in range(k // per_call):
            state, _ = fn(state, device_batch)
        jax.block_until_ready(state)
        holder["state"] = state

    def peak_memory() -> int | None:
        stats = jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None

    def check() -> None:
        size = fn._cache_size()
        assert size == 1, f"the train step was compiled {size} times (a retrace while timing)"

    state = setup.state
    info = {
        "params": tree.num_params(state.params) + tree.num_params(state.frozen),
        "trainable_params": tree.num_params(state.params),
        "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state))),
        "scan_steps": scan_steps,
    }
    name = "jax-scan" if scan_steps else "jax"
    return _timing.Runner(name, prepare, run, info=info, peak_memory=peak_memory, check=check)


# ------------------------------------------------------------------ one case


def _peak(device_kind: str, dtype: str, table) -> float | None:
    for key, peaks in table.items():
        if key in device_kind:
            return peaks.get(dtype)
    return None


def torch_runners(case, mode, dtype, batch, frameworks, channels_last) -> list:
    """Torch runners for the frameworks asked; (framework, error) pairs where it can't run."""
    from benchmarks import torch_models

    if jax.devices()[0].platform != "cpu" and torch_models.device().type != "cuda":
        return [(f, "torch has no CUDA here (CPU wheel): not comparable") for f in frameworks]
    if case.model["name"] == "llama":  # transformers is its reference: llm_decode, lora_vs_peft
        return [(f, "no hand-written PyTorch twin of llama") for f in frameworks]
    return [
        torch_models.torch_runner(
            case.model,
            kind=case.kind,
            batch=batch,
            mode=mode,
            dtype=dtype,
            frozen_trains=case.frozen_trains,
            lora={**LORA, "targets": case.lora_targets},
            compiled=f == "torch-compile",
            channels_last=channels_last,
        )
        for f in frameworks
    ]


def bench_case(
    case: Case,
    mode: str,
    dtype: str,
    preset: Preset,
    *,
    frameworks: Sequence[str] = FRAMEWORKS,
    scan_steps: int = 0,
    channels_last: bool = False,
    log=print,
) -> list[dict[str, Any]]:
    """Compile, warm up and time every framework on one case; one record per framework."""
    base = {"model": case.name, "mode": mode, "dtype": dtype, "batch": case.batch}
    batch = host_batch(case)
    start = time.perf_counter()
    setup = jax_setup(case, mode, dtype)
    build_s = time.perf_counter() - start
    runners: list = [jax_runner(setup, batch)]
    if scan_steps:
        runners.append(jax_runner(setup, batch, scan_steps=scan_steps))
    torch_fw = [f for f in frameworks if f.startswith("torch")]
    if torch_fw:
        runners += torch_runners(case, mode, dtype, batch, torch_fw, channels_last)

    multiple = max(scan_steps, 1)  # a jax-scan runner runs whole scans only
    warmup = -(-preset.warmup // multiple) * multiple
    records, ready, facts = [], [], {}
    for runner in runners:
        if isinstance(runner, tuple):
            records.append({**base, "framework": runner[0], "error": runner[1]})
            continue
        try:
            facts[runner.framework] = runner.prepare()
            warm = _timing.time_call(lambda r=runner: r.run(warmup)) / warmup
        except Exception as err:  # noqa: BLE001  torch.compile may fail: record, go on
            if runner.framework.startswith("jax"):
                raise
            records.append({**base, "framework": runner.framework, "error": _one_line(err)})
            continue
        facts[runner.framework]["warm_step_s"] = warm
        ready.append(runner)

    slowest = max(facts[r.framework]["warm_step_s"] for r in ready)
    k = _timing.pick_steps_per_trial(slowest, preset.target_trial_s, preset.max_steps_per_trial)
    k = -(-k // multiple) * multiple
    with _timing.CompileCounter() as counter:
        times = _timing.interleaved_trials(ready, trials=preset.trials, steps_per_trial=k)
    assert not counter.events, f"{case.name}: compiled while timing: {counter.events}"
    for runner in ready:
        runner.check()

    flops = _flops.model_flops(
        case.model,
        case.input_shape,
        case.batch,
        mode,
        trains=lambda name: re.fullmatch(case.frozen_trains, f"params/{name}/x") is not None,
    )
    timing = {"steps_per_trial": k, "trials": preset.trials, "warmup_steps": warmup}
    for runner in ready:
        rec = _record(case, runner, times, facts[runner.framework], flops, {**base, **timing})
        if runner.framework == "jax":
            rec["build_s"] = build_s
        records.append(rec)
    for rec in records:
        log(_report.one_line(rec))
    return records


def _record(case: Case, runner, times, facts, flops, base) -> dict[str, Any]:
    """One result record: the schema of the JSON's "results" (see benchmarks/README.md)."""
    kind = jax.devices()[0].device_kind
    stats = _timing.step_stats(times[runner.framework])
    peak = _peak(kind, base["dtype"], PEAK_FLOPS)
    measured_peak = _peak(kind, base["dtype"], MEASURED_PEAK_FLOPS)
    per_second = flops / stats["median"] if flops else None
    mfu = lambda peak: per_second / peak if per_second and peak else None
    return {
        **base,
        "framework": runner.framework,
        "step_time_s": stats,
        "throughput": case.items_per_step / stats["median"],
        "throughput_unit": f"{case.examples_unit}/s",
        "compile_s": facts["compile_s"],
        "flops_per_step": flops,
        "xla_flops": facts.get("xla_flops"),
        "mfu": mfu(peak),
        "mfu_vs_measured_peak": mfu(measured_peak),
        "peak_memory_bytes": runner.peak_memory(),
        "xla_peak_bytes": facts.get("xla_peak_bytes"),
        "step_times_s": times[runner.framework],
        # median over paired trials of this step time / JAX's: > 1 means JAX is faster
        "time_vs_jax": _timing.paired_ratio(times[runner.framework], times["jax"]),
        **{key: (v() if callable(v) else v) for key, v in runner.info.items()},
    }


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# ------------------------------------------------------------------ command line


def _csv(text: str | None, allowed: Sequence[str], flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"{flag}: expected a comma list of {list(allowed)}, found {bad}.")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-quick")
    p.add_argument("--smoke", action="store_true", help="= --preset smoke: tiny, one trial (CI)")
    p.add_argument("--models", help=f"comma list of {list(CASES)} (default: the preset's)")
    p.add_argument("--modes", help=f"comma list of {list(MODES)}")
    p.add_argument("--dtypes", help=f"comma list of {list(DTYPES)}")
    p.add_argument("--frameworks", help=f"comma list of {list(FRAMEWORKS)}")
    p.add_argument("--out", type=Path, help="JSON file; FILE.md and FILE.png go beside it")
    p.add_argument(
        "--render",
        type=Path,
        metavar="FILE.json",
        help="only rewrite FILE.md and FILE.png from a stored FILE.json",
    )
    p.add_argument("--trials", type=int, help="timed trials per framework (default 7)")
    p.add_argument(
        "--jax-scan",
        type=int,
        default=0,
        metavar="N",
        help="also time N steps fused with lax.scan (framework jax-scan)",
    )
    p.add_argument("--channels-last", action="store_true", help="torch images in NHWC memory")
    p.add_argument("--torch-threads", type=int, help="default: the CPU count")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE"],
        help="OMP_WAIT_POLICY for torch's OpenMP threads (unless already set)",
    )
    p.add_argument(
        "--prng",
        default="rbg",
        choices=["rbg", "threefry2x32"],
        help="JAX PRNG: rbg compiles the model inits ~5x faster on CPU (default)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.render:
        stored = json.loads(args.render.read_text())
        _report.write_all(args.render, stored["env"], stored["results"])
        return stored["results"]
    preset = PRESETS["smoke" if args.smoke else args.preset]
    models = _csv(args.models, list(CASES), "--models") or preset.models
    modes = _csv(args.modes, MODES, "--modes") or preset.modes
    dtypes = _csv(args.dtypes, list(DTYPES), "--dtypes") or preset.dtypes
    frameworks = _csv(args.frameworks, FRAMEWORKS, "--frameworks") or preset.frameworks
    if args.trials:
        preset = dataclasses.replace(preset, trials=args.trials)
    jax.config.update("jax_default_prng_impl", args.prng)

    threads = None
    if any(f.startswith("torch") for f in frameworks):
        # libgomp reads this when torch loads. Spinning OpenMP workers (the default) lose
        # their cores on a shared machine and a step then waits for a descheduled thread:
        # measured 10 ms -> 250 ms per MLP step at load 8 on 2 cores.
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
        try:
            import torch
        except ImportError:
            print("torch is not installed (pip install .[bench]): timing JAX only")
            frameworks = ("jax",)
        else:
            torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
            threads = torch.get_num_threads()

    env = _timing.environment(torch_threads=threads)
    print(
        f"env: {env['device']} jax {env['jax']} torch {env['torch']} threads {threads} "
        f"load {env['load_avg']}"
    )
    start = time.perf_counter()
    results = []
    for name in models:
        for mode in modes:
            for dtype in dtypes:
                results += bench_case(
                    CASES[name],
                    mode,
                    dtype,
                    preset,
                    frameworks=frameworks,
                    scan_steps=args.jax_scan,
                    channels_last=args.channels_last,
                )
    env["wall_s"] = time.perf_counter() - start
    env["load_avg_end"] = list(os.getloadavg())
    env["preset"] = "smoke" if args.smoke else args.preset
    env["argv"] = list(sys.argv[1:] if argv is None else argv)
    if args.out:
        _report.write_all(args.out, env, results)
        print(f"wrote {args.out} (+ .md, .png) in {env['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
