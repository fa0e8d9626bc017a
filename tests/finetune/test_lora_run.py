"""A LoRA fine-tune of the digits SimpleCNN through `trainer.train`, from a full base run.

Checked: only the adapters train; the LoRA checkpoint (adapters + their Adam moments, no
frozen base) is far smaller than the base run's; a resumed LoRA run reloads the frozen
base from init_from and ends bitwise where a straight run ends; `load_params` of the
LoRA workdir returns merged params that give the adapted model's outputs.
"""

import jax
import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl import testing
from jaxdl.checkpoint.read import load_params, state_metadata
from jaxdl.core import steps
from jaxdl.core import tree as tree_lib
from jaxdl.finetune import lora
from jaxdl.models import create_model
from jaxdl.training.evaluate import restore_run
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_lora_run")

STEPS = 6
RANK, ALPHA = 2, 4.0
KERNELS = {"conv_0": (9, 64), "conv_1": (9 * 64, 128), "fc": (2 * 2 * 128, 128), "head": (128, 10)}
ADAPTER_PARAMS = sum(RANK * (fan_in + fan_out) for fan_in, fan_out in KERNELS.values())  # 3,110


def cnn_cfg(steps: int, extra=()):
    return config_lib.load_config(
        "experiments/digits_cnn.py",
        [
            "--config.num_epochs=0",
            f"--config.num_steps={steps}",
            "--config.log_every=3",
            "--config.best_metric=",
            "--config.keep_checkpoints=1",
            *extra,
        ],
    )


def lora_cfg(base, steps: int):
    lora_value = {"rank": RANK, "alpha": ALPHA, "targets": "params/.*/kernel"}
    return cnn_cfg(steps, [f"--config.lora={lora_value}", f"--config.init_from.checkpoint={base}"])


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full base run, a straight LoRA run of 2*STEPS, and one resumed at STEPS."""
    root = tmp_path_factory.mktemp("lora_run")
    keep_two = ["--config.keep_checkpoints=2"]
    base = train(cnn_cfg(STEPS, keep_two), root / "base", progress=False, echo=quiet)
    straight = train(lora_cfg(root / "base", 2 * STEPS), root / "lora", progress=False, echo=quiet)
    train(lora_cfg(root / "base", STEPS), root / "resumed", progress=False, echo=quiet)
    # The base run trains on: "latest" of it is no longer the base the LoRA runs started
    # from, and the resumed run must still restore the pinned step.
    train(cnn_cfg(2 * STEPS, keep_two), root / "base", progress=False, echo=quiet)
    lines = []
    resumed = train(
        lora_cfg(root / "base", 2 * STEPS), root / "resumed", progress=False, echo=lines.append
    )
    return root, {"base": base, "lora": straight, "resumed": resumed, "resume_log": lines}


@pytest.fixture(scope="module")
def restored(runs):
    """(setup with the LoRA run's final state, its data), rebuilt from its workdir."""
    root, _ = runs
    _, setup, data = restore_run(root / "lora")
    return setup, data


def _bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_only_the_adapters_train(runs, restored):
    root, summaries = runs
    assert summaries["lora"]["trainable_params"] == ADAPTER_PARAMS
    assert summaries["lora"]["params"] == summaries["base"]["params"] == 141_450
    state = jax.device_get(restored[0].state)
    assert int(state.step) == 2 * STEPS
    expected = {f"lora/params/{k}/kernel/{ab}" for k in KERNELS for ab in "ab"}
    assert set(tree_lib.flatten(state.params)) == expected
    testing.assert_no_opt_state_for_frozen(state)
    # The frozen base is the base run's params, bitwise; the B factors left zero.
    base = {"params": load_params(root / "base", step=STEPS)}  # the pinned base step
    testing.assert_frozen_unchanged(state.replace(frozen=base), state)
    for name in KERNELS:
        assert np.abs(state.params["lora"]["params"][name]["kernel"]["b"]).max() > 0, name


def test_lora_checkpoint_is_much_smaller_than_the_full_one(runs):
    root, _ = runs
    full_dir = root / "base" / "checkpoints" / str(STEPS)
    lora_dir = root / "lora" / "checkpoints" / str(2 * STEPS)
    assert tree_lib.flatten(state_metadata(lora_dir)["frozen"]) == {}
    full_bytes, lora_bytes = _bytes(full_dir), _bytes(lora_dir)
    print(f"checkpoint bytes: full run {full_bytes:,}, LoRA run {lora_bytes:,}")
    # 141,450 params + 2 Adam moments, float32, vs 3,110 adapter params + 2 moments (Orbax
    # compresses, so on disk each is somewhat below its raw size).
    assert full_bytes > 2 * 141_450 * 4
    assert lora_bytes * 10 < full_bytes


def test_resumed_lora_run_ends_where_the_straight_run_ends(runs):
    root, summaries = runs
    assert any(f"resumed from step {STEPS}" in line for line in summaries["resume_log"])
    assert summaries["resumed"]["params_sha256"] == summaries["lora"]["params_sha256"]

    def train_losses(name):
        records = read_metrics(root / name / "metrics.jsonl")
        return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]

    assert train_losses("resumed") == train_losses("lora")
    assert [s for s, _ in train_losses("lora")] == [3, 6, 9, 12]


def test_load_params_of_the_lora_workdir_is_the_merged_model(runs, restored):
    root, summaries = runs
    setup, data = restored
    state = setup.state
    merged = load_params(root / "lora")
    base = {"params": load_params(root / "base", step=STEPS)}  # the pinned base step
    adapters = state.params["lora"]
    expected = tree_lib.flatten(lora.merge(base, adapters, rank=RANK, alpha=ALPHA)["params"])
    assert tree_lib.flatten(merged).keys() == expected.keys()
    for path, value in expected.items():
        # numpy (load_params) and XLA matmuls may differ in the last bit
        np.testing.assert_allclose(tree_lib.flatten(merged)[path], value, atol=1e-7, err_msg=path)

    batch = next(iter(data.eval_iter("test", data.split_sizes["test"])))  # all 360, one batch
    model = create_model({"name": "simple_cnn", "num_classes": 10})
    testing.assert_lora_merge_equivalent(
        model, base, adapters, batch["image"], rank=RANK, alpha=ALPHA
    )
    adapted = steps.model_params(state.params, state.frozen, setup.lora_cfg)
    want = model.apply({"params": adapted}, batch["image"])
    got = model.apply({"params": merged}, batch["image"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The merged params reproduce the run's own test accuracy.
    accuracy = np.mean(np.argmax(np.asarray(got), -1) == batch["label"])
    assert accuracy == pytest.approx(summaries["lora"]["test_accuracy"], abs=1e-6)
