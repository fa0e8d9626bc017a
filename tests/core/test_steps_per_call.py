"""steps_per_call: K train steps per jitted call give the run of K = 1, resume exactly,
and report a NaN at the exact step."""

import re

import jax
import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.checkpoint.read import load_params
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import NonFiniteLossError, chunk_size, train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_steps_per_call")

QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=40",
    "--config.log_every=10",
    "--config.eval_every=20",
]


def quick_cfg(*extra):
    return config_lib.load_config("experiments/digits_mlp.py", [*QUICK, *extra])


def test_chunks_stop_at_every_log_eval_and_checkpoint():
    # K = 8, logs every 10: 8 steps, then single steps up to 10; the end caps the last call.
    sizes, step = [], 0
    while step < 30:
        sizes.append(chunk_size(step, 8, 30, (10, 20, 0)))
        step += sizes[-1]
    assert sizes == [8, 1, 1, 8, 1, 1, 8, 1, 1]
    assert chunk_size(0, 1, 30, (10,)) == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("k1")
    return workdir, train(quick_cfg(), workdir, progress=False)


def test_eight_steps_per_call_match_one(reference, tmp_path):
    ref_dir, ref = reference
    summary = train(quick_cfg("--config.steps_per_call=8"), tmp_path, progress=False)
    assert summary["steps"] == 40
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], abs=1e-6)
    ref_log, log = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in log] == [(r["step"], r["split"]) for r in ref_log]
    for a, b in zip(ref_log, log, strict=True):  # per-step means over the same steps
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    got, want = load_params(tmp_path), load_params(ref_dir)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got, want)


def test_resume_with_eight_steps_per_call_is_exact(tmp_path):
    straight = train(quick_cfg("--config.steps_per_call=8"), tmp_path / "a", progress=False)
    first = quick_cfg("--config.steps_per_call=8", "--config.num_steps=20")
    train(first, tmp_path / "b", progress=False)
    resumed = train(quick_cfg("--config.steps_per_call=8"), tmp_path / "b", progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]


def _nan_step(cfg, workdir) -> int:
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, workdir, progress=False)
    return int(re.search(r"at step (\d+)", str(err.value)).group(1))


def test_nan_is_reported_at_the_exact_step(tmp_path):
    diverge = ["--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e30"]
    one = _nan_step(quick_cfg(*diverge), tmp_path / "k1")
    eight = _nan_step(quick_cfg(*diverge, "--config.steps_per_call=8"), tmp_path / "k8")
    assert eight == one
    assert 1 < one < 9  # a step inside the first K = 8 call, not its end
