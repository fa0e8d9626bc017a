"""The fit loop: one function that reads top to bottom in phases.

workdir -> data -> model/state (+ pretrained restore, partition plan) -> resume ->
loop (train step, logs, eval, early stop, checkpoints) -> test -> summary.

Host work stays off the hot path: step metrics stay on the device until a log point,
batches are prefetched to the device, and the host validates only the first batch of
each split.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdl import config as config_lib
from jaxdl.core import steps
from jaxdl.core import tree as tree_lib
from jaxdl.core.heads import FLAGS, check_label_flags
from jaxdl.data import build_data, prefetch_to_device, validate_batch
from jaxdl.data.pipeline import format_report as format_data_report
from jaxdl.errors import UserError
from jaxdl.fileio import read_json, write_json
from jaxdl.finetune import partition
from jaxdl.interop.base import with_base
from jaxdl.parallel import sharding
from jaxdl.training import scores
from jaxdl.training.build import Setup, build, saves_frozen
from jaxdl.training.evaluate import (
    check_same_data,
    eval_batches,
    evaluate_split,
    scalars,
    stored_fit,
    with_pinned_base,
)
from jaxdl.training.guards import StopRequest, stop_on_signals, workdir_lock
from jaxdl.training.runlog import MetricLogger, params_sha256, plot_curves, read_metrics

# Keys a resumed run may change: extending a run is the point of resuming it; the mesh is
# where it runs, not what it computes (checkpoints restore onto any mesh); logging, eval and
# checkpoint cadence and the trackers reported to change no number; and the optimizer's
# hyper-parameters are what a diverged run's fix changes (a change that alters the optimizer
# state's structure, e.g. turning clipping on, is refused by the restore, naming the leaves).
_RESUMABLE_CHANGES = {
    "num_steps",
    "num_epochs",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "steps_per_call",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "trackers",
    *(
        f"{block}.{k}"
        for block, keys in config_lib.default_config().items()
        if block in ("wandb", "mlflow", "trackio", "jsonl")
        for k in keys
    ),
    *(
        f"optimizer.{k}"
        for k in (
            "learning_rate",
            "momentum",
            "b1",
            "b2",
            "eps",
            "weight_decay",
            "schedule",
            "warmup_steps",
            "decay_steps",
            "decay_rate",
            "step_every",
            "end_lr_fraction",
            "grad_clip_norm",
        )
    ),
}

T = TypeVar("T")


class NonFiniteLossError(UserError):
    pass


def check_workdir(workdir: Path, cfg: ml_collections.ConfigDict) -> dict:
    """Refuse a workdir whose checkpoints belong to a different run; return the config as
    it will be written to it.

    Nothing is written here: config.json is written with the run's first checkpoint, so a
    run that fails before it (a bad value, a bad file, a NaN in the first steps) leaves a
    workdir that takes the fixed config. A workdir without a checkpoint holds no run yet.
    """
    from jaxdl.checkpoint.read import list_steps

    path = workdir / "config.json"
    new = json.loads(config_lib.to_json(cfg))
    if path.exists() and list_steps(workdir / "checkpoints"):
        defaults = json.loads(config_lib.to_json(config_lib.default_config()))
        diff = _config_diff(read_json(path), new, defaults) - _RESUMABLE_CHANGES
        if diff:
            keys = sorted(diff)
            raise UserError(
                f"--workdir: {workdir} holds another run (config differs at {keys[:6]}). "
                "Fix: use a new --workdir, or the same config to resume."
            )
    return new


def _config_diff(old: Mapping, new: Mapping, defaults: Mapping, prefix: str = "") -> set[str]:
    """Keys whose values differ. A key the saved config lacks (added to jaxdl since) counts
    as its default; a key only the saved config has (since removed) is ignored."""
    diff = set()
    for key in new.keys():
        default = defaults.get(key) if isinstance(defaults, Mapping) else None
        a, b = old.get(key, default), new[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diff |= _config_diff(a, b, default or {}, f"{prefix}{key}.")
        elif a != b:
            diff.add(f"{prefix}{key}")
    return diff


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def full_params(state, setup: Setup) -> dict:
    """The model's parameters as numpy (LoRA merged), for hashing and export."""
    params = steps.model_params(state.params, state.frozen, setup.lora_cfg)
    return sharding.fetch(params)  # gathered across processes when sharded over them


