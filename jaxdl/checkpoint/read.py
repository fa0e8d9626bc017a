"""Reading jaxdl checkpoints: find a step, check it, load its variables as numpy.

A jaxdl checkpoint step is ``WORKDIR/checkpoints/<step>/`` with the Orbax items ``state``
(the TrainState), ``config`` and optionally ``data`` (see `jaxdl.checkpoint.manager`). Everything
here reads as host numpy arrays, so a checkpoint written on 8 devices loads on 1: the
caller places the arrays. Paths are the variable-tree keys joined by "/", e.g.
``params/backbone/Conv_0/kernel``.

Fitting a checkpoint onto another model (rename, re-initialise, report) is fine-tuning
surgery and lives in `jaxdl.finetune.surgery`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxdl.checkpoint.deferred import Deferred
from jaxdl.checkpoint.integrity import corrupt_step_fix, verify_step
from jaxdl.core import tree as tree_lib
from jaxdl.core.adapters import merge as merge_adapters
from jaxdl.core.quant import dequantize_tree, has_quantized
from jaxdl.errors import UserError

STATE_PARTS = ("params", "frozen", "model_state")


# ---- locating and checking a step directory -----------------------------------------------


def step_key(config_key: str) -> str:
    """ "init_from.checkpoint" -> "init_from.step" (the key named in step errors)."""
    return config_key.rsplit(".", 1)[0] + ".step" if "." in config_key else "step"


def list_steps(ckpt_dir: Path) -> list[int]:
    """Finalized steps in an Orbax manager directory (tmp dirs of killed saves excluded)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def resolve_step_dir(
    path: str | os.PathLike, step: int | None, *, config_key: str = "checkpoint"
) -> tuple[Path, int]:
    """A workdir, its checkpoints/ folder or one step folder -> (step dir, step).

    ``step`` None (or < 0) means the latest finalized step.
    """
    root = Path(path).expanduser().absolute()  # Orbax reads absolute paths only
    expected = "(expected WORKDIR/checkpoints/<step>)"
    fix = f"Fix: set {config_key} to a training workdir, its checkpoints/ folder or a step folder."
    if not root.exists():
        raise UserError(f"{config_key}: no checkpoint found at {root} {expected}. {fix}")
    step = None if step is None or int(step) < 0 else int(step)
    if root.name.isdigit() and (root / "state").is_dir():
        if step is not None and step != int(root.name):
            raise UserError(
                f"{step_key(config_key)}: asked for step {step} but {config_key} is the step "
                f"folder {root}. Fix: point {config_key} at its parent or drop the step."
            )
        return root, int(root.name)
    ckpt_dir = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = list_steps(ckpt_dir)
    if not steps:
        raise UserError(
            f"{config_key}: no checkpoint found at {ckpt_dir} {expected}: no complete step "
            f"folder there. {fix}"
        )
    if step is None:
        step = steps[-1]
    require_step(ckpt_dir, step, steps, step_key(config_key))
    return ckpt_dir / str(step), step


def require_step(ckpt_dir: Path, step: int, steps: list[int], key: str) -> None:
    """Refuse a step that is not among the saved ``steps``, listing the ones that are."""
    if step not in steps:
        raise UserError(
            f"{key}: step {step} not found in {ckpt_dir}; available steps: {sorted(steps)}. "
            "Fix: use one of these, or -1/None for the latest."
        )


