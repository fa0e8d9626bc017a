"""Optuna's samplers and pruners driving vmapped groups (ask-and-tell).

Each round asks M trials from the study (TPE, random or grid sampler), trains them as
vmapped groups (`jaxdl.runs.group.run_group`), reports every evaluation to the trial
so the successive-halving pruner can stop it (TPE and random; a grid is never pruned), and
tells the study each outcome. With an RDB storage (``--storage sqlite:///DIR/sweep.db``, or
``postgresql://USER@HOST:PORT/DB`` across machines) several `jaxdl sweep` processes share
one study: Optuna numbers trials in the storage, so no two processes train the same trial,
and each member's record is DIR/trials/<number> in the DIR of the process that trains it.
Processes may share DIR (one machine, a shared file system) or each have their own
(machines without one): the study is the source of truth, it keeps each trial's outcome
(RECORD), and the sweep's table is read from it, so every process reports the whole study.

A process that dies leaves its trials RUNNING in the storage. Each running trial has a
heartbeat (Optuna's RDB heartbeat) and its process's host and pid; a trial whose process
is gone (same host) or whose heartbeat stopped (any host) is failed and requeued, and the
next process to ask gets it and resumes its member from DIR/trials/<number>'s checkpoints:
where that DIR holds none (the trial ran on another machine), the member starts afresh.
A rerun of the same command therefore finishes the study, and waits for trials of other
live processes instead of leaving them behind. A signal (SIGTERM, Ctrl-C) requeues the
unfinished members at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdl.checkpoint.read import list_steps
from jaxdl.errors import Stopped, UserError, warn
from jaxdl.fileio import pid_alive
from jaxdl.runs.group import RESUME, group_key, member_config, run_group
from jaxdl.runs.spaces import Space
from jaxdl.training.guards import stop_on_signals
from jaxdl.training.trainer import minimized

STUDY_NAME = "jaxdl-sweep"


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(
            "--strategy tpe / --storage: expected the optional Optuna package, found it "
            'missing. Fix: pip install "jaxdl[optuna]", or use --strategy grid|random.'
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _categorical(value):
    """Optuna's categorical choices are None/bool/int/float/str: tuples travel as JSON."""
    return json.dumps(value) if isinstance(value, list | tuple) else value


def _distributions(optuna, spaces: Sequence[Space]) -> dict:
    dist = optuna.distributions
    out = {}
    for s in spaces:
        if s.discrete:
            out[s.key] = dist.CategoricalDistribution([_categorical(v) for v in s.values])
        elif s.kind == "int":
            out[s.key] = dist.IntDistribution(*s.values)
        else:
            out[s.key] = dist.FloatDistribution(*s.values, log=s.kind == "loguniform")
    return out


def _sampler(optuna, strategy: str, spaces: Sequence[Space], seed: int):
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {s.key: [_categorical(v) for v in s.values] for s in spaces}

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler whose last tell does not call `Study.stop`, which Optuna allows only
        inside `Study.optimize` (a RuntimeError in ask-and-tell); `run` counts the trials."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGridSampler(grid, seed=seed)


def _decode(spaces: Sequence[Space], params: dict) -> dict:
    out = {}
    for s in spaces:
        value = params[s.key]
        if (
            s.discrete
            and isinstance(value, str)
            and any(isinstance(v, list | tuple) for v in s.values)
        ):
            value = next(v for v in s.values if _categorical(v) == value)
        out[s.key] = value
    return out


def _engine_url(storage: str) -> str:
    """The SQLAlchemy URL of ``--storage``: a PostgreSQL URL without a driver
    (``postgresql://``, or libpq's ``postgres://``) is opened with psycopg 3, the driver of
    ``jaxdl[postgres]``; a URL naming its driver (``postgresql+psycopg2://``) is kept."""
    scheme, sep, rest = storage.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return storage


# What a refused connection says (libpq's words) -> the fix.
_CONNECT_FIXES = [
    ("does not exist", "create what the message names (createdb DB, createuser USER)"),
    ("password authentication failed", "put the password in ~/.pgpass or the URL"),
    ("no password supplied", "put the password in ~/.pgpass or the URL"),
    ("refused", "start the database server, or correct the URL's host and port"),
    ("resolve host", "correct the URL's host"),
    ("timeout", "start the database server, or correct the URL's host and port"),
    ("unable to open database file", "create the file's directory, or correct the path"),
]


def _shown(storage: str) -> str:
    """``storage`` for a message: its password, if any, as ***."""
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        return repr(sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True))
    except sqlalchemy.exc.ArgumentError:
        return repr(storage)


