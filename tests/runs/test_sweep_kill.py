"""`jaxdl sweep` killed with SIGKILL in the middle of a group, then the same command again:
every trial finishes once, the killed members continue from their checkpoints (grid: with
the figures of an uninterrupted sweep; Optuna: the trials left RUNNING are requeued)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from jaxdl import config as config_lib
from jaxdl.runs.sweep import run_sweep
from jaxdl.training.runlog import read_metrics

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=40",
    "--config.log_every=10",
    "--config.eval_every=10",
    "--config.data.train_transforms=[]",
]


def sweep_cmd(workdir, *extra):
    return [
        sys.executable, "-m", "jaxdl.cli", "sweep", "--config", "experiments/digits_mlp.py",
        "--workdir", str(workdir), *QUICK, *extra,
    ]  # fmt: skip


def kill_after_checkpoint(cmd, step_dir):
    """Start ``cmd``, SIGKILL it as soon as ``step_dir`` (a member's checkpoint) exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not step_dir.is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out


def rows_once(member):
    """Every (step, split) row of the member's metrics.jsonl, each logged exactly once."""
    rows = Counter((r["step"], r["split"]) for r in read_metrics(member / "metrics.jsonl"))
    assert max(rows.values()) == 1, rows
    return sorted(rows)


def test_grid_sweep_killed_mid_group_resumes_to_the_uninterrupted_figures(tmp_path):
    grid = ["--param=optimizer.learning_rate=[1e-3,3e-3]", "--param=seed=[0,1]"]
    straight = subprocess.run(
        sweep_cmd(tmp_path / "straight", *grid), capture_output=True, text=True, env=ENV
    )
    assert straight.returncode == 0, straight.stderr
    cut = tmp_path / "cut"
    kill_after_checkpoint(sweep_cmd(cut, *grid), cut / "trials" / "000" / "checkpoints" / "20")
    rerun = subprocess.run(sweep_cmd(cut, *grid), capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr
    a, b = (json.loads((w / "sweep.json").read_text()) for w in (tmp_path / "straight", cut))
    assert len(b["trials"]) == 4
    for x, y in zip(a["trials"], b["trials"], strict=True):
        assert (x["params"], x["best"], x["state"]) == (y["params"], y["best"], y["state"])
        sx, sy = (json.loads(open(f"{t['workdir']}/summary.json").read()) for t in (x, y))
        assert sx["params_sha256"] == sy["params_sha256"] and sx["test_loss"] == sy["test_loss"]
        assert rows_once(tmp_path / "cut" / "trials" / os.path.basename(y["workdir"])) == sorted(
            [(s, "train") for s in (10, 20, 30, 40)]
            + [(s, "val") for s in (10, 20, 30, 40)]
            + [(40, "test")]
        )


GRID = [1e-3, 2e-3, 3e-3, 4e-3]


@pytest.mark.parametrize(
    "strategy, space",
    [("random", "loguniform(1e-4,1e-2)"), ("grid", "[" + ",".join(map(str, GRID)) + "]")],
)
def test_optuna_sweep_killed_mid_group_requeues_and_resumes_its_running_trials(
    tmp_path, strategy, space
):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/sweep.db"
    workdir = tmp_path / "sweep"
    cmd = sweep_cmd(
        workdir,
        f"--param=optimizer.learning_rate={space}",
        "--strategy", strategy, "--storage", storage, "--trials", "4", "--parallel", "2",
    )  # fmt: skip
    first = kill_after_checkpoint(cmd, workdir / "trials" / "000" / "checkpoints" / "20")
    assert "sweep: training trials [0, 1] together" in first
    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]  # left by the dead

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr
    lines = [x for x in rerun.stdout.splitlines() if x.startswith("sweep: training trials")]
    groups = {tuple(json.loads(re.search(r"\[[\d, ]*\]", x)[0])): x for x in lines}
    # Trials 0 and 1 continue from their checkpoints (together, or apart when the kill fell
    # between their saves: each from its own last step); then two new trials (numbered
    # after the requeued copies of 0 and 1, which took numbers 2 and 3).
    resume_step = {
        n: int(x.split("resumed from step ")[1].rstrip(")"))
        for group, x in groups.items()
        if "resumed from step" in x
        for n in group
    }
    assert sorted(resume_step) == [0, 1] and resume_step[0] >= 20, rerun.stdout
    fresh = sorted(n for group, x in groups.items() if "resumed" not in x for n in group)
    assert fresh == [4, 5], rerun.stdout

    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    by_state = Counter(t.state.name for t in study.trials)
    # The two killed trials failed and were requeued as two new ones; four finished.
    assert by_state["FAIL"] == 2 and by_state["RUNNING"] == by_state["WAITING"] == 0, by_state
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(t.user_attrs.get("jaxdl_trial", t.number) for t in finished) == [0, 1, 4, 5]
    report = json.loads((workdir / "sweep.json").read_text())
    names = [os.path.basename(t["workdir"]) for t in report["trials"]]
    assert names == ["000", "001", "004", "005"]
    if strategy == "grid":  # the requeued copies kept their grid points: all four ran
        lrs = sorted(t["params"]["optimizer.learning_rate"] for t in report["trials"])
        assert lrs == GRID
    for name in names:
        steps = [s for s, split in rows_once(workdir / "trials" / name) if split == "val"]
        assert steps == list(range(10, steps[-1] + 1, 10)), steps  # none missing, none twice


def test_a_member_that_stopped_early_before_the_kill_is_recorded_at_resume(tmp_path):
    # The slow member stops early at step 10; the process is "killed" at step 15, before
    # any outcome was written. The rerun resumes both from step 10: the slow one is finished
    # there (its summary from the restored state), the fast one trains on. Both records
    # must equal the uninterrupted sweep's.
    cfg = config_lib.load_config(
        "experiments/digits_mlp.py",
        [
            *QUICK[:2],
            "--config.num_steps=20",
            "--config.log_every=5",
            "--config.eval_every=5",
            "--config.best_metric=val_loss",
            "--config.early_stopping.patience=1",
            "--config.early_stopping.min_delta=1e-3",
        ],
    )
    params = ["optimizer.learning_rate=[1e-7,1e-3]"]
    quiet = lambda s: None  # noqa: E731
    done = run_sweep(cfg, tmp_path / "done", params, parallel=2, echo=quiet)
    shutil.copytree(tmp_path / "done", tmp_path / "cut")
    slow, fast = (tmp_path / "cut" / "trials" / n for n in ("000", "001"))
    assert sorted(int(p.name) for p in (slow / "checkpoints").iterdir()) == [5, 10]
    shutil.rmtree(fast / "checkpoints" / "20")
    for member in (slow, fast):
        (member / "trial.json").unlink()
        (member / "summary.json").unlink()
    resumed = run_sweep(cfg, tmp_path / "cut", params, parallel=2, echo=quiet)
    for a, b in zip(done["trials"], resumed["trials"], strict=True):
        assert (a["params"], a["best"], a["state"]) == (b["params"], b["best"], b["state"])
        sa, sb = (json.loads(open(f"{t['workdir']}/summary.json").read()) for t in (a, b))
        assert sa == {**sb, "wall_s": sa["wall_s"]}
    assert json.loads((slow / "summary.json").read_text())["steps"] == 10
