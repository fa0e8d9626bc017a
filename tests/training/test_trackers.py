"""Trackers, offline and for real: W&B in offline mode (its .wandb run files read back),
MLflow on a SQLite store (read back with MlflowClient), trackio's local SQLite store, and
the jsonl tracker. Runs are real `jaxdl train` subprocesses; the resume test kills one with
SIGKILL mid-run and checks that every (key, step) reaches each tracker exactly once."""

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jaxdl.errors import UserError
from jaxdl.testing import kill_mid_run, subprocess_env, train_command
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trackers import TrackerSet, flatten_config, parse_names

# trackio installs apart (README, Trackers); CI installs it, so there it must be present
HAS_TRACKIO = importlib.util.find_spec("trackio") is not None or bool(os.environ.get("CI"))
CONFIG = str(Path(__file__).resolve().parents[2] / "experiments" / "digits_mlp.py")
QUICK = [
    "--config.num_epochs=0",
    "--config.eval_every=10",
    "--config.log_every=10",
    "--config.data.train_transforms=[]",
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = subprocess_env()
    env.update(WANDB_MODE="offline", TRACKIO_DIR=str(tmp_path / "trackio"))
    env.pop("WANDB_DIR", None)
    return env


def _train(tmp_path, workdir, overrides, **kwargs):
    cmd = train_command(CONFIG, workdir, [*QUICK, *overrides])
    # cwd: MLflow's default artifact root (./mlruns) lands in tmp_path
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path)


# ---- reading the trackers back -----------------------------------------------------------


