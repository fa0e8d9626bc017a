"""Resume is exact after SIGKILL mid-run (a new process resumes from the last complete
checkpoint). Resume across a clean stop is `jaxdl.testing.assert_resume_exact`, exercised in
tests/test_testing.py."""

import json
import os
import subprocess
import sys

from jaxdl.testing import kill_mid_run
from jaxdl.training.runlog import read_metrics

CONFIG = "experiments/digits_mlp.py"
# Constant learning rate and step-based evaluation: the run's length changes nothing else.
OVERRIDES = [
    "--config.eval_every=15",
    "--config.checkpoint_every=5",
    "--config.data.train_transforms=[]",
]


def _cmd(workdir, steps):
    return [
        sys.executable,
        "-m",
        "jaxdl.cli",
        "train",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--no-progress",
        *OVERRIDES,
        "--config.num_epochs=0",
        f"--config.num_steps={steps}",
        "--config.log_every=5",
    ]


def test_sigkill_mid_run_then_resume_matches_straight_run(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, 120), check=True, capture_output=True, env=env)

    killed = tmp_path / "killed"
    kill_mid_run(_cmd(killed, 120), killed, after_step=20, env=env, timeout=120)

    subprocess.run(_cmd(killed, 120), check=True, capture_output=True, env=env)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["params_sha256"] == a["params_sha256"]
    losses = [
        [(r["step"], r["loss"]) for r in read_metrics(w / "metrics.jsonl") if r["split"] == "train"]
        for w in (straight, killed)
    ]
    assert losses[0] == losses[1]
