"""chex-based assertions for users' own tests of fine-tuning setups (jaxdl uses them too).

from jaxdl import testing
testing.assert_frozen_unchanged(state_before, state_after)
testing.assert_no_opt_state_for_frozen(state)
testing.assert_lora_merge_equivalent(model, params, adapters, x, rank=4, alpha=8.0)
step = testing.assert_no_retrace(step_fn)          # wrap before jax.jit
testing.assert_resume_exact("experiments/x.py", tmp_path, steps=20)
testing.kill_mid_run(testing.train_command(cfg, workdir), workdir, after_step=20)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import chex
import jax
import numpy as np

from jaxdl.core import tree
from jaxdl.core.state import TrainState
from jaxdl.finetune import lora
from jaxdl.training.runlog import read_metrics


def assert_frozen_unchanged(before: TrainState, after: TrainState) -> None:
    """Every frozen leaf is bitwise identical before and after training."""
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, jax.device_get(before.frozen)),
        jax.tree.map(np.asarray, jax.device_get(after.frozen)),
    )


def _param_paths_in(opt_state) -> set[str]:
    """Parameter paths that optimizer-state subtrees are keyed by."""
    paths = set()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        if keys and getattr(leaf, "ndim", 0) > 0:
            paths.add("/".join(keys))
    return paths


def assert_no_opt_state_for_frozen(state: TrainState) -> None:
    """Optimizer state exists for trainable leaves only, never for a frozen one."""
    trainable = set(tree.flatten(state.params))
    frozen = set(tree.flatten(state.frozen))
    in_opt = _param_paths_in(state.opt_state)
    leaked = sorted(in_opt & frozen)
    assert not leaked, f"optimizer state holds frozen leaves: {leaked[:5]}"
    stray = sorted(in_opt - trainable)
    assert not stray, f"optimizer state holds leaves that are not trainable params: {stray[:5]}"


def assert_lora_merge_equivalent(
    model,
    params_tree: dict,
    adapters: dict,
    x,
    *,
    rank: int,
    alpha: float,
    model_state: dict | None = None,
    atol: float = 1e-5,
) -> None:
    """The merged plain parameter tree gives the adapted model's outputs."""
    merged = lora.merge(params_tree, adapters, rank=rank, alpha=alpha)
    extra = model_state or {}

    @jax.jit
    def adapted(p, a):
        return model.apply({**lora.apply(p, a, rank=rank, alpha=alpha), **extra}, x)

    expected = adapted(params_tree, adapters)
    got = model.apply({**merged, **extra}, x)
    chex.assert_trees_all_close(got, expected, atol=atol, rtol=atol)


def assert_no_retrace(fn: Callable, n: int = 1) -> Callable:
    """Wrap ``fn`` (before jax.jit) so that tracing it more than ``n`` times fails."""
    return chex.assert_max_traces(fn, n=n)


def train_command(config: str, workdir: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """argv of ``jaxdl train`` in a new Python process (this interpreter), without a bar."""
    cmd = [sys.executable, "-m", "jaxdl.cli", "train", "--config", config]
    return [*cmd, "--workdir", str(workdir), "--no-progress", *overrides]


def subprocess_env() -> dict[str, str]:
    """This environment, with JAX on CPU unless the caller chose a platform."""
    return {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def kill_mid_run(
    cmd: Sequence[str],
    workdir: str | Path,
    after_step: int,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300,
) -> None:
    """Start ``cmd`` (a `jaxdl train`), SIGKILL it once WORKDIR/checkpoints holds a step >=
    ``after_step``, and check that the signal, not the end of the run, stopped it."""
    import signal
    import time

    proc = subprocess.Popen(
        cmd, env=env or subprocess_env(), cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    ckpts, deadline = Path(workdir) / "checkpoints", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
        if done and max(done) >= after_step:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert not (Path(workdir) / "summary.json").exists(), "the run ended before the kill"


def _train(config: str, workdir: Path, overrides: Sequence[str]) -> dict:
    cmd = train_command(config, workdir, overrides)
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}"
    return json.loads((workdir / "summary.json").read_text())


def assert_resume_exact(
    config: str, tmp_dir: str | Path, *, steps: int, overrides: Sequence[str] = ()
) -> None:
    """``steps`` steps, a new process, ``steps`` more == ``2*steps`` straight, bitwise.

    Both runs are real subprocesses of ``jaxdl train``; compared are every logged train
    loss and the final ``params_sha256``.
    """
    tmp_dir = Path(tmp_dir)
    common = [*overrides, "--config.num_epochs=0", f"--config.log_every={max(steps // 4, 1)}"]
    straight = _train(config, tmp_dir / "straight", [*common, f"--config.num_steps={2 * steps}"])
    _train(config, tmp_dir / "resumed", [*common, f"--config.num_steps={steps}"])
    resumed = _train(config, tmp_dir / "resumed", [*common, f"--config.num_steps={2 * steps}"])

    def losses(workdir):
        return [
            (r["step"], r["loss"])
            for r in read_metrics(workdir / "metrics.jsonl")
            if r["split"] == "train"
        ]

    assert losses(tmp_dir / "resumed") == losses(tmp_dir / "straight"), "losses differ"
    assert resumed["params_sha256"] == straight["params_sha256"], "final parameters differ"
