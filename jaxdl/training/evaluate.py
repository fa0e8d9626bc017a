"""Evaluation: score a split exactly (`evaluate_split`), and restore or evaluate a trained
workdir (rebuild from config.json, restore a checkpoint). The fit loop, `jaxdl evaluate`,
sweeps and the compression study all score through here."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxdl.checkpoint.load import load_run_config
from jaxdl.core import steps
from jaxdl.core.heads import finalize
from jaxdl.data import Data, build_data, validate_batch
from jaxdl.errors import UserError
from jaxdl.fileio import read_json
from jaxdl.parallel import sharding
from jaxdl.training import scores
from jaxdl.training.build import Setup, build, saves_frozen


def evaluate_split(
    eval_step,
    state,
    batches: Iterable[Mapping],
    kind: str,
    num_classes: int = 0,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Sum masked metrics over a split on the device, then one transfer.

    Heads that return per-example outputs also get exact whole-split metrics (AUC, F1,
    R^2: `jaxdl.training.scores`) and their per-class lists (non-scalar values). Binary:
    ``threshold`` (chosen on val) adds F1 and accuracy at it.
    """
    sums, per_example = None, []
    for batch in batches:
        out = dict(eval_step(state, batch))
        if "per_example" in out:
            per_example.append(out.pop("per_example"))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    assert sums is not None, "empty evaluation split"
    metrics: dict[str, Any] = finalize(jax.device_get(sums), kind)
    if per_example:
        arrays = scores.gather(jax.device_get(per_example))
        metrics.update(scores.exact_metrics(kind, arrays, threshold))
        metrics.update(scores.details(kind, arrays, num_classes))
    return metrics


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics (what metrics.jsonl and TensorBoard take)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def eval_batches(data, split: str, batch_size: int, spec, num_classes: int, placement=None):
    """The split's batches (``batch_size`` per process), the first one validated on the host,
    each placed with ``placement`` (the batch sharding) when given."""
    for i, batch in enumerate(data.eval_iter(split, batch_size)):
        if i == 0:
            validate_batch(batch, spec, num_classes, split=split)
        yield batch if placement is None else sharding.put_batch(batch, placement)


def with_pinned_base(cfg: ml_collections.ConfigDict, workdir: Path):
    """On resume, restore the exact base step the run's checkpoints name (`_pinned_base`).

    A LoRA run's checkpoints hold no base weights, so resuming from "latest" of a base
    workdir that has trained on since would silently change the frozen weights.
    """
    from jaxdl.checkpoint.integrity import CorruptCheckpointError
    from jaxdl.checkpoint.read import list_steps
    from jaxdl.checkpoint.read import read_json as read_item

    steps = list_steps(workdir / "checkpoints")
    if not cfg.init_from.checkpoint or not steps:
        return cfg
    pinned = {}
    for step in reversed(steps):  # the step resume will use: the newest intact one
        try:
            pinned = (read_item(workdir / "checkpoints" / str(step), "config") or {}).get(
                "init_from", {}
            )
            break
        except CorruptCheckpointError:
            continue
    if not pinned.get("checkpoint"):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.init_from.checkpoint, cfg.init_from.step = pinned["checkpoint"], int(pinned["step"])
    return cfg


def stored_fit(workdir: Path) -> dict[str, Any] | None:
    """What the run in `workdir` fitted to its data (`Data.fit`, kept in
    data_report.json), or None (a source that fits nothing, or an older workdir)."""
    report = workdir / "data_report.json"
    return read_json(report).get("fit") if report.is_file() else None


def check_same_data(fit: Mapping[str, Any], data: Data, workdir: Path) -> None:
    """Refuse data whose file changed since the run in `workdir` fitted `fit` to it: its
    rows, split and statistics would not be the ones the model trained on."""
    old, new = fit["preprocessing"].get("fingerprint"), data.preprocessing.get("fingerprint")
    if old and new and old["sha256"] != new["sha256"]:
        files = f"{old['files']:,} files, " if "files" in old else ""
        now = f"{new['files']:,} files, " if "files" in new else ""
        raise UserError(
            f"data.source: {new['path']} changed since {workdir} trained on it ({files}"
            f"{old['bytes']:,} bytes then, {now}{new['bytes']:,} bytes now), so its "
            "examples, split and statistics are not the ones the model learned. Fix: restore "
            "it, or train a new run on it."
        )


