"""Run outputs: metrics.jsonl, the configured trackers (jaxdl.training.trackers), curves.png.

Everything here is a side effect at the edge of a run. Files a user reads are written with
`jaxdl.fileio` (atomic), so a killed process never leaves one half-written; metrics.jsonl
is appended to, so a crash can tear its last line, which the next reader drops.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.core import tree
from jaxdl.errors import UserError, warn
from jaxdl.fileio import atomic_write_bytes, atomic_write_text
from jaxdl.training.trackers import TrackerSet

__all__ = ["MetricLogger", "params_sha256", "plot_curves", "read_metrics"]


def params_sha256(params: Mapping[str, Any]) -> str:
    """A hash of a parameter tree: paths, dtypes, shapes and bytes, in sorted path order."""
    digest = hashlib.sha256()
    for path, leaf in sorted(tree.flatten(params).items()):
        array = np.asarray(leaf)
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class MetricLogger:
    """Appends {"step", "split", ...} lines to metrics.jsonl and fans them out to trackers.

    ``config`` is the resolved config (a dict): its ``trackers`` names them (default
    TensorBoard) and they get it as parameters. `finish` hands them the summary and the
    final files; without it, closing marks their runs unfinished (a resume continues them).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        config: Mapping[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        if not enabled:
            return
        # a killed run may have logged past the step this run starts from (and a run that
        # never checkpointed logged past step 0): those rows are this run's to write
        history = _drop_lines_after(self.path, resume_step) if self.path.exists() else []
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.trackers = TrackerSet(self.workdir, config or {}, resume_step, history)
        self._file = self.path.open("a")

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.trackers.log(int(step), split, metrics)

    def finish(self, summary: Mapping[str, Any], files: Sequence[str] = ()) -> None:
        """The run's summary and final files (names in the workdir) to every tracker."""
        if self.enabled:
            self.trackers.finish(summary, [self.workdir / name for name in files])

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()
            self.trackers.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_lines_after(path: Path, step: int) -> list[dict]:
    """Keep the records up to `step` (rewriting the file); -> those records."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when absent).

    A torn last line (a crash mid-append) is dropped with a warning; a bad line before the
    last is corruption, reported naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "split" not in record:
                raise ValueError("expected an object with step and split")
        except ValueError as err:
            if number == len(lines):
                warn(
                    f"{path}: dropped its torn last line {number} ({err}); a run was killed "
                    "while writing it."
                )
                break
            raise UserError(
                f"{path}: line {number} is not a metrics record ({err}). Fix: delete the "
                "corrupt lines, or the file to start its log afresh."
            ) from err
        records.append(record)
    return records


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Loss and metric curves per split, one panel per metric, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    skip = {"step", "split", "finite", "examples_per_s", "tokens_per_s", "lr", "grad_norm"}
    keys = sorted({k for r in records for k in r} - skip)
    if not keys:
        return
    width, height = 4.5 * len(keys), 3.4
    fig, axes = plt.subplots(1, len(keys), figsize=(width, height), squeeze=False)
    # Fixed margins in inches (room for tick labels and titles) instead of tight_layout,
    # which draws the figure once more: half the time of a run's plotting.
    fig.subplots_adjust(
        left=0.75 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.35 / height,
        wspace=0.95 / (4.5 - 0.95),
    )  # fmt: skip
    for ax, key in zip(axes[0], keys, strict=True):
        for split in sorted({r["split"] for r in records}):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())
