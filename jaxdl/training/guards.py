"""What a run holds while it trains: the workdir lock and the stop signals.

Both are context managers entered by `jaxdl.training.trainer.train` (and the federated
runner) for exactly its duration: the lock is released and the previous signal handlers
are back on every exit. Runners of many runs (task lists, cross-validation, sweeps) hold
the signal handlers around all of them, so a signal between two runs stops the runner
with the same exit status and a line saying where, instead of the default action.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from jaxdl.errors import Stopped, UserError

LOCK_FILE = ".lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def workdir_lock(workdir: Path, command: str = "train") -> Iterator[None]:
    """Hold an exclusive ``flock`` on WORKDIR/.lock (which records the `jaxdl` command, pid
    and host).

    A second run on the same workdir (`jaxdl train` or `jaxdl sweep`) is refused in one line
    naming the holder. The kernel
    drops the lock when its process dies, so a killed run leaves no stale lock: the file
    stays, with a dead pid in it, and the next run simply takes it. A workdir this run
    created and left holding nothing but the lock (it failed before writing anything) is
    removed, so a bad input leaves no trace.
    """
    created = not workdir.exists()
    path = workdir / LOCK_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"--workdir: {workdir} (or a folder above it) is a file, expected a folder. Fix: "
            "pass a folder path that does not exist yet or is a workdir."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "run (unknown)"
            raise UserError(
                f"--workdir: {workdir} is in use by another {holder}. Fix: wait for that run "
                "to finish or stop it, or use another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        me = f"jaxdl {command} (pid {os.getpid()} on host {socket.gethostname()})\n"
        os.pwrite(fd, me.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
        if created and [p.name for p in workdir.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # another run may have started in it since
                workdir.rmdir()


class StopRequest:
    """Set by the first SIGTERM / SIGINT; the loops poll it between steps, evaluation
    batches and members."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def check(self, what: str) -> None:
        """If a signal came, raise `Stopped` ("stopped by SIGTERM WHAT", exit status
        128 + signal); a no-op otherwise."""
        if self.signum is not None:
            raise Stopped(f"stopped by {self.name} {what}", status=128 + self.signum)


# The request of the outermost `stop_on_signals` of this process while it is active, so a
# runner of many runs (tasks, folds, a sweep) and each run inside it share one request.
_active: StopRequest | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn the first SIGTERM / SIGINT into a `StopRequest` the loop acts on between steps;
    a second one exits at once with status 128 + signal.

    Nested inside another `stop_on_signals` (a run inside a sweep or a task list) it yields
    the outer request, so a signal between two runs is seen by the runner. Handlers can
    only be installed from the main thread; elsewhere (a sweep worker thread) the request
    stays unset and signals keep their previous meaning.
    """
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        if request:
            os.write(2, f"jaxdl: second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        request.signum = signum
        os.write(
            2,
            f"jaxdl: {signal.Signals(signum).name} received: finishing the current step and "
            "saving a checkpoint (send it again to exit at once)\n".encode(),
        )

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)
