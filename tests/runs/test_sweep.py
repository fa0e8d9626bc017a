"""The vmapped sweep: members equal standalone `train` runs, per-member NaN and early
stopping, sweep.json/table/png, resume."""

import json

import pytest

from jaxdl import config as config_lib
from jaxdl.runs.sweep import run_sweep
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_sweep")

QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=30",
    "--config.log_every=10",
    "--config.eval_every=15",
]


def quick_cfg(*extra):
    return config_lib.load_config("experiments/digits_mlp.py", [*QUICK, *extra])


def last_val(workdir) -> dict:
    return [r for r in read_metrics(f"{workdir}/metrics.jsonl") if r["split"] == "val"][-1]


def standalone(tmp_path, params: dict, *extra) -> dict:
    overrides = [*extra, *(f"--config.{k}={v!r}" for k, v in params.items())]
    workdir = tmp_path / "standalone" / "_".join(f"{v}" for v in params.values())
    train(quick_cfg(*overrides), workdir, progress=False)
    return last_val(workdir)


PARAMS = [
    "optimizer.learning_rate=[1e-3,4e-3]",
    "seed=[1,2]",
    "optimizer.weight_decay=[0.0,1e-3]",
    "optimizer.grad_clip_norm=[0.0,0.5]",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    # One group of 16: enough stacked members that XLA:CPU would hand the softmax and
    # bias-gradient sums to YNNPACK, were the group step not keeping reductions in XLA.
    report = run_sweep(quick_cfg(), workdir, PARAMS, parallel=16, echo=lambda s: None)
    return workdir, report


def test_sweep_json_contract(sweep):
    workdir, report = sweep
    on_disk = json.loads((workdir / "sweep.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["metric"] == "val_accuracy" and report["mode"] == "max"
    assert len(report["trials"]) == 16
    first = report["trials"][0]
    assert set(first) == {"params", "best", "state", "workdir"}
    assert first["params"] == {
        "optimizer.learning_rate": 1e-3,
        "seed": 1,
        "optimizer.weight_decay": 0.0,
        "optimizer.grad_clip_norm": 0.0,
    }
    for trial in report["trials"]:
        assert trial["state"] == "complete"
        member = trial["workdir"]
        assert trial["best"] == max(
            r["accuracy"] for r in read_metrics(f"{member}/metrics.jsonl") if r["split"] == "val"
        )
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            assert (workdir / "trials" / member.split("/")[-1] / name).is_file()
        assert any((workdir / "trials" / member.split("/")[-1] / "checkpoints_best").iterdir())
    assert (workdir / "sweep.png").stat().st_size > 1000
    table = (workdir / "table.txt").read_text().splitlines()
    assert table[0].split()[:2] == ["rank", "optimizer.grad_clip_norm"]
    bests = [float(line.split()[5]) for line in table[1:]]
    assert bests == sorted(bests, reverse=True) and len(bests) == 16


@pytest.mark.parametrize("index", [0, 7, 13, 15])
def test_member_equals_standalone_run(sweep, tmp_path, index):
    _, report = sweep
    trial = report["trials"][index]
    want = standalone(tmp_path, trial["params"])  # digits_mlp has dropout 0.1
    got = last_val(trial["workdir"])
    assert got["step"] == want["step"] == 30
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-5)


def test_members_without_dropout_equal_standalone_runs(tmp_path):
    params = ["optimizer.learning_rate=[2e-3,5e-3]", "seed=[3,4]"]
    no_dropout = "--config.model.dropout_rate=0.0"
    report = run_sweep(
        quick_cfg(no_dropout), tmp_path / "sweep", params, parallel=4, echo=lambda s: None
    )
    for trial in (report["trials"][1], report["trials"][2]):
        want = standalone(tmp_path, trial["params"], no_dropout)
        got = last_val(trial["workdir"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_a_diverging_member_is_marked_and_its_neighbours_finish(tmp_path):
    params = ["optimizer.learning_rate=[0.1,1e30]"]
    report = run_sweep(
        quick_cfg("--config.optimizer.name=sgd"),
        tmp_path,
        params,
        parallel=2,
        echo=lambda s: None,
    )
    good, bad = report["trials"]
    assert good["state"] == "complete" and bad["state"] == "diverged"
    assert good["best"] > 0.5
    trial = json.loads((tmp_path / "trials" / "001" / "trial.json").read_text())
    assert 1 <= trial["diverged_at_step"] <= 10
    assert last_val(good["workdir"])["step"] == 30


def test_label_smoothing_and_l2_members_equal_standalone_runs(tmp_path):
    params = ["loss.label_smoothing=[0.0,0.1]", "loss.l2=[0.0,1e-3]"]
    report = run_sweep(quick_cfg(), tmp_path / "sweep", params, parallel=4, echo=lambda s: None)
    for trial in (report["trials"][0], report["trials"][3]):  # neither, and both
        want = standalone(tmp_path, trial["params"])
        got = last_val(trial["workdir"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_dropout_rate_members_equal_standalone_runs(tmp_path):
    params = ["model.dropout_rate=[0.0,0.3]", "seed=[1,2]"]
    report = run_sweep(quick_cfg(), tmp_path / "sweep", params, parallel=4, echo=lambda s: None)
    for trial in (report["trials"][0], report["trials"][3]):  # rate 0 and rate 0.3
        want = standalone(tmp_path, trial["params"])
        got = last_val(trial["workdir"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_eight_steps_per_call_match_one(sweep, tmp_path):
    _, report = sweep
    params = ["optimizer.learning_rate=[1e-3,4e-3]", "seed=[1,2]"]
    fused = run_sweep(
        quick_cfg("--config.steps_per_call=8"), tmp_path, params, parallel=4, echo=lambda s: None
    )
    for trial in fused["trials"]:
        want = next(
            t
            for t in report["trials"]
            if t["params"]
            == {**trial["params"], "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0}
        )
        got, ref = last_val(trial["workdir"]), last_val(want["workdir"])
        assert got["step"] == 30
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)


def test_a_table_task_sweeps_with_the_statistics_its_data_fixes(tmp_path):
    """Tabular members need the data's task fields (feature count, class counts): a binary
    sweep scores each member by exact ROC AUC, equal to a standalone run's."""
    quick = ["--config.num_epochs=0", "--config.num_steps=20", "--config.eval_every=10"]
    cfg = config_lib.load_config("experiments/breast_cancer.py", quick)
    report = run_sweep(
        cfg,
        tmp_path / "sweep",
        ["optimizer.learning_rate=[1e-3,3e-3]"],
        parallel=2,
        echo=lambda s: None,
    )
    assert report["metric"] == "val_roc_auc" and report["mode"] == "max"
    trial = next(t for t in report["trials"] if t["params"]["optimizer.learning_rate"] == 3e-3)
    alone = config_lib.load_config(
        "experiments/breast_cancer.py", [*quick, "--config.optimizer.learning_rate=3e-3"]
    )
    train(alone, tmp_path / "alone", progress=False, echo=lambda *_: None)
    assert trial["best"] == pytest.approx(last_val(tmp_path / "alone")["roc_auc"], abs=1e-5)
