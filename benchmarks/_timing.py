"""Timing shared by the JAX and PyTorch sides: runners, interleaved trials, statistics, env.

A `Runner` is one framework's training loop for one case. ``prepare()`` compiles (or makes the
first call) and returns what it learned; ``run(k)`` issues ``k`` steps back to back and blocks
once at the end, so a trial measures the steady state and not the per-step sync. The trials of
several runners are interleaved (jax, torch, jax, torch, ...) so that load from other processes
on a shared machine hits every framework alike, and their ratio is taken trial by trial.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Runner:
    """One framework's train loop for one case.

    prepare() -> dict of facts found while compiling (compile_s, xla_flops, ...).
    run(k) runs k steps and blocks until the last one is done.
    """

    framework: str  # "jax" | "torch-eager" | "torch-compile"
    prepare: Callable[[], dict[str, Any]]
    run: Callable[[int], None]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # static facts (params, ...)
    peak_memory: Callable[[], int | None] = lambda: None
    check: Callable[[], None] = lambda: None  # called after timing: raises if it recompiled


def step_stats(step_times: Sequence[float]) -> dict[str, float]:
    """Median, min, p90 and coefficient of variation (std / mean) of per-step times [s]."""
    t = np.asarray(step_times, np.float64)
    assert t.size >= 1, "no trials timed"
    cv = float(t.std(ddof=1) / t.mean()) if t.size > 1 else 0.0
    return {
        "median": float(np.median(t)),
        "min": float(t.min()),
        "p90": float(np.percentile(t, 90)),
        "cv": cv,
    }


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pick_steps_per_trial(step_s: float, target_s: float, max_steps: int) -> int:
    """K such that a trial lasts about ``target_s`` (at least 1 step, at most ``max_steps``)."""
    if step_s <= 0:
        return max_steps
    return int(min(max(round(target_s / step_s), 1), max_steps))


def interleaved_trials(
    runners: Sequence[Runner], *, trials: int, steps_per_trial: int
) -> dict[str, list[float]]:
    """Per-step seconds of each trial, per framework, with the runners' trials alternating.

    Trial i of every runner runs before trial i + 1 of any; the order within a round
    rotates so no framework always follows the same one (caches, thermal state).
    """
    times: dict[str, list[float]] = {r.framework: [] for r in runners}
    assert len(times) == len(runners), "two runners share a framework name"
    for i in range(trials):
        shift = i % len(runners)
        for runner in list(runners[shift:]) + list(runners[:shift]):
            elapsed = time_call(lambda r=runner: r.run(steps_per_trial))
            times[runner.framework].append(elapsed / steps_per_trial)
    return times


def peak_rss_of(cmd: Sequence[str], cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, run as the child of a small fresh
    Python: Linux carries a process's peak RSS across fork and exec, so a command started
    straight from a benchmark that holds a model would report at least that model's RSS."""
    start = time.time()
    code = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True, cwd=cwd
    )
    return time.time() - start, int(done.stdout.split()[-1]) * 1024


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over trials of num[i] / den[i]: trial i of both ran in the same round."""
    assert len(num) == len(den), "trials are not paired"
    return float(statistics.median(a / b for a, b in zip(num, den, strict=True)))


class CompileCounter:
    """Counts JAX traces and XLA compiles in this process (jax.monitoring events).

    Used around the timed trials: any event there means the step recompiled, which
    would make the timing wrong.
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        import jax.monitoring

        self.events: list[tuple[str, str]] = []
        self._monitoring = jax.monitoring
        self._listener = self._on_event

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event in self.EVENTS:
            self.events.append((event, str(kwargs.get("fun_name", "?"))))

    def __enter__(self) -> CompileCounter:
        self._monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        from jax._src import monitoring  # the public module has no unregister

        monitoring.unregister_event_duration_listener(self._listener)


# ------------------------------------------------------------------ environment


def _run_text(cmd: Sequence[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return platform.processor() or None


# The CPU features a bf16 matmul's speed depends on: without them XLA and torch convert bf16
# around float32 math; with AMX a bf16 x bf16 -> f32 product runs several times float32's rate.
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def _cpu_bf16_features() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in BF16_FEATURES if f in flags]
    except OSError:
        pass
    return []


def _gpu_driver() -> str | None:
    text = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return text.splitlines()[0] if text else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(torch_threads: int | None = None) -> dict[str, Any]:
    """What the numbers depend on: device, versions, flags, commit, load."""
    import jax

    device = jax.devices()[0]
    repo = Path(__file__).resolve().parents[1]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_bf16_features": _cpu_bf16_features(),
        "cpu_count": os.cpu_count(),
        "driver": _gpu_driver(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "git_commit": _run_text(["git", "rev-parse", "HEAD"], cwd=repo),
        "git_dirty": bool(_run_text(["git", "status", "--porcelain"], cwd=repo)),
        "python": platform.python_version(),
        "load_avg": list(os.getloadavg()),
    }
