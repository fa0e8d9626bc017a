"""Orbax checkpoints of a training run: async save, keep-last-K, a separate best copy, resume.

Layout (**contract**)::

    WORKDIR/checkpoints/<step>/        latest K steps (Orbax CheckpointManager)
        state/    the TrainState (StandardSave); without `frozen` when save_frozen=False
        data/     the data iterator state (JsonSave), absent when there is none
        config/   the resolved config (JsonSave)
        jaxdl_digest.json   size and xxh3 hashes of every item file (`jaxdl.checkpoint.integrity`)
    WORKDIR/checkpoints_best/<step>/   the best step by `best_metric`, same items
    WORKDIR/checkpoints/<step>.corrupt  a step that failed its digest, set aside on resume

The best copy has its own manager (max_to_keep=1), so keeping the best never deletes the
latest and rotating the latest never deletes the best. Orbax writes each step into
``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a killed save leaves only
that tmp dir, which `Checkpointer` removes at start. The digest is written into the tmp
dir after every item is final and before the rename, so a finalized step always carries
it; every restore verifies it before Orbax reads a byte. Reading helpers (`load_variables`,
`restore_pretrained`, ...) live in `jaxdl.checkpoint.read` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import flags

from jaxdl.checkpoint.deferred import type_handler_registry
from jaxdl.checkpoint.integrity import CorruptCheckpointError, corrupt_step_fix, write_digest
from jaxdl.checkpoint.read import check_step, orbax_errors, require_step, state_metadata
from jaxdl.core.state import TrainState
from jaxdl.core.tree import leaf_paths
from jaxdl.errors import UserError, warn
from jaxdl.fileio import disk_error

__all__ = ["Checkpointer", "remove_tmp_dirs"]

TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"


def remove_tmp_dirs(ckpt_dir: Path) -> list[str]:
    """Delete the unfinished ``<step>.orbax-checkpoint-tmp`` dirs of a killed save.

    Orbax 0.12.8 only does this when ``cleanup_tmp_directories=True`` and then lazily, on
    the next save; we do it now so a resumed run starts from a clean directory.
    """
    if not ckpt_dir.is_dir() or jax.process_index() != 0:
        return []
    removed = []
    for entry in ckpt_dir.iterdir():
        if TMP_SUFFIX not in entry.name:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
        removed.append(entry.name)
    return sorted(removed)


def _json_checked(value: Any, key: str) -> Any:
    """Fail at save time, not in Orbax's background thread, on a non-JSON value."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"{key}: expected a JSON-serializable dict, found {type(value).__name__} ({err}). "
            "Fix: convert it to plain dicts, lists, numbers and strings."
        ) from err
    return value