def schedule(cfg: ml_collections.ConfigDict, data, local_batch: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, eval every) of a run whose processes each load
    `local_batch` rows per step: num_steps, else num_epochs epochs; eval per epoch unless
    eval_every says otherwise."""
    steps_per_epoch = data.steps_per_epoch(local_batch)
    if steps_per_epoch < 1:
        raise UserError(
            f"data.batch_size: expected at most {data.split_sizes['train']} (the train split), "
            f"found {cfg.data.batch_size}. Fix: lower data.batch_size."
        )
    total_steps = cfg.num_steps or cfg.num_epochs * steps_per_epoch
    return steps_per_epoch, total_steps, cfg.eval_every or steps_per_epoch


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    progress: bool = True,
    echo=print,
    fold: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` in ``workdir``; return the summary.

    ``fold=(i, k)`` trains on k-1 stratified folds of train+val and validates on fold i.
    """
    if cfg.tasks:
        raise UserError(
            "config.tasks: train() runs one task; found a task list. "
            "Fix: call jaxdl.training.multitask.run_tasks(cfg, workdir) (what `jaxdl train` does)."
        )
    _check_cadence(cfg)
    if isinstance(workdir, str) and not workdir.strip():  # Path("") would be the cwd
        raise UserError(
            f"workdir: expected a folder path, found {workdir!r}. Fix: name one, e.g. runs/NAME."
        )
    workdir = Path(workdir)
    # The lock before anything is written to the workdir; the signal handlers for as long
    # as there is a step to finish and a checkpoint to write.
    with (
        workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(),
        stop_on_signals() as stop,
    ):
        summary = _train(cfg, workdir, stop, progress=progress, echo=echo, fold=fold)
    # A signal while the summary was written: the run is whole, but the caller (a scheduler,
    # a runner of several runs) asked to stop and learns it from the exit status.
    stop.check(f"after the run finished ({workdir / 'summary.json'} written); nothing to resume")
    return summary


def _check_cadence(cfg: ml_collections.ConfigDict) -> None:
    for key, zero in (("checkpoint_every", "at evaluations only"), ("eval_every", "per epoch")):
        value = cfg[key]
        if not isinstance(value, int) or value < 0:
            raise UserError(
                f"config.{key}: expected an int >= 0 (0: {zero}), found {value!r}. "
                f"Fix: set --config.{key}=0 or a positive number of steps."
            )


