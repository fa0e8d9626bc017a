"""`jaxdl sweep --storage postgresql://...` against a real PostgreSQL server that the tests
start in a temporary directory: two workers "on two machines" (each its own workdir, one
study), one SIGKILLed in its second trial, finish the sweep with a single process's table.

Debian's `postgresql` package installs the server outside PATH (/usr/lib/postgresql/N/bin);
the tests skip only where no server binaries are found (`.ci/run` installs them)."""

import glob
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_sweep_kill import QUICK  # 40 steps, eval and checkpoint every 10

from jaxdl import config as config_lib
from jaxdl.runs.sweep import run_sweep

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_postgres_sweep")

# A dead worker's trial is requeued once its heartbeat is GRACE_S old: 12 s with beats every
# 2 s (6 missed beats) instead of 30 s, so that B does not sit idle waiting for A's trial.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
ENV |= {"JAXDL_SWEEP_HEARTBEAT_S": "2", "JAXDL_SWEEP_GRACE_S": "12"}
GRID = ["optimizer.learning_rate=[1e-3,2e-3,3e-3]", "seed=[0,1]"]


def _server_bin() -> Path | None:
    """The directory of initdb and pg_ctl (Debian's, or initdb's on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    versions.sort(key=lambda p: int(Path(p).parts[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1; yields a function that creates a database
    and returns its ``postgresql://`` URL. The server refuses to run as root: as root it runs
    as the `postgres` user the Debian package creates."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql")
    pytest.importorskip("optuna")
    pytest.importorskip("psycopg")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="jaxdl-pg-"))
    if os.getuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("as root, the server runs as the `postgres` user; found no such user")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)

    def database(name: str) -> str:
        import psycopg

        server = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    database.port = port
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o", opts, "start")
        yield database
    finally:
        if (data / "postmaster.pid").exists():
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def sweep_cmd(workdir, storage, *extra):
    return [
        sys.executable, "-m", "jaxdl.cli", "sweep", "--config", "experiments/digits_mlp.py",
        "--workdir", str(workdir), *QUICK, *(f"--param={p}" for p in GRID),
        "--strategy", "grid", "--storage", storage, "--parallel", "1", *extra,
    ]  # fmt: skip


def trained(out: str) -> list[int]:
    """The trial numbers a worker's stdout says it trained."""
    lines = [x for x in out.splitlines() if x.startswith("sweep: training trials")]
    return [n for x in lines for n in json.loads(re.search(r"\[[\d, ]*\]", x)[0])]


def rows(table: str) -> list[list[str]]:
    """table.txt without its workdir column (the trials' numbers differ between one
    process and two workers that lost a trial)."""
    return [line.split()[:-1] for line in table.splitlines()]


def start(cmd, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nobody reads it while the worker runs
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=ENV)


def wait_for(proc: subprocess.Popen, found):
    """Poll ``found()`` until it returns something, while ``proc`` runs."""
    deadline = time.time() + 240
    while not (got := found()):
        assert proc.poll() is None and time.time() < deadline, "the worker ended first"
        time.sleep(0.02)
    return got


def test_two_workers_one_killed_finish_with_the_single_process_table(tmp_path, postgres):
    import optuna

    storage = postgres("two_workers")
    a_dir, b_dir = tmp_path / "machine_a", tmp_path / "machine_b"
    a = start(sweep_cmd(a_dir, storage), tmp_path / "a.log")
    b = start(sweep_cmd(b_dir, storage), tmp_path / "b.log")

    # A finishes one trial; in its second, once it has a checkpoint, it dies as a machine
    # does (SIGKILL). As if on another machine: B cannot see A's pid (its owner record names
    # another host), only that its heartbeats stopped.
    wait_for(a, lambda: list(a_dir.glob("trials/*/trial.json")))
    rdb = optuna.storages.RDBStorage(storage)  # ready before A's second trial starts
    study_id = rdb.get_study_id_from_name("jaxdl-sweep")
    started = lambda: [d for d in a_dir.glob("trials/*") if not (d / "trial.json").exists()]
    cut = wait_for(a, started)[0]
    killed = int(cut.name)
    trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, killed)
    rdb.set_trial_user_attr(trial_id, "jaxdl_owner", {"host": "machine-a", "pid": 1})
    wait_for(a, lambda: (cut / "checkpoints" / "10").is_dir())
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=60) == -signal.SIGKILL
    assert not (cut / "trial.json").exists(), "A finished its second trial before the kill"
    assert b.wait(timeout=240) == 0, (tmp_path / "b.log").read_text()
    a_out, b_out = ((tmp_path / n).read_text() for n in ("a.log", "b.log"))

    # Split between the workers; A's killed trial requeued and trained afresh by B (B's
    # workdir holds no checkpoint of it: it does not say "resumed").
    a_trained, b_trained = trained(a_out), trained(b_out)
    a_finished = sorted(int(d.parent.name) for d in a_dir.glob("trials/*/trial.json"))
    assert len(a_finished) == 1 and a_trained == [*a_finished, killed], a_out
    assert killed in b_trained and not set(a_finished) & set(b_trained), b_out
    assert f"sweep: training trials [{killed}] together\n" in b_out
    study = optuna.load_study(study_name="jaxdl-sweep", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[killed] == "FAIL" and list(states.values()).count("COMPLETE") == 6, states
    copy = [t for t in study.trials if t.user_attrs.get("jaxdl_retry_of") == killed]
    assert len(copy) == 1 and copy[0].state.name == "COMPLETE"
    assert copy[0].user_attrs["jaxdl_record"]["workdir"] == str(b_dir / "trials" / f"{killed:03d}")

    # B's table holds A's finished trial too (read from the study), and so does A restarted
    # on its machine, which trains nothing; both equal one process's table of the grid.
    again = subprocess.run(sweep_cmd(a_dir, storage), capture_output=True, text=True, env=ENV)
    assert again.returncode == 0 and trained(again.stdout) == [], again.stderr
    cfg = config_lib.load_config("experiments/digits_mlp.py", QUICK)
    single = run_sweep(cfg, tmp_path / "single", GRID, parallel=1, echo=lambda s: None)
    want = rows((tmp_path / "single" / "table.txt").read_text())
    assert len(want) == 7
    for workdir in (a_dir, b_dir):
        assert rows((workdir / "table.txt").read_text()) == want
        report = json.loads((workdir / "sweep.json").read_text())
        got = sorted((json.dumps(t["params"]), t["best"], t["state"]) for t in report["trials"])
        assert got == sorted(
            (json.dumps(t["params"]), t["best"], t["state"]) for t in single["trials"]
        )  # the values exactly: training is deterministic on CPU


@pytest.mark.parametrize(
    "url, words",
    [
        ("postgres://postgres@{host}:{port}/nodb", ['"nodb" does not exist', "createdb"]),
        ("postgresql://nobody:hunter2@{host}:{port}/postgres", ["nobody:***@", "createuser"]),
        ("postgresql://postgres@{host}:{closed}/postgres", ["Connection refused", "start the"]),
        ("postgresql+psycopg2://postgres@{host}:{port}/postgres", ["psycopg2", "jaxdl[postgres]"]),
    ],
)  # fmt: skip
def test_a_bad_postgresql_url_is_one_line(tmp_path, postgres, url, words):
    url = url.format(host="127.0.0.1", port=postgres.port, closed=_free_port())
    if "psycopg2" in url and importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed here: the URL opens")
    cmd = sweep_cmd(tmp_path / "w", url)
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdl: error: --storage: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "hunter2" not in lines[0]
