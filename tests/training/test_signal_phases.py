"""A signal in every phase of a run, sent by the real process to itself at a chosen moment
(final test evaluation, val evaluation, a checkpoint save, between two tasks or two folds,
inside a sweep group, an Optuna sweep, between federated rounds): exit 128 + signal with a
line naming it, and the rerun finishes (with the figures of an uninterrupted run)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from jaxdl.training.runlog import read_metrics

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_signal_phases")

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=40",
    "--config.log_every=10",
    "--config.eval_every=20",
    "--config.data.train_transforms=[]",
]

# The patch runs in the child before `jaxdl.cli.main`; SELF_SIGNAL() is os.kill of itself.
DRIVER = """
import os, signal, sys
from jaxdl import cli

def SELF_SIGNAL():
    os.kill(os.getpid(), signal.SIG{sig})

{patch}
sys.exit(cli.main(sys.argv[1:]))
"""

# In the evaluation of SPLIT (after step AT, or the first one) at its second batch.
EVAL_PATCH = """
from jaxdl.training import trainer
real_batches = trainer.eval_batches
seen = []

def eval_batches(data, split, *args, **kwargs):
    seen.append(split)
    for i, batch in enumerate(real_batches(data, split, *args, **kwargs)):
        if split == "{split}" and seen.count(split) == {nth} and i == 1:
            SELF_SIGNAL()
        yield batch

trainer.eval_batches = eval_batches
"""

# While step AT's checkpoint is being saved (the first such save: a sweep saves one per
# member, and a second signal would exit at once).
SAVE_PATCH = """
from jaxdl.checkpoint import manager
real_save = manager.Checkpointer.save
sent = []

def save(self, step, *args, **kwargs):
    if step == {at} and not sent:
        sent.append(step)
        SELF_SIGNAL()
    return real_save(self, step, *args, **kwargs)

manager.Checkpointer.save = save
"""


def run(args, patch=None, sig="TERM"):
    code = DRIVER.format(sig=sig, patch=textwrap.dedent(patch or ""))
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV
    )


def train_args(workdir, *extra):
    return [
        "train", "--config", "experiments/digits_mlp.py", "--workdir", str(workdir),
        "--no-progress", *QUICK, *extra,
    ]  # fmt: skip


def summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def same_figures(a, b):
    keys = ("test_loss", "test_accuracy", "params_sha256", "steps")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    done = run(train_args(workdir))
    assert done.returncode == 0, done.stderr
    return summary(workdir)


def stopped_lines(done, sig="SIGTERM"):
    assert done.returncode == 128 + getattr(signal, sig), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"jaxdl: {sig} received"), done.stderr
    assert lines[1].startswith(f"jaxdl: stopped by {sig} "), done.stderr
    return lines[1]


@pytest.mark.parametrize("sig", ["TERM", "INT"])  # a scheduler's stop, Ctrl-C
def test_signal_in_the_final_test_evaluation_exits_and_the_rerun_only_evaluates(
    tmp_path, straight, sig
):
    workdir = tmp_path / "run"
    done = run(train_args(workdir), EVAL_PATCH.format(split="test", nth=1), sig=sig)
    line = stopped_lines(done, f"SIG{sig}")
    assert line.startswith(f"jaxdl: stopped by SIG{sig} during the test evaluation after step 40")
    assert "Run the same command to finish: it only evaluates." in line
    assert not (workdir / "summary.json").exists()
    assert not [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]

    rerun = run(train_args(workdir))
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from step 40" in rerun.stdout
    same_figures(summary(workdir), straight)
    rows = [(r["step"], r["split"]) for r in read_metrics(workdir / "metrics.jsonl")]
    assert rows.count((40, "test")) == 1 and rows.count((40, "val")) == 1


def test_signal_in_a_val_evaluation_finishes_it_saves_and_resumes_exactly(tmp_path, straight):
    workdir = tmp_path / "run"
    done = run(train_args(workdir), EVAL_PATCH.format(split="val", nth=1))
    line = stopped_lines(done)
    assert line.startswith("jaxdl: stopped by SIGTERM at step 20; checkpoint saved in ")
    rerun = run(train_args(workdir))
    assert rerun.returncode == 0 and "resumed from step 20" in rerun.stdout, rerun.stderr
    same_figures(summary(workdir), straight)


def test_signal_during_a_checkpoint_save_keeps_that_save(tmp_path, straight):
    workdir = tmp_path / "run"
    done = run(train_args(workdir, "--config.checkpoint_every=10"), SAVE_PATCH.format(at=30))
    line = stopped_lines(done)
    assert line.startswith("jaxdl: stopped by SIGTERM at step 30; checkpoint saved in ")
    assert (workdir / "checkpoints" / "30").is_dir()
    rerun = run(train_args(workdir, "--config.checkpoint_every=10"))
    assert rerun.returncode == 0 and "resumed from step 30" in rerun.stdout, rerun.stderr
    same_figures(summary(workdir), straight)


# After task a's train() returned, before task b starts.
TASK_PATCH = """
from jaxdl.training import multitask
real_run_task = multitask._run_task

def run_task(name, *args):
    row = real_run_task(name, *args)
    if name == "a":
        SELF_SIGNAL()
    return row