def _train(cfg, workdir: Path, stop, *, progress: bool, echo, fold) -> dict[str, Any]:
    start_time = time.time()
    is_writer = jax.process_index() == 0
    cfg = with_base(cfg)  # the base's model, tokenizer, normalization where cfg asks
    config_dict = check_workdir(workdir, cfg)

    # ---- data ---------------------------------------------------------------------------
    data = build_data(
        cfg.data,
        seed=cfg.seed,
        num_classes=cfg.model.get("num_classes"),
        fold=fold,
        task=cfg.get("task") or None,
    )
    fit = stored_fit(workdir)
    if fit is not None and (workdir / "config.json").exists():  # resuming: the same data
        check_same_data(fit, data, workdir)
    if "task_reason" in data.preprocessing:
        echo(f"task: {data.kind} ({data.preprocessing['task_reason']})")
    mesh = sharding.make_mesh(cfg.mesh)
    batch_size = cfg.data.batch_size  # global: all processes together
    eval_batch_size = cfg.data.eval_batch_size or batch_size
    accumulate = int(cfg.optimizer.accumulate_steps)  # micro-batches of batch_size per step
    local_batch = sharding.per_process_batch(batch_size * accumulate, mesh)
    eval_field = "data.eval_batch_size" if cfg.data.eval_batch_size else "data.batch_size"
    local_eval_batch = sharding.per_process_batch(eval_batch_size, mesh, field=eval_field)
    steps_per_epoch, total_steps, eval_every = schedule(cfg, data, local_batch)

    # ---- model, pretrained restore, partition plan, optimizer, state ----------------------
    from jaxdl.checkpoint.manager import Checkpointer
    from jaxdl.finetune.surgery import format_report

    setup = build(
        with_pinned_base(cfg, workdir),
        kind=data.kind,
        example_spec=data.example_spec,
        num_classes=data.num_classes,
        total_steps=total_steps,
        mesh=mesh,
        task_fields=data.task_fields,
    )
    if is_writer:
        write_json(workdir / "partition_plan.json", {"groups": setup.plan_rows})
        write_json(workdir / "data_report.json", data.report)
        echo(format_data_report(data.report))
        echo(partition.format_table(setup.plan_rows))
        if setup.init_report is not None:
            write_json(workdir / "init_report.json", setup.init_report)
            echo(format_report(setup.init_report))
    ckpt_config = _pinned_base(config_dict, setup.init_report)
    kwargs = {"lora_cfg": setup.lora_cfg, "batch_spec": setup.batch_spec, "layout": setup.layout}
    train_kwargs = dict(l1=cfg.loss.l1, l2=cfg.loss.l2, accumulate=accumulate, **kwargs)
    train_step = steps.make_train_step(setup.model, setup.head, setup.tx, **train_kwargs)
    eval_step = steps.make_eval_step(setup.model, setup.head, **kwargs)
    multi_step = None
    if cfg.steps_per_call > 1:
        multi_step = steps.make_train_steps(setup.model, setup.head, setup.tx, **train_kwargs)

    # ---- resume ---------------------------------------------------------------------------
    # The stack closes checkpoint managers, the prefetch thread, grain workers and logs on
    # every exit path: normal end, early stop, exception, KeyboardInterrupt.
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            Checkpointer(
                workdir,
                max_to_keep=cfg.keep_checkpoints,
                best_metric=cfg.best_metric or None,
                best_mode="min" if minimized(cfg.best_metric) else "max",
                save_frozen=saves_frozen(setup.lora_cfg),
            )
        )
        train_iter = data.train_iter(local_batch, seed=cfg.seed, num_workers=cfg.data.num_workers)
        stack.callback(train_iter.close)
        # A step is whole or not used: corrupt steps and steps without the data position
        # (which would restart the data from batch 0) are set aside with a warning.
        start_step, state, data_state = ckpt.resume(
            setup.state, require_data=train_iter.get_state() is not None
        )
        if start_step:
            if data_state is not None:
                train_iter.set_state(sharding.local_data_state(data_state))
            echo(f"resumed from step {start_step} in {workdir / 'checkpoints'}")
        wrote_config = False
        batches = stack.enter_context(
            prefetch_to_device(train_iter, size=cfg.data.prefetch, sharding=setup.layout.batch)
        )
        logger = stack.enter_context(
            MetricLogger(workdir, enabled=is_writer, resume_step=start_step, config=config_dict)
        )

        # ---- loop -------------------------------------------------------------------------
        # the step-0 baseline is not a point early stopping weighs (a fresh run never saw it)
        history = [
            r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "val" and r["step"]
        ]
        stopper = EarlyStopping(
            cfg.early_stopping.patience,
            cfg.early_stopping.min_delta,
            cfg.best_metric or "val_loss",
            history,
        )
        pending: list[dict] = []
        last_checked = start_step
        bar = stack.enter_context(_progress(total_steps, start_step, progress and is_writer))
        window_start, window_step = time.time(), start_step
        step_times: list[float] = []
        flops_per_token = _flops_per_token(cfg, data)
        step = start_step
        val_metrics = None
        val_batches = lambda: eval_batches(
            data,
            cfg.data.eval_split,
            local_eval_batch,
            data.example_spec,
            data.num_classes,
            setup.layout.batch,
        )
        if (
            start_step == 0
            and data.kind in ("lm", "sft")
            and cfg.data.eval_split in data.split_sizes
        ):
            # the starting model's figure: every language-model run shows its own baseline
            baseline = evaluate_split(eval_step, state, val_batches(), data.kind, data.num_classes)
            _check_finite_metrics(scalars(baseline), "val", 0)
            logger.log(0, "val", scalars(baseline))
        while step < total_steps and not stopper.should_stop and not stop:
            events = (cfg.log_every, eval_every, cfg.checkpoint_every)
            k = chunk_size(step, cfg.steps_per_call, total_steps, events)
            chunk = [next(batches) for _ in range(k)]
            if step == start_step:
                host_batch = sharding.host_local(chunk[0])  # this process's rows
                validate_batch(host_batch, data.example_spec, data.num_classes, split="train")
            if k == 1:
                state, metrics = train_step(state, chunk[0])
            else:
                state, metrics = multi_step(state, jax.tree.map(lambda *xs: jnp.stack(xs), *chunk))
            pending.append(metrics)
            step += k
            at_eval = step % eval_every == 0 or step == total_steps
            at_ckpt = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or at_eval
            if step % cfg.log_every == 0 or at_eval or at_ckpt:
                means = _flush(pending, last_checked, step)
                pending, last_checked = [], step
                elapsed = time.time() - window_start  # train steps only: reset after eval below
                if window_step > start_step:  # the first window holds the compilation
                    step_times.append(elapsed / (step - window_step))
                rate = (step - window_step) * batch_size / max(elapsed, 1e-9)
                window_step = step
                language = data.kind in ("lm", "sft")
                unit = "tokens_per_s" if language else "examples_per_s"
                if language:
                    rate *= data.example_spec["inputs"][0][0]
                    if flops_per_token:
                        means["model_flops_per_s"] = rate * flops_per_token
                means[unit] = rate
                logger.log(step, "train", means)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k != "finite"})
            val_metrics = None
            if at_eval and cfg.data.eval_split in data.split_sizes:
                val_metrics = evaluate_split(
                    eval_step, state, val_batches(), data.kind, data.num_classes
                )
                _check_finite_metrics(scalars(val_metrics), "val", step)
                logger.log(step, "val", scalars(val_metrics))
                stopper.update({f"val_{k}": v for k, v in scalars(val_metrics).items()})
            if at_ckpt or stopper.should_stop or step == total_steps or stop:
                if pending:  # a stop between log points: check the unlogged steps too
                    _flush(pending, last_checked, step)
                    pending, last_checked = [], step
                _check_finite_state(state, step, ckpt.latest_step())
                if is_writer and not wrote_config:
                    # The run's identity, once it has a checkpoint to be the identity of.
                    write_json(workdir / "config.json", config_dict)
                    wrote_config = True
                best = {f"val_{k}": v for k, v in scalars(val_metrics or {}).items()}
                ckpt.save(
                    step,
                    state,
                    data_state=batches.get_state(),
                    config=ckpt_config,
                    metrics=best or None,
                )
            if window_step == step:
                window_start = time.time()
            bar.update(k)
        ckpt.wait()
        saved = (
            f"checkpoint saved in {workdir / 'checkpoints' / str(step)}"
            if step > start_step
            else "no new step to save"
        )
        stop.check(f"at step {step}; {saved}. Run the same command to resume.")

        # ---- test -------------------------------------------------------------------------
        test_split = cfg.data.test_split
        if test_split not in data.split_sizes:  # said, not silent: summary.json's test_split
            test_split = cfg.data.eval_split
            echo(
                f"test: {cfg.data.source} has no {cfg.data.test_split!r} split, so the test "
                f"figures are the {test_split!r} split's (data.test_fraction holds one out)"
            )
        if test_split == cfg.data.eval_split and val_metrics is not None:
            test_metrics = val_metrics
        else:
            # Every step is saved by now; a signal abandons the evaluation (it may be long)
            # between batches, and the rerun evaluates the saved final step.
            test_metrics = evaluate_split(
                eval_step,
                state,
                _until_stopped(
                    eval_batches(
                        data,
                        test_split,
                        local_eval_batch,
                        data.example_spec,
                        data.num_classes,
                        setup.layout.batch,
                    ),
                    stop,
                    f"during the {test_split} evaluation after step {step} (every step is "
                    f"saved, up to {workdir / 'checkpoints' / str(step)}). Run the same "
                    "command to finish: it only evaluates.",
                ),
                data.kind,
                data.num_classes,
                (val_metrics or {}).get("best_threshold"),
            )
        _check_finite_metrics(scalars(test_metrics), test_split, step)
        logger.log(step, "test", scalars(test_metrics))
        final = full_params(state, setup)
        summary = {
            "test_split": test_split,
            "test_loss": test_metrics["loss"],
            "params": tree_lib.num_params(final),
            "trainable_params": tree_lib.num_params(state.params),
            "steps": int(step),
            "epochs": step / steps_per_epoch,
            "stopped_early": stopper.should_stop,
            "wall_s": time.time() - start_time,
            "step_ms": 1e3 * float(np.median(step_times)) if step_times else None,
            "params_sha256": params_sha256(final),
        }
        summary.update({f"test_{k}": v for k, v in test_metrics.items()})
        if val_metrics is not None and "best_threshold" in val_metrics:
            # Binary: the decision threshold to deploy is chosen on val, never on test.
            summary["val_best_threshold"] = val_metrics["best_threshold"]
        if is_writer:
            write_json(workdir / "summary.json", summary)
            plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
            if "confusion_matrix" in test_metrics:
                names = data.class_names or [
                    str(c) for c in range(len(test_metrics["confusion_matrix"]))
                ]
                scores.plot_confusion(
                    test_metrics["confusion_matrix"], names, workdir / "confusion.png"
                )
            files = ("curves.png", "confusion.png", "summary.json", "config.json")
            logger.finish(summary, files)
    return summary


