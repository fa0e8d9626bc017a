"""train() releases what it opens: no thread or worker process outlives a run."""

import multiprocessing
import threading

import pytest

from jaxdl import config as config_lib
from jaxdl.training.trainer import train


def _cfg(*overrides):
    return config_lib.load_config(
        "experiments/digits_mlp.py",
        [
            "--config.num_epochs=0",
            "--config.num_steps=6",
            "--config.log_every=3",
            "--config.eval_every=3",
            *overrides,
        ],
    )


def _alive():
    threads = {t for t in threading.enumerate() if t.is_alive()}
    return threads, set(multiprocessing.active_children())


def test_repeated_runs_leave_no_threads_or_children(tmp_path):
    # Libraries keep a few process-wide pools (XLA, grain's reader pool): let them start once.
    for workers in (0, 1):
        train(
            _cfg(f"--config.data.num_workers={workers}"),
            tmp_path / f"warmup{workers}",
            progress=False,
            echo=lambda *_: None,
        )
    threads, children = _alive()
    for i, workers in enumerate([0, 1, 0]):
        train(
            _cfg(f"--config.data.num_workers={workers}"),
            tmp_path / f"run{i}",
            progress=False,
            echo=lambda *_: None,
        )
    after_threads, after_children = _alive()
    assert not {t.name for t in after_threads - threads}, "threads left behind"
    assert not after_children - children, "worker processes left behind"


def test_a_failing_run_closes_its_prefetcher(tmp_path):
    threads, _ = _alive()
    with pytest.raises(ValueError, match="eval_split"):
        train(_cfg("--config.data.eval_split=nope"), tmp_path / "w", progress=False)
    after, _ = _alive()
    assert not {t.name for t in after - threads if t.name.startswith("jaxdl")}
