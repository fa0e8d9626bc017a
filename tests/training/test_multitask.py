"""Fine-tuning end to end on real digits: pretrain on 0-4, fine-tune on new classes.

One pretrained SimpleCNN (8 steps on digits 0-4, 5-class head) feeds a two-task
`run_tasks` run: a full fine-tune on 7-9, then a frozen-backbone fine-tune on 5-9 with a
fresh head. The bad inputs go through the real `jaxdl train` command.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxdl import config as config_lib
from jaxdl import testing
from jaxdl.checkpoint.read import load_params
from jaxdl.core import tree as tree_lib
from jaxdl.data import build_data
from jaxdl.finetune.surgery import restore_pretrained
from jaxdl.training.evaluate import restore_run
from jaxdl.training.multitask import format_rows, run_tasks, task_configs
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_multitask")

STEPS = 8
QUICK = [
    "--config.num_epochs=0",
    f"--config.num_steps={STEPS}",
    "--config.log_every=4",
    "--config.best_metric=",
    "--config.keep_checkpoints=1",
]
BACKBONE = [
    f"params/{layer}/{leaf}" for layer in ("conv_0", "conv_1", "fc") for leaf in ("bias", "kernel")
]
HEAD = ["params/head/bias", "params/head/kernel"]
BACKBONE_PARAMS = (9 * 64 + 64) + (9 * 64 * 128 + 128) + (2 * 2 * 128 * 128 + 128)  # 140,160


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Workdir of a SimpleCNN trained STEPS steps on digits 0-4."""
    workdir = tmp_path_factory.mktemp("pretrain_0_4")
    cfg = config_lib.load_config(
        "experiments/digits_cnn.py",
        [*QUICK, "--config.data.classes=[0,1,2,3,4]", "--config.model.num_classes=5"],
    )
    train(cfg, workdir, progress=False, echo=lambda *_: None)
    return workdir


def finetune_cfg(pretrained, extra=()):
    return config_lib.load_config(
        "experiments/digits_finetune.py",
        [*QUICK, f"--config.init_from.checkpoint={pretrained}", *extra],
    )


@pytest.fixture(scope="module")
def tasks(pretrained, tmp_path_factory):
    """run_tasks: a full fine-tune on 7-9 first, then the frozen-backbone 5-9 task."""
    workdir = tmp_path_factory.mktemp("tasks")
    cfg = finetune_cfg(pretrained)
    cfg.tasks = [
        {
            "name": "full-7-9",
            "data.classes": [7, 8, 9],
            "model": {"num_classes": 3},
            "partition": None,
        },
        {"name": "5-9"},
    ]
    return workdir, run_tasks(cfg, workdir, progress=False, echo=lambda *_: None)


def test_frozen_backbone_finetune_trains_only_the_fresh_head(pretrained, tasks):
    workdir, _ = tasks
    task_dir = workdir / "tasks" / "5-9"
    _, setup, _ = restore_run(task_dir)
    final = jax.device_get(setup.state)
    assert int(final.step) == STEPS
    assert sorted(tree_lib.flatten(final.frozen)) == BACKBONE
    assert sorted(tree_lib.flatten(final.params)) == HEAD
    # The frozen leaves are the pretrained values, bitwise, after training.
    saved = tree_lib.flatten({"params": load_params(pretrained)})
    before = final.replace(frozen=tree_lib.unflatten({p: saved[p] for p in BACKBONE}))
    testing.assert_frozen_unchanged(before, final)
    # Adam's two moments for the 645 head parameters and nothing else.
    testing.assert_no_opt_state_for_frozen(final)
    moments = [x.size for x in jax.tree.leaves(final.opt_state) if np.ndim(x) > 0]
    assert sum(moments) == 2 * (128 * 5 + 5)


def test_init_report_lists_the_head_as_reinitialized(pretrained, tasks):
    workdir, _ = tasks
    report = (workdir / "tasks" / "5-9" / "init_report.json").read_text()
    report = json.loads(report)
    assert report["source"] == str(pretrained / "checkpoints" / str(STEPS))
    assert report["step"] == STEPS
    assert report["reinitialized"] == HEAD
    assert report["loaded"] == BACKBONE
    for key in ("missing", "unexpected", "shape_mismatch", "ignored", "dtype_cast"):
        assert report[key] == [], key