def _pinned_base(config_dict: dict, init_report: dict | None) -> dict:
    """The config saved inside checkpoints, naming the exact base step it restored.

    A LoRA run's checkpoints hold no base weights; pinning the absolute step directory
    keeps `load_params` and resume on the same base even if the base workdir trains on
    or the run is read from another working directory.
    """
    if init_report is None:
        return config_dict
    pinned = {"checkpoint": str(Path(init_report["source"]).resolve()), "step": init_report["step"]}
    return {**config_dict, "init_from": {**config_dict["init_from"], **pinned}}


def _flops_per_token(cfg: ml_collections.ConfigDict, data) -> float | None:
    """Model FLOPs per trained token (6N + attention), for language models only."""
    if data.kind not in ("lm", "sft") or cfg.model.name not in ("transformer", "llama"):
        return None
    from jaxdl.models import llama, transformer

    family = llama if cfg.model.name == "llama" else transformer
    return family.flops_per_token(dict(cfg.model), seq_len=data.example_spec["inputs"][0][0])


def _flush(pending: list[dict], first_step: int, last_step: int) -> dict[str, float]:
    """Fetch the device-side metrics of steps (first_step, last_step]; stop on NaN/Inf."""
    host = jax.device_get(pending)  # each entry: one step's scalars or K steps' [K] arrays
    per_step = {k: np.concatenate([np.ravel(m[k]) for m in host]) for k in host[0]}
    steps = [{k: v[i] for k, v in per_step.items()} for i in range(len(per_step["finite"]))]
    check_label_flags(steps, first_step)  # first: a bad label is what makes the loss NaN
    finite = per_step["finite"]
    if not finite.all():
        bad = first_step + 1 + int(np.argmin(finite))
        raise NonFiniteLossError(
            f"loss: expected finite values, found NaN/Inf at step {bad} (steps "
            f"{first_step + 1}..{last_step} checked; parameters after step {first_step} were not "
            "saved). Fix: lower optimizer.learning_rate or set optimizer.grad_clip_norm."
        )
    return {k: float(np.mean(v)) for k, v in per_step.items() if k not in FLAGS}


