"""k-fold cross-validation (the article's 9.4): one run per fold, then mean +/- std."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np

from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.training.guards import stop_on_signals
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train


def cross_validate(
    cfg: ml_collections.ConfigDict, workdir: str | Path, *, folds: int, progress: bool = True
) -> dict:
    """Train ``folds`` runs in WORKDIR/fold_I; write per-fold and aggregate figures."""
    if folds < 2:
        raise UserError(f"--folds: expected at least 2, found {folds}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    per_fold = []
    # One signal handler for all folds: a signal between two folds stops here too.
    with stop_on_signals() as stop:
        for i in range(folds):
            stop.check(f"before fold {i + 1}/{folds}. Run the same command to resume.")
            print(f"== fold {i + 1}/{folds} ==")
            per_fold.append(_fold(cfg, workdir, i, folds, progress))
    aggregate = {}
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        values = [f[key] for f in per_fold if f.get(key) is not None]
        if values:
            aggregate[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    summary = {"folds": folds, "per_fold": per_fold, "mean_std": aggregate}
    write_json(workdir / "summary.json", summary)
    print(json.dumps(aggregate, indent=2))
    return summary


def _fold(cfg: ml_collections.ConfigDict, workdir: Path, i: int, folds: int, progress: bool):
    fold_dir = workdir / f"fold_{i}"
    summary = train(cfg, fold_dir, progress=progress, fold=(i, folds))
    val = [r for r in read_metrics(fold_dir / "metrics.jsonl") if r["split"] == "val"]
    last_val = val[-1] if val else {}
    return {
        "fold": i,
        "val_loss": last_val.get("loss"),
        "val_accuracy": last_val.get("accuracy"),
        **{k: summary[k] for k in ("test_accuracy", "test_loss") if k in summary},
    }