def check_safe(step_dir: Path) -> None:
    """Refuse a step dir holding symlinks or entries resolving outside it (read nothing)."""
    root = Path(os.path.realpath(step_dir))
    if os.path.islink(step_dir):
        raise UserError(
            f"checkpoint {step_dir}: is a symbolic link (to {os.readlink(step_dir)}); expected "
            "a real directory. Fix: copy the real checkpoint files in place of the link."
        )
    for dirpath, dirnames, filenames in os.walk(step_dir, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            real = Path(os.path.realpath(entry))
            if os.path.islink(entry) or not real.is_relative_to(root):
                raise UserError(
                    f"checkpoint {step_dir}: entry {entry} is a symbolic link or resolves to "
                    f"{real}, outside the checkpoint; refusing to read it. Fix: replace it "
                    "with the real file, or use a checkpoint you wrote yourself."
                )


def check_step(step_dir: Path, items: list[str] | None = None) -> None:
    """`check_safe`, then the step's recorded digest (all items, or ``items``), before any
    byte of it is parsed."""
    check_safe(step_dir)
    verify_step(step_dir, items)


@contextlib.contextmanager
def orbax_errors(step_dir: Path) -> Iterator[None]:
    """Re-raise Orbax / tensorstore read failures as one UserError naming the directory.

    Callers verify the step's digest first (`check_step`), so the bytes Orbax reads are
    the bytes it wrote and a failure here is rare (an unreadable disk, a step older jaxdl
    wrote and the user vouched for).
    """
    try:
        yield
    except Exception as err:  # tensorstore, JSON and OS errors all mean the same to a user
        detail = " ".join(str(err).split())[:300]
        raise UserError(
            f"checkpoint {step_dir}: cannot be read, it is corrupt or incomplete "
            f"({type(err).__name__}: {detail}). {corrupt_step_fix(step_dir)}"
        ) from err


def state_metadata(step_dir: Path) -> dict:
    """The saved TrainState's tree of Orbax ArrayMetadata (shape, dtype), nothing read."""
    with orbax_errors(step_dir):
        handler = ocp.PyTreeCheckpointHandler()
        try:
            return dict(handler.metadata(epath.Path(step_dir.absolute() / "state")).tree)
        finally:
            handler.close()


def read_json(step_dir: Path, item: str) -> Any:
    """A JsonSave item of the step ("config", "data"), or None when the step has none."""
    if not (step_dir / item).is_dir():
        return None
    check_step(step_dir, [item])
    with orbax_errors(step_dir):
        checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
        try:
            return checkpointer.restore(epath.Path(step_dir.absolute() / item))
        finally:
            checkpointer.close()


def _check_parts(step_dir: Path, meta: Mapping) -> None:
    if not all(part in meta for part in STATE_PARTS):
        raise UserError(
            f"checkpoint {step_dir}: expected a jaxdl TrainState with {list(STATE_PARTS)}, "
            f"found items {sorted(meta)}. Fix: point at a checkpoint written by jaxdl."
        )


def _read_state_numpy(step_dir: Path) -> dict[str, dict]:
    """params / frozen / model_state of the saved TrainState as numpy (opt_state not read)."""
    meta = state_metadata(step_dir)
    _check_parts(step_dir, meta)
    parts = {k: meta[k] for k in STATE_PARTS if jax.tree_util.tree_leaves(meta[k])}
    out = _restore_numpy(step_dir, parts)
    return {k: dict(out.get(k) or {}) for k in STATE_PARTS}


def _restore_numpy(step_dir: Path, item: Mapping) -> dict:
    """The leaves of the saved state that ``item`` (a subtree of its metadata) names, as
    numpy; the rest is not read."""
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with orbax_errors(step_dir):
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            return checkpointer.restore(
                epath.Path(step_dir.absolute() / "state"),
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        finally:
            checkpointer.close()


GROUP_BYTES = 64 << 20  # streamed leaves read per Orbax call (each call has a fixed cost)


class _GroupReader:
    """Some leaves of a step's state, read together (one Orbax call) when the first is asked
    for, each then handed out once: streaming a state leaf by leaf at a few calls' cost."""

    def __init__(self, step_dir: Path, group: Mapping[str, Any]):
        self.step_dir, self.group = step_dir, dict(group)
        self.arrays: dict[str, np.ndarray] | None = None

    def _read(self, paths: list[str]) -> dict[str, np.ndarray]:
        item = tree_lib.unflatten({p: self.group[p] for p in paths})
        out = _restore_numpy(self.step_dir, item)
        return {p: np.asarray(v) for p, v in tree_lib.flatten(out).items()}

    def take(self, path: str) -> np.ndarray:
        if self.arrays is None:
            self.arrays = self._read(list(self.group))
        if path in self.arrays:
            return self.arrays.pop(path)
        return self._read([path])[path]  # asked for again: read it by itself


def _deferred_parts(step_dir: Path) -> dict[str, dict] | None:
    """`_read_state_numpy`'s parts with `Deferred` leaves, each read from the step when it
    is made (leaves in flatten order, grouped to about `GROUP_BYTES`): a caller that turns
    each leaf into something smaller (QLoRA's quantized kernels) never holds the float
    state. None when the step holds adapters or quantized kernels, which are merged whole."""
    meta = state_metadata(step_dir)
    _check_parts(step_dir, meta)
    if "lora" in (meta.get("params") or {}) or has_quantized(meta.get("frozen") or {}):
        return None
    flat = {
        f"{part}/{path}": leaf
        for part in STATE_PARTS
        for path, leaf in tree_lib.flatten(meta.get(part) or {}).items()
    }
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for path, leaf in flat.items():
        if size >= GROUP_BYTES:
            groups.append({})
            size = 0
        groups[-1][path] = leaf
        size += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    out: dict[str, Any] = {}
    for group in groups:
        reader = _GroupReader(step_dir, group)
        for path, leaf in group.items():
            out[path] = Deferred(
                functools.partial(reader.take, path), tuple(leaf.shape), np.dtype(leaf.dtype)
            )
    tree = tree_lib.unflatten(out)
    return {k: dict(tree.get(k) or {}) for k in STATE_PARTS}


# ---- whole model variables -----------------------------------------------------------------


def _overlay(base: Mapping, top: Mapping) -> dict:
    """``base`` with every leaf of ``top`` put over it (by path)."""
    flat = tree_lib.flatten(base)
    flat.update(tree_lib.flatten(top))
    return tree_lib.unflatten(flat)


def load_checkpoint(
    path: str | os.PathLike,
    step: int | None,
    config_key: str,
    seen: tuple[Path, ...] = (),
    *,
    merge_lora: bool = True,
    deferred: bool = False,
) -> tuple[dict, Path, int]:
    """(variables, step_dir, step): see `load_variables`. ``deferred``: a plain step's leaves
    as `Deferred`s, read as each is made (see `_deferred_parts`); a step with adapters or
    quantized kernels is still read whole, as numpy."""
    step_dir, step = resolve_step_dir(path, step, config_key=config_key)
    check_step(step_dir)
    if step_dir.resolve() in seen:
        raise UserError(
            f"{config_key}: LoRA checkpoints name each other as base in a loop: "
            f"{[str(s) for s in seen]}. Fix: point init_from.checkpoint at a full checkpoint."
        )
    lazy = _deferred_parts(step_dir) if deferred else None
    if lazy is not None:
        merged = tree_lib.merge(lazy["params"], lazy["frozen"])
        return {**merged, **lazy["model_state"]}, step_dir, step
    parts = _read_state_numpy(step_dir)
    params = dict(parts["params"])
    adapters = params.pop("lora", None)
    # a QLoRA run's frozen kernels are stored quantized: the merged model is the dequantized
    # base plus the adapters, as the run computed it
    merged = tree_lib.merge(params, dequantize_tree(parts["frozen"]))
    model_state = parts["model_state"]
    if adapters is not None:
        cfg = read_json(step_dir, "config") or {}
        init_from = cfg.get("init_from") or {}
        if not tree_lib.flatten(parts["frozen"]):
            # Saved with save_frozen=False: the base weights live in the run it started from.
            if not init_from.get("checkpoint"):
                raise UserError(
                    f"checkpoint {step_dir}: holds LoRA adapters without the frozen base "
                    "params and its config has no init_from.checkpoint naming the base. Fix: "
                    "load a checkpoint saved with its frozen params."
                )
            base, _, _ = load_checkpoint(
                init_from["checkpoint"],
                init_from.get("step"),
                "init_from.checkpoint",
                (*seen, step_dir.resolve()),
            )
            merged = _overlay({"params": base.get("params", {})}, merged)
            model_state = _overlay({k: v for k, v in base.items() if k != "params"}, model_state)
        lora_cfg = cfg.get("lora") or {}
        if "rank" not in lora_cfg or "alpha" not in lora_cfg:
            raise UserError(
                f"checkpoint {step_dir}: holds LoRA adapters but its config has lora="
                f"{lora_cfg!r}, expected lora.rank and lora.alpha. Fix: restore its config."
            )
        if merge_lora:
            merged = merge_adapters(
                merged, adapters, rank=lora_cfg["rank"], alpha=lora_cfg["alpha"]
            )
    variables = {**merged, **model_state}
    return jax.tree.map(np.asarray, variables), step_dir, step


def load_variables(
    path: str | os.PathLike, step: int | None = None, *, config_key: str = "checkpoint"
) -> dict:
    """Model variables ``{"params": ..., "batch_stats"?: ...}`` of a checkpoint, as numpy.

    ``path``: a workdir, its checkpoints/ folder or a step folder; ``step`` None = latest.
    Trainable and frozen params are merged (quantized frozen kernels dequantized first);
    LoRA adapters are folded into their kernels
    (loading the base checkpoint named by the run's init_from when frozen params were not
    saved). ``config_key`` is the config key that error messages name.
    """
    return load_checkpoint(path, step, config_key)[0]


def load_adapters(
    path: str | os.PathLike, step: int | None = None, *, config_key: str = "--workdir"
) -> tuple[dict, dict]:
    """``(adapters, lora config)`` of a LoRA run's checkpoint, unmerged, as numpy:
    adapters ``{"params": {... kernel: {"a": [in, r], "b": [r, out]}}}``; a UserError when
    the checkpoint holds none."""
    step_dir, _ = resolve_step_dir(path, step, config_key=config_key)
    check_step(step_dir)
    adapters = _read_state_numpy(step_dir)["params"].get("lora")
    lora_cfg = (read_json(step_dir, "config") or {}).get("lora") or {}
    if not adapters or "rank" not in lora_cfg:
        raise UserError(
            f"{config_key}: {step_dir} holds no LoRA adapters (the run trained without lora). "
            "Fix: export the whole model (without --adapter or --base), or pass a LoRA run's "
            "workdir."
        )
    return jax.tree.map(np.asarray, adapters), lora_cfg


def load_params(
    path: str | os.PathLike, step: int | None = None, *, merge_lora: bool = True
) -> dict:
    """``load_variables(path, step)["params"]``: the model params as numpy arrays.

    ``merge_lora=False``: a LoRA run's base alone, the params its adapters were trained
    over (a QLoRA run's dequantized base, which differs from the base it started from by
    the quantization's rounding)."""
    return load_checkpoint(path, step, "checkpoint", merge_lora=merge_lora)[0]["params"]
