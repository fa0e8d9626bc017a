"""The fit loop end to end on real digits data: outputs, determinism, errors."""

import json

import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.training.evaluate import evaluate_workdir
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import NonFiniteLossError, train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_trainer")

QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=40",
    "--config.log_every=10",
    "--config.eval_every=20",
]


def quick_cfg(name="digits_mlp", extra=()):
    return config_lib.load_config(f"experiments/{name}.py", [*QUICK, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlp")
    summary = train(quick_cfg(), workdir, progress=False)
    return workdir, summary


def test_workdir_contract_files(trained):
    workdir, summary = trained
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "partition_plan.json",
        "curves.png",
    ):
        assert (workdir / name).is_file(), name
    assert (workdir / "checkpoints").is_dir()
    assert any((workdir / "tb").iterdir())
    for key in (
        "test_accuracy",
        "test_loss",
        "params",
        "trainable_params",
        "steps",
        "wall_s",
        "params_sha256",
    ):
        assert key in summary
    assert summary["steps"] == 40
    assert summary["params"] == 64 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert summary["trainable_params"] == summary["params"]
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [10, 20, 30, 40]
    assert [r["step"] for r in records if r["split"] == "val"] == [20, 40]
    assert summary["test_accuracy"] > 0.8  # 40 steps of Adam already learn digits


def test_same_seed_same_params(trained, tmp_path):
    _, first = trained
    again = train(quick_cfg(), tmp_path / "again", progress=False)
    assert again["params_sha256"] == first["params_sha256"]
    other = train(quick_cfg(extra=["--config.seed=7"]), tmp_path / "other", progress=False)
    assert other["params_sha256"] != first["params_sha256"]


def test_evaluate_matches_summary(trained):
    workdir, summary = trained
    metrics = evaluate_workdir(workdir, "test")
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert metrics["step"] == 40


def test_refuses_a_workdir_of_another_run(trained):
    workdir, _ = trained
    with pytest.raises(ValueError, match="holds another run"):
        train(quick_cfg(extra=["--config.seed=1"]), workdir, progress=False)


def test_nan_loss_stops_with_the_step_range(tmp_path):
    cfg = quick_cfg(extra=["--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e30"])
    with pytest.raises(NonFiniteLossError, match=r"found NaN/Inf at step \d+ \(steps \d+\.\.\d+"):
        train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "summary.json").exists()
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_labels_out_of_range_are_refused(tmp_path):
    cfg = quick_cfg(extra=["--config.model.num_classes=5"])
    with pytest.raises(ValueError, match="label"):
        train(cfg, tmp_path, progress=False)


def test_early_stopping_stops_and_says_so(tmp_path):
    cfg = quick_cfg(
        extra=[
            "--config.eval_every=5",
            "--config.early_stopping.patience=1",
            "--config.early_stopping.min_delta=1.0",
        ]
    )
    summary = train(cfg, tmp_path, progress=False)
    assert summary["stopped_early"] is True
    assert summary["steps"] == 10  # first eval sets the best, the second cannot beat it by 1.0


def test_frozen_backbone_plan_file(tmp_path):
    cfg = quick_cfg(
        extra=[
            "--config.partition=[('params/head/.*', {'lr_mult': 10.0}),"
            " ('.*', {'trainable': False})]"
        ]
    )
    summary = train(cfg, tmp_path, progress=False)
    assert summary["trainable_params"] == 128 * 10 + 10
    plan = json.loads((tmp_path / "partition_plan.json").read_text())["groups"]
    head = next(g for g in plan if g["group"] == "params/head/.*")
    assert head["params"] == 1290 and head["trainable"] is True
    assert head["lr"] == pytest.approx(1e-2)
    assert head["opt_state_bytes"] == 1290 * 2 * 4
    rest = next(g for g in plan if g["group"] == ".*")
    assert rest["opt_state_bytes"] == 0 and rest["trainable"] is False
    assert np.isfinite(summary["test_loss"])


def test_relative_workdirs_train_resume_and_restore(tmp_path, monkeypatch):
    """Orbax wants absolute paths; users type relative ones (the demo's default is one)."""
    first, full = quick_cfg(extra=["--config.num_steps=20"]), quick_cfg()
    fine = quick_cfg(extra=["--config.init_from.checkpoint=runs/base", "--config.num_steps=10"])
    monkeypatch.chdir(tmp_path)
    train(first, "runs/base", progress=False)
    train(full, "runs/base", progress=False)  # resume 20 -> 40
    summary = train(fine, "runs/fine", progress=False)
    report = json.loads((tmp_path / "runs/fine/init_report.json").read_text())
    assert report["step"] == 40 and summary["steps"] == 10
    assert evaluate_workdir("runs/fine")["step"] == 10


def test_a_workdir_of_an_older_jaxdl_resumes(tmp_path):
    """A config.json that lacks keys added since (or has keys removed since) is the same run."""
    import json

    from jaxdl.checkpoint.read import list_steps

    cfg = config_lib.load_config(
        "experiments/digits_mlp.py", ["--config.num_steps=4", "--config.num_epochs=0"]
    )
    train(cfg, tmp_path, progress=False, echo=lambda *_: None)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["data"]["max_image_pixels"]  # added after this workdir was written
    saved["folds"] = 0  # removed since
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg.num_steps = 6
    summary = train(cfg, tmp_path, progress=False, echo=lambda *_: None)
    assert summary["steps"] == 6 and list_steps(tmp_path / "checkpoints")[-1] == 6
