"""FedAvg: client shards, equality with centralized training for one client, CLI errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.training.federated import client_shards, run_federated
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
