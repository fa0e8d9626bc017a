"""One vmapped group: M members of one config, trained as one jitted program.

    members (configs equal in every key outside `jaxdl.core.vmapped.VMAPPED_KEYS`)
      -> each built exactly as `train` builds it, states stacked, one vmapped step,
         each member fed its own batches (its own data-order seed)
      -> per member: a workdir record (config.json, metrics.jsonl, checkpoints/,
         checkpoints_best/, summary.json, trial.json)

Early stopping and NaN are per member: a member whose loss turns non-finite is marked
"diverged" at that step and its record ends there; vmap keeps its NaNs out of its
neighbours. The sweep strategies (`jaxdl.runs.sweep`: grid and random;
`jaxdl.runs.optuna_search`: Optuna's samplers and pruners) both train through `run_group`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdl import config as config_lib
from jaxdl.checkpoint.manager import Checkpointer
from jaxdl.core import heads, vmapped
from jaxdl.core.optim import make_optimizer
from jaxdl.data import build_data, validate_batch
from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.finetune import partition
from jaxdl.training import scores
from jaxdl.training.build import build
from jaxdl.training.guards import stop_on_signals
from jaxdl.training.runlog import MetricLogger, params_sha256, read_metrics
from jaxdl.training.trainer import (
    EarlyStopping,
    check_workdir,
    chunk_size,
    full_params,
    minimized,
    schedule,
)

RESUME = "Run the same command to resume."


def member_config(
    cfg: ml_collections.ConfigDict, params: dict[str, Any]
) -> ml_collections.ConfigDict:
    """``cfg`` with one trial's values, type-checked like `--config.KEY=VALUE`."""
    out = copy.deepcopy(cfg)
    for key, value in params.items():
        try:
            config_lib.apply_override(out, f"{key}={value!r}")
        except UserError as err:
            raise UserError(f"--param {key}: {err}") from None
    config_lib.validate(out)
    return out


def group_key(params: dict[str, Any]) -> str:
    fixed = {k: v for k, v in params.items() if k not in vmapped.VMAPPED_KEYS}
    return json.dumps(fixed, sort_keys=True)


