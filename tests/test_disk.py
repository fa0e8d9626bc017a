"""A full or read-only disk is the user's, not a bug: one line naming the path, exit 2, and
nothing half-written that a rerun would take for a checkpoint or an artifact. The disks are
real: small tmpfs mounts (the test needs the right to mount, else it is skipped)."""

import contextlib
import subprocess
import sys

import pytest

from jaxdl.testing import subprocess_env

RUN = ["--no-progress", "--config.num_epochs=0", "--config.num_steps=30"]
RUN += ["--config.checkpoint_every=10", "--config.keep_checkpoints=5"]


@contextlib.contextmanager
def tmpfs(path, options):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    if done.returncode:
        pytest.skip("needs the right to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def jaxdl(*args):
    cmd = [sys.executable, "-m", "jaxdl.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())


def one_line(done, *words):
    """Exit 2 and jaxdl's one line last (Orbax's writer thread may log its own error before
    it: that is Orbax's log, not jaxdl's report)."""
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("jaxdl: ")]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr[-2000:]
    assert errors[0].startswith("jaxdl: error: "), errors[0]
    for word in words:
        assert word in errors[0], errors[0]


def test_a_full_disk_mid_run_then_a_rerun_with_space(tmp_path):
    with tmpfs(tmp_path / "disk", "size=600k") as disk:
        run = disk / "run"
        cnn = ["train", "--config", "jaxdl/configs/digits_cnn.py", "--workdir", str(run)]
        one_line(jaxdl(*cnn, *RUN), str(run / "checkpoints"), "No space left on device")
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = jaxdl(*cnn, *RUN)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (run / "summary.json").is_file()
        assert "resumed" not in done.stdout  # the failed step was not taken for a checkpoint

        with tmpfs(tmp_path / "small", "size=8k") as small:
            out = small / "digits.jaxexport"
            export = jaxdl("export", "--workdir", str(run), "--out", str(out))
            one_line(export, str(out), "ENOSPC")
            assert list(small.iterdir()) == []  # no artifact, no temporary


def test_a_read_only_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "size=1m,ro") as disk:
        run = disk / "run"
        mlp = ["train", "--config", "jaxdl/configs/digits_mlp.py", "--workdir", str(run)]
        one_line(jaxdl(*mlp, *RUN), str(run), "Read-only file system")


def test_asyncio_echoes_of_a_reported_disk_error_are_dropped_and_others_kept(caplog):
    """After jaxdl's one line for a full disk, the save's other failed write tasks are
    logged by asyncio at exit; those (disk errors, as TensorStore words them) are dropped,
    anything else still shows."""
    import logging

    from jaxdl import fileio

    logger = logging.getLogger("asyncio")
    before = list(logger.filters)
    full = ValueError("RESOURCE_EXHAUSTED: Failed to write: No space [os_error_code='28']")
    bug = RuntimeError("a bug")
    try:
        fileio.quiet_disk_echoes()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for err in (full, bug):
                logger.error("Task exception was never retrieved", exc_info=(type(err), err, None))
    finally:
        logger.filters[:] = before
    assert [r.exc_info[1] for r in caplog.records] == [bug]