def _wandb_records(path: Path):
    """The protobuf records of a W&B .wandb file (LevelDB-log framing: 32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks; type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_run(workdir: Path, run_id: str) -> dict:
    """History rows, config and summary of every offline run file of W&B run `run_id`, in
    order, as `wandb sync` makes them one run: a resumed run starts after the last step
    synced before it (W&B drops rows whose step is not past it)."""
    files = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, list((workdir / "wandb").iterdir())
    rows, config, summary = [], {}, {}

    def items(update):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}

    for path in files:
        synced = max((row["_step"] for row in rows), default=-1)
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = items(record.history.item)
                if row["_step"] > synced:
                    rows.append(row)
            elif kind == "run":
                config.update(items(record.run.config.update))
            elif kind == "config":
                config.update(items(record.config.update))
            elif kind == "summary":
                summary.update(items(record.summary.update))
    return {"files": files, "rows": rows, "config": config, "summary": summary}


def _points(rows, prefix):
    """Counter of (key, step) and {(key, step): value} of the split-prefixed keys in rows."""
    seen, values = Counter(), {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix):
                seen[key, row["_step"]] += 1
                values[key, row["_step"]] = value
    return seen, values


def _jsonl_points(workdir: Path, split: str) -> dict:
    return {
        (f"{split}/{k}", r["step"]): v
        for r in read_metrics(workdir / "metrics.jsonl")
        if r["split"] == split
        for k, v in r.items()
        if k not in ("step", "split")
    }


def _mlflow(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("jaxdl")
    return client, client.search_runs([experiment.experiment_id])


def _mlflow_points(client, run_id: str, keys) -> tuple[Counter, dict]:
    seen, values = Counter(), {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            seen[key, metric.step] += 1
            values[key, metric.step] = metric.value
    return seen, values


# ---- the must-show -----------------------------------------------------------------------


def test_one_run_shows_its_val_metrics_and_config_in_mlflow_and_wandb(tmp_path):
    workdir, db = tmp_path / "run", tmp_path / "mlflow.db"
    done = _train(
        tmp_path,
        workdir,
        [
            "--config.num_steps=30",
            "--config.trackers=tensorboard,mlflow,wandb",
            f"--config.mlflow.tracking_uri=sqlite:///{db}",
            "--config.wandb.tags=['digits']",
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    val = _jsonl_points(workdir, "val")
    assert sorted({step for _, step in val}) == [10, 20, 30]
    config = flatten_config(json.loads((workdir / "config.json").read_text()))
    summary = json.loads((workdir / "summary.json").read_text())
    ids = json.loads((workdir / "trackers.json").read_text())

    client, runs = _mlflow(db)
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    seen, values = _mlflow_points(client, run.info.run_id, {k for k, _ in val})
    assert set(seen.values()) == {1} and values == pytest.approx(val, rel=1e-6)
    assert run.data.params == {k: str(v) for k, v in config.items()}
    assert run.data.metrics["summary.test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert run.data.tags["summary.params_sha256"] == summary["params_sha256"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "summary.json", "config.json"} <= artifacts

    wb = _wandb_run(workdir, ids["wandb"]["id"])
    seen, values = _points(wb["rows"], "val/")
    assert set(seen.values()) == {1} and values == pytest.approx(val, rel=1e-6)
    assert {k: wb["config"][k] for k in config} == config
    assert wb["summary"]["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    files = wb["files"][0].parent / "files"
    assert (files / "curves.png").read_bytes() == (workdir / "curves.png").read_bytes()


def test_sigkill_then_resume_continues_each_tracker_run_without_duplicates(tmp_path):
    workdir, db = tmp_path / "run", tmp_path / "mlflow.db"
    args = [
        "--config.checkpoint_every=5",
        "--config.eval_every=5",
        "--config.log_every=5",
        "--config.trackers=mlflow,wandb,jsonl,tensorboard" + (",trackio" if HAS_TRACKIO else ""),
        f"--config.mlflow.tracking_uri=sqlite:///{db}",
    ]
    cmd = train_command(CONFIG, workdir, [*QUICK, *args, "--config.num_steps=400"])
    kill_mid_run(cmd, workdir, after_step=15, env=_env(tmp_path), cwd=tmp_path, timeout=120)
    first = json.loads((workdir / "trackers.json").read_text())

    done = _train(tmp_path, workdir, [*args, "--config.num_steps=40"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stdout
    ids = json.loads((workdir / "trackers.json").read_text())
    assert ids["wandb"]["id"] == first["wandb"]["id"]
    assert ids["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    val, train = _jsonl_points(workdir, "val"), _jsonl_points(workdir, "train")
    assert sorted({s for _, s in val}) == list(range(5, 41, 5))
    # the throughput is the one figure a resumed run measures anew
    train = {k: v for k, v in train.items() if not k[0].endswith("examples_per_s")}

    client, runs = _mlflow(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    seen, values = _mlflow_points(client, runs[0].info.run_id, {k for k, _ in {**val, **train}})
    assert set(seen.values()) == {1}, [k for k, n in seen.items() if n > 1]
    assert values == pytest.approx({**val, **train}, rel=1e-6)

    wb = _wandb_run(workdir, ids["wandb"]["id"])
    assert len(wb["files"]) == 2  # the killed run's file and the resumed run's
    for prefix, expected in (("val/", val), ("train/", train)):
        seen, values = _points(wb["rows"], prefix)
        values = {k: v for k, v in values.items() if k in expected}
        assert set(seen.values()) == {1}, [k for k, n in seen.items() if n > 1]
        assert values == pytest.approx(expected, rel=1e-6)

    if HAS_TRACKIO:  # its local store: one run, every point once
        store = sqlite3.connect(tmp_path / "trackio" / "jaxdl.db")
        rows = store.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
        keys = {k for k, _ in {**val, **train}}
        assert {name for name, _, _ in rows} == {"run"}
        points = [(k, s, v) for _, s, m in rows for k, v in json.loads(m).items() if k in keys]
        assert Counter((k, s) for k, s, _ in points) == Counter(set({**val, **train}))
        assert {(k, s): v for k, s, v in points} == pytest.approx({**val, **train}, rel=1e-6)

    events = [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]
    logged = Counter(
        (k, e["step"]) for e in events if e["event"] == "scalars" for k in e["scalars"]
    )
    assert set(logged.values()) == {1} and set(val) <= set(logged)
    assert [e["event"] for e in events].count("summary") == 1


# ---- names, packages and bad input -------------------------------------------------------


def test_names_parse_and_an_unknown_one_names_the_accepted():
    assert parse_names(" tensorboard, wandb,,wandb ") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="unknown tracker 'foo'.*tensorboard, wandb, mlflow"):
        parse_names("tensorboard,foo")


def test_flatten_config_gives_dotted_keys_and_json_for_lists():
    flat = flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None, "g": {}})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": "[1, 2]", "f": "null", "g": "{}"}


def test_jsonl_resumes_from_its_own_file_past_a_kill_window(tmp_path):
    """The kill window, made by hand: a run wrote val at step 20 and half a line, then died
    before trackers.json (marks at 15) was updated. The resumed run sends neither step 15
    (history) nor 20 again, drops the cut line and appends whole lines after it."""
    events = tmp_path / "events.jsonl"
    lines = [{"event": "scalars", "step": s, "scalars": {"val/loss": 1 / s}} for s in (15, 20)]
    events.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "scal')
    marks = {"jsonl": {"sent": {"val": 15}}}
    (tmp_path / "trackers.json").write_text(json.dumps(marks))
    history = [{"step": 15, "split": "val", "loss": 1 / 15}]
    trackers = TrackerSet(tmp_path, {"trackers": "jsonl"}, 15, history)
    for step in (20, 25):
        trackers.log(step, "val", {"loss": 1 / step})
    trackers.close()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "scalars"]
    assert steps == [15, 20, 25]
    assert json.loads((tmp_path / "trackers.json").read_text())["jsonl"]["sent"] == {"val": 25}


def test_jsonl_resume_refuses_a_file_with_a_line_that_is_not_json(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"event": "params"}\nnot json\n')
    with pytest.raises(UserError, match=r"^config\.jsonl\.path: line 2 of .* is not JSON"):
        TrackerSet(tmp_path, {"trackers": "jsonl"}, 15)


def test_a_missing_package_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec reports for an absent one
    with pytest.raises(UserError) as err:
        TrackerSet(tmp_path, {"trackers": "tensorboard,wandb"}, 0)
    assert str(err.value).startswith('trackers: "wandb" needs the wandb package, found it')
    assert 'pip install "jaxdl[trackers]"' in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tb").exists()  # refused before any tracker opened


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.trackers=tensorboard,foo", "config.trackers: unknown tracker 'foo'"),
        (
            "--config.trackers=mlflow --config.mlflow.tracking_uri=sqlite:////proc/no/m.db",
            "config.mlflow.tracking_uri: cannot open the MLflow store at sqlite:////proc/no",
        ),
        ("--config.wandb.mode=sometimes", "config.wandb.mode: expected online, offline"),
    ],
)
def test_bad_tracker_settings_are_one_line_exit_2(tmp_path, override, expected):
    done = _train(tmp_path, tmp_path / "run", ["--config.num_steps=2", *override.split()])
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("jaxdl: error")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_wandb_dir_from_the_environment_is_honoured(tmp_path):
    env = {**_env(tmp_path), "WANDB_DIR": str(tmp_path / "elsewhere")}
    cmd = train_command(CONFIG, tmp_path / "run", [*QUICK, "--config.num_steps=10"])
    cmd += ["--config.trackers=wandb", "--config.wandb.name=custom"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "run" / "wandb").exists()
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]["id"]
    (path,) = (tmp_path / "elsewhere" / "wandb").glob(f"offline-run-*-{run_id}/*.wandb")
    names = [r.run.display_name for r in _wandb_records(path) if r.HasField("run")]
    assert names and set(names) == {"custom"}


def test_default_config_logs_to_tensorboard_only(tmp_path):
    done = _train(tmp_path, tmp_path / "run", ["--config.num_steps=10"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()).keys() == {"tensorboard"}
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "mlruns").exists()
    assert os.listdir(tmp_path) == ["run"]


def test_each_sweep_trial_is_its_own_tracker_run(tmp_path):
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "jaxdl.cli", "sweep", "--config", CONFIG]
    cmd += ["--workdir", str(tmp_path / "sweep"), "--param", "optimizer.learning_rate=[1e-3,3e-3]"]
    cmd += [*QUICK, "--config.num_steps=20", "--config.trackers=jsonl,mlflow"]
    cmd += [f"--config.mlflow.tracking_uri=sqlite:///{db}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _mlflow(db)
    assert sorted(r.info.run_name for r in runs) == ["000", "001"]
    for run in runs:
        trial = tmp_path / "sweep" / "trials" / run.info.run_name
        val = _jsonl_points(trial, "val")
        assert sorted({s for _, s in val}) == [10, 20]
        seen, values = _mlflow_points(client, run.info.run_id, {k for k, _ in val})
        assert set(seen.values()) == {1} and values == pytest.approx(val, rel=1e-6)
        lr = json.loads((trial / "config.json").read_text())["optimizer"]["learning_rate"]
        assert run.data.params["optimizer.learning_rate"] == str(lr)
        assert run.info.status == "FINISHED" and (trial / "events.jsonl").exists()