def test_tasks_write_rows_side_by_side_and_restore_fresh(pretrained, tasks):
    workdir, result = tasks
    rows = result["tasks"]
    assert [r["task"] for r in rows] == ["full-7-9", "5-9"]
    assert [r["trainable_params"] for r in rows] == [BACKBONE_PARAMS + 128 * 3 + 3, 128 * 5 + 5]
    assert [r["steps"] for r in rows] == [STEPS, STEPS]
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["wall_s"] > 0 and row["step_ms"] > 0
        test = [
            r for r in read_metrics(Path(row["workdir"]) / "metrics.jsonl") if r["split"] == "test"
        ]
        assert test[-1]["accuracy"] == pytest.approx(row["test_accuracy"])
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert [r["task"] for r in on_disk["tasks"]] == ["full-7-9", "5-9"]
    assert on_disk["init_from"]["checkpoint"] == str(pretrained)
    table = format_rows(rows).splitlines()
    assert table[0].split() == [
        "task",
        "test_accuracy",
        "trainable_params",
        "steps",
        "step_ms",
        "wall_s",
    ]
    assert table[2].split()[:3] == ["full-7-9", f"{rows[0]['test_accuracy']:.4g}", "140,547"]
    # The full fine-tune moved the backbone; the task after it still starts from the checkpoint.
    saved = tree_lib.flatten(load_params(pretrained))
    full = tree_lib.flatten(load_params(workdir / "tasks" / "full-7-9"))
    frozen = tree_lib.flatten(load_params(workdir / "tasks" / "5-9"))
    assert not np.array_equal(full["conv_1/kernel"], saved["conv_1/kernel"])
    for path in ("conv_0/kernel", "conv_1/kernel", "fc/kernel", "fc/bias"):
        np.testing.assert_array_equal(frozen[path], saved[path], err_msg=path)
    task_cfg = json.loads((workdir / "tasks" / "full-7-9" / "config.json").read_text())
    assert task_cfg["data"]["classes"] == [7, 8, 9] and task_cfg["tasks"] is None
    assert task_cfg["model"] == {"name": "simple_cnn", "num_classes": 3}


def test_task_errors_name_the_task_before_anything_trains(pretrained):
    cfg = finetune_cfg(pretrained)
    cfg.tasks = [{"name": "ok"}, {"name": "typo", "data.clases": [1]}]
    with pytest.raises(ValueError, match=r"config.tasks\[1\] \('typo'\): config.data.clases"):
        task_configs(cfg)
    cfg.tasks = [{"name": "a"}, {"name": "a"}]
    with pytest.raises(ValueError, match=r"config.tasks\[1\]: expected a dict with a unique"):
        task_configs(cfg)
    cfg.tasks = [{"name": "../escape"}]
    with pytest.raises(ValueError, match=r"config.tasks\[0\]"):
        task_configs(cfg)


# ---- data.classes / data.examples_per_class --------------------------------------------------


def _ids_and_labels(data, split):
    records = data.source.splits[split]
    rows = [records[i] for i in range(len(records))]
    return np.array([r["id"] for r in rows]), np.array([r["label"] for r in rows])


def test_classes_are_kept_and_relabelled_in_the_given_order():
    digits = load_digits().target  # the record "id" is the row in load_digits
    every = build_data({"source": "digits"}, seed=0)
    data = build_data({"source": "digits", "classes": [7, 3]}, seed=0, num_classes=2)
    assert data.num_classes == 2 and data.class_names == ["7", "3"]
    assert data.preprocessing["classes"] == [7, 3]
    for split in ("train", "val", "test"):
        ids, labels = _ids_and_labels(data, split)
        all_ids, _ = _ids_and_labels(every, split)
        np.testing.assert_array_equal(ids, all_ids[np.isin(digits[all_ids], [7, 3])])
        np.testing.assert_array_equal(labels, np.where(digits[ids] == 7, 0, 1))
    assert data.split_sizes["test"] == 36 + 37  # 20% of the 180 sevens and 183 threes


def test_examples_per_class_takes_the_first_n_train_records_whatever_the_seed():
    cfg = {"source": "digits", "classes": [5, 6, 7, 8, 9], "examples_per_class": 2}
    a = build_data(cfg, seed=0, num_classes=5)
    b = build_data(cfg, seed=123, num_classes=5)
    full = build_data({"source": "digits", "classes": [5, 6, 7, 8, 9]}, seed=0, num_classes=5)
    ids = lambda d: [d.source.splits["train"][i]["id"] for i in range(d.split_sizes["train"])]
    assert ids(a) == ids(b)
    labels = [full.source.splits["train"][i]["label"] for i in range(full.split_sizes["train"])]
    expected = sorted(i for c in range(5) for i in [j for j, y in enumerate(labels) if y == c][:2])
    assert ids(a) == [ids(full)[i] for i in expected]
    assert a.split_sizes == {"train": 10, "val": full.split_sizes["val"], "test": 180}


