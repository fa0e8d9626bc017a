"""Evaluate a trained workdir: rebuild from config.json, restore the latest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxdl.checkpoint.load import load_run_config
from jaxdl.core import steps
from jaxdl.data import Data, build_data
from jaxdl.errors import UserError
from jaxdl.parallel import sharding
from jaxdl.training.build import Setup, build


def restore_run(
    workdir: str | Path, step: int | None = None, *, sharded: bool = False
) -> tuple[Any, Setup, Data]:
    """(config, setup with the restored state, data) of a trained workdir.

    ``sharded``: restore onto the run's ``mesh`` over this machine's devices (whatever
    mesh saved it), with ``setup.layout`` set; else onto the default device.
    """
    from jaxdl.checkpoint.manager import Checkpointer

    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    data = build_data(
        cfg.data,
        seed=cfg.seed,
        num_classes=cfg.model.get("num_classes"),
        task=cfg.get("task") or None,
    )
    from jaxdl.training.trainer import with_pinned_base

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
    ckpt = Checkpointer(workdir, save_frozen=setup.lora_cfg is None, read_only=True)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise UserError(
            f"--workdir: no checkpoint in {workdir / 'checkpoints'}. Fix: train the run first."
        )
    setup.state, _ = ckpt.restore(setup.state, step)
    ckpt.close()
    return cfg, setup, data


def evaluate_workdir(workdir: str | Path, split: str = "test") -> dict[str, float]:
    from jaxdl.training.trainer import _eval_batches, evaluate_split

    cfg, setup, data = restore_run(workdir, sharded=True)
    if split not in data.split_sizes:
        raise UserError(f"--split: expected one of {sorted(data.split_sizes)}, found {split!r}.")
    eval_step = steps.make_eval_step(
        setup.model, setup.head, lora_cfg=setup.lora_cfg, layout=setup.layout
    )
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    local = sharding.per_process_batch(batch_size, setup.layout.mesh, field="data.eval_batch_size")
    batches = _eval_batches(
        data, split, local, data.example_spec, data.num_classes, setup.layout.batch
    )
    metrics = evaluate_split(eval_step, setup.state, batches, data.kind, data.num_classes)
    return {"split": split, "step": int(setup.state.step), **metrics}
