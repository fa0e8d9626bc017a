"""Checkpoint digests: a flipped byte or a lost item is never restored; a step older than
digests loads with one warning line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _corrupt import flip_a_byte
from test_manager import CONFIG, assert_same, make_state, zeros_like

from jaxdl.checkpoint.integrity import DIGEST_FILE, CorruptCheckpointError
from jaxdl.checkpoint.manager import Checkpointer
from jaxdl.checkpoint.read import load_params

REPO = Path(__file__).resolve().parents[2]


def save_steps(workdir: Path, steps=(1, 2), data=True) -> None:
    with Checkpointer(workdir) as ckpt:
        for s in steps:
            ckpt.save(
                s, make_state(s, step=s), data_state={"pos": s} if data else None, config=CONFIG
            )


def test_flipped_byte_is_refused_by_every_reader_and_resume_falls_back(tmp_path, capsys):
    save_steps(tmp_path)
    step_dir = tmp_path / "checkpoints" / "2"
    victim = flip_a_byte(step_dir)
    name = str(victim.relative_to(step_dir))
    with pytest.raises(CorruptCheckpointError, match=f"{step_dir}: file {name} hashes to") as err:
        load_params(tmp_path)
    # The advice holds for commands that take no step (evaluate, export use the latest).
    assert str(err.value).endswith(
        f"Fix: delete {step_dir} (evaluate, export and resume then use the latest of [1]); "
        "init_from.step can name another step."
    )
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match=name):
        ckpt.restore(zeros_like(make_state()), 2)
    capsys.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        step, state, data_state = ckpt.resume(zeros_like(make_state()), require_data=True)
        assert ckpt.latest_step() == 1
    assert (step, data_state) == (1, {"pos": 1})
    assert_same(state, make_state(1, step=1))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "skipped corrupt checkpoint step(s) [2]" in err[0], err
    assert "resuming from step 1" in err[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.corrupt"]
    np.testing.assert_array_equal(
        load_params(tmp_path)["head"]["bias"],
        np.asarray(make_state(1).params["params"]["head"]["bias"]),
    )


def test_step_without_data_state_is_not_resumed_from(tmp_path):
    save_steps(tmp_path)
    step_dir = tmp_path / "checkpoints" / "2"
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, make_state(3, step=3), data_state=None, config=CONFIG)
    with Checkpointer(tmp_path) as ckpt:
        step, _, data_state = ckpt.resume(zeros_like(make_state()), require_data=True)
    assert (step, data_state) == (2, {"pos": 2})
    # A deleted data item is caught by the digest even without require_data.

    shutil.rmtree(step_dir / "data")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.restore(zeros_like(make_state()), 2)


def test_every_step_corrupt_is_one_error_not_a_silent_restart(tmp_path):
    save_steps(tmp_path, steps=(1,))
    flip_a_byte(tmp_path / "checkpoints" / "1")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match="every"):
        ckpt.resume(zeros_like(make_state()), require_data=True)


def test_step_without_digest_loads_with_one_warning_until_vouched_for(tmp_path, capsys):
    # A step an older jaxdl wrote (no digest file at all) loads unverified, one line naming
    # it and the command that records a digest, however many of its items are read.
    save_steps(tmp_path, steps=(1, 2))
    step_dir = tmp_path / "checkpoints" / "2"
    (step_dir / DIGEST_FILE).unlink()
    capsys.readouterr()
    np.testing.assert_array_equal(
        load_params(tmp_path)["head"]["bias"],
        np.asarray(make_state(2).params["params"]["head"]["bias"]),
    )
    with Checkpointer(tmp_path) as ckpt:
        step, state, data_state = ckpt.resume(zeros_like(make_state()), require_data=True)
    assert (step, data_state) == (2, {"pos": 2})
    assert_same(state, make_state(2, step=2))
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"jaxdl: warning: checkpoint {step_dir}: has no {DIGEST_FILE} (written by an older "
        "jaxdl), so corruption cannot be detected in it; loading it unverified. To record its "
        f"digest once you trust it: python -m jaxdl.checkpoint.integrity {step_dir}"
    ], err
    out = subprocess.run(
        [sys.executable, "-m", "jaxdl.checkpoint.integrity", str(step_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.startswith(f"wrote {step_dir / DIGEST_FILE}")
    # Vouched for, it is verified like any other step: a flipped byte is refused again.
    victim = flip_a_byte(step_dir)
    with pytest.raises(CorruptCheckpointError, match=f"file {victim.relative_to(step_dir)}"):
        load_params(tmp_path)
    (step_dir / DIGEST_FILE).write_text('{"files": ')
    with pytest.raises(CorruptCheckpointError, match=f"{DIGEST_FILE} is corrupt"):
        load_params(tmp_path)


def test_a_digest_that_does_not_match_is_still_refused_without_a_digest_elsewhere(tmp_path, capsys):
    # Step 1 predates digests, step 2 is corrupt: resume sets step 2 aside and takes step 1
    # (unverified, with its warning); load_params refuses step 2 outright.
    save_steps(tmp_path, steps=(1, 2))
    (tmp_path / "checkpoints" / "1" / DIGEST_FILE).unlink()
    flip_a_byte(tmp_path / "checkpoints" / "2")
    with pytest.raises(CorruptCheckpointError, match="hashes to"):
        load_params(tmp_path)
    capsys.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        step, state, _ = ckpt.resume(zeros_like(make_state()), require_data=True)
    assert step == 1
    assert_same(state, make_state(1, step=1))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert any("skipped corrupt checkpoint step(s) [2]" in line for line in err), err
    assert any(f"no {DIGEST_FILE} (written by an older jaxdl)" in line for line in err), err


def test_verify_benchmark_runs_and_reports_the_share(tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import checkpoint_verify

    out = tmp_path / "v.json"
    checkpoint_verify.main(["--size", "tiny", "--trials", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["params"] == 35712  # the tiny transformer with the byte vocabulary
    assert 0 < result["verify_s"] < result["restore_s_with_verify"]
