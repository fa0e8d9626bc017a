"""Multi-task fine-tuning (the article's 3.1): one pretrained checkpoint, several tasks in turn.

Config key ``tasks`` is a list of dicts, each a ``"name"`` plus overrides laid over the
base config, as dotted keys or nested dicts::

    c.init_from.checkpoint = "runs/digits_0_4"
    c.tasks = [
        {"name": "5-9", "data.classes": [5, 6, 7, 8, 9], "model.num_classes": 5},
        {"name": "odd", "data": {"classes": [1, 3, 5, 7, 9]}, "model.num_classes": 5},
    ]

Every task restores ``init_from`` afresh (no task starts from another task's weights) and
trains in WORKDIR/tasks/NAME, a normal run workdir. WORKDIR/summary.json puts the tasks
side by side. A second call with the same config resumes unfinished tasks.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.tables import text_table
from jaxdl.training.guards import stop_on_signals
from jaxdl.training.runlog import read_metrics

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COLUMNS = ("task", "trainable_params", "steps", "step_ms", "wall_s")


def _flat_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping, prefix: str = ""):
    """Nested dicts over config sections -> [(dotted key, value)]; other values are leaves."""
    out = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        node = _node(cfg, dotted)
        if isinstance(value, Mapping) and isinstance(node, ml_collections.ConfigDict):
            out += _flat_overrides(cfg, value, f"{dotted}.")
        else:
            out.append((dotted, value))
    return out


def _node(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    """The config value at ``dotted``, or None when there is none."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set one dotted key with the config's own type checks (unknown key -> ValueError)."""
    node, leaf, section = config_lib.find_section(cfg, dotted)
    config_lib.merge_config(node, {leaf: value}, prefix=f"{section}." if section else "")


def task_configs(cfg: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """``cfg.tasks`` -> [(name, resolved config of that task)], all validated up front.

    A task's config is ``cfg`` with ``tasks`` unset and the task's overrides applied, so a
    typo in the last task fails before the first one trains.
    """
    tasks = cfg.tasks
    if not isinstance(tasks, list | tuple) or not tasks:
        raise UserError(
            f"config.tasks: expected a non-empty list of dicts with a 'name', found {tasks!r}. "
            "Fix: e.g. [{'name': '5-9', 'data.classes': [5, 6, 7, 8, 9], "
            "'model.num_classes': 5}]."
        )
    out, seen = [], set()
    for i, task in enumerate(tasks):
        task = task.to_dict() if isinstance(task, ml_collections.ConfigDict) else task
        name = task.get("name") if isinstance(task, Mapping) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in seen:
            raise UserError(
                f"config.tasks[{i}]: expected a dict with a unique 'name' of letters, digits, "
                f"'.', '_' or '-' (it names WORKDIR/tasks/NAME), found {task!r}. Fix: name it."
            )
        seen.add(name)
        task_cfg = copy.deepcopy(cfg)
        task_cfg.tasks = None
        overrides = {k: v for k, v in task.items() if k != "name"}
        try:
            if "tasks" in overrides:
                raise UserError("config.tasks: a task cannot hold tasks. Fix: remove it.")
            for dotted, value in _flat_overrides(task_cfg, overrides):
                _set(task_cfg, dotted, value)
            config_lib.validate(task_cfg)
        except ValueError as err:
            raise UserError(f"config.tasks[{i}] ({name!r}): {err}") from None
        out.append((name, task_cfg))
    return out


def median_step_ms(workdir: Path, batch_size: int) -> float | None:
    """Median train step time from the logged throughput, the first window (compile) left out
    (for a trainer whose summary has no step_ms)."""
    rates = [
        r["examples_per_s"]
        for r in read_metrics(Path(workdir) / "metrics.jsonl")
        if r["split"] == "train" and r.get("examples_per_s")
    ]
    rates = rates[1:] or rates
    if not rates:
        return None
    return 1000.0 * statistics.median(batch_size / r for r in rates)


def format_rows(rows: list[Mapping[str, Any]]) -> str:
    """The per-task rows as an aligned text table."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    metric = "test_accuracy" if any("test_accuracy" in r for r in rows) else "test_bits_per_byte"
    columns = (_COLUMNS[0], metric, *_COLUMNS[1:])
    return text_table(columns, [[cell(row.get(c)) for c in columns] for row in rows])


def run_tasks(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Fine-tune ``cfg.init_from`` on each of ``cfg.tasks`` in WORKDIR/tasks/NAME.

    Returns (and writes to WORKDIR/summary.json) ``{"init_from", "tasks": [row, ...]}``,
    one row per task: task, test_accuracy (or test_bits_per_byte), test_loss, params,
    trainable_params, steps, step_ms (median train step), wall_s. WORKDIR/config.json holds
    the base config with its tasks; each task's workdir holds its own resolved config.
    """
    workdir = Path(workdir)
    configs = task_configs(cfg)
    rows = []
    # One signal handler for all tasks: a signal between two tasks stops here too.
    with stop_on_signals() as stop:
        for i, (name, task_cfg) in enumerate(configs):
            stop.check(f"before task {name}. Run the same command to resume.")
            echo(f"== task {i + 1}/{len(configs)}: {name} ==")
            rows.append(_run_task(name, task_cfg, workdir, progress, echo))
    result = {"init_from": cfg.init_from.to_dict(), "tasks": rows}
    write_json(workdir / "config.json", json.loads(config_lib.to_json(cfg)))
    write_json(workdir / "summary.json", result)
    echo(format_rows(rows))
    return result


def _run_task(name: str, task_cfg, workdir: Path, progress: bool, echo) -> dict[str, Any]:
    """Train one task in WORKDIR/tasks/NAME; its row of the side-by-side summary."""
    from jaxdl.training.trainer import train

    task_dir = workdir / "tasks" / name
    summary = train(task_cfg, task_dir, progress=progress, echo=echo)
    row = {"task": name, "workdir": str(task_dir)}
    for key in ("test_accuracy", "test_bits_per_byte", "test_loss", "params"):
        if key in summary:
            row[key] = summary[key]
    row["trainable_params"] = summary["trainable_params"]
    row["steps"] = summary["steps"]
    row["step_ms"] = summary.get("step_ms") or median_step_ms(task_dir, task_cfg.data.batch_size)
    row["wall_s"] = summary["wall_s"]
    return row