def restore_run(
    workdir: str | Path, step: int | None = None, *, sharded: bool = False, examples: bool = True
) -> tuple[Any, Setup, Data]:
    """(config, setup with the restored state, data) of a trained workdir.

    ``sharded``: restore onto the run's ``mesh`` over this machine's devices (whatever
    mesh saved it), with ``setup.layout`` set; else onto the default device.
    ``examples=False`` (export): the data only as training fitted it (`Data.from_fit`),
    never re-read; an imported model without data is accepted. Else the data is read again
    and refused if its file changed since training.
    """
    from jaxdl.checkpoint.manager import Checkpointer

    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    fit = stored_fit(workdir)
    if fit is not None and not examples:
        data = Data.from_fit(fit)
    else:
        data = build_data(
            cfg.data,
            seed=cfg.seed,
            num_classes=cfg.model.get("num_classes"),
            task=cfg.get("task") or None,
            need_examples=examples,
        )
        if fit is not None:
            check_same_data(fit, data, workdir)
    setup = build(
        with_pinned_base(cfg, workdir),  # a LoRA run's frozen base: the step it trained on
        kind=data.kind,
        example_spec=data.example_spec,
        num_classes=data.num_classes,
        total_steps=max(cfg.num_steps, 1),
        mesh=sharding.make_mesh(cfg.mesh) if sharded else None,
        task_fields=data.task_fields,
    )
    # read-only: the run may still be training and saving into this workdir
    ckpt = Checkpointer(workdir, save_frozen=saves_frozen(setup.lora_cfg), read_only=True)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise UserError(
            f"--workdir: no checkpoint in {workdir / 'checkpoints'}. Fix: train the run first."
        )
    setup.state, _ = ckpt.restore(setup.state, step)
    ckpt.close()
    return cfg, setup, data


def evaluate_workdir(workdir: str | Path, split: str | None = None) -> dict[str, Any]:
    """Metrics of a workdir's latest checkpoint on `split`; None: the run's test split, or
    its eval split when the source has no test split (the result's "split" says which)."""
    if load_run_config(workdir).data.source == "none":
        raise UserError(
            f'--workdir: {workdir} has no data to evaluate (data.source "none": a model '
            "imported without a dataset). Fix: fine-tune it with `jaxdl train` (a config "
            "with data.source and init_from.checkpoint) and evaluate that run."
        )
    cfg, setup, data = restore_run(workdir, sharded=True)
    if split is None:
        test = cfg.data.test_split
        split = test if test in data.split_sizes else cfg.data.eval_split
    if split not in data.split_sizes:
        held_out = " (text sources hold out a test split with data.test_fraction)"
        raise UserError(
            f"--split: {cfg.data.source} has the splits {sorted(data.split_sizes)}, found "
            f"{split!r}. Fix: pass --split {cfg.data.eval_split}"
            f"{held_out if str(cfg.data.source).startswith('text:') else ''}."
        )
    eval_step = steps.make_eval_step(
        setup.model, setup.head, lora_cfg=setup.lora_cfg, layout=setup.layout
    )
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    local = sharding.per_process_batch(batch_size, setup.layout.mesh, field="data.eval_batch_size")
    batches = eval_batches(
        data, split, local, data.example_spec, data.num_classes, setup.layout.batch
    )
    metrics = evaluate_split(eval_step, setup.state, batches, data.kind, data.num_classes)
    return {"split": split, "step": int(setup.state.step), **metrics}


def export_workdir(
    workdir: str | Path,
    out_path: str | Path,
    *,
    platforms: Sequence[str] = ("cpu",),
    quantize: str | None = None,
) -> dict:
    """The latest checkpoint of a `jaxdl train` workdir -> artifact + sidecar; the sidecar.

    The one place a workdir meets `jaxdl.deploy`: deploy itself never reads a workdir.
    """
    from jaxdl.deploy.export import export_run

    cfg, setup, data = restore_run(workdir, examples=False)
    return export_run(
        cfg, setup, data, out_path, platforms=platforms, quantize=quantize, workdir=workdir
    )
