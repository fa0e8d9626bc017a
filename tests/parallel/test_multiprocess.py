"""Two real `jaxdl train` processes (loopback coordinator, gloo CPU collectives, one device
each) train like one process with 2 devices, and survive being killed and restarted.

One device per process: on a 2-core machine, 2 processes x 2 devices each blocking a thread
in a gloo collective once hung in CI (see `jaxdl.parallel.sharding.MIN_CPU_THREADS`); the
in-process device axis is covered by tests/parallel/test_sharding.py's 8-device runs.

Each process loads its contiguous half of the global batch (data.batch_size is global), so
every step sees the same rows in the same places as the one-process run: with dropout on
(digits_mlp's 0.1), whose mask follows the row, the losses still match to 1e-6.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdl.data import build_data
from jaxdl.errors import UserError
from jaxdl.parallel import sharding
from jaxdl.training.runlog import read_metrics

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_multiprocess")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
OVERRIDES = [
    "--config.num_epochs=0",
    f"--config.num_steps={STEPS}",
    "--config.log_every=1",
    "--config.eval_every=20",
    "--config.checkpoint_every=5",
    "--config.model.dropout_rate=0.1",
]


def coordinator_port() -> int:
    """A free port BELOW the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: until process 0 listens on it (seconds of
    imports later) any outgoing connection may take it, including process 1's own retries,
    which can connect to themselves (TCP self-connect) and hang the run.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        try:
            sharding.check_port_free(port)
            return port
        except UserError:
            continue
    raise RuntimeError(f"no free port below {low}")


def launch(workdir: Path, processes: int, devices: int, cache: Path) -> list[subprocess.Popen]:
    """Start `processes` x `jaxdl train` on `devices` CPU devices each; logs in WORKDIR.p<i>.log."""
    port = coordinator_port()
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),  # restarted processes reuse the programs
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONFAULTHANDLER": "1",  # a hung process killed with SIGABRT prints its threads
    }
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "jaxdl.cli", "train", "--config", "experiments/digits_mlp.py"]
        cmd += ["--workdir", str(workdir), "--no-progress", *OVERRIDES]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
            cmd += ["--process-id", str(i)]
        log = open(f"{workdir}.p{i}.log", "a")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    return procs


def wait(procs: list[subprocess.Popen], workdir: Path, timeout: float = 300) -> None:
    """All of `procs` exit 0 within `timeout`; else stop them all and show every log.

    Watches all processes at once: when one fails, its peers block in a collective, so
    waiting on them one by one would only report the timeout.
    """
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:  # faulthandler dumps every thread's stack into the log on SIGABRT
        p.send_signal(signal.SIGABRT)
    for p in hung:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if hung or any(p.returncode != 0 for p in procs):
        logs = "\n".join(
            f"--- process {i} (rc {p.returncode}{', hung' if p in hung else ''}):\n"
            + Path(f"{workdir}.p{i}.log").read_text()[-3000:]
            for i, p in enumerate(procs)
        )
        pytest.fail(f"{len(procs)}-process run in {workdir} failed:\n{logs}")


def train_losses(workdir: Path) -> np.ndarray:
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes x 1 device and one process x 2 devices, side by side."""
    build_data({"source": "digits"}, seed=0)  # build the TFDS copy once, not in both processes
    root = tmp_path_factory.mktemp("mp")
    cache = root / "xla_cache"
    two, one = root / "two", root / "one"
    procs = launch(two, 2, 1, cache) + launch(one, 1, 2, cache)
    wait(procs[:2], two)
    wait(procs[2:], one)
    return root, cache, two, one


def test_two_processes_train_like_one(runs):
    _, _, two, one = runs
    np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=0, atol=1e-6)
    a = json.loads((two / "summary.json").read_text())
    b = json.loads((one / "summary.json").read_text())
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)
    assert a["steps"] == b["steps"] == STEPS
    assert a["params"] == b["params"] == 64 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 1290
    assert a["test_accuracy"] > 0.8


def test_only_process_0_writes_logs(runs):
    _, _, two, _ = runs
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in map(json.loads, lines) if r["split"] == "train"]) == STEPS  # not 2x
    assert (two / "curves.png").is_file() and (two / "summary.json").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["30", "35", "40"]


def test_kill_and_resume_with_two_processes(runs):
    root, cache, two, _ = runs
    workdir = root / "killed"
    procs = launch(workdir, 2, 1, cache)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert all(p.poll() is None for p in procs), "a process ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    for proc in procs:  # mid-run, without warning
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 5 <= killed_at < STEPS, f"the run got to step {killed_at} before the kill"

    wait(launch(workdir, 2, 1, cache), workdir)
    log = Path(f"{workdir}.p0.log").read_text()
    resumed = int(log.split("resumed from step ")[1].split()[0])
    assert killed_at <= resumed < STEPS
    # Exactly the uninterrupted curve: data position and parameters came back on both.
    np.testing.assert_allclose(train_losses(workdir), train_losses(two), rtol=0, atol=1e-6)
    a = json.loads((workdir / "summary.json").read_text())
    b = json.loads((two / "summary.json").read_text())
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)
