"""A failed run never blocks its own fix, never ends with a silent NaN, never leaves a
half-written file; the workdir's JSON and JSONL files are read naming the file."""

import json
import shutil
import signal

import pytest
from test_trainer import quick_cfg

from jaxdl.errors import UserError
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import NonFiniteLossError, train


def steps_cfg(n, *extra):
    return quick_cfg(extra=[f"--config.num_steps={n}", "--config.eval_every=10", *extra])


def test_divergence_in_the_last_update_is_an_error_not_a_nan_summary(tmp_path):
    # The one step's loss is computed before its update, so it is finite; the update is not.
    cfg = steps_cfg(1, "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e38")
    with pytest.raises(NonFiniteLossError, match="NaN/Inf .*after step 1"):
        train(cfg, tmp_path, progress=False)
    assert not (tmp_path / "summary.json").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_nan_then_resume_with_a_lower_learning_rate_from_the_last_good_step(tmp_path):
    train(steps_cfg(20), tmp_path, progress=False)
    diverging = steps_cfg(40, "--config.optimizer.learning_rate=1e38")
    with pytest.raises(NonFiniteLossError):
        train(diverging, tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 20
    summary = train(
        steps_cfg(40, "--config.optimizer.learning_rate=1e-4"), tmp_path, progress=False
    )
    assert summary["steps"] == 40
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 1e-4
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [10, 20, 30, 40]  # the diverged attempt's rows are gone


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_identity(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(UserError, match="keep_checkpoints"):
        train(steps_cfg(10, "--config.keep_checkpoints=0"), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()
    # train() put back the signal handlers it found and released the workdir lock.
    assert {s: signal.getsignal(s) for s in before} == before
    # A workdir without a checkpoint holds no run: another config may use it.
    (tmp_path / "config.json").write_text(json.dumps({"seed": 123}))
    assert train(steps_cfg(10, "--config.seed=7"), tmp_path, progress=False)["steps"] == 10
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7


@pytest.mark.parametrize("key", ["checkpoint_every", "eval_every"])
def test_negative_cadence_is_refused_before_anything_is_written(tmp_path, key):
    with pytest.raises(UserError, match=f"config.{key}: expected an int >= 0 .*found -5"):
        train(steps_cfg(10, f"--config.{key}=-5"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_torn_metrics_line_is_dropped_and_corrupt_files_are_named(tmp_path, capfd):
    train(steps_cfg(10), tmp_path, progress=False)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 11, "split": "tr')  # killed mid-append
    capfd.readouterr()
    train(steps_cfg(20), tmp_path, progress=False)
    err = capfd.readouterr().err
    assert f"{metrics}: dropped its torn last line" in err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [10, 20]

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(UserError, match=f"{metrics}: line 1 is not a metrics record"):
        read_metrics(metrics)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match=f"{tmp_path / 'config.json'}: expected a JSON file"):
        train(steps_cfg(30), tmp_path, progress=False)


def test_resume_skips_a_step_without_its_data_position_and_stays_exact(tmp_path, capfd):
    exact = "--config.data.train_transforms=[]"
    straight = train(steps_cfg(30, exact), tmp_path / "straight", progress=False)
    run = tmp_path / "run"
    train(steps_cfg(20, exact), run, progress=False)  # checkpoints at steps 10 and 20
    shutil.rmtree(run / "checkpoints" / "20" / "data")
    capfd.readouterr()
    resumed = train(steps_cfg(30, exact), run, progress=False)
    out, err = capfd.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("jaxdl: warning")]
    assert len(warnings) == 1 and "skipped corrupt checkpoint step(s) [20]" in warnings[0]
    assert "resumed from step 10" in out
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert (run / "checkpoints" / "20.corrupt").is_dir()


def test_evaluate_leaves_in_flight_saves_and_with_init_from_refuses_a_corrupt_step(tmp_path):
    from _corrupt import flip_a_byte

    from jaxdl.checkpoint.integrity import CorruptCheckpointError
    from jaxdl.training.evaluate import evaluate_workdir

    run = tmp_path / "run"
    train(steps_cfg(10), run, progress=False)
    # A save the run may have in flight: evaluating beside a training run leaves it alone.
    in_flight = run / "checkpoints" / "20.orbax-checkpoint-tmp" / "state"
    in_flight.mkdir(parents=True)
    assert evaluate_workdir(run)["step"] == 10
    assert in_flight.is_dir()
    step_dir = run / "checkpoints" / "10"
    flip_a_byte(step_dir)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {step_dir}: file state/"):
        evaluate_workdir(run)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {step_dir}: file state/"):
        train(
            steps_cfg(10, f"--config.init_from.checkpoint={run}"), tmp_path / "ft", progress=False
        )
