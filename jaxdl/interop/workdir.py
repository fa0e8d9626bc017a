"""Write an imported model as an ordinary jaxdl workdir at step 0.

    WORKDIR/config.json          the resolved config; its model section rebuilds the source
    WORKDIR/checkpoints/0/       a TrainState saved by jaxdl's own Checkpointer
    WORKDIR/import_report.json   the init_report.json categories + provenance (kind, files,
                                 sha256 of each)
    WORKDIR/<assets>             files that travel with the model (tokenizer.json)

So `jaxdl evaluate`, `generate`, `export` and ``init_from.checkpoint=WORKDIR`` treat it as a
trained run. The config's optimizer is plain SGD: its state is a step counter, so the
checkpoint holds the weights and little else (an imported workdir is a starting point;
fine-tuning runs name it in init_from with their own optimizer). Everything is written to a
temporary sibling folder and renamed at the end: an interrupted import leaves no workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdl import config as config_lib
from jaxdl.checkpoint.deferred import Deferred
from jaxdl.core.optim import make_optimizer
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError
from jaxdl.fileio import pid_alive
from jaxdl.finetune import partition
from jaxdl.interop.readers import sha256


@dataclasses.dataclass
class Imported:
    """What an importer hands the workdir writer.

    config: a partial config laid over `jaxdl.config.default_config()` (at least ``model``
    and ``data``). variables: {"params": ..., "batch_stats"?: ...} as numpy, the model's
    tree. report: `jaxdl.interop.mapping.convert`'s report. files: the source files
    read (hashed into the provenance). assets: {name in the workdir: file to copy, or its
    bytes}.
    provenance: extra JSON-able facts (e.g. the source config.json).
    """

    config: dict[str, Any]
    variables: dict[str, Any]
    report: dict[str, Any]
    files: list[Path]
    assets: dict[str, Path | bytes] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


# Overrides every imported config gets: one step of plain SGD (see the module docstring).
IMPORT_DEFAULTS = {"num_steps": 1, "optimizer": {"name": "sgd"}}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _deep_update(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_update(dict(out[key]), value)
        else:
            out[key] = value
    return out


def resolved_config(partial: Mapping[str, Any]):
    """default_config() with IMPORT_DEFAULTS and `partial` on top, validated."""
    cfg = config_lib.merge_config(
        config_lib.default_config(), _deep_update(IMPORT_DEFAULTS, partial)
    )
    config_lib.validate(cfg)
    return cfg


def deferred_leaves(tree: Any) -> Any:
    """Every array leaf as a `Deferred` (those that are stay as they are): the import's
    checkpoint writes the leaves one at a time, without the copy Orbax makes of numpy
    leaves or of jax arrays' host buffers."""

    def defer(leaf: Any) -> Any:
        if isinstance(leaf, Deferred):
            return leaf
        return Deferred(lambda: np.asarray(leaf), tuple(leaf.shape), np.dtype(leaf.dtype))

    return jax.tree.map(defer, tree)


def _stand_ins(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.stand_in(), tree)


def initial_state(cfg: Any, variables: Mapping[str, Any]) -> TrainState:
    """The step-0 TrainState `jaxdl.training.build.build` makes for `cfg`, with `variables`
    in place of a fresh init (same partition, optimizer and rng, so restores fit). Its weights
    are `Deferred` leaves, for a `Checkpointer(deferred=True)`."""
    variables = deferred_leaves(variables)
    params = {"params": variables["params"]}
    model_state = {k: v for k, v in variables.items() if k != "params"}
    plan = partition.make_plan(params, partition.default_rules(lora=False))
    trainable, frozen = partition.split(params, plan)
    tx = make_optimizer(
        cfg.optimizer,
        max(cfg.num_steps, 1),
        lr_mults=lambda step: partition.lr_mult_tree(plan, trainable, step),
        wd_mults=partition.wd_mult_tree(plan, trainable),
    )
    rng = jax.random.PRNGKey(cfg.seed + 3)
    # the optimizer's init sees stand-ins of the (deferred) weights: it looks at shapes only
    state = TrainState.create(_stand_ins(trainable), tx, rng, model_state=model_state)
    return state.replace(params=trainable, frozen=frozen)


def imported_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """An imported workdir's config.json (model section, tokenizer, preprocessing), for
    fine-tuning configs to start from."""
    config = Path(workdir).expanduser() / "config.json"
    if not config.is_file():
        raise UserError(
            f"init_from.checkpoint: no config.json in {config.parent}. Fix: run `jaxdl import "
            "KIND --from WEIGHTS --out DIR` first and point at DIR."
        )
    return json.loads(config.read_text())


def imported_model(workdir: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """The model section of an imported workdir with `overrides` on top (e.g.
    ``num_classes=10`` for a new head)."""
    return {**imported_config(workdir)["model"], **overrides}


def check_out(out: Path) -> None:
    """Refuse an existing, non-empty --out (before any slow reading)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"--out: {out} already exists and is not empty. Fix: pass a new folder (jaxdl "
            "never writes over an existing one)."
        )


@contextlib.contextmanager
def staging(out: Path, tag: str) -> Iterator[Path]:
    """A temporary sibling folder that becomes `out` when the block finishes, and vanishes
    when it raises (or is interrupted). Leftovers of killed runs (their PID gone) are
    removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.{tag}-tmp-"
    for stale in out.parent.glob(prefix + "*"):
        pid = stale.name.removeprefix(prefix)
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # an empty folder the user made: replace it
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_workdir(out: str | os.PathLike, kind: str, imported: Imported) -> dict[str, Any]:
    """Write `imported` as the workdir `out` (atomically); returns the import report.

    The weights are converted as the checkpoint writes them, where the importer deferred
    them (`mapping.convert(defer=True)`)."""
    from jaxdl.checkpoint.manager import Checkpointer

    out = Path(out).absolute()
    check_out(out)
    cfg = resolved_config(imported.config)
    report = {
        "source": {
            "kind": kind,
            "files": [
                {
                    "name": f.name,
                    "path": str(f.absolute()),
                    "sha256": sha256(f),
                    "bytes": f.stat().st_size,
                }
                for f in imported.files
            ],
            **imported.provenance,
        },
        "step": 0,
        **imported.report,
    }
    with staging(out, "import") as tmp:
        state = initial_state(cfg, imported.variables)
        with Checkpointer(tmp, max_to_keep=1, deferred=True) as ckpt:
            ckpt.save(0, state, data_state=None, config=cfg.to_dict())
        for name, src in imported.assets.items():
            if isinstance(src, bytes):
                (tmp / name).write_bytes(src)
            else:
                shutil.copyfile(src, tmp / name)
        _write_json(tmp / "config.json", cfg.to_dict())
        _write_json(tmp / "import_report.json", report)
    return report
