"""A user's own NNX model (experiments/nnx_digits.py: BatchNorm, Dropout, nnx.List layers)
through everything a built-in Linen model gets: the CLI run on digits to the Linen MLP's
accuracy, exact resume after SIGKILL, `jaxdl evaluate` and `load_model` in a new process
(the config's model_file), export/predict equal to `load_model`, LoRA and partition rules
on its nnx.Linear kernels, and registration errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdl
from jaxdl.config import load_config
from jaxdl.core import tree
from jaxdl.errors import UserError
from jaxdl.models import create_model
from jaxdl.testing import kill_mid_run
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_nnx")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "nnx_digits.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
QUICK = ["--config.num_epochs=0", "--config.eval_every=15", "--config.checkpoint_every=5",
         "--config.log_every=5"]  # fmt: skip


def _cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *map(str, args)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_cmd(workdir, steps):
    return [sys.executable, "-m", "jaxdl.cli", "train", "--config", str(CONFIG), "--workdir",
            str(workdir), "--no-progress", *QUICK, f"--config.num_steps={steps}"]  # fmt: skip


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The experiment as shipped (20 epochs) and the Linen MLP's config, from the CLI."""
    root = tmp_path_factory.mktemp("nnx")
    _cli("train", "--config", CONFIG, "--workdir", root / "nnx", "--no-progress")
    _cli("train", "--config", "digits_mlp", "--workdir", root / "linen", "--no-progress")
    return root


def test_the_nnx_model_trains_on_digits_to_the_linen_mlps_accuracy(full_runs):
    nnx_run = json.loads((full_runs / "nnx" / "summary.json").read_text())
    linen_run = json.loads((full_runs / "linen" / "summary.json").read_text())
    assert nnx_run["test_accuracy"] >= linen_run["test_accuracy"] - 0.02, (nnx_run, linen_run)
    assert nnx_run["test_accuracy"] > 0.95
    config = json.loads((full_runs / "nnx" / "config.json").read_text())
    assert config["model_file"] == str(CONFIG)  # what later processes import
    assert config["model"]["name"] == "nnx_mlp"
    assert json.loads((full_runs / "linen" / "config.json").read_text())["model_file"] == ""


def test_evaluate_load_model_export_and_predict_in_new_processes(full_runs, tmp_path):
    workdir = full_runs / "nnx"
    summary = json.loads((workdir / "summary.json").read_text())
    out = _cli("evaluate", "--workdir", workdir, "--split", "test").stdout
    assert f"{summary['test_accuracy']:.4f}"[:5] in out, out

    from sklearn.datasets import load_digits

    from jaxdl.data.digits import split_indices, to_uint8

    digits, idx = load_digits(), split_indices()["test"]
    raw = to_uint8(digits.images[idx])  # the 8-bit values predict reads from an image
    code = (
        "import sys, numpy as np, jaxdl\n"
        "model, variables = jaxdl.load_model(sys.argv[1])\n"
        "raw = np.load(sys.argv[2])\n"
        "x = (np.round(raw.astype(np.float32) * np.float32(16 / 255)) / 16.0)[..., None]\n"
        "np.save(sys.argv[3], np.asarray(model.apply(variables, x)))\n"
    )
    np.save(tmp_path / "raw.npy", raw)
    subprocess.run([sys.executable, "-c", code, str(workdir), str(tmp_path / "raw.npy"),
                    str(tmp_path / "logits.npy")], check=True, env=ENV, cwd=tmp_path)  # fmt: skip
    logits = np.load(tmp_path / "logits.npy")
    accuracy = (logits.argmax(-1) == digits.target[idx]).mean()
    assert accuracy == pytest.approx(summary["test_accuracy"])

    artifact = tmp_path / "nnx.jaxexport"
    _cli("export", "--workdir", workdir, "--out", artifact)
    from jaxdl.deploy import predict

    probs = predict.load(artifact).predict(raw[..., None].astype(np.float32))
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, axis=-1), atol=1e-6)


def test_sigkill_mid_run_then_resume_is_bitwise_the_straight_run(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, 60), check=True, capture_output=True, env=ENV, cwd=ROOT)
    killed = tmp_path / "killed"
    kill_mid_run(_train_cmd(killed, 60), killed, after_step=20, env=ENV, cwd=ROOT)
    subprocess.run(_train_cmd(killed, 60), check=True, capture_output=True, env=ENV, cwd=ROOT)
    a, b = (json.loads((w / "summary.json").read_text()) for w in (straight, killed))
    assert b["params_sha256"] == a["params_sha256"]
    rows = [
        [(r["step"], r["split"], r["loss"]) for r in read_metrics(w / "metrics.jsonl")]
        for w in (straight, killed)
    ]
    assert rows[0] == rows[1]


