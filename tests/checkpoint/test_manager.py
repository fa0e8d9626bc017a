"""Checkpointer: real Orbax saves in tmp dirs, resume, rotation, best copy, failures, kill."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.checkpoint.deferred import Deferred
from jaxdl.checkpoint.manager import Checkpointer
from jaxdl.checkpoint.read import load_params, load_variables, state_metadata
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"model": {"name": "mlp"}, "seed": 0, "lora": None}
SHAPE = (512, 256)  # as in tests/_ckpt_writer.py


def expected_kernel(step: int) -> np.ndarray:
    """The kernel tests/_ckpt_writer.py saves at ``step``."""
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + step


def make_state(seed: int = 0, *, step: int = 0) -> TrainState:
    """A TrainState with real adam moments (one update taken), batch_stats and frozen."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "params": {
            "Dense_0": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jnp.zeros(3)},
            "head": {"kernel": jax.random.normal(k[1], (3, 2)), "bias": jnp.ones(2)},
        }
    }
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.int32(step),
        params=optax.apply_updates(params, updates),
        frozen={"params": {"embed": {"embedding": jax.random.normal(k[2], (5, 4))}}},
        model_state={"batch_stats": {"bn": {"mean": jnp.arange(3.0), "var": jnp.ones(3)}}},
        opt_state=opt_state,
        rng=jax.random.PRNGKey(seed + 100),
    )


def assert_same(a, b) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise


def zeros_like(state: TrainState) -> TrainState:
    return jax.tree.map(jnp.zeros_like, state)


def step_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_round_trip_is_bitwise_with_adam_state_and_data_state(tmp_path):
    state = make_state(step=7)
    assert float(jnp.abs(state.opt_state[0].mu["params"]["head"]["kernel"]).sum()) > 0
    data_state = {"epoch": 2, "position": 13, "order": [3, 1, 2]}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(7, state, data_state=data_state, config=CONFIG)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 7
    restored, restored_data = ckpt.restore(zeros_like(state))
    assert_same(restored, state)
    assert type(restored.opt_state[0]) is optax.ScaleByAdamState
    assert restored_data == data_state
    ckpt.close()
    assert step_dirs(tmp_path / "checkpoints" / "7") == [
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "config",
        "data",
        "jaxdl_digest.json",
        "state",
    ]


def test_deferred_leaves_are_made_as_they_are_written_and_restore_bitwise(tmp_path):
    """An import's save: each Deferred leaf is made when its write starts and dropped after
    it, so at most two of them (the one written, the next one being made) live at once;
    what lands is an ordinary checkpoint that restores into jax arrays and reads as numpy."""
    import gc
    import weakref

    made: list[weakref.ref] = []
    most = []

    def maker(i: int):
        def make() -> np.ndarray:
            gc.collect()
            most.append(sum(ref() is not None for ref in made))
            out = np.full((256, 128), float(i), np.float32)
            made.append(weakref.ref(out))
            return out

        return make

    leaves = {f"w{i}": Deferred(maker(i), (256, 128), np.dtype(np.float32)) for i in range(12)}
    state = make_state(step=0).replace(params={"params": leaves}, frozen={})
    with Checkpointer(tmp_path, deferred=True) as ckpt:
        ckpt.save(0, state, data_state=None, config=CONFIG)
    assert len(most) == 12 and max(most) <= 1  # at each make, at most one other made leaf lives
    template = state.replace(
        params={"params": {k: jnp.zeros(v.shape, v.dtype) for k, v in leaves.items()}}
    )
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        restored, _ = ckpt.restore(zeros_like(template))
    for i in range(12):
        got = restored.params["params"][f"w{i}"]
        assert isinstance(got, jax.Array) and (np.asarray(got) == i).all()
    assert_same(restored.opt_state, state.opt_state)
    numpy_params = load_params(tmp_path / "checkpoints" / "0")
    for name, value in numpy_params.items():
        assert isinstance(value, np.ndarray) and (value == int(name[1:])).all()
    assert sorted(numpy_params) == sorted(leaves)