def _until_stopped(items: Iterable[T], stop: StopRequest, what: str) -> Iterator[T]:
    """``items`` until a signal comes, then `Stopped` ("stopped by SIGTERM WHAT")."""
    iterator = iter(items)
    try:
        for item in iterator:
            stop.check(what)
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # a generator: run its cleanup now, not when collected
            close()


def chunk_size(step: int, steps_per_call: int, total_steps: int, every: Iterable[int]) -> int:
    """Steps the next call takes: ``steps_per_call``, or 1 where fewer remain before the next
    log, evaluation, checkpoint or the end, so those land on the same steps for any K."""
    ends = [total_steps] + [(step // n + 1) * n for n in every if n]
    return steps_per_call if min(ends) - step >= steps_per_call else 1


def _check_finite_metrics(metrics: Mapping[str, float], split: str, step: int) -> None:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise NonFiniteLossError(
            f"{split} metrics: expected finite values, found NaN/Inf in {bad} evaluating the "
            f"state after step {step} (not saved). Fix: lower optimizer.learning_rate or set "
            "optimizer.grad_clip_norm, and resume from the last checkpoint."
        )


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite_state(state, step: int, last_saved: int | None) -> None:
    """Refuse to checkpoint parameters or optimizer state holding NaN/Inf (one reduction on
    the device, once per checkpoint): the last update can diverge after its loss was
    finite."""
    leaves = jax.tree.leaves((state.params, state.opt_state, state.model_state))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if floats and not bool(_all_finite(floats)):
        raise NonFiniteLossError(
            f"train state: expected finite parameters, found NaN/Inf after step {step} (not "
            f"saved; last checkpoint: step {last_saved}). Fix: lower optimizer.learning_rate "
            "or set optimizer.grad_clip_norm, and resume from the last checkpoint."
        )


def minimized(metric: str) -> bool:
    """Losses, errors, bits per byte and perplexity improve downwards; accuracies upwards."""
    return any(word in metric for word in ("loss", "bits", "perplexity", "mse", "mae"))


class EarlyStopping:
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    def __init__(self, patience: int, min_delta: float, metric: str, history: list[dict]):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.minimize = minimized(metric)
        self.best: float | None = None
        self.bad_evals = 0
        self.should_stop = False
        for record in history:  # replay a resumed run's evaluations
            self.update({f"val_{k}": v for k, v in record.items()})

    def update(self, metrics: Mapping[str, float]) -> None:
        if self.patience <= 0 or self.metric not in metrics:
            return
        value = metrics[self.metric]
        sign = -1.0 if self.minimize else 1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            self.should_stop = self.bad_evals >= self.patience