def _check_storage(storage: str) -> str:
    """Open ``--storage`` once before Optuna does, so that a URL this install cannot use or a
    server that refuses is one line; returns the SQLAlchemy URL."""
    import sqlalchemy
    import sqlalchemy.exc

    url = _engine_url(storage)
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError, ImportError) as err:
        raise UserError(
            f"--storage: {_shown(storage)} is not a database URL this install can open "
            f"({str(err).splitlines()[0]}). Fix: use sqlite:///DIR/sweep.db, or "
            'postgresql://USER@HOST:PORT/DB with pip install "jaxdl[postgres]" '
            "(postgresql+psycopg2:// needs pip install psycopg2-binary)."
        ) from err
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as err:
        reason = " ".join(str(err.orig or err).split())
        fix = next(
            (f for words, f in _CONNECT_FIXES if words in reason.lower()),
            "check that the database server runs and the URL's host, port, user and database exist",
        )
        raise UserError(
            f"--storage: could not open {_shown(storage)} ({reason}). Fix: {fix}."
        ) from err
    finally:
        engine.dispose()
    return url


def _open_study(optuna, storage: str | None, requeue: Callable, **kwargs):
    """Create or join the study; returns (study, its RDB storage or None for in-memory).

    Processes started together race to create the storage's tables (sqlite: a UNIQUE
    constraint fails in the loser); the loser retries and joins. An RDB storage records a
    heartbeat of every running trial: a trial silent for ``GRACE_S`` belongs to a dead
    process, and Optuna fails it and calls ``requeue(study, frozen_trial)``.
    """
    import sqlalchemy.exc

    url = None if storage is None else _check_storage(storage)
    for attempt in range(5):
        try:
            rdb = None
            if url is not None:
                # The heartbeat arguments are marked experimental; they are what Optuna
                # offers for trials of dead processes, and their warnings say nothing useful.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    rdb = optuna.storages.RDBStorage(
                        url,
                        heartbeat_interval=HEARTBEAT_S,
                        grace_period=GRACE_S,
                        **{_stale_callback_arg(optuna): requeue},
                    )
            study = optuna.create_study(
                study_name=STUDY_NAME, storage=rdb, load_if_exists=True, **kwargs
            )
            return study, rdb
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            if attempt == 4:
                if isinstance(err, sqlalchemy.exc.IntegrityError):
                    raise
                reason = str(err.orig).splitlines()[0] if err.orig else type(err).__name__
                raise UserError(
                    f"--storage: could not open {_shown(storage)} ({reason}). Fix: check that the "
                    "database server runs and the URL's host, port, user and database exist."
                ) from err
            time.sleep(0.5 * (attempt + 1))


def _stale_callback_arg(optuna) -> str:
    """RDBStorage's name for the stale-trial callback (renamed in Optuna 4.9)."""
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    new = "heartbeat_stale_trial_callback"
    return new if new in params else "failed_trial_callback"


# ---- trials of dead processes -----------------------------------------------------------------
# A trial asked by a process that died (SIGKILL, a lost node) stays RUNNING in the storage.
# It is failed and a WAITING copy of it is queued (the next `ask` of any process returns it),
# carrying the number of the trial whose workdir it continues (TRIAL_KEY): the member resumes
# from its checkpoints there, so the trial is neither lost nor trained twice. Dead is: its
# process is gone (same host, seen at once), or its heartbeat is GRACE_S old (any host).

# Environment overrides (whole seconds) for tests that wait out a dead process's grace.
HEARTBEAT_S = int(os.environ.get("JAXDL_SWEEP_HEARTBEAT_S", "5"))
GRACE_S = int(os.environ.get("JAXDL_SWEEP_GRACE_S", "30"))
TRIAL_KEY = "jaxdl_trial"  # the workdir number a requeued trial continues
RETRY_OF = "jaxdl_retry_of"  # the trial number it replaces
OWNER = "jaxdl_owner"  # {"host", "pidns", "pid"} of the process training it
SURPLUS = "jaxdl_surplus"  # asked past --trials in a race with another process; not trained
RECORD = "jaxdl_record"  # the member's trial.json, its "workdir" and "host": the sweep's table


def _key(trial) -> int:
    """The number of the trial's workdir, DIR/trials/NNN."""
    return int(trial.user_attrs.get(TRIAL_KEY, trial.number))