def test_a_deferred_leaf_that_cannot_be_made_fails_the_save_with_its_own_error(tmp_path):
    """A source read that fails while the save runs (the file went away) reaches the caller
    as the UserError its reader raised, from Orbax's writer thread, not as a wrapped one."""

    def unreadable() -> np.ndarray:
        raise UserError("--from: reading tensor w1 failed. Fix: import again.")

    leaves = {
        "w0": Deferred(lambda: np.zeros((4,), np.float32), (4,), np.dtype(np.float32)),
        "w1": Deferred(unreadable, (4,), np.dtype(np.float32)),
    }
    state = make_state(step=0).replace(params={"params": leaves}, frozen={})
    with pytest.raises(UserError, match=r"^--from: reading tensor w1 failed"):
        with Checkpointer(tmp_path, deferred=True) as ckpt:
            ckpt.save(0, state, data_state=None, config=CONFIG)


def test_keeps_last_k_and_ignores_a_second_save_of_a_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, make_state(step), data_state=None, config=CONFIG)
        ckpt.save(4, make_state(99), data_state=None, config=CONFIG)  # already saved: no-op
    assert step_dirs(tmp_path / "checkpoints") == ["3", "4"]
    ckpt = Checkpointer(tmp_path)
    restored, data_state = ckpt.restore(zeros_like(make_state()))
    assert_same(restored.params, make_state(4).params)
    assert data_state is None
    ckpt.close()


def test_best_is_kept_apart_and_never_deletes_latest(tmp_path):
    accuracies = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.4}
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="val_accuracy") as ckpt:
        for step, acc in accuracies.items():
            ckpt.save(
                step,
                make_state(step),
                data_state=None,
                config=CONFIG,
                metrics={"val_accuracy": acc, "val_loss": 1 - acc},
            )
        assert ckpt.best_value == 0.7
    assert step_dirs(tmp_path / "checkpoints") == ["4"]
    assert step_dirs(tmp_path / "checkpoints_best") == ["2"]
    assert_same(load_params(tmp_path / "checkpoints_best"), load_variables_of(make_state(2)))
    # A restarted run knows the best so far: a worse value does not replace it.
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="val_accuracy") as ckpt:
        assert ckpt.best_value == 0.7
        ckpt.save(5, make_state(5), data_state=None, config=CONFIG, metrics={"val_accuracy": 0.6})
    assert step_dirs(tmp_path / "checkpoints_best") == ["2"]
    with Checkpointer(tmp_path, best_metric="val_loss", best_mode="min") as ckpt:
        ckpt.save(6, make_state(6), data_state=None, config=CONFIG, metrics={"val_loss": 0.1})
    assert step_dirs(tmp_path / "checkpoints") == ["5", "6"]
    assert step_dirs(tmp_path / "checkpoints_best") == ["6"]
    with Checkpointer(tmp_path, best_metric="val_acc") as ckpt:  # absent: no best copy
        ckpt.save(7, make_state(7), data_state=None, config=CONFIG, metrics={"val_accuracy": 1})
    assert step_dirs(tmp_path / "checkpoints_best") == ["6"]


def load_variables_of(state: TrainState) -> dict:
    """What load_params should return for a saved state: trainable + frozen params, numpy."""
    merged = {**state.params["params"], **state.frozen["params"]}
    return jax.tree.map(np.asarray, merged)


def test_async_save_survives_deleting_the_arrays_then_wait(tmp_path):
    # The trainer donates the state to the next step right after save(): Orbax must have
    # copied the arrays to the host before save() returns.
    state = make_state(3)
    host_copy = jax.device_get(state)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state, data_state={"i": 1}, config=CONFIG)
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    assert step_dirs(tmp_path / "checkpoints") == ["3"]
    restored, _ = ckpt.restore(zeros_like(make_state()))
    assert_same(jax.device_get(restored), host_copy)
    ckpt.close()


def test_save_frozen_false_omits_frozen_and_restore_keeps_templates(tmp_path):
    state = make_state(1)
    with Checkpointer(tmp_path, save_frozen=False) as ckpt:
        ckpt.save(1, state, data_state=None, config=CONFIG)
    saved = state_metadata(tmp_path / "checkpoints" / "1")
    assert jax.tree.leaves(saved["frozen"]) == []
    template = zeros_like(state).replace(frozen=make_state(5).frozen)
    with Checkpointer(tmp_path, save_frozen=False) as ckpt:
        restored, _ = ckpt.restore(template)
    assert_same(restored.params, state.params)
    assert_same(restored.opt_state, state.opt_state)
    assert_same(restored.frozen, make_state(5).frozen)


