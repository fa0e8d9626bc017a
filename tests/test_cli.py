"""The `jaxdl` command as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

QUICK = [
    "--config.num_epochs=0",
    "--config.num_steps=20",
    "--config.log_every=10",
    "--config.eval_every=10",
]


def jaxdl(*args, cwd=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def assert_user_error(done, *words):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("jaxdl: error: ")
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--config.nonexistent=1"], ["config.nonexistent", "unknown key"]),
        (["--config.data.batch_size=big"], ["config.data.batch_size", "expected int", "'big'"]),
        (["--config.model.name=transformerz"], ["model.name", "expected one of", "transformerz"]),
        (["--config.model.num_classes=5"], ["label", "[0, 5)"]),
        (["--config.model.widthz=3"], ["model.widthz"]),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, overrides, words):
    done = jaxdl(
        "train",
        "--config",
        "experiments/digits_mlp.py",
        "--workdir",
        str(tmp_path / "w"),
        "--no-progress",
        *QUICK,
        *overrides,
    )
    assert_user_error(done, *words)


def test_debug_shows_the_traceback(tmp_path):
    done = jaxdl(
        "train",
        "--config",
        "experiments/digits_mlp.py",
        "--workdir",
        str(tmp_path),
        "--config.nonexistent=1",
        "--debug",
    )
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_missing_config_and_bad_flag(tmp_path):
    assert_user_error(jaxdl("train", "--config", "nope.py", "--workdir", str(tmp_path)), "nope.py")
    assert_user_error(
        jaxdl("train", "--config", "x.py", "--workdir", "w", "--bogus"),
        "unrecognized arguments: --bogus",
    )
    assert_user_error(jaxdl("evaluate", "--workdir", str(tmp_path / "none")), "config.json")


def test_train_then_evaluate(tmp_path):
    workdir = tmp_path / "run"
    done = jaxdl(
        "train",
        "--config",
        "experiments/digits_cnn.py",
        "--workdir",
        str(workdir),
        "--no-progress",
        *QUICK,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    evaluated = jaxdl("evaluate", "--workdir", str(workdir))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(summary["test_accuracy"])
    # the same workdir with another config is refused, and nothing in it changes
    before = (workdir / "config.json").read_text()
    again = jaxdl(
        "train", "--config", "experiments/digits_mlp.py", "--workdir", str(workdir), *QUICK
    )
    assert_user_error(again, "holds another run")
    assert (workdir / "config.json").read_text() == before


def test_a_bug_exits_1_with_its_traceback_and_bad_input_still_exits_2(tmp_path):
    """A broken internal function is a bug (exit 1, traceback); a bad key is user input."""
    script = (
        "import sys\n"
        "import jaxdl.core.heads as heads\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('internal invariant broken')\n"
        "heads.make_head = broken\n"
        "from jaxdl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["train", "--config", "experiments/digits_mlp.py", "--no-progress", *QUICK]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bug = subprocess.run(
        [sys.executable, "-c", script, *args, "--workdir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bug.returncode == 1, bug.stderr
    assert "Traceback" in bug.stderr and "internal invariant broken" in bug.stderr
    assert "internal error" in bug.stderr.strip().splitlines()[-1]
    bad_key = subprocess.run(
        [sys.executable, "-c", script, *args, "--workdir", str(tmp_path / "b"), "--config.nope=1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert_user_error(bad_key, "config.nope")


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["train", "--config", "jaxdl/configs/digits_mlp.py", "--workdir", ""],
            ["--workdir", "''"],
        ),
        (["train", "--config", "jaxdl/configs/digits_mlp.py", "--workdir", " "], ["--workdir"]),
        (["evaluate", "--workdir", ""], ["--workdir: expected a path"]),
        (["export", "--workdir", "w", "--out", ""], ["--out: expected a path"]),
        (["import", "timm:resnet18", "--from", "", "--out", "w"], ["--from: expected a path"]),
        (["predict", "m.jaxexport", ""], ["predict: expected file paths"]),
    ],
)
def test_an_empty_path_is_refused_not_the_current_folder(
    tmp_path, capsys, monkeypatch, args, words
):
    from jaxdl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    for word in words:
        assert word in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran


def test_train_refuses_an_empty_workdir_from_python_too(tmp_path, monkeypatch):
    from jaxdl import config as config_lib
    from jaxdl.errors import UserError
    from jaxdl.training.trainer import train

    cfg = config_lib.load_config("jaxdl/configs/digits_mlp.py")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="workdir: expected a folder path, found ''"):
        train(cfg, "")
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
    from jaxdl.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    for workdir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        cmd = ["train", "--config", "jaxdl/configs/digits_mlp.py", "--workdir", str(workdir)]
        assert main(cmd) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"--workdir: {workdir} (or a folder above it) is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