def _process() -> dict:
    """This process as an OWNER: host, pid, and its pid namespace (containers on one host
    share a host name, not their pids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "pidns": namespace, "pid": os.getpid()}


@dataclasses.dataclass
class _Study:
    """The study, its RDB storage (None: in memory, one process) and the sweep's workdir."""

    optuna: Any
    study: Any
    rdb: Any
    workdir: Path

    def member_dir(self, key: int) -> Path:
        return self.workdir / "trials" / f"{key:03d}"

    def trial_id(self, number: int) -> int:
        study_id = self.rdb.get_study_id_from_name(STUDY_NAME)
        return self.rdb.get_trial_id_from_study_id_trial_number(study_id, number)

    def resume_step(self, key: int) -> int:
        saved = list_steps(self.member_dir(key) / "checkpoints")
        return saved[-1] if saved else 0

    def requeue(self, frozen) -> None:
        """Queue a WAITING copy of the failed ``frozen`` trial that continues its workdir.

        Its intermediate values are kept up to the member's last checkpoint: the resumed
        member reports the later evaluations again, and the pruner judges them again."""
        key = _key(frozen)
        last = self.resume_step(key)
        self.study.add_trial(
            self.optuna.trial.create_trial(
                state=self.optuna.trial.TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs={TRIAL_KEY: key, RETRY_OF: frozen.number},
                # The sampler's bookkeeping (GridSampler's grid_id): the copy is the same
                # grid point, not a new one drawn from the unvisited.
                system_attrs=frozen.system_attrs,
                intermediate_values={
                    s: v for s, v in frozen.intermediate_values.items() if s < last
                },
            )
        )

    def settle(self, trial, key: int) -> None:
        """On a stop: tell a finished member's outcome; fail an unfinished one and queue its
        continuation (for the rerun, or another process, to resume)."""
        record = self.record(key)
        if record is not None:
            self.tell(trial, record)
        else:
            self.requeue(self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL))

    def reclaim(self) -> None:
        """Fail and requeue the RUNNING trials of dead processes."""
        optuna = self.optuna
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # silent GRACE_S: requeued
        me = _process()
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in running:
            owner = trial.user_attrs.get(OWNER)
            if owner is None:  # asked, killed before its owner was written: by its age
                age = datetime.datetime.now() - trial.datetime_start
                dead = age.total_seconds() > GRACE_S
            else:
                here = (owner["host"], owner.get("pidns")) == (me["host"], me["pidns"])
                dead = here and not pid_alive(owner["pid"])
            if not dead:
                continue
            trial_id = self.trial_id(trial.number)
            try:  # another process may reclaim it first: only the one that fails it requeues
                if not self.rdb.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.requeue(self.rdb.get_trial(trial_id))

    @contextlib.contextmanager
    def heartbeats(self, numbers: Sequence[int]) -> Iterator[None]:
        """Record the trials' heartbeats every HEARTBEAT_S while the block runs."""
        if self.rdb is None:
            yield
            return
        ids = [self.trial_id(n) for n in numbers]
        done = threading.Event()

        def beat() -> None:
            while True:
                for trial_id in ids:
                    self.rdb.record_heartbeat(trial_id)
                if done.wait(HEARTBEAT_S):
                    return

        thread = threading.Thread(target=beat, name="jaxdl-sweep-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def record(self, key: int) -> dict | None:
        """The member's trial.json (None while it is unfinished)."""
        path = self.member_dir(key) / "trial.json"
        return json.loads(path.read_text()) if path.exists() else None

    def tell(self, trial, record: dict) -> None:
        """Tell the study a member's outcome from its trial.json."""
        states = self.optuna.trial.TrialState
        member = {
            **record,
            "workdir": str(self.member_dir(_key(trial))),
            "host": _process()["host"],
        }
        try:
            trial.set_user_attr(RECORD, member)
            if record["state"] == "complete" and record["best"] is not None:
                self.study.tell(trial, record["best"])
            elif record["state"] == "pruned":
                self.study.tell(trial, state=states.PRUNED)
            else:
                self.study.tell(trial, state=states.FAIL)
        except self.optuna.exceptions.UpdateFinishedTrialError:
            # Taken for dead meanwhile (its heartbeats were late): its requeued copy finds
            # this trial.json and is told from it, without training again.
            warn(
                f"sweep: trial {trial.number} was failed and requeued by another process "
                "while it trained; its queued copy is recorded from "
                f"{self.member_dir(_key(trial)) / 'trial.json'}."
            )

    def records(self) -> list[dict]:
        """Every recorded trial of the study, whichever process trained it, in workdir
        order: the members' trial.json with their "workdir" and "host"."""
        by_key = {
            _key(t): t.user_attrs[RECORD]
            for t in self.study.get_trials(deepcopy=False)
            if RECORD in t.user_attrs and t.state.is_finished()
        }
        return [by_key[k] for k in sorted(by_key)]


def run(
    cfg: ml_collections.ConfigDict,
    workdir: Path,
    spaces: Sequence[Space],
    *,
    strategy: str,
    storage: str | None,
    trials: int,
    parallel: int,
    metric: str,
    echo: Callable[[str], None],
) -> list[dict]:
    """Ask, train and tell until the study holds ``trials`` finished trials; return the
    study's records (`_Study.records`), those of other processes included."""
    optuna = _import_optuna()

    if strategy == "grid":
        for s in spaces:
            if not s.discrete:
                raise UserError(
                    f"--strategy grid: expected lists or choice(...) only, found {s.key}={s.text}."
                    " Fix: give a list of values, or use --strategy tpe|random."
                )
    box: list[_Study] = []  # the callback needs the study it is called for
    study, rdb = _open_study(
        optuna,
        storage,
        lambda _study, frozen: box[0].requeue(frozen),
        sampler=_sampler(optuna, strategy, spaces, cfg.seed),
        # A grid trains every point to the end, as without Optuna: pruning would make its
        # table depend on the order the trials report in (one process or several).
        pruner=(
            optuna.pruners.NopPruner()
            if strategy == "grid"
            else optuna.pruners.SuccessiveHalvingPruner()
        ),
        direction="minimize" if minimized(metric) else "maximize",
    )
    sweep = _Study(optuna, study, rdb, workdir)
    box.append(sweep)
    owner = _process()
    distributions = _distributions(optuna, spaces)
    states = optuna.trial.TrialState
    waited = False
    with stop_on_signals() as stop:
        while True:
            if rdb is not None:
                sweep.reclaim()
            every = study.get_trials(deepcopy=False)
            fresh = [t for t in every if RETRY_OF not in t.user_attrs]
            waiting = [t for t in every if t.state == states.WAITING]
            left = trials - len(fresh)
            if left <= 0 and not waiting:
                running = sorted(_key(t) for t in every if t.state == states.RUNNING)
                if not running:
                    return sweep.records()
                # Other processes' trials: wait for them to finish, or to go silent and be
                # requeued here (a rerun after a crash elsewhere finishes the study).
                if not waited:
                    echo(f"sweep: waiting for trials {running} of other processes")
                    waited = True
                stop.check(f"while waiting for trials {running}. {RESUME}")
                time.sleep(1.0)
                continue
            asked = []
            for _ in range(min(parallel, max(left, 0) + len(waiting))):
                with warnings.catch_warnings():
                    # Optuna expects heartbeats with Study.optimize; this loop records them.
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = study.ask(distributions)
                if RETRY_OF not in trial.user_attrs:
                    earlier = [
                        t
                        for t in study.get_trials(deepcopy=False)
                        if RETRY_OF not in t.user_attrs and t.number < trial.number
                    ]
                    if len(earlier) >= trials:  # another process took the last ones meanwhile
                        trial.set_user_attr(SURPLUS, True)
                        study.tell(trial, state=states.FAIL)
                        continue
                if rdb is not None:
                    rdb.record_heartbeat(sweep.trial_id(trial.number))
                    trial.set_user_attr(OWNER, owner)
                asked.append((trial, _decode(spaces, trial.params), _key(trial)))
            groups: dict[tuple, list] = {}
            for item in asked:  # members resumed together must share their step
                groups.setdefault((group_key(item[1]), sweep.resume_step(item[2])), []).append(item)
            # Heartbeats for every asked trial until the last group is told: a trial waiting
            # for its group must not look like one of a dead process.
            with sweep.heartbeats([t.number for t, _, _ in asked]):
                batches = list(groups.items())
                for n, ((_, resume_step), members) in enumerate(batches):
                    try:
                        _run_members(sweep, cfg, members, resume_step, metric, stop, echo)
                    except Stopped:
                        for _, later in batches[n + 1 :]:
                            for trial, _, key in later:
                                sweep.settle(trial, key)
                        raise


def _run_members(
    sweep: _Study, cfg, members: list, resume_step: int, metric: str, stop, echo
) -> None:
    """Train one vmapped group of asked trials and tell the study each outcome. A member
    already finished (its process was killed before telling) is told from its trial.json;
    on a signal, unfinished members go back to the queue for the rerun to resume."""
    todo = []
    for trial, params, key in members:
        record = sweep.record(key)
        if record is None:
            todo.append((trial, params, key))
        else:
            sweep.tell(trial, record)
    if not todo:
        return
    keys = [key for _, _, key in todo]
    if stop:
        for trial, _, key in todo:
            sweep.settle(trial, key)
        stop.check(f"before trials {keys}. {RESUME}")
    resumed = f" (resumed from step {resume_step})" if resume_step else ""
    echo(f"sweep: training trials {keys} together{resumed}")

    def should_prune(i: int, step: int, value: float) -> bool:
        trial = todo[i][0]
        trial.report(value, step)
        return trial.should_prune()

    try:
        run_group(
            [member_config(cfg, p) for _, p, _ in todo],
            [sweep.member_dir(key) for key in keys],
            [p for _, p, _ in todo],
            metric=metric,
            should_prune=should_prune,
        )
    except Stopped:
        for trial, _, key in todo:
            sweep.settle(trial, key)
        raise
    for trial, _, key in todo:
        sweep.tell(trial, sweep.record(key))
