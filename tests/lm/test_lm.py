"""Language models end to end: byte-level training, bits per byte, generate, bf16, LoRA."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxdl import config as config_lib
from jaxdl.training.build import build
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_lm")

TINY = [
    "--config.model={'name': 'transformer', 'size': 'tiny', 'vocab_size': 256}",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=32",
    "--config.num_steps=12",
    "--config.eval_every=12",
    "--config.log_every=6",
    "--config.optimizer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm")
    cfg = config_lib.load_config(
        "experiments/lm_stdlib_pretrain.py", [*TINY, "--config.data.source=text:pydoc"]
    )
    return workdir, train(cfg, workdir, progress=False)


def test_lm_summary_and_logs(lm_run):
    workdir, summary = lm_run
    assert summary["test_bits_per_byte"] == pytest.approx(summary["test_loss"] / 0.6931471805599453)
    assert 0 < summary["test_bits_per_byte"] < 8.5  # below uniform over 256 bytes (8 bits)
    assert summary["params"] == 35_712
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if r["split"] == "train"]
    assert all(r["tokens_per_s"] > 0 and r["model_flops_per_s"] > 0 for r in train_logs)
    assert {r["split"] for r in records} == {"train", "val", "test"}
    # text:pydoc has no test split unless data.test_fraction holds one out: the summary
    # says whose figures its test_* are.
    assert summary["test_split"] == "val"
    last_val = [r for r in records if r["split"] == "val"][-1]
    assert summary["test_loss"] == last_val["loss"]


def test_evaluate_of_a_run_without_test_split_names_the_fix(lm_run):
    from jaxdl.errors import UserError
    from jaxdl.training.evaluate import evaluate_workdir

    workdir, summary = lm_run
    with pytest.raises(UserError, match=r"has the splits \['train', 'val'\], found 'test'"):
        evaluate_workdir(workdir, "test")
    metrics = evaluate_workdir(workdir)  # by default the split the summary's test_* are
    assert metrics["split"] == summary["test_split"] == "val"
    assert metrics["loss"] == pytest.approx(summary["test_loss"])


def test_a_held_out_test_split_is_scored_apart_from_val(tmp_path):
    cfg = config_lib.load_config(
        "experiments/lm_stdlib_pretrain.py",
        [*TINY, "--config.data.source=text:pydoc", "--config.data.test_fraction=0.1"],
    )
    lines = []
    summary = train(cfg, tmp_path, progress=False, echo=lines.append)
    val = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in val if r["split"] == "val"][-1]
    assert summary["test_split"] == "test"
    assert abs(summary["test_loss"] - last_val["loss"]) > 1e-4
    assert not any(line.startswith("test:") for line in lines)


def _jaxdl(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *args], capture_output=True, text=True, env=env
    )


def test_generate_and_its_errors(lm_run, tmp_path):
    workdir, _ = lm_run
    done = _jaxdl(
        "generate",
        "--workdir",
        str(workdir),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "10",
        "--greedy",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout.encode()) >= 4
    for args, words in [
        (["--prompt", ""], "--prompt: expected at least 1 byte"),
        (["--prompt", "x", "--max-new-tokens", "1000"], "--max-new-tokens"),
    ]:
        bad = _jaxdl("generate", "--workdir", str(workdir), *args)
        assert bad.returncode == 2 and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    classifier = tmp_path / "clf"
    classifier.mkdir()
    cfg = config_lib.load_config("experiments/digits_mlp.py")
    (classifier / "config.json").write_text(config_lib.to_json(cfg))
    bad = _jaxdl("generate", "--workdir", str(classifier), "--prompt", "x")
    assert bad.returncode == 2 and "classifier" in bad.stderr


def test_bf16_model_keeps_float32_params_and_optimizer_state():
    cfg = config_lib.load_config("experiments/lm_stdlib_pretrain.py", TINY)
    cfg.model.dtype = "bfloat16"
    setup = build(
        cfg,
        kind="lm",
        example_spec={"inputs": ((32,), jnp.int32), "targets": ((32,), jnp.int32)},
        num_classes=256,
        total_steps=10,
    )
    dtypes = {x.dtype for x in jax.tree.leaves(setup.state.params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    opt_dtypes = {x.dtype for x in jax.tree.leaves(setup.state.opt_state) if x.ndim}
    assert opt_dtypes == {jnp.dtype(jnp.float32)}
    logits = setup.model.apply(
        {"params": setup.state.params["params"]}, jnp.zeros((1, 32), jnp.int32)
    )
    assert logits.dtype == jnp.float32


def test_lora_run_trains_adapters_only_and_checkpoints_small(lm_run, tmp_path):
    base, _ = lm_run
    cfg = config_lib.load_config(
        "experiments/lm_pydoc_lora.py", [*TINY, f"--config.init_from.checkpoint={base}"]
    )
    summary = train(cfg, tmp_path, progress=False)
    # rank 8 on q, k, v, out (32x32) and fc1/fc2 (32x128), in 2 blocks
    per_block = 4 * (32 * 8 + 8 * 32) + 2 * (32 * 8 + 8 * 128)
    assert summary["trainable_params"] == 2 * per_block == 9216
    full = sum(f.stat().st_size for f in (base / "checkpoints").rglob("*") if f.is_file())
    lora = sum(f.stat().st_size for f in (tmp_path / "checkpoints").rglob("*") if f.is_file())
    assert lora < full  # tiny model: Orbax's fixed metadata dominates; README has real sizes
    plan = json.loads((tmp_path / "partition_plan.json").read_text())["groups"]
    trainable = [g["group"] for g in plan if g["trainable"]]
    assert trainable == ["lora/.*"]
    assert summary["params"] == 35_712  # merged adapters: the model's own size
