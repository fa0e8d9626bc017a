"""Run outputs: metrics.jsonl, TensorBoard events, curves.png, atomic JSON files.

Everything here is a side effect at the edge of a run. Files a user reads (config.json,
summary.json, ...) are written to a temporary name and renamed, so a killed process never
leaves one half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.core import tree


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def params_sha256(params: Mapping[str, Any]) -> str:
    """A hash of a parameter tree: paths, dtypes, shapes and bytes, in sorted path order."""
    digest = hashlib.sha256()
    for path, leaf in sorted(tree.flatten(params).items()):
        array = np.asarray(leaf)
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class MetricLogger:
    """Appends {"step", "split", ...} lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: Path, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            _drop_lines_after(self.path, resume_step)  # a killed run may have logged past it
        self._file = self.path.open("a")
        self._writer = _summary_writer()(str(Path(workdir) / "tb"), flush_secs=10)

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._writer.add_scalar(f"{split}/{key}", float(value), int(step))

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()
            self._writer.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without importing PyTorch.

    tensorboardX imports torch at import time when it is installed (seconds of start-up,
    and jaxdl never uses PyTorch); a None entry in sys.modules makes that import fail
    softly, as tensorboardX expects when torch is absent.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


def _drop_lines_after(path: Path, step: int) -> None:
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
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
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