def test_restore_names_leaves_that_do_not_fit_and_missing_steps(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="no checkpoint found at .*checkpoints"):
            ckpt.restore(make_state())
        ckpt.save(2, make_state(), data_state=None, config=CONFIG)
        bad = make_state()
        bad = bad.replace(
            params={
                "params": {
                    **bad.params["params"],
                    "head": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)},
                }
            }
        )
        with pytest.raises(ValueError) as err:
            ckpt.restore(bad)
        msg = str(err.value)
        assert "\n" not in msg
        assert "params/params/head/kernel checkpoint (3, 2) vs state (3, 5)" in msg
        with pytest.raises(ValueError, match=r"step 9 not found .*available steps: \[2\]"):
            ckpt.restore(make_state(), step=9)


def largest_file(root: Path) -> Path:
    files = [p for p in root.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_raises_value_error_naming_the_dir(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(), data_state=None, config=CONFIG)
    step_dir = tmp_path / "checkpoints" / "1"
    victim = largest_file(step_dir / "state" / "d")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match=f"{step_dir}.*corrupt"):
        ckpt.restore(make_state())
    with pytest.raises(ValueError, match=f"{step_dir}.*corrupt"):
        load_params(tmp_path)
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {')
    with pytest.raises(ValueError, match=f"{step_dir}.*corrupt"):
        load_params(tmp_path)


def test_failed_read_prints_nothing_after_the_error(tmp_path):
    """Orbax closes its loop on the first failed read; late callbacks must not print."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(), data_state=None, config=CONFIG)
    for victim in (tmp_path / "checkpoints" / "1" / "state").rglob("d/*"):
        os.truncate(victim, victim.stat().st_size // 2)
    script = (
        "import time\nfrom jaxdl.checkpoint.read import load_params\n"
        f"for _ in range(3):\n    try: load_params({str(tmp_path)!r})\n"
        "    except ValueError: pass\n"
        "time.sleep(0.5)\nprint('done')"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr
    assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_missing_dir_and_symlinks_are_refused(tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint found at {tmp_path / 'nope'}"):
        load_params(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no checkpoint found at .*empty/checkpoints"):
        load_params(tmp_path / "empty")
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, make_state(), data_state=None, config=CONFIG)
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    link = tmp_path / "run" / "checkpoints" / "1" / "config" / "extra"
    link.symlink_to(outside)
    with pytest.raises(ValueError, match=f"entry {link} is a symbolic link"):
        load_params(tmp_path / "run")
    with Checkpointer(tmp_path / "run") as ckpt, pytest.raises(ValueError, match="symbolic"):
        ckpt.restore(make_state())


def test_leftover_tmp_dirs_are_ignored_and_removed_at_start(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), data_state=None, config=CONFIG)
    tmp_dir = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (tmp_dir / "state").mkdir(parents=True)
    (tmp_dir / "state" / "_METADATA").write_text("{")
    assert (
        load_params(tmp_path)["head"]["bias"].tolist()
        == load_variables_of(make_state(1))["head"]["bias"].tolist()
    )
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert step_dirs(tmp_path / "checkpoints") == ["1"]


def test_killed_writer_leaves_a_resumable_latest_step(tmp_path):
    """SIGKILL a process that saves every iteration; a new Checkpointer resumes cleanly."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "_ckpt_writer.py"), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.05, 0.8))  # lands inside a save most of the time
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    names = step_dirs(tmp_path / "checkpoints")
    assert not [n for n in names if "tmp" in n], names
    step = ckpt.latest_step()
    assert step is not None and step >= 1 and str(step) in names
    # Written on 2 devices, restored into a 1-device template.
    template = TrainState(
        step=jnp.int32(0),
        params={"params": {"dense": {"kernel": jnp.zeros(SHAPE)}}},
        frozen={"params": {"embed": {"embedding": jnp.zeros((64, 8))}}},
        model_state={},
        opt_state={"mu": jnp.zeros(SHAPE)},
        rng=jax.random.PRNGKey(0),
    )
    state, data_state = ckpt.restore(template)
    ckpt.close()
    assert data_state == {"step": step}
    assert int(state.step) == step
    np.testing.assert_array_equal(state.params["params"]["dense"]["kernel"], expected_kernel(step))
    np.testing.assert_array_equal(state.opt_state["mu"], 2 * expected_kernel(step))
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(step))
    params = load_variables(tmp_path)["params"]
    np.testing.assert_array_equal(params["dense"]["kernel"], expected_kernel(step))
    assert params["embed"]["embedding"].tolist() == np.full((64, 8), step).tolist()
