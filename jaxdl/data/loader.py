"""Iterating batches: resumable train iterator, eval batches, device prefetch.

Train batch k is a pure function of (data, seed, k) (batches.py), so the iterator state is
one integer: the number of batches handed out. Resuming asks grain for batches from that
step on, bitwise equal to an uninterrupted run, with or without worker processes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import numpy as np

from jaxdl.data.batches import EvalBatches, TrainBatches
from jaxdl.errors import UserError

Batch = dict[str, np.ndarray]
STATE_VERSION = 1


@contextlib.contextmanager
def _absl_flags_readable() -> Iterator[None]:
    """grain reads its absl flags while starting worker processes; outside an absl app they
    were never parsed. Mark them parsed (their defaults) only while the workers start."""
    from absl import flags

    if flags.FLAGS.is_parsed():
        yield
        return
    fl = flags.FLAGS
    given = {name: (fl[name].value, fl[name].present) for name in fl if fl[name].present}
    flags.FLAGS.mark_as_parsed()
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()  # back to "never parsed", every flag at its default...
        for name, (value, present) in given.items():  # ...but those set in code (Orbax's)
            fl[name].value, fl[name].present = value, present


class TrainIterator:
    """Infinite train batches for one process, with exact `get_state` / `set_state`.

    `make_batches(seed)` returns the batches for a seed (`TrainBatches`): batch k is
    `make_batches(seed)[k]`. With `num_workers` > 0 grain worker processes compute
    batches (in order); with 0 a small thread pool in this process does.
    """

    def __init__(
        self,
        make_batches: Callable[[int], TrainBatches],
        *,
        seed: int,
        batch_size: int,
        steps_per_epoch: int,
        shard: tuple[int, int],
        num_workers: int = 0,
    ):
        self._make_batches = make_batches
        self._seed, self._batches = int(seed), make_batches(int(seed))
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.shard, self.num_workers = tuple(shard), int(num_workers)
        self._step = 0
        self._it: Iterator | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        if self._it is not None:
            batch = next(self._it)
        elif self.num_workers > 0:
            with _absl_flags_readable():  # the first `next` starts the workers
                self._it = self._open()
                batch = next(self._it)
        else:
            self._it = self._open()
            batch = next(self._it)
        self._step += 1
        return batch

    def _open(self) -> Iterator:
        ds = grain.MapDataset.source(self._batches)[self._step :]
        if self.num_workers > 0:
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            options = grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=2
            )
            return iter(ds.mp_prefetch(options))
        return iter(ds.to_iter_dataset(_read_options(self._batches)))

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position: the next batch is number `step` (epoch = step // spe)."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "epoch": self._step // self.steps_per_epoch,
            "seed": self._seed,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "shard": list(self.shard),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (from `get_state`, possibly of another iterator)."""
        for key, mine in (
            ("batch_size", self.batch_size),
            ("steps_per_epoch", self.steps_per_epoch),
            ("shard", list(self.shard)),
        ):
            found = list(state[key]) if key == "shard" else state[key]
            if found != mine:
                raise UserError(
                    f"data: the saved data state has {key} {found}, this run has {mine}, so "
                    "batches cannot resume where they stopped. Fix: resume with the same "
                    "data.batch_size, data source and process count, or start a new workdir."
                )
        self.close()
        self._step = int(state["step"])
        if int(state["seed"]) != self._seed:
            self._seed = int(state["seed"])
            self._batches = self._make_batches(self._seed)

    def close(self) -> None:
        """Stop worker processes / threads (a later `next` reopens at the same step)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __del__(self):
        self.close()


# ---- evaluation ----------------------------------------------------------------------------


def eval_batches(batches: EvalBatches) -> Iterator[Batch]:
    """The batches in order, computed ahead by a small thread pool."""
    ds = grain.MapDataset.source(batches)
    yield from ds.to_iter_dataset(_read_options(batches))


def _read_options(batches: TrainBatches | EvalBatches) -> grain.ReadOptions:
    """Two reader threads decode ahead; batches gathered from a cache are read inline, as
    handing a 20-microsecond gather to a thread pool costs more than it saves."""
    if batches.cheap:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


# ---- device prefetch -----------------------------------------------------------------------


class _Done:
    """Queue marker: the source ended (StopIteration) or raised `error`."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class DevicePrefetcher:
    """Background thread that `jax.device_put`s the next `size` batches.

    `get_state` is the wrapped iterator's state as of the last batch handed to the
    consumer (the read-ahead is not counted), so a checkpoint resumes exactly.
    """

    def __init__(self, iterator, size: int = 2, sharding=None):
        self._source, self._size, self._sharding = iterator, max(1, int(size)), sharding
        self._state = iterator.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, batch: Batch):
        import jax

        if self._sharding is None:
            return jax.device_put(batch)
        if jax.process_count() > 1:  # each process holds its own rows of the global batch
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch
            )
        return jax.device_put(batch, self._sharding)

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        def offer(item) -> None:  # give up when told to stop, never block forever
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                batch = next(self._source)
                offer((self._put(batch), self._source.get_state()))
        except StopIteration:
            offer(_Done())
        except BaseException as err:  # handed to the consumer, raised there
            offer(_Done(err))

    def _start(self) -> None:
        self._queue, self._stop = queue.Queue(self._size), threading.Event()
        self._thread = threading.Thread(
            target=self._produce,
            args=(self._queue, self._stop),
            daemon=True,
            name="jaxdl-device-prefetch",
        )
        self._thread.start()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Done):
            self._queue.put(item)  # keep raising on further calls
            if item.error is not None:
                raise item.error
            raise StopIteration
        batch, self._state = item
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._stop_thread()
        self._source.set_state(state)
        self._state = self._source.get_state()

    def close(self) -> None:
        """Stop the thread and the wrapped iterator's workers; read-ahead batches are dropped
        and the wrapped iterator is set back to the last batch handed out (so iterating
        again continues exactly)."""
        if self._stop_thread():
            self._source.set_state(self._state)
        if hasattr(self._source, "close"):
            self._source.close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_thread(self) -> bool:
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        self._thread = None
        return True

    def __del__(self):
        self._stop_thread()


def prefetch_to_device(iterator, size: int = 2, sharding=None) -> DevicePrefetcher:
    """Wrap a batch iterator with `get_state`/`set_state` so `size` batches wait on device.

    With a `sharding` (a `jax.sharding.Sharding` for the global batch), arrays are placed
    with it; across processes each process's batch becomes its rows of the global array.
    """
    return DevicePrefetcher(iterator, size=size, sharding=sharding)