def test_lora_and_partition_rules_act_on_the_nnx_linear_kernels(tmp_path):
    base = tmp_path / "base"
    train(load_config(CONFIG, [*QUICK, "--config.num_steps=10"]), base, progress=False,
          echo=_quiet)  # fmt: skip
    lora = {"rank": 2, "alpha": 4.0, "targets": r"params/hidden/\d+/kernel"}
    cfg = load_config(CONFIG, [*QUICK, "--config.num_steps=10", f"--config.lora={lora}",
                               f"--config.init_from.checkpoint={base}"])  # fmt: skip
    summary = train(cfg, tmp_path / "lora", progress=False, echo=_quiet)
    plan = json.loads((tmp_path / "lora" / "partition_plan.json").read_text())
    assert summary["trainable_params"] == sum(2 * (a + b) for a, b in [(64, 512), (512, 256),
                                                                      (256, 128)])  # fmt: skip
    assert plan  # the plan names the groups it made
    base_params = tree.flatten(jaxdl.load_params(base))
    merged = tree.flatten(jaxdl.load_params(tmp_path / "lora"))
    changed = sorted(p for p in base_params if not np.array_equal(base_params[p], merged[p]))
    assert changed == [f"hidden/{i}/kernel" for i in range(3)]

    rules = [(r"params/head/.*", {}), (".*", {"trainable": False})]
    cfg = load_config(CONFIG, [*QUICK, "--config.num_steps=10", f"--config.partition={rules}",
                               f"--config.init_from.checkpoint={base}"])  # fmt: skip
    summary = train(cfg, tmp_path / "head", progress=False, echo=_quiet)
    assert summary["trainable_params"] == 128 * 10 + 10
    tuned = tree.flatten(jaxdl.load_params(tmp_path / "head"))
    changed = sorted(p for p in base_params if not np.array_equal(base_params[p], tuned[p]))
    assert changed == ["head/bias", "head/kernel"]


def test_variables_keep_string_keys_and_batch_stats_update_in_train_mode():
    load_config(CONFIG)  # registers nnx_mlp
    model = create_model({"name": "nnx_mlp", "num_classes": 3, "in_features": 4, "hidden": [5]})
    x = jnp.arange(8.0).reshape(2, 4)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert set(tree.flatten(variables)) == {
        "params/hidden/0/kernel", "params/hidden/0/bias", "params/norms/0/scale",
        "params/norms/0/bias", "params/head/kernel", "params/head/bias",
        "batch_stats/norms/0/mean", "batch_stats/norms/0/var",
    }  # fmt: skip
    _, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                             mutable=["batch_stats"])  # fmt: skip
    assert list(tree.flatten(updates)) == ["batch_stats/norms/0/mean", "batch_stats/norms/0/var"]
    assert not np.allclose(updates["batch_stats"]["norms"]["0"]["mean"], 0)


def test_registration_and_options_are_checked():
    load_config(CONFIG)
    with pytest.raises(UserError, match=r"model.width: model 'nnx_mlp' has no such option"):
        create_model({"name": "nnx_mlp", "num_classes": 3, "width": 4})
    with pytest.raises(UserError, match=r"model.num_classes: model 'nnx_mlp' needs it"):
        create_model({"name": "nnx_mlp"})
    load_config(CONFIG)  # importing the same file again re-registers the same class: fine

    class Other(nnx.Module):
        def __init__(self, *, rngs):
            pass

    with pytest.raises(UserError, match=r"register_model\('nnx_mlp'\): the name is taken"):
        jaxdl.register_model("nnx_mlp")(Other)


def test_a_missing_or_wrong_model_file_is_one_line(tmp_path):
    cfg = {"model": {"name": "gone_model", "num_classes": 10}, "num_steps": 1,
           "model_file": str(tmp_path / "gone.py")}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model_file: model 'gone_model' was registered in"):
        load_config(tmp_path / "c.json")
    (tmp_path / "gone.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"registers no model 'gone_model'"):
        load_config(tmp_path / "c.json")
    (tmp_path / "gone.py").write_text("raise ValueError('boom')\n")
    with pytest.raises(UserError, match=r"model_file: .*gone.py line 1 raised ValueError"):
        load_config(tmp_path / "c.json")
