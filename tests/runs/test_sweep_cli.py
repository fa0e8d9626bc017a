"""`jaxdl sweep` as a user runs it: a real subprocess, bad input as one line and exit 2,
resume of an unfinished sweep, early stopping per member, search spaces."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.runs.spaces import make_trials, parse_param
from jaxdl.runs.sweep import run_sweep
from jaxdl.training.guards import workdir_lock
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=20",
    "--config.log_every=10",
    "--config.eval_every=10",
]


def jaxdl(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *args], capture_output=True, text=True, env=env
    )


def sweep_args(workdir, *params):
    return [
        "sweep",
        "--config",
        "experiments/digits_mlp.py",
        "--workdir",
        str(workdir),
        *QUICK,
        *(f"--param={p}" for p in params),
    ]


def test_cli_sweep_writes_the_contract(tmp_path):
    done = jaxdl(*sweep_args(tmp_path, "optimizer.learning_rate=[1e-3,3e-3]"), "--parallel", "2")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [t["params"] for t in report["trials"]] == [
        {"optimizer.learning_rate": 1e-3},
        {"optimizer.learning_rate": 3e-3},
    ]
    assert "rank" in done.stdout and (tmp_path / "sweep.png").is_file()


@pytest.mark.parametrize(
    "param, extra, words",
    [
        ("optimizer.learnig_rate=[1e-3]", [], ["--param optimizer.learnig_rate", "unknown key"]),
        ("optimizer.learning_rate=logunifrm(1e-4,1e-2)", [], ["--param", "logunifrm"]),
        ("optimizer.learning_rate=loguniform(1e-2)", [], ["--param", "low < high"]),
        ("optimizer.learning_rate=[1e-3", [], ["--param", "does not parse"]),
        ("data.batch_size=int(16,64)", [], ["data.batch_size", "--parallel 8"]),
        ("data.batch_size=['a']", [], ["data.batch_size", "expected int"]),
        ("federated.clients=[2,4]", [], ["--param federated.clients:", "centrally"]),
        (
            "optimizer.learning_rate=[1e-3]",
            ["--config.federated.clients=2"],
            ["config.federated.clients: a sweep trains each member centrally", "jaxdl train"],
        ),
        ("seed=[0,1]", ["--trials", "0"], ["--trials: expected >= 1, found 0"]),
        (
            "seed=[0,1]",
            ["--trials", "5"],
            ["--trials: expected at most 2 (the grid", "found 5", "--strategy random"],
        ),
        (
            "seed=[0,1]",
            ["--param=seed=[2]"],
            ["--param seed: expected each key once", "seed=[0,1] and seed=[2]"],
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, param, extra, words):
    done = jaxdl(*sweep_args(tmp_path / "w", param), *extra)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdl: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp_path / "w").exists()  # nothing half-written


def test_a_second_sweep_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
    cfg = config_lib.load_config("experiments/digits_mlp.py", QUICK)
    said = []
    with workdir_lock(tmp_path, "sweep"):  # as a first `jaxdl sweep` holds it
        with pytest.raises(UserError) as err:
            run_sweep(cfg, tmp_path, ["seed=[0,1]"], trials=1, echo=said.append)
    assert str(err.value) == (
        f"--workdir: {tmp_path} is in use by another jaxdl sweep (pid {os.getpid()} on host "
        f"{os.uname().nodename}). Fix: wait for that run to finish or stop it, or use another "
        "--workdir."
    )
    assert said == ["sweep: the first 1 of the grid's 2 trials (--trials 1)"]
    assert not (tmp_path / "trials").exists() and not (tmp_path / "sweep_spec.json").exists()


def test_spaces_parse_and_sample():
    assert parse_param("seed=[1,2,3]").values == (1, 2, 3)
    lr = parse_param("optimizer.learning_rate=loguniform(1e-4,1e-1)")
    wd = parse_param("optimizer.weight_decay=uniform(0,0.1)")
    hidden = parse_param("model.hidden=choice((64,),(128,64))")
    draws = make_trials([lr, wd, hidden], "random", 200, seed=0)
    assert len(draws) == 200 and draws == make_trials([lr, wd, hidden], "random", 200, seed=0)
    lrs = np.array([d["optimizer.learning_rate"] for d in draws])
    assert lrs.min() >= 1e-4 and lrs.max() < 1e-1
    assert 0.3 < np.mean(lrs < 10**-2.5) < 0.7  # log-uniform: half the draws below the log midpoint
    assert {d["model.hidden"] for d in draws} == {(64,), (128, 64)}
    steps = make_trials([parse_param("num_steps=int(1,3)")], "random", 50, seed=1)
    assert {d["num_steps"] for d in steps} == {1, 2, 3}
    grid = make_trials([parse_param("a=[1,2]"), parse_param("b=choice('x','y')")], "grid", None, 0)
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(UserError, match="continuous"):
        make_trials([lr], "grid", None, 0)


def quick_cfg(*extra):
    return config_lib.load_config("experiments/digits_mlp.py", [*QUICK, *extra])


def test_resume_of_an_unfinished_sweep_is_exact(tmp_path):
    params = ["optimizer.learning_rate=[1e-3,3e-3]", "seed=[5,6]"]
    quiet = lambda s: None
    done = run_sweep(quick_cfg(), tmp_path / "done", params, parallel=4, echo=quiet)
    shutil.copytree(tmp_path / "done", tmp_path / "cut")
    # As if killed after the step-10 checkpoints: no step 20, no outcome files.
    for member in sorted((tmp_path / "cut" / "trials").iterdir()):
        shutil.rmtree(member / "checkpoints" / "20")
        (member / "trial.json").unlink()
        (member / "summary.json").unlink()
    resumed = run_sweep(quick_cfg(), tmp_path / "cut", params, parallel=4, echo=quiet)
    for a, b in zip(done["trials"], resumed["trials"], strict=True):
        assert a["best"] == b["best"] and a["params"] == b["params"]
        sha = [
            json.loads(open(f"{t['workdir']}/summary.json").read())["params_sha256"] for t in (a, b)
        ]
        assert sha[0] == sha[1]
        assert [r["step"] for r in read_metrics(f"{b['workdir']}/metrics.jsonl")] == [
            10,
            10,
            20,
            20,
            20,
        ]  # train, val, train, val, test: nothing logged twice
    with pytest.raises(UserError, match="holds another sweep"):
        run_sweep(quick_cfg(), tmp_path / "cut", params[:1], parallel=4, echo=quiet)


def test_early_stopping_is_per_member(tmp_path):
    stop = [
        "--config.best_metric=val_loss",
        "--config.early_stopping.patience=1",
        "--config.early_stopping.min_delta=1e-3",
        "--config.eval_every=5",
    ]
    params = ["optimizer.learning_rate=[1e-7,1e-3]"]
    report = run_sweep(quick_cfg(*stop), tmp_path / "s", params, parallel=2, echo=lambda s: None)
    slow, fast = (json.loads(open(f"{t['workdir']}/summary.json").read()) for t in report["trials"])
    assert slow["stopped_early"] and slow["steps"] == 10
    assert fast["steps"] > 10
    train(quick_cfg(*stop, "--config.optimizer.learning_rate=1e-7"), tmp_path / "a", progress=False)
    want = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["split"] == "test"][-1]
    got = [
        r
        for r in read_metrics(f"{report['trials'][0]['workdir']}/metrics.jsonl")
        if r["split"] == "test"
    ][-1]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)  # the state it stopped with


def test_two_processes_share_one_optuna_study(tmp_path):
    pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/sweep.db"
    args = [
        *sweep_args(tmp_path / "sweep", "optimizer.learning_rate=loguniform(1e-4,1e-2)"),
        "--strategy",
        "tpe",
        "--storage",
        storage,
        "--trials",
        "6",
        "--parallel",
        "2",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxdl.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    per_process = [
        [
            int(n)
            for line in out.splitlines()
            if line.startswith("sweep: training trials")
            for n in line.split("[")[1].split("]")[0].split(",")
        ]
        for out, _ in outs
    ]
    numbers = sorted(n for mine in per_process for n in mine)
    assert numbers == list(range(6))  # every trial once, none twice
    assert all(per_process), per_process  # both processes took part
    import optuna

    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    # Both processes may ask for the last trial at once: the later one's is marked surplus
    # and failed without training.
    trained = [t for t in study.trials if not t.user_attrs.get("jaxdl_surplus")]
    assert [t.number for t in trained] == list(range(6))
    assert all(t.state.name == "FAIL" for t in study.trials if t not in trained)
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(report["trials"]) == 6


@pytest.mark.parametrize(
    "url, words",
    [
        ("foo://bar", ["--storage: 'foo://bar' is not a database URL", "sqlite:///DIR/sweep.db"]),
        ("sqlite:////nonexistent-dir/x.db", ["--storage: could not open", "unable to open"]),
    ],
)
def test_a_bad_storage_url_is_one_line(tmp_path, url, words):
    done = jaxdl(*sweep_args(tmp_path / "w", "seed=[0,1]"), "--storage", url)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdl: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