multitask._run_task = run_task
"""


def test_signal_between_two_tasks_stops_before_the_next(tmp_path):
    tasks = "--config.tasks=[{'name': 'a'}, {'name': 'b', 'seed': 1}]"
    workdir = tmp_path / "tasks"
    done = run(train_args(workdir, tasks), TASK_PATCH)
    line = stopped_lines(done)  # not the default action's silent death
    assert line == "jaxdl: stopped by SIGTERM before task b. Run the same command to resume."
    assert (workdir / "tasks" / "a" / "summary.json").exists()
    assert not (workdir / "tasks" / "b").exists()
    rerun = run(train_args(workdir, tasks))
    assert rerun.returncode == 0, rerun.stderr
    rows = json.loads((workdir / "summary.json").read_text())["tasks"]
    assert [r["task"] for r in rows] == ["a", "b"] and [r["steps"] for r in rows] == [40, 40]


# After fold 1's train() returned, before fold 2 starts.
FOLD_PATCH = """
from jaxdl.training import crossval
real_fold = crossval._fold

def fold(cfg, workdir, i, *args):
    row = real_fold(cfg, workdir, i, *args)
    if i == 0:
        SELF_SIGNAL()
    return row

crossval._fold = fold
"""


def test_signal_between_two_folds_stops_before_the_next(tmp_path):
    workdir = tmp_path / "cv"
    done = run(train_args(workdir, "--folds", "2"), FOLD_PATCH)
    line = stopped_lines(done)
    assert line == "jaxdl: stopped by SIGTERM before fold 2/2. Run the same command to resume."
    assert not (workdir / "fold_1").exists()
    rerun = run(train_args(workdir, "--folds", "2"))
    assert rerun.returncode == 0, rerun.stderr
    assert [f["fold"] for f in json.loads((workdir / "summary.json").read_text())["per_fold"]] == [
        0,
        1,
    ]


def sweep_args(workdir):
    return [
        "sweep", "--config", "experiments/digits_mlp.py", "--workdir", str(workdir), *QUICK,
        "--param=optimizer.learning_rate=[1e-3,3e-3]", "--parallel", "2",
    ]  # fmt: skip


def test_signal_in_a_sweep_group_saves_every_member_and_the_rerun_finishes_it(tmp_path):
    straight = run(sweep_args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "cut"
    done = run(sweep_args(workdir), SAVE_PATCH.format(at=20))
    line = stopped_lines(done)
    assert line == (
        "jaxdl: stopped by SIGTERM at step 20; trials ['000', '001'] saved their checkpoints. "
        "Run the same command to resume."
    )
    for member in ("000", "001"):
        assert (workdir / "trials" / member / "checkpoints" / "20").is_dir()
        assert not (workdir / "trials" / member / "trial.json").exists()
    rerun = run(sweep_args(workdir))
    assert rerun.returncode == 0, rerun.stderr
    a, b = (json.loads((w / "sweep.json").read_text()) for w in (tmp_path / "straight", workdir))
    assert [(t["params"], t["best"], t["state"]) for t in a["trials"]] == [
        (t["params"], t["best"], t["state"]) for t in b["trials"]
    ]
    for member in ("000", "001"):
        x, y = (summary(w / "trials" / member) for w in (tmp_path / "straight", workdir))
        assert x["params_sha256"] == y["params_sha256"] and x["test_loss"] == y["test_loss"]


def test_signal_in_an_optuna_sweep_requeues_the_unfinished_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/sweep.db"
    args = [
        *sweep_args(tmp_path / "sweep")[:-3],
        "--param=optimizer.learning_rate=loguniform(1e-4,1e-2)",
        "--strategy", "random", "--storage", storage, "--trials", "2", "--parallel", "2",
    ]  # fmt: skip
    done = run(args, SAVE_PATCH.format(at=20))
    assert stopped_lines(done).startswith("jaxdl: stopped by SIGTERM at step 20; trials ")
    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    # Failed by the stopping process itself, and queued again to continue their workdirs.
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert [t.user_attrs.get("jaxdl_trial") for t in study.trials[2:]] == [0, 1]
    rerun = run(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "sweep: training trials [0, 1] together (resumed from step 20)" in rerun.stdout
    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    assert [t.state.name for t in study.trials][:2] == ["FAIL", "FAIL"]
    assert {t.state.name for t in study.trials[2:]} <= {"COMPLETE", "PRUNED"}


def test_signal_in_a_federated_run_stops_between_rounds(tmp_path):
    fed = [
        "--config.federated.clients=4",
        "--config.federated.rounds=6",
        "--config.federated.local_steps=5",
    ]
    workdir = tmp_path / "fed"
    done = run(train_args(workdir, *fed), SAVE_PATCH.format(at=15))
    line = stopped_lines(done)
    assert line == (
        "jaxdl: stopped by SIGTERM before round 4; rounds 1..3 are saved. "
        "Run the same command to resume."
    )
    rerun = run(train_args(workdir, *fed))
    assert rerun.returncode == 0 and "resumed from round 3" in rerun.stdout, rerun.stderr
    assert json.loads((workdir / "summary.json").read_text())["rounds"] == 6


# After the demo's first run returned (each run cut to 20 steps), before the second starts.
DEMO_PATCH = """
from jaxdl.training import trainer
real_train = trainer.train

def train(cfg, workdir, **kwargs):
    cfg.num_epochs, cfg.num_steps = 0, 20
    summary = real_train(cfg, workdir, **kwargs)
    SELF_SIGNAL()
    return summary

trainer.train = train
"""


def test_signal_between_two_demo_runs_stops_before_the_next(tmp_path):
    done = run(["demo", "--task", "digits", "--workdir", str(tmp_path)], DEMO_PATCH)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "jaxdl: stopped by SIGTERM before the demo's digits_cnn run. Run `jaxdl demo` again "
        "to start it over."
    )
    assert (tmp_path / "digits_mlp" / "summary.json").exists()
    assert not (tmp_path / "digits_cnn").exists()