def run_group(
    cfgs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[Path],
    params: Sequence[dict],
    *,
    metric: str,
    should_prune: Callable[[int, int, float], bool] | None = None,
) -> list[str]:
    """Train members that differ only in `VMAPPED_KEYS` as one vmapped program; return each
    member's state ("complete", "pruned", "diverged").

    ``should_prune(member, step, value)`` is asked at every evaluation (an Optuna pruner).
    """
    c0 = cfgs[0]
    num_members = len(cfgs)
    datas: dict[int, Any] = {}
    for c in cfgs:  # synthetic sources draw their examples from the seed
        seeded = str(c.data.source).startswith("synthetic")
        if c.seed not in datas:
            datas[c.seed] = (
                build_data(c.data, seed=c.seed, num_classes=c.model.get("num_classes"))
                if seeded or not datas
                else next(iter(datas.values()))
            )
    data = datas[c0.seed]
    batch_size = c0.data.batch_size
    eval_batch_size = c0.data.eval_batch_size or batch_size
    _, total_steps, eval_every = schedule(c0, data, batch_size)

    # ---- members, built exactly as `train` builds them --------------------------------------
    setups = [
        build(
            c,
            kind=data.kind,
            example_spec=data.example_spec,
            num_classes=data.num_classes,
            total_steps=total_steps,
            task_fields=data.task_fields,
        )
        for c in cfgs
    ]
    config_dicts = [check_workdir(d, c) for d, c in zip(workdirs, cfgs, strict=True)]
    s0 = setups[0]
    opt_cfg = vmapped.group_optimizer_config([dict(c.optimizer) for c in cfgs])
    trainable = s0.state.params
    mults = dict(
        lr_mults=lambda step: partition.lr_mult_tree(s0.plan, trainable, step),
        wd_mults=partition.wd_mult_tree(s0.plan, trainable),
    )
    group_template = s0.state.replace(
        opt_state=make_optimizer(opt_cfg, total_steps, **mults).init(trainable)
    )
    step_args = dict(
        l1=c0.loss.l1,
        l2=c0.loss.l2,
        lora_cfg=s0.lora_cfg,
        make_head=lambda smoothing: heads.make_head(
            data.kind, {**dict(c0.loss), "label_smoothing": smoothing}, data.num_classes
        ),
        **mults,
    )
    group_step = vmapped.make_group_step(s0.model, s0.head, opt_cfg, total_steps, **step_args)
    group_steps = vmapped.make_group_step(
        s0.model, s0.head, opt_cfg, total_steps, scan=True, **step_args
    )
    group_eval = vmapped.make_group_eval(s0.model, s0.head, lora_cfg=s0.lora_cfg)
    hyper = vmapped.hyper_arrays(
        [c.optimizer for c in cfgs], [c.loss for c in cfgs], [c.model for c in cfgs]
    )

    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_on_signals())  # the sweep's, when run_sweep holds one
        ckpts = [
            stack.enter_context(
                Checkpointer(
                    d,
                    max_to_keep=c.keep_checkpoints,
                    best_metric=c.best_metric or None,
                    best_mode="min" if minimized(c.best_metric) else "max",
                )
            )
            for d, c in zip(workdirs, cfgs, strict=True)
        ]
        iters = [datas[c.seed].train_iter(batch_size, seed=c.seed) for c in cfgs]
        for it in iters:
            stack.callback(it.close)

        # ---- resume: every member from the newest step all of them saved --------------------
        saved = [ck.latest_step() for ck in ckpts]
        start_step = min(s or 0 for s in saved)
        states = []
        for i, (setup, ck) in enumerate(zip(setups, ckpts, strict=True)):
            state = setup.state
            if start_step:
                state, data_state = ck.restore(state, start_step)
                iters[i].set_state(data_state)
            elif (workdirs[i] / "metrics.jsonl").exists():
                (workdirs[i] / "metrics.jsonl").unlink()  # killed before its first checkpoint
            states.append(vmapped.restructure(state, group_template))
        for d, config_dict, setup in zip(workdirs, config_dicts, setups, strict=True):
            d.mkdir(parents=True, exist_ok=True)
            write_json(d / "config.json", config_dict)
            write_json(d / "partition_plan.json", {"groups": setup.plan_rows})
        loggers = [
            stack.enter_context(MetricLogger(d, resume_step=start_step, config=config_dict))
            for d, config_dict in zip(workdirs, config_dicts, strict=True)
        ]
        stoppers = [
            EarlyStopping(
                c.early_stopping.patience,
                c.early_stopping.min_delta,
                metric,
                [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "val"],
            )
            for c, d in zip(cfgs, workdirs, strict=True)
        ]
        outcome: list[str | None] = [
            "complete" if s.should_stop else None for s in stoppers
        ]  # None while training
        if should_prune and start_step:  # killed after pruning a member, before recording it
            for i, d in enumerate(workdirs):
                value = _val_at(d, start_step, metric)
                if outcome[i] is None and value is not None and should_prune(i, start_step, value):
                    outcome[i] = "pruned"

        # ---- loop ---------------------------------------------------------------------------
        # slots[j]: the member in row j of the stacked state. A member that stops (early
        # stopping, pruning, NaN) leaves the stack, so the rest no longer compute for it.
        # finals: member -> its host state when it stopped (at the step resumed from, for one
        # that had stopped there before the process was killed).
        finals: dict[int, Any] = {
            i: jax.device_get(states[i]) for i in range(num_members) if outcome[i] is not None
        }
        slots = [i for i in range(num_members) if outcome[i] is None]
        if slots:
            state = vmapped.stack([states[i] for i in slots])
            hyper = {k: v[np.asarray(slots)] for k, v in hyper.items()}
        pending: list[dict] = []
        diverged_at: dict[int, int] = {}
        prune: set[int] = set()
        last_checked = start_step
        step = start_step
        start_time = time.time()
        while step < total_steps and slots and not stop:
            events = (c0.log_every, eval_every, c0.checkpoint_every)
            k = chunk_size(step, c0.steps_per_call, total_steps, events)
            hosts = [[next(iters[i]) for i in slots] for _ in range(k)]  # [K][M]
            if step == start_step:
                validate_batch(hosts[0][0], data.example_spec, data.num_classes, split="train")
            batch = {
                key: np.stack([np.stack([b[key] for b in host]) for host in hosts])
                for key in hosts[0][0]
            }
            if k == 1:
                state, metrics = group_step(state, {key: v[0] for key, v in batch.items()}, hyper)
            else:
                state, metrics = group_steps(state, batch, hyper)
            pending.append(metrics)
            step += k
            at_eval = step % eval_every == 0 or step == total_steps
            at_ckpt = (c0.checkpoint_every and step % c0.checkpoint_every == 0) or at_eval
            if step % c0.log_every == 0 or at_eval or at_ckpt:
                means = _flush(pending, last_checked, slots, outcome, diverged_at)
                pending, last_checked = [], step
                for i, m in means.items():
                    loggers[i].log(step, "train", m)
            val = {}
            if at_eval and c0.data.eval_split in data.split_sizes:
                members = [cfgs[i] for i in slots]
                rows = _evaluate(
                    group_eval, state, datas, members, c0.data.eval_split, eval_batch_size
                )
                val = {i: row for i, row in zip(slots, rows, strict=True) if outcome[i] is None}
                for i, row in val.items():
                    loggers[i].log(step, "val", row)
                    named = {f"val_{k}": v for k, v in row.items()}
                    stoppers[i].update(named)
                    if should_prune and metric in named and should_prune(i, step, named[metric]):
                        prune.add(i)
            done = prune or any(stoppers[i].should_stop for i in val)
            host_state = None
            if at_ckpt or step == total_steps or done or stop:
                host_state = jax.device_get(state)
                for j, i in enumerate(slots):
                    if outcome[i] is not None:
                        continue
                    member = vmapped.restructure(vmapped.unstack(host_state, j), setups[i].state)
                    ckpts[i].save(
                        step,
                        member,
                        data_state=iters[i].get_state(),
                        config=config_dicts[i],
                        metrics={f"val_{k}": v for k, v in val[i].items()} if i in val else None,
                    )
                    if stoppers[i].should_stop or i in prune:
                        outcome[i] = "pruned" if i in prune else "complete"
                        finals[i] = vmapped.unstack(host_state, j)
                prune.clear()
            keep = [j for j, i in enumerate(slots) if outcome[i] is None]
            if len(keep) < len(slots):
                if host_state is None:
                    host_state = jax.device_get(state)
                slots = [slots[j] for j in keep]
                if keep:
                    state = vmapped.stack([vmapped.unstack(host_state, j) for j in keep])
                    hyper = {k: v[np.asarray(keep)] for k, v in hyper.items()}
        for ck in ckpts:
            ck.wait()
        # Stopped by a signal: members still training keep their checkpoints (resumed by the
        # rerun) and get no summary or trial.json yet; finished ones are recorded below.
        unfinished = set(slots) if stop else set()
        if slots and not stop:
            host_state = jax.device_get(state)
            finals.update({i: vmapped.unstack(host_state, j) for j, i in enumerate(slots)})

        # ---- test, summaries ----------------------------------------------------------------
        tested = [i for i in range(num_members) if i in finals]
        test_split = c0.data.test_split if c0.data.test_split in data.split_sizes else None
        test = {}
        if test_split and tested:
            stacked = vmapped.stack([finals[i] for i in tested])
            members = [cfgs[i] for i in tested]
            rows = _evaluate(group_eval, stacked, datas, members, test_split, eval_batch_size)
            test = dict(zip(tested, rows, strict=True))
        wall = time.time() - start_time
        for i, d in enumerate(workdirs):
            if i in unfinished:
                continue
            history = [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "val"]
            record_step = int(history[-1]["step"]) if history else step
            stopped_early = outcome[i] in ("complete", "pruned") and record_step < total_steps
            summary = {"steps": record_step, "stopped_early": stopped_early}
            if i in finals:
                member = vmapped.restructure(finals[i], setups[i].state)
                summary["params_sha256"] = params_sha256(full_params(member, setups[i]))
            if i in test:
                summary.update({f"test_{k}": v for k, v in test[i].items()})
                loggers[i].log(record_step, "test", test[i])
            summary["wall_s"] = wall
            write_json(d / "summary.json", summary)
            loggers[i].finish(summary, ("summary.json", "config.json"))
            _write_trial(d, params[i], metric, outcome[i] or "complete", diverged_at.get(i))
    names = [d.name for i, d in enumerate(workdirs) if i in unfinished]
    if names:
        stop.check(f"at step {step}; trials {names} saved their checkpoints. {RESUME}")
    stop.check(f"after trials {[d.name for d in workdirs]} finished. {RESUME}")
    return [o or "complete" for o in outcome]


