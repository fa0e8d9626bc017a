"""`jaxdl sweep`: many trials of one config, M at a time in one vmapped program.

    trials (grid / random draws over --param spaces, `jaxdl.runs.spaces`; or Optuna's
            samplers, `jaxdl.runs.optuna_search`)
      -> groups: trials equal in every key outside `jaxdl.core.vmapped.VMAPPED_KEYS`,
         at most --parallel each
      -> per group: one vmapped program (`jaxdl.runs.group.run_group`), each member's
         record in DIR/trials/NNN/ (config.json, metrics.jsonl, checkpoints/,
         checkpoints_best/, summary.json, trial.json)
      -> DIR/sweep.json, DIR/table.txt, DIR/sweep.png

A rerun of the same command resumes: finished trials are kept, unfinished members continue
from their latest common checkpoint with their data iterators' state. With Optuna the
report lists the study's trials, so with a --storage shared by several processes (or
machines, each with its own DIR) every one of them reports the whole sweep.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdl import config as config_lib
from jaxdl.core import vmapped
from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.runs import optuna_search
from jaxdl.runs import spaces as spaces_lib
from jaxdl.runs.group import RESUME, group_key, member_config, run_group
from jaxdl.training.guards import stop_on_signals, workdir_lock
from jaxdl.training.trainer import minimized


def check_spaces(spaces: Sequence[spaces_lib.Space], parallel: int, strategy: str) -> None:
    """Refuse a shape-changing key that would leave every member alone in its group."""
    if parallel <= 1 or strategy == "grid":
        return
    for space in spaces:
        if space.key not in vmapped.VMAPPED_KEYS and not space.discrete:
            raise UserError(
                f"--param {space.key}={space.text}: {space.key} is not one of the keys members "
                f"of a vmapped group may differ in ({', '.join(vmapped.VMAPPED_KEYS)}), and a "
                f"continuous space gives every trial its own value, so --parallel {parallel} "
                "cannot group any. Fix: give a list of values [v1,v2,...] or choice(...), "
                "or pass --parallel 1."
            )


def run_sweep(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    param_texts: Sequence[str],
    *,
    trials: int | None = None,
    parallel: int = 8,
    strategy: str | None = None,
    storage: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a sweep in ``workdir``; return the sweep.json record.

    ``strategy`` "tpe", or any strategy with a ``storage`` URL, runs through Optuna
    (`jaxdl.runs.optuna_search`); grid and random alone need no Optuna.
    """
    if cfg.tasks:
        raise UserError("config.tasks: a sweep trains single-task runs; found a task list.")
    if parallel < 1:
        raise UserError(f"--parallel: expected >= 1, found {parallel}.")
    spaces = [spaces_lib.parse_param(t) for t in param_texts]
    if not spaces:
        raise UserError("--param: expected at least one KEY=SPACE. Fix: add --param KEY=[...].")
    spaces_lib.check_keys(spaces)
    strategy = strategy or ("grid" if all(s.discrete for s in spaces) else "random")
    use_optuna = strategy == "tpe" or storage is not None
    draw = spaces_lib.make_trials(spaces, "random", 1, seed=cfg.seed)[0]
    check_central(cfg, None)
    for space in spaces:  # unknown keys and wrong types fail before any work
        check_central(member_config(cfg, {space.key: draw[space.key]}), space.key)
    check_spaces(spaces, parallel, strategy)
    count = spaces_lib.count_trials(spaces, strategy, trials)
    size = spaces_lib.grid_size(spaces) if strategy == "grid" else None
    if size is not None and count < size:
        echo(f"sweep: the first {count} of the grid's {size} trials (--trials {count})")
    trial_params = (
        [] if use_optuna else spaces_lib.make_trials(spaces, strategy, count, seed=cfg.seed)
    )
    metric = cfg.best_metric or "val_loss"
    workdir = Path(workdir)
    spec = {
        "config": json.loads(config_lib.to_json(cfg)),
        "params": {s.key: s.text for s in spaces},
        "strategy": strategy,
        "trials": trials if use_optuna else len(trial_params),
    }
    # One process per workdir, as `jaxdl train`; with a --storage several processes share
    # the workdir by design: the study numbers the trials, so none trains one twice.
    lock = workdir_lock(workdir, "sweep") if storage is None else contextlib.nullcontext()
    with lock:
        _check_spec(workdir, spec)
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(workdir / "sweep_spec.json", spec)
        records = None  # grid / random: read from DIR/trials
        with stop_on_signals() as stop:  # one handler for every group of the sweep
            if use_optuna:
                records = optuna_search.run(
                    cfg,
                    workdir,
                    spaces,
                    strategy=strategy,
                    storage=storage,
                    trials=count,
                    parallel=parallel,
                    metric=metric,
                    echo=echo,
                )
            else:
                _run_trials(cfg, workdir, trial_params, parallel, metric, stop, echo)
        return write_report(workdir, metric, records, echo=echo)


