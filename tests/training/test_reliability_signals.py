"""Real `jaxdl train` processes: SIGTERM saves and exits 143, resume is bitwise; a second
signal exits at once; a second run on a busy workdir is refused naming the holder."""

import json
import os
import signal
import subprocess
import sys
import time

from jaxdl.training.runlog import read_metrics

STEPS = 300


def cmd(workdir, *extra):
    return [
        sys.executable, "-m", "jaxdl.cli", "train", "--config", "experiments/digits_mlp.py",
        "--workdir", str(workdir), "--no-progress", "--config.num_epochs=0",
        f"--config.num_steps={STEPS}", "--config.log_every=5", "--config.eval_every=100",
        "--config.data.train_transforms=[]", *extra,
    ]  # fmt: skip


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def start_and_wait_for_a_logged_step(workdir, *extra):
    proc = subprocess.Popen(
        cmd(workdir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 120
    while not read_metrics(workdir / "metrics.jsonl") and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    return proc


def test_sigterm_checkpoints_exits_143_and_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(cmd(straight), check=True, capture_output=True, env=ENV)

    run = tmp_path / "run"
    proc = start_and_wait_for_a_logged_step(run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()  # nothing but our two lines: no Orbax noise
    assert len(lines) == 2 and lines[0].startswith("jaxdl: SIGTERM received"), err
    last = lines[1]
    assert last.startswith("jaxdl: stopped by SIGTERM at step ")
    step = int(last.split("at step ")[1].split(";")[0])
    assert 0 < step < STEPS and (run / "checkpoints" / str(step)).is_dir(), err
    assert not (run / "summary.json").exists()

    resumed = subprocess.run(cmd(run), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step}" in resumed.stdout
    a, b = (json.loads((w / "summary.json").read_text()) for w in (straight, run))
    assert b["params_sha256"] == a["params_sha256"]


def test_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
    proc = start_and_wait_for_a_logged_step(tmp_path, "--config.num_steps=1000000")
    second = subprocess.run(cmd(tmp_path), capture_output=True, text=True, env=ENV)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the same graceful stop
    _, err = proc.communicate(timeout=60)
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"jaxdl: error: --workdir: {tmp_path} is in use by another jaxdl train (pid {proc.pid} "
        f"on host {os.uname().nodename}). Fix: wait for that run to finish or stop it, or use "
        "another --workdir."
    ]
    assert proc.returncode == 128 + signal.SIGINT, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("jaxdl: stopped by SIGINT at step "), err
    # The lock went with the process: the workdir takes the next run.
    done = subprocess.run(cmd(tmp_path, "--config.num_steps=20"), capture_output=True, env=ENV)
    assert done.returncode == 0, done.stderr


def test_a_second_signal_exits_at_once(tmp_path):
    proc = subprocess.Popen(
        cmd(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 60
    while not (tmp_path / ".lock").exists():  # train() has started: handlers are in place
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().startswith("jaxdl: SIGINT received: finishing the current")
    proc.send_signal(signal.SIGINT)  # while it builds, compiles or saves: no waiting for that
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines() == ["jaxdl: second SIGINT: exiting now"], err


def test_an_error_while_a_save_is_in_flight_is_one_line(tmp_path):
    # Saving every step, the loss diverges at step 3 while step 2's async save is running.
    done = subprocess.run(
        cmd(tmp_path, "--config.checkpoint_every=1", "--config.log_every=1")
        + ["--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1000"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "found NaN/Inf at step" in lines[0], done.stderr
    from jaxdl.checkpoint.read import load_params

    assert load_params(tmp_path)["hidden_0"]["kernel"].shape == (64, 512)  # the saves are whole