@pytest.mark.parametrize(
    "data, num_classes, words",
    [
        ({"classes": [5, 5]}, None, "data.classes: expected distinct int labels in [0, 10)"),
        ({"classes": [3, 10]}, None, "found [3, 10]"),
        ({"classes": [1, 2, 3]}, 2, "model.num_classes: expected at least 3"),
        ({"examples_per_class": 200}, None, "data.examples_per_class: expected at least 200"),
    ],
)
def test_bad_data_selection_is_refused(data, num_classes, words):
    with pytest.raises(ValueError) as err:
        build_data({"source": "digits", **data}, seed=0, num_classes=num_classes)
    assert words in str(err.value)


# ---- bad input through the CLI ------------------------------------------------------------


def _corrupt_copy(pretrained: Path, dest: Path) -> Path:
    """The pretrained workdir with every array file of its step cut to half its size."""
    shutil.copytree(pretrained, dest)
    data = dest / "checkpoints" / str(STEPS) / "state" / "ocdbt.process_0" / "d"
    for path in data.iterdir():
        os.truncate(path, path.stat().st_size // 2)
    return dest


def test_bad_fine_tuning_inputs_exit_2_with_one_line(pretrained, tmp_path):
    corrupt = _corrupt_copy(pretrained, tmp_path / "corrupt_ckpt")
    cases = {
        "missing": (
            ["--config.init_from.checkpoint=" + str(tmp_path / "nope")],
            ["init_from.checkpoint: no checkpoint found at", "nope"],
        ),
        "corrupt": (
            [f"--config.init_from.checkpoint={corrupt}"],
            ["it is corrupt or truncated", str(corrupt / "checkpoints")],
        ),
        "other_model": (
            ["--config.model.name=mlp"],
            [
                "does not fit the model",
                "missing from the checkpoint: params/hidden_0/bias",
                "unexpected",
            ],
        ),
        "head_without_reinit": (
            [
                "--config.init_from.reinit=[]",
                "--config.data.classes=[7,8,9]",
                "--config.model.num_classes=3",
            ],
            ["params/head/kernel checkpoint (128, 5) vs model (128, 3)", "init_from.reinit"],
        ),
        "uncovered_leaf": (
            ["--config.partition=[('params/head/.*', {})]"],
            ["6 parameter(s) matched by no rule", "params/conv_0/kernel", "catch-all"],
        ),
        "rule_matches_nothing": (
            ["--config.partition=[('params/heads/.*', {}), ('.*', {'trainable': False})]"],
            ["partition rule 'params/heads/.*' matches no parameter"],
        ),
        "lora_target_matches_nothing": (
            ["--config.lora={'rank': 2, 'alpha': 4.0, 'targets': 'params/nope/kernel'}"],
            ["lora.targets: regex 'params/nope/kernel'", "matched no kernel"],
        ),
    }
    procs = {}
    for name, (overrides, _) in cases.items():
        overrides = [*QUICK, f"--config.init_from.checkpoint={pretrained}", *overrides]
        cmd = testing.train_command("experiments/digits_finetune.py", tmp_path / name, overrides)
        procs[name] = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=testing.subprocess_env(),
        )
    for name, proc in procs.items():  # all seven run at once: most of each is start-up
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.startswith("jaxdl: error: ")]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr[-2000:])
        for word in cases[name][1]:
            assert word in lines[0], (name, lines[0])
        assert not (tmp_path / name / "config.json").exists(), name  # nothing half-written


# ---- security -----------------------------------------------------------------------------


def test_a_checkpoint_holding_a_symlink_is_refused(pretrained, tmp_path):
    copy = tmp_path / "linked"
    shutil.copytree(pretrained, copy)
    step_dir = copy / "checkpoints" / str(STEPS)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.symlink(outside, step_dir / "state" / "extra")
    init_from = {"checkpoint": str(copy), "reinit": ["params/head/.*"]}
    with pytest.raises(ValueError, match=r"is a symbolic link or resolves to .*refusing to read"):
        restore_pretrained(init_from, {"params": load_params(pretrained)})
    # A step directory that is itself a link is refused too.
    os.remove(step_dir / "state" / "extra")
    linked_step = tmp_path / "ckpts" / str(STEPS)
    linked_step.parent.mkdir()
    os.symlink(step_dir, linked_step)
    with pytest.raises(ValueError, match="is a symbolic link"):
        load_params(linked_step)


def test_nothing_in_the_package_uses_pickle():
    package = Path(__file__).resolve().parents[2] / "jaxdl"
    pattern = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|shelve)\b"
        # torch.load only with weights_only=True: its restricted unpickler runs no code
        r"|allow_pickle\s*=\s*True|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)",
        re.MULTILINE,
    )
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 20
    offenders = [
        f"{p.relative_to(package)}: {m.group(0).strip()}"
        for p in sources
        for m in pattern.finditer(p.read_text())
    ]
    assert offenders == []