def check_central(cfg: ml_collections.ConfigDict, key: str | None) -> None:
    """Refuse a federated member: a vmapped group trains each member centrally, and FedAvg's
    rounds (`jaxdl.runs.federated`) are a run of their own."""
    clients = cfg.federated.clients
    if clients:
        field = f"--param {key}" if key else "config.federated.clients"
        raise UserError(
            f"{field}: a sweep trains each member centrally in one vmapped group, found a "
            f"federated member (federated.clients={clients}). Fix: sweep with "
            "federated.clients=0, or run each federated config with `jaxdl train`."
        )


def _run_trials(cfg, workdir: Path, trial_params, parallel: int, metric: str, stop, echo) -> None:
    """Grid / random: train every trial without a trial.json, group by group."""
    pending = []
    for i, params in enumerate(trial_params):
        member_dir = workdir / "trials" / f"{i:03d}"
        if not (member_dir / "trial.json").exists():
            pending.append((i, params, member_dir))
    groups: dict[str, list] = {}
    for item in pending:
        groups.setdefault(group_key(item[1]), []).append(item)
    for members in groups.values():
        for start in range(0, len(members), parallel):
            chunk = members[start : start + parallel]
            stop.check(f"before trials {[i for i, _, _ in chunk]}. {RESUME}")
            echo(f"sweep: training trials {[i for i, _, _ in chunk]} together")
            run_group(
                [member_config(cfg, p) for _, p, _ in chunk],
                [d for _, _, d in chunk],
                [p for _, p, _ in chunk],
                metric=metric,
            )


def _check_spec(workdir: Path, spec: dict) -> None:
    path = workdir / "sweep_spec.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(spec)):
        raise UserError(
            f"--workdir: {workdir} holds another sweep (config, --param, --strategy or "
            "--trials differ). Fix: use a new --workdir, or the same command to resume."
        )


# ---- the report -----------------------------------------------------------------------------


def write_report(
    workdir: Path, metric: str, trials: list[dict] | None = None, *, echo=print
) -> dict[str, Any]:
    """sweep.json (finished trials, in trial order), table.txt (ranked) and sweep.png.

    ``trials``: the finished trials' records (trial.json and its "workdir"), as an Optuna
    study holds them; None reads them from DIR/trials/*/trial.json."""
    mode = "min" if minimized(metric) else "max"
    if trials is None:
        trials = [
            {**json.loads(path.read_text()), "workdir": str(path.parent)}
            for path in sorted((workdir / "trials").glob("*/trial.json"))
        ]
    report = {"metric": metric, "mode": mode, "trials": trials}
    write_json(workdir / "sweep.json", report)
    table = format_table(report)
    (workdir / "table.txt").write_text(table + "\n")
    echo(table)
    plot_sweep(report, workdir / "sweep.png")
    return report


def _ranked(report: dict) -> list[dict]:
    """Best first; ties by their params, so the ranking does not depend on the trials'
    numbering (which differs between one process and several sharing a study)."""
    sign = 1.0 if report["mode"] == "min" else -1.0
    usable = [t for t in report["trials"] if t["best"] is not None]
    rest = [t for t in report["trials"] if t["best"] is None]
    by_params = lambda t: json.dumps(t["params"], sort_keys=True)
    return sorted(usable, key=lambda t: (sign * t["best"], by_params(t))) + sorted(
        rest, key=by_params
    )


def format_table(report: dict) -> str:
    """The trials ranked by their best metric, one row each."""
    keys = sorted({k for t in report["trials"] for k in t["params"]})
    header = ["rank", *keys, report["metric"], "state", "workdir"]
    rows = [
        [
            str(rank),
            *(f"{t['params'].get(k)!s:.10}" for k in keys),
            "-" if t["best"] is None else f"{t['best']:.5f}",
            t["state"],
            Path(t["workdir"]).name,
        ]
        for rank, t in enumerate(_ranked(report), 1)
    ]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    )


def plot_sweep(report: dict, out_path: Path) -> None:
    """The metric against each parameter, one panel per parameter (diverged trials as x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for t in report["trials"] for k in t["params"]})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(t["params"][key], t["best"]) for t in report["trials"] if t["best"] is not None]
        numeric = all(isinstance(x, int | float) for x, _ in points)
        xs = [x if numeric else str(x) for x, _ in points]
        ax.scatter(xs, [y for _, y in points])
        if numeric and points and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(report["metric"])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    shutil.move(tmp, out_path)
