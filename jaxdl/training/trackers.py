"""Experiment trackers behind one small interface: TensorBoard, W&B, MLflow, trackio, JSON lines.

`config.trackers` names them (a comma list, default "tensorboard"); each package is imported
only when named. A tracker receives four things, from process 0 only:

    log_params(params)          the resolved config, flattened to dotted keys
    log_scalars(step, scalars)  split-prefixed keys at a step, e.g. {"val/loss": 0.31}
    log_summary(summary)        summary.json's figures, at the end
    log_artifact(path)          files at the end: curves.png, summary.json, config.json

Resume: WORKDIR/trackers.json keeps each tracker's run id (W&B `id`, MLflow `run_id`,
trackio run name) and the last step sent per split. A resumed run continues the same
tracker runs, first sends what metrics.jsonl holds up to its checkpoint that a tracker
lacks, then skips every (split, step) at or below a tracker's mark: with exact resume the
points a killed run sent past its checkpoint are the same numbers. W&B's mark is W&B's own
(`run.step` of a resumed online run), since its service buffers what it is given and
loses it when the process is killed: an offline run's files are written at its end, so a
killed offline run's points are sent again by the resumed one (W&B keeps the first of
each step when syncing). trackio's marks are its local store's last steps, for the
same reason; MLflow's and the jsonl file's are what they hold (a kill between a point and
trackers.json's update). TensorBoard trusts trackers.json. A run that starts from step 0
starts new tracker runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from jaxdl.errors import UserError
from jaxdl.fileio import atomic_write_text, read_json

__all__ = ["NAMES", "Tracker", "TrackerSet", "flatten_config", "parse_names"]

# name -> (the module to import, the pip command that installs it)
_PACKAGES = {
    "tensorboard": ("tensorboardX", 'pip install "jaxdl"'),
    "wandb": ("wandb", 'pip install "jaxdl[trackers]"'),
    "mlflow": ("mlflow", 'pip install "jaxdl[trackers]"'),
    # trackio 0.43 pins pillow<13, which jaxdl's Pillow>=13 excludes (README, Trackers)
    "trackio": ("trackio", "pip install --no-deps trackio, then its dependencies (README)"),
    "jsonl": (None, ""),
}
NAMES = tuple(_PACKAGES)


class Tracker(Protocol):
    """What every tracker implements; `TrackerSet` calls these on process 0 only."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
    def log_summary(self, summary: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def close(self, finished: bool) -> None: ...

    # What the tracker itself holds: the last step of every split (an int), per split
    # ({split: step}), or None to trust trackers.json's marks.
    have_step: int | Mapping[str, int] | None


def _marks(points: Iterable[tuple[int, Iterable[str]]]) -> dict[str, int]:
    """{split: the last step} of (step, scalar names) points, names "split/key" (resume
    marks read back from what a tracker's own store holds)."""
    last: dict[str, int] = {}
    for step, names in points:
        for split in {name.split("/", 1)[0] for name in names if "/" in name}:
            last[split] = max(last.get(split, -1), int(step))
    return last


def parse_names(value: str) -> list[str]:
    """'tensorboard,wandb' -> ["tensorboard", "wandb"]; an unknown name is a UserError."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    unknown = [n for n in names if n not in _PACKAGES]
    if unknown:
        raise UserError(
            f"config.trackers: unknown tracker {unknown[0]!r} in {value!r}. Expected a comma "
            f"list of {', '.join(NAMES)}. Fix: e.g. --config.trackers=tensorboard,mlflow."
        )
    return list(dict.fromkeys(names))


def _require(name: str) -> None:
    module, fix = _PACKAGES[name]
    if module is not None and importlib.util.find_spec(module) is None:
        raise UserError(
            f'trackers: "{name}" needs the {module} package, found it missing. Fix: {fix}, '
            "or drop it from config.trackers."
        )


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"batch_size": 32}} -> {"data.batch_size": 32}; lists and None as JSON."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=list)
    return flat


def _scalars(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """summary.json's finite numbers, and its strings (lists and None left out)."""
    numbers = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    numbers.update({k: float(v) for k, v in summary.items() if isinstance(v, bool)})
    strings = {k: v for k, v in summary.items() if isinstance(v, str)}
    return numbers, strings


# ---- the trackers ------------------------------------------------------------------------


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


class _TensorBoard:
    have_step = None

    def __init__(self, workdir: Path):
        self._writer = _summary_writer()(str(workdir / "tb"), flush_secs=10)

    def log_params(self, params):
        pass  # config.json is beside tb/; TensorBoard's hparams view wants a metric set

    def log_scalars(self, step, scalars):
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a point counts as sent once it is on disk (resume marks)

    def log_summary(self, summary):
        self._writer.add_text("summary", json.dumps(dict(summary), indent=1, default=str))

    def log_artifact(self, path):
        pass  # the files are in the workdir beside tb/

    def close(self, finished):
        self._writer.close()


class _JsonLines:
    """Every tracker call as one JSON line, at `jsonl.path` (default WORKDIR/events.jsonl):
    a dependency-free tracker for log shippers and scripts that tail a file. Resumed, its
    marks are the file's own last steps: a run killed between writing a point and
    trackers.json's update has written one point more than it recorded."""

    def __init__(self, workdir: Path, path: str, resumed: bool):
        self.path = Path(path) if path else workdir / "events.jsonl"
        try:
            self.have_step = self._last_steps() if resumed else None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        except OSError as err:
            raise UserError(
                f"config.jsonl.path: cannot append to {self.path} ({err.strerror}). Fix: "
                "name a writable file, or leave it empty for WORKDIR/events.jsonl."
            ) from None

    def _last_steps(self) -> dict[str, int]:
        """{split: the last step} of the file's scalars events; a last line the kill cut
        short is cut off the file (the next line would be appended to it)."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        records = []
        for number, line in enumerate(data.splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(
                    f"config.jsonl.path: line {number} of {self.path} is not JSON, so the "
                    "resumed run cannot tell what it already holds. Fix: remove that line, or "
                    "point jsonl.path at a file only this run writes."
                ) from None
        return _marks((r["step"], r["scalars"]) for r in records if r.get("event") == "scalars")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()

    def log_params(self, params):
        self._write({"event": "params", "params": dict(params)})

    def log_scalars(self, step, scalars):
        self._write({"event": "scalars", "step": step, "scalars": dict(scalars)})

    def log_summary(self, summary):
        self._write({"event": "summary", "summary": dict(summary)})

    def log_artifact(self, path):
        self._write({"event": "artifact", "path": str(path)})

    def close(self, finished):
        self._file.close()


class _WandB:
    def __init__(self, workdir: Path, cfg: Mapping[str, Any], state: dict):
        import wandb

        kwargs: dict[str, Any] = {
            "project": cfg.get("project") or None,
            "entity": cfg.get("entity") or None,
            "name": cfg.get("name") or workdir.name,
            "tags": list(cfg.get("tags") or []) or None,
            "id": state.get("id"),
            "resume": "allow",
        }
        if cfg.get("mode"):  # else W&B's own choice: WANDB_MODE, then its settings
            kwargs["mode"] = cfg["mode"]
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(workdir)  # W&B writes WORKDIR/wandb/
        settings = wandb.Settings(console="off", silent=True, reinit="create_new")
        try:
            self.run = wandb.init(**kwargs, settings=settings)
        except wandb.errors.Error as err:
            raise UserError(
                f"trackers: wandb.init failed: {str(err).splitlines()[0]}. Fix: `wandb login`, "
                "or --config.wandb.mode=offline (or WANDB_MODE=offline)."
            ) from None
        state["id"] = self.run.id
        # a resumed online run: the server's next step; else it holds nothing yet
        self.have_step = self.run.step - 1 if self.run.resumed else -1

    def log_params(self, params):
        self.run.config.update(dict(params), allow_val_change=True)

    def log_scalars(self, step, scalars):
        self.run.log(dict(scalars), step=step)

    def log_summary(self, summary):
        numbers, strings = _scalars(summary)
        self.run.summary.update({**numbers, **strings})

    def log_artifact(self, path):
        # a copy in the run's files folder, which W&B uploads (a save from elsewhere symlinks)
        copy = Path(self.run.dir) / path.name
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self, finished):
        self.run.finish(exit_code=0 if finished else 1)


class _MLflow:
    def __init__(self, workdir: Path, cfg: Mapping[str, Any], state: dict):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = cfg.get("tracking_uri") or None
        resumed = bool(state.get("run_id"))
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if resumed:
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                name = cfg.get("experiment") or "Default"
                found = self.client.get_experiment_by_name(name)
                experiment = found.experiment_id if found else self.client.create_experiment(name)
                run_name = cfg.get("run_name") or workdir.name
                self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        except (MlflowException, OSError) as err:
            shown = uri or os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default"
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err)
            raise UserError(
                f"config.mlflow.tracking_uri: cannot open the MLflow store at {shown} "
                f"({first}). Fix: e.g. --config.mlflow.tracking_uri=sqlite:///PATH/mlflow.db "
                "in a writable folder, or a reachable http(s):// server."
            ) from None
        state["run_id"] = self.run_id
        # what the store holds, not what trackers.json says: a run killed between a log
        # and that file's update has sent one point more than it recorded
        self.have_step = self._last_steps() if resumed else {}

    def _last_steps(self) -> dict[str, int]:
        """{split: the last step logged} of the run's "split/key" metrics."""
        return _marks(
            (m.step, [key])
            for key in self.client.get_run(self.run_id).data.metrics
            if "/" in key
            for m in self.client.get_metric_history(self.run_id, key)
        )

    def log_params(self, params):
        from mlflow.entities import Param

        # a resumed run keeps its parameters (MLflow refuses to change one): new keys only
        have = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(todo), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=todo[i : i + 100])

    def log_scalars(self, step, scalars):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary):
        from mlflow.entities import Metric, RunTag

        numbers, strings = _scalars(summary)
        now, step = int(time.time() * 1000), int(summary.get("steps") or 0)
        metrics = [Metric(f"summary.{k}", v, now, step) for k, v in numbers.items()]
        tags = [RunTag(f"summary.{k}", v) for k, v in strings.items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def close(self, finished):
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class _Trackio:
    def __init__(self, workdir: Path, cfg: Mapping[str, Any], state: dict, config: Mapping):
        with contextlib.redirect_stdout(sys.stderr):  # its banners; jaxdl's stdout is its own
            import trackio

            self._trackio = trackio
            self.run = trackio.init(
                project=cfg.get("project") or "jaxdl",
                name=state.get("name") or cfg.get("name") or workdir.name,
                config=dict(config),
                resume="allow",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        state["name"] = self.run.name
        self.step = 0
        # its local store, asked per split (it writes from a background thread, so what a
        # killed run had given it may be lost)
        from trackio.sqlite_storage import SQLiteStorage

        rows = SQLiteStorage.get_logs(self.run.project, self.run.name, run_id=self.run.id)
        self.have_step = _marks((row["step"], row) for row in rows)

    def log_params(self, params):
        pass  # given to trackio.init as its config (it replaces the stored one on resume)

    def log_scalars(self, step, scalars):
        self.run.log(dict(scalars), step=step)
        self.step = step

    def log_summary(self, summary):
        numbers, _ = _scalars(summary)
        self.run.log({f"summary/{k}": v for k, v in numbers.items()}, step=self.step)

    def log_artifact(self, path):
        pass  # trackio's artifacts are versioned uploads; the files stay in the workdir

    def close(self, finished):
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


# ---- the fan-out -------------------------------------------------------------------------


class TrackerSet:
    """The configured trackers of one workdir, with their resume state in trackers.json."""

    def __init__(
        self,
        workdir: Path,
        settings: Mapping[str, Any],
        resume_step: int,
        history: Sequence[Mapping[str, Any]] = (),
    ):
        """``history``: metrics.jsonl's records up to ``resume_step``, sent to each tracker
        that lacks them."""
        self.workdir = Path(workdir)
        self.path = self.workdir / "trackers.json"
        names = parse_names(settings.get("trackers", "tensorboard"))
        for name in names:
            _require(name)
        saved = read_json(self.path) if self.path.exists() and resume_step > 0 else {}
        self.state: dict[str, dict] = {n: dict(saved.get(n, {})) for n in names}
        for entry in self.state.values():
            entry.setdefault("sent", {})
        config = flatten_config(settings)
        self.trackers: dict[str, Tracker] = {}
        self.finished = False
        try:
            for name in names:
                self.trackers[name] = _open(
                    name, self.workdir, settings, self.state[name], config, resume_step > 0
                )
                self.trackers[name].log_params(config)
                have = self.trackers[name].have_step
                if isinstance(have, int):
                    self.state[name]["sent"] = {s: have for s in {r["split"] for r in history}}
                elif have is not None:
                    self.state[name]["sent"] = dict(have)
            for record in history if resume_step > 0 else ():
                metrics = {k: v for k, v in record.items() if k not in ("step", "split")}
                self._send(int(record["step"]), record["split"], metrics)
        except BaseException:
            self.close()
            raise
        self._save()

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self._send(step, split, metrics):
            self._save()

    def _send(self, step: int, split: str, metrics: Mapping[str, float]) -> bool:
        """Send a point to each tracker that lacks it; whether any did."""
        scalars = {f"{split}/{k}": float(v) for k, v in metrics.items()}
        sent_any = False
        for name, tracker in self.trackers.items():
            sent = self.state[name]["sent"]
            if step <= sent.get(split, -1):  # sent before the run was killed: the same point
                continue
            tracker.log_scalars(step, scalars)
            sent[split] = step
            sent_any = True
        return sent_any

    def finish(self, summary: Mapping[str, Any], artifacts: list[Path]) -> None:
        for tracker in self.trackers.values():
            tracker.log_summary(summary)
            for path in artifacts:
                if path.exists():
                    tracker.log_artifact(path)
        self.finished = True

    def close(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close(self.finished)

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")


def _open(
    name: str, workdir: Path, settings, state: dict, config: Mapping, resumed: bool
) -> Tracker:
    block = dict(settings.get(name) or {})
    if name == "tensorboard":
        return _TensorBoard(workdir)
    if name == "jsonl":
        return _JsonLines(workdir, block.get("path", ""), resumed)
    if name == "wandb":
        return _WandB(workdir, block, state)
    if name == "mlflow":
        return _MLflow(workdir, block, state)
    assert name == "trackio", name
    return _Trackio(workdir, block, state, config)