def _val_at(workdir: Path, step: int, metric: str) -> float | None:
    """The member's logged val ``metric`` at ``step`` (None when there is none)."""
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "val"]
    values = [r.get(metric.removeprefix("val_")) for r in rows if r["step"] == step]
    return values[-1] if values else None


def _write_trial(
    workdir: Path, params: dict, metric: str, state: str, diverged_at: int | None
) -> None:
    """trial.json: the member's outcome, written after its summary.json: its presence marks
    the trial finished, and a member killed before it is trained (resumed) again."""
    history = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "val"]
    values = [r[metric.removeprefix("val_")] for r in history]
    values = [v for v in values if math.isfinite(v)]
    best = (min if minimized(metric) else max)(values) if values else None
    record = {"params": params, "best": best, "state": state}
    if diverged_at is not None:
        record["diverged_at_step"] = diverged_at
    write_json(workdir / "trial.json", record)


def _flush(
    pending, first_step: int, slots: list[int], outcome: list, diverged_at: dict
) -> dict[int, dict]:
    """Per-member means of the steps after ``first_step`` ({member: means}); a member with
    a non-finite loss is marked "diverged" at its first bad step (``diverged_at``)."""
    host = jax.device_get(pending)  # each entry: metrics [M], or [K, M] from K steps per call
    n = len(slots)
    per_step = {k: np.concatenate([np.reshape(m[k], (-1, n)) for m in host]) for k in host[0]}
    out = {}
    for j, i in enumerate(slots):
        if outcome[i] is not None:
            continue
        finite = per_step["finite"][:, j]
        if not finite.all():
            outcome[i] = "diverged"
            diverged_at[i] = first_step + 1 + int(np.argmin(finite))
            continue
        out[i] = {k: float(v[:, j].mean()) for k, v in per_step.items() if k != "finite"}
    return out


def _evaluate(group_eval, state, datas, cfgs, split: str, batch_size: int) -> list[dict]:
    """Every member on its own data's ``split``: masked sums on the device, one transfer."""
    streams = [datas[c.seed].eval_iter(split, batch_size) for c in cfgs]
    sums, per_example = None, []
    for host in zip(*streams, strict=True):
        batch = {k: np.stack([b[k] for b in host]) for k in host[0]}
        out = dict(group_eval(state, batch))
        if "per_example" in out:
            per_example.append(out.pop("per_example"))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    assert sums is not None, "empty evaluation split"
    kind = next(iter(datas.values())).kind
    return scores.member_metrics(jax.device_get(sums), jax.device_get(per_example), kind, len(cfgs))
