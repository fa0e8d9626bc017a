"""FedAvg: client shards, equality with centralized training for one client, CLI errors,
exact resume of a killed run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.runs.federated import client_shards, run_federated
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train


def test_iid_shards_cover_the_split_once():
    labels = np.arange(103) % 10
    shards = client_shards(labels, 10, 0.0, 8, seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(103))
    assert sorted(len(s) for s in shards) == [10] * 7 + [11] * 3


def test_dirichlet_shards_skew_labels_with_small_alpha():
    labels = np.repeat(np.arange(10), 150)

    def top_class_share(alpha):
        shards = client_shards(labels, 10, alpha, 8, seed=1)
        assert sorted(np.concatenate(shards).tolist()) == list(range(1500))
        assert min(len(s) for s in shards) >= 8
        return np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shards])

    assert top_class_share(0.1) > 0.5  # most of a client's examples are one class
    assert top_class_share(100.0) < 0.2  # close to the uniform 0.1


def test_more_clients_than_examples_is_refused():
    with pytest.raises(UserError, match="federated.clients: expected at most 20"):
        client_shards(np.zeros(20, int), 21, 0.0, 1, seed=0)


def test_one_client_is_centralized_training(tmp_path):
    # One client holding the whole split, SGD (no optimizer state to reset between rounds),
    # no dropout: FedAvg's rounds are plain training, batch for batch.
    base = [
        "--config.optimizer.name=sgd",
        "--config.optimizer.learning_rate=0.05",
        "--config.model.dropout_rate=0.0",
        "--config.num_epochs=0",
        "--config.num_steps=30",
        "--config.log_every=10",
        "--config.eval_every=30",
    ]
    fed = [
        "--config.federated.clients=1",
        "--config.federated.rounds=3",
        "--config.federated.local_steps=10",
    ]
    got = run_federated(
        config_lib.load_config("experiments/digits_mlp.py", base + fed),
        tmp_path / "fed",
        echo=lambda s: None,
    )
    want = train(
        config_lib.load_config("experiments/digits_mlp.py", base),
        tmp_path / "central",
        progress=False,
    )
    assert got["test_loss"] == pytest.approx(want["test_loss"], abs=1e-5)
    assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-6)


def test_cli_more_clients_than_examples_exits_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxdl.cli",
            "train",
            "--config",
            "experiments/digits_mlp.py",
            "--workdir",
            str(tmp_path / "w"),
            "--config.federated.clients=5000",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "federated.clients: expected at most" in lines[0], done.stderr


def test_killed_run_resumes_after_its_last_round_to_the_uninterrupted_figures(tmp_path):
    # Client sampling (2 of 4 per round) and dropout: the resumed rounds must draw the same
    # clients, batches and dropout masks as an uninterrupted run.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def cmd(workdir):
        return [
            sys.executable, "-m", "jaxdl.cli", "train", "--config", "experiments/digits_mlp.py",
            "--workdir", str(workdir), "--config.data.train_transforms=[]",
            "--config.federated.clients=4", "--config.federated.clients_per_round=2",
            "--config.federated.rounds=8", "--config.federated.local_steps=5",
        ]  # fmt: skip

    straight = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "cut"
    proc = subprocess.Popen(cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "15").is_dir():  # round 3 saved
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "summary.json").exists()
    rerun = subprocess.run(cmd(workdir), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    start = int(re.search(r"resumed from round (\d) in ", rerun.stdout)[1])
    assert 3 <= start < 8, rerun.stdout
    rounds = [int(x) for x in re.findall(r"^round (\d+):", rerun.stdout, re.M)]
    assert rounds == list(range(start + 1, 9)), rerun.stdout  # earlier rounds not trained again
    a, b = (json.loads((w / "summary.json").read_text()) for w in (tmp_path / "straight", workdir))
    for key in ("test_loss", "test_accuracy", "params_sha256"):
        assert a[key] == b[key], key
    rows = read_rows(workdir)
    assert sorted(rows) == sorted(read_rows(tmp_path / "straight")) and len(set(rows)) == len(rows)


def read_rows(workdir):
    return [(r["step"], r["split"]) for r in read_metrics(workdir / "metrics.jsonl")]