def _abstract(leaf: Any) -> Any:
    """Template leaf -> what Orbax restores into: same shape, dtype and placement."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf  # numpy arrays restore as numpy; ShapeDtypeStructs pass through


def _fit_errors(target: TrainState, saved: Mapping[str, Any]) -> list[str]:
    """Leaves of ``target`` that the saved state cannot fill, as phrases naming them."""
    want = {p: tuple(x.shape) for p, x in leaf_paths(target).items()}
    have = {p: tuple(m.shape) for p, m in leaf_paths(saved).items()}
    out = []
    wrong = [
        f"{p} checkpoint {have[p]} vs state {want[p]}"
        for p in sorted(want.keys() & have.keys())
        if want[p] != have[p]
    ]
    if wrong:
        out.append("shape mismatch: " + ", ".join(wrong))
    if missing := sorted(want.keys() - have.keys()):
        out.append("not in the checkpoint: " + ", ".join(missing))
    if extra := sorted(have.keys() - want.keys()):
        out.append("in the checkpoint, not in the state: " + ", ".join(extra))
    return out


@contextlib.contextmanager
def coordinator_barriers():
    """Within: Orbax's cross-process barriers wait on jax.distributed's key-value store.

    By default Orbax syncs processes with a device collective (`sync_global_devices`),
    some of them from its background save threads. A collective issued from two threads
    can interleave with the train step's collectives in a different order in each process
    and deadlock for good (Orbax's `synchronization.py` warns of it); the key-value
    barrier touches no device and times out with an error instead.
    """
    flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    before = flag.value, flag.present
    flag.parse("true")  # read even when absl never parsed argv (`present` counts)
    try:
        yield
    finally:
        flag.value, flag.present = before


class _DiskRefusals(logging.Filter):
    """Drops Orbax's log of a save that failed because the disk refused (full, read-only):
    the same error reaches the caller, which reports it in one line naming the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else RuntimeError(record.getMessage())
        return err is None or disk_error(err) is None


@contextlib.contextmanager
def _quiet_disk_refusals() -> Iterator[None]:
    logger, refusals = logging.getLogger("absl"), _DiskRefusals()
    logger.addFilter(refusals)
    try:
        yield
    finally:
        logger.removeFilter(refusals)


class Checkpointer:
    """Async Orbax checkpointing of a TrainState plus data-iterator state and config."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        save_frozen: bool = True,
        read_only: bool = False,
        deferred: bool = False,
    ):
        """``read_only``: for readers of a workdir that a run may be writing (evaluate,
        export): nothing is saved, and the tmp dirs of the run's in-flight saves are not
        treated as leftovers of a killed one. ``deferred``: the saved
        state may hold `jaxdl.checkpoint.deferred.Deferred` leaves, each made as it is written
        (an import: the save holds two converted leaves at a time, never the model)."""
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise UserError(
                f"keep_checkpoints: expected an int >= 1, found {max_to_keep!r}. "
                "Fix: keep at least the latest checkpoint."
            )
        if best_mode not in ("max", "min"):
            raise UserError(f"best_mode: expected 'max' or 'min', found {best_mode!r}.")
        self.directory = Path(workdir) / "checkpoints"
        self.best_directory = Path(workdir) / "checkpoints_best"
        self.best_metric, self.best_mode, self.save_frozen = best_metric, best_mode, save_frozen
        self._saving: dict[Path, int] = {}  # manager directory -> step of its save in flight
        self._scope = contextlib.ExitStack()  # closed last by close()
        self._scope.enter_context(_quiet_disk_refusals())
        if jax.process_count() > 1:
            self._scope.enter_context(coordinator_barriers())
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, save_interval_steps=0, max_to_keep=None, create=False
            )
        else:
            for d in (self.directory, self.best_directory):
                remove_tmp_dirs(d)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                async_options=self._digest_hook(self.directory),
            )
        handlers = None
        self._deferred = deferred
        if deferred:  # Orbax needs every item's handler then
            state = ocp.PyTreeCheckpointHandler(type_handler_registry=type_handler_registry())
            json_items = {k: ocp.JsonCheckpointHandler() for k in ("config", "data")}
            handlers = {"state": state, **json_items}
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(), options=options, item_handlers=handlers
        )
        self._best_manager = None
        self._best_value: float | None = None
        self._warned = False
        if best_metric and not read_only:
            # best_fn makes Orbax itself keep the better one, even if our tracking restarts;
            # a best copy saved under another metric counts as the worst.
            worst = -math.inf if best_mode == "max" else math.inf
            self._best_manager = ocp.CheckpointManager(
                self.best_directory.absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: float(m.get(best_metric, worst)),
                    best_mode=best_mode,
                    create=True,
                    async_options=self._digest_hook(self.best_directory),
                    # the same step is saved to both managers: their cross-process barriers
                    # need distinct names, or the second save waits forever
                    multiprocessing_options=ocp.options.MultiprocessingOptions(
                        barrier_sync_key_prefix="best"
                    ),
                ),
            )
            self._best_value = self._saved_best()

    def _digest_hook(self, directory: Path) -> ocp.AsyncOptions:
        """Orbax calls this on the primary process once every item of the save in flight is
        final, before renaming its tmp dir: the digest lands inside the step atomically."""

        def write() -> None:
            tmp = directory / f"{self._saving[directory]}{TMP_SUFFIX}"
            assert tmp.is_dir(), f"Orbax's tmp dir {tmp} is not where jaxdl expects it"
            write_digest(tmp)

        return ocp.AsyncOptions(post_finalization_callback=write)

    def _saved_best(self) -> float | None:
        step = self._best_manager.latest_step()
        metrics = self._best_manager.metrics(step) if step is not None else None
        value = (metrics or {}).get(self.best_metric)
        return None if value is None else float(value)

    def latest_step(self) -> int | None:
        """The newest complete step in WORKDIR/checkpoints (None when there is none)."""
        return self._manager.latest_step()

    @property
    def best_value(self) -> float | None:
        """The best `best_metric` value saved so far (None before the first)."""
        return self._best_value

    def _improves(self, metrics: Mapping[str, Any] | None) -> float | None:
        if self._best_manager is None or not metrics:
            return None
        if self.best_metric not in metrics:
            # Not an error: the brief's contract is "if metrics has best_metric"; say it once.
            if not self._warned:
                logging.warning(
                    "best_metric: %r is not among the eval metrics %s; no best copy is kept. "
                    "Fix: set best_metric to one of them.",
                    self.best_metric,
                    sorted(metrics),
                )
                self._warned = True
            return None
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return None
        best = self._best_value
        if best is None or (value > best if self.best_mode == "max" else value < best):
            return value
        return None

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_state: dict | None,
        config: dict,
        metrics: dict | None = None,
        force: bool = False,
    ) -> None:
        """Start an async save of ``state`` at ``step``; returns once arrays are on the host.

        A step already saved (e.g. the step a run resumed from) is left as it is. When
        ``metrics[best_metric]`` improves on the best so far, the step is also saved to
        WORKDIR/checkpoints_best.
        """
        step = int(step)
        if not self.save_frozen:
            state = state.replace(frozen={})
        items = {
            "state": (ocp.args.PyTreeSave if self._deferred else ocp.args.StandardSave)(state),
            "config": ocp.args.JsonSave(_json_checked(config, "config")),
        }
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_json_checked(data_state, "data_state"))
        value = self._improves(metrics)
        if step not in self._manager.all_steps():
            self._manager.wait_until_finished()  # the hook reads _saving: one save at a time
            self._saving[self.directory] = step
            self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if value is not None and step not in self._best_manager.all_steps():
            self._best_manager.wait_until_finished()
            self._saving[self.best_directory] = step
            self._best_manager.save(
                step,
                args=ocp.args.Composite(**items),
                metrics={self.best_metric: value},
                force=True,
            )
            self._best_value = value

    def restore(
        self, template: TrainState, step: int | None = None, *, require_data: bool = False
    ) -> tuple[TrainState, dict | None]:
        """Restore ``step`` (None = latest) into the structure, dtypes and placement of
        ``template`` (real arrays or ShapeDtypeStructs with shardings).

        The step's digest is verified first: a corrupt step raises `CorruptCheckpointError`
        (one line naming the file), as does a step without data-iterator state when
        ``require_data``. Returns (state, data_state or None). If the checkpoint was saved
        without the frozen tree, ``template.frozen`` is kept.
        """
        self.wait()
        steps = list(self._manager.all_steps())
        if step is None:
            step = self._manager.latest_step()
        if step is None:
            raise UserError(
                f"resume: no checkpoint found at {self.directory} (expected "
                "WORKDIR/checkpoints/<step>). Fix: train from scratch or use the workdir of "
                "the run to resume."
            )
        require_step(self.directory, step, steps, "resume")
        step_dir = self.directory / str(step)
        check_step(step_dir)
        if require_data and not (step_dir / "data").is_dir():
            raise CorruptCheckpointError(
                f"checkpoint {step_dir}: has no data/ item (the data-iterator state), so "
                "resuming from it would restart the data from batch 0. "
                f"{corrupt_step_fix(step_dir)}"
            )
        saved = state_metadata(step_dir)
        has_frozen = bool(jax.tree_util.tree_leaves(saved.get("frozen")))
        target = template if has_frozen else template.replace(frozen={})
        if errors := _fit_errors(target, saved):
            raise UserError(
                f"resume: checkpoint {step_dir} does not fit the train state: "
                f"{'; '.join(errors)}. Fix: resume with the config that wrote it "
                "(model, optimizer, partition, lora), or use a new workdir."
            )
        items = {"state": ocp.args.StandardRestore(jax.tree.map(_abstract, target))}
        if (step_dir / "data").is_dir():
            items["data"] = ocp.args.JsonRestore()
        with orbax_errors(step_dir):
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if not has_frozen:
            state = state.replace(frozen=template.frozen)
        return state, restored["data"] if "data" in items else None

    def resume(
        self, template: TrainState, *, require_data: bool
    ) -> tuple[int, TrainState, dict | None]:
        """(step, state, data_state) of the newest intact step; (0, template, None) if none.

        Steps that fail verification are renamed ``<step>.corrupt`` (kept for inspection,
        out of Orbax's way so the run can save that step again) and named in one warning
        line; a run never resumes from a corrupt step, nor silently from scratch when
        checkpoints exist but none is intact.
        """
        self.wait()
        skipped: list[tuple[int, str]] = []
        found = None
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                found = (step, *self.restore(template, step, require_data=require_data))
                break
            except CorruptCheckpointError as err:
                skipped.append((step, str(err)))
        if skipped:
            self._set_aside([s for s, _ in skipped])
            if found is None:
                raise CorruptCheckpointError(
                    f"resume: every checkpoint in {self.directory} is corrupt (set aside as "
                    f"<step>{CORRUPT_SUFFIX}; newest: {skipped[0][1]}). Fix: start afresh in a "
                    "new --workdir, or delete the checkpoints to start this one afresh."
                )
            warn(
                f"skipped corrupt checkpoint step(s) {[s for s, _ in skipped]} (set aside as "
                f"<step>{CORRUPT_SUFFIX}; {skipped[0][1]}); resuming from step {found[0]}."
            )
        return found if found is not None else (0, template, None)

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}{CORRUPT_SUFFIX}"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}{CORRUPT_SUFFIX}{n}"
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdl_set_aside_corrupt_steps")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is on disk (raises a failed save's error)."""
        self._manager.wait_until_finished()
        if self._best_manager is not None:
            self._best_manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's threads."""
        try:
            self._manager.close()
            if self._best_manager is not None:
                self._best_manager.close()
        finally:
            self._scope.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
