"""Benchmark records -> FILE.json, a markdown table FILE.md and a bar chart FILE.png."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = Mapping[str, Any]


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def one_line(rec: Record) -> str:
    """A progress line for the console."""
    if "error" in rec:
        return f"{rec['model']:12s} {rec['mode']:6s} {rec['dtype']:8s} {rec['framework']:13s} ERROR"
    t = rec["step_time_s"]
    return (
        f"{rec['model']:12s} {rec['mode']:6s} {rec['dtype']:8s} {rec['framework']:13s} "
        f"{t['median'] * 1e3:9.2f} ms/step (cv {t['cv'] * 100:4.1f}%)  "
        f"{rec['throughput']:10.0f} {rec['throughput_unit']}  x{rec['time_vs_jax']:.2f} vs jax"
    )


HEADER = (
    "| model | mode | dtype | framework | batch | step ms (median) | min | p90 | CV % "
    "| throughput | compile s | model GFLOP/step | XLA GFLOP/step | MFU % | memory MB "
    "| time / JAX |"
)


def markdown_table(results: Sequence[Record]) -> str:
    """One row per record; "memory MB" is the device peak where known, else XLA's estimate
    of the compiled step's peak (JAX on CPU), else the training state (params + optimizer)."""
    rows = [HEADER, _separator()]
    columns = HEADER.count("|") - 1
    for r in results:
        head = f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['framework']} "
        if "error" in r:
            msg = str(r["error"]).replace("|", "/")[:120]
            rows.append(head + f"| {r.get('batch', '-')} | failed: {msg} |" + " |" * (columns - 6))
            continue
        t = r["step_time_s"]
        memory = r.get("peak_memory_bytes") or r.get("xla_peak_bytes") or r.get("state_bytes")
        unit = "tok/s" if r["throughput_unit"].startswith("tokens") else "ex/s"
        rows.append(
            head
            + f"| {r['batch']} | {t['median'] * 1e3:.2f} | {t['min'] * 1e3:.2f} "
            + f"| {t['p90'] * 1e3:.2f} | {t['cv'] * 100:.1f} | {r['throughput']:,.0f} {unit} "
            + f"| {_num(r['compile_s'], '.1f')} | {_num(r['flops_per_step'], '.3f', 1e-9)} "
            + f"| {_num(r['xla_flops'], '.3f', 1e-9)} | {_num(r['mfu'], '.1f', 100)} "
            + f"| {_num(memory, '.1f', 1e-6)} | {r['time_vs_jax']:.2f} |"
        )
    return "\n".join(rows) + "\n"


def _separator() -> str:
    return "|" + "---|" * (HEADER.count("|") - 1)


def markdown(env: Mapping[str, Any], results: Sequence[Record]) -> str:
    load = lambda key: " / ".join(f"{x:.1f}" for x in env.get(key) or [])
    lines = [
        f"# Throughput: {env.get('preset', '')} on {env['device']}",
        "",
        f"- CPU: {env.get('cpu')} x {env.get('cpu_count')}, torch threads "
        f"{env.get('torch_threads')}, OMP_WAIT_POLICY {env.get('omp_wait_policy')}; load "
        f"average (1 / 5 / 15 min) {load('load_avg')} at start, {load('load_avg_end')} at end",
        f"- jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, optax "
        f"{env['optax']}, torch {env['torch']}; XLA_FLAGS='{env['xla_flags']}'; "
        f"PRNG {env.get('prng_impl')}",
        f"- commit {env.get('git_commit')}{' (dirty tree)' if env.get('git_dirty') else ''}; "
        f"wall time {env.get('wall_s', 0):.0f} s; args: {' '.join(env.get('argv', []))}",
        "- time / JAX: median over interleaved trials of (this step time / JAX step time); "
        "> 1 means JAX is faster.",
        "",
        markdown_table(results),
    ]
    return "\n".join(lines)


def bar_chart(results: Sequence[Record], path: Path, title: str) -> None:
    """Bars of time / JAX per case and non-JAX framework; the line at 1 is parity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = []
    for r in results:
        key = (r["model"], r["mode"], r["dtype"])
        if key not in cases:
            cases.append(key)
    others = [f for f in dict.fromkeys(r["framework"] for r in results) if f != "jax"]
    width = 0.8 / max(len(others), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 4.5))
    for j, fw in enumerate(others):
        xs, ys = [], []
        for i, key in enumerate(cases):
            for r in results:
                if (r["model"], r["mode"], r["dtype"]) == key and r["framework"] == fw:
                    if "error" not in r:
                        xs.append(i + (j - (len(others) - 1) / 2) * width)
                        ys.append(r["time_vs_jax"])
        bars = ax.bar(xs, ys, width, label=fw)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(["\n".join(k) for k in cases], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylabel("step time / JAX step time  (>1: JAX faster)")
    ax.set_title(title, fontsize=10)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_record(out: str | Path, record: Mapping[str, Any], table: str) -> None:
    """A benchmark's record as OUT (JSON) and its markdown table as OUT with .md."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)


def write_all(path: Path, env: Mapping[str, Any], results: Sequence[Record]) -> None:
    """FILE (JSON: {"env", "results"}), FILE with .md, FILE with .png."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": dict(env), "results": list(results)}, indent=1) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(env, results))
    load = ", ".join(f"{x:.1f}" for x in env.get("load_avg", []))
    args = " ".join(env.get("argv", [])) or env.get("preset", "")
    title = f"{args}\non {env['device']}, load {load}"
    bar_chart(results, path.with_suffix(".png"), title)
