"""Batches as random-access sources: item k is batch k, a pure function of (config, k).

grain then only schedules whole batches (threads or worker processes), and a resumed run
asks for batch k again and gets the same bytes. Per-example work (read, decode,
transforms) happens inside `__getitem__`, once per batch, which keeps grain's per-element
bookkeeping off the hot path.

Train batch k of process `index` of `count`, with S = steps per epoch, B = batch size (per
process) and G = count * B (the global batch):
    epoch e, j = divmod(k, S)
    order_e = permutation(n) seeded by (seed, e)
    global batch j = order_e[j*G : (j+1)*G]; this process's batch is its contiguous block
              [index*B : (index+1)*B], the rows its devices hold in the global array
    example at global epoch position p augmented with a generator seeded by (augment seed, e, p)
So 1 device, N devices and P processes see the same rows in the same places of every global
batch: dropout masks and augmentation, which follow the row, match too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
Example = Mapping[str, np.ndarray]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from ints, so nearby run seeds give unrelated streams."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def read_records(records: Sequence, indices: Sequence[int]) -> list:
    """records[i] for i in indices.

    One read per record: tfds 4.9.10's `mock_data` breaks the batched `__getitems__`, and
    decoding, not reading, dominates the cost of a batch.
    """
    return [records[int(i)] for i in indices]


def stack(examples: Sequence[Example]) -> Batch:
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def materialize(records: Sequence, prepare: Callable) -> Batch:
    """`prepare(record)` of every record, stacked: a split decoded once, then gathered.

    By index: record sources need not raise IndexError at the end, so no `for r in records`.
    """
    return stack([prepare(records[i]) for i in range(len(records))])


def take(arrays: Batch, indices: np.ndarray) -> Batch:
    """Rows `indices` of a materialized split: one numpy gather per key."""
    return {k: v[indices] for k, v in arrays.items()}


class TrainBatches:
    """Infinite train batches of one process (see the module docstring).

    `prepare(record)` decodes; `augment(example, rng)` applies the train chain. `cache`,
    when given, is `materialize(records, prepare)`: batches are then gathered from it
    instead of read and decoded record by record (same bytes, a fraction of the host time).
    """

    def __init__(
        self,
        records: Sequence,
        prepare: Callable,
        augment: Callable | None,
        *,
        batch_size: int,
        seed: int,
        shard: tuple[int, int],
        cache: Batch | None = None,
    ):
        self.records, self.prepare, self.augment = records, prepare, augment
        self.cache = cache
        self.cheap = cache is not None and augment is None  # a gather: no reader threads
        self.batch_size, self.index, self.count = batch_size, shard[0], shard[1]
        self.steps_per_epoch = len(records) // self.count // batch_size
        assert self.steps_per_epoch > 0, "batch larger than the shard"
        self.shuffle_seed = derive_seed(seed, 0)
        # One stream for all processes, indexed by global position; (seed, 1, 0) is what
        # one-process runs always used, so their augmentation is unchanged.
        self.augment_seed = derive_seed(seed, 1, 0)
        # The last two epochs' orders. Replaced whole, never mutated, so grain's reader
        # threads can share it without a lock (a lock would not pickle to workers).
        self._orders: tuple[tuple[int, np.ndarray], ...] = ()

    def __len__(self) -> int:
        return sys.maxsize  # infinite: grain slices it from the resume step

    def order(self, epoch: int) -> np.ndarray:
        """This process's record indices for `epoch`, in visiting order (whole batches): its
        block of each global batch."""
        for e, order in self._orders:
            if e == epoch:
                return order
        perm = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.records))
        used = perm[: self.steps_per_epoch * self.count * self.batch_size]
        order = used.reshape(self.steps_per_epoch, self.count, self.batch_size)[:, self.index]
        order = order.reshape(-1)
        self._orders = ((epoch, order),) + self._orders[:1]
        return order

    def __getitem__(self, k: int) -> Batch:
        epoch, j = divmod(int(k), self.steps_per_epoch)
        start = j * self.batch_size
        indices = self.order(epoch)[start : start + self.batch_size]
        if self.cache is not None and self.augment is None:
            return take(self.cache, indices)
        if self.cache is not None:
            examples = [{k: v[i] for k, v in self.cache.items()} for i in indices]
        else:
            examples = [self.prepare(r) for r in read_records(self.records, indices)]
        if self.augment is not None:
            first = (j * self.count + self.index) * self.batch_size  # global epoch position
            examples = [
                self.augment(ex, np.random.default_rng([self.augment_seed, epoch, first + i]))
                for i, ex in enumerate(examples)
            ]
        return stack(examples)


class EvalBatches:
    """Fixed-order eval batches of exactly `batch_size`, with "mask" float32 [B].

    Process `index` of `count` takes records index, index + count, ...; slots past the
    end repeat record 0 with mask 0, and every process has the same number of batches.
    """

    def __init__(
        self,
        records: Sequence,
        prepare: Callable,
        *,
        batch_size: int,
        shard: tuple[int, int],
        cache: Batch | None = None,
    ):
        self.records, self.prepare, self.batch_size = records, prepare, batch_size
        self.cache = cache
        self.cheap = cache is not None
        self.index, self.count = shard
        per_process = -(-len(records) // self.count)
        self.num_batches = -(-per_process // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, b: int) -> Batch:
        slots = np.arange(int(b) * self.batch_size, (int(b) + 1) * self.batch_size)
        global_index = slots * self.count + self.index
        real = global_index < len(self.records)
        indices = np.where(real, global_index, 0)
        if self.cache is not None:
            batch = take(self.cache, indices)
        else:
            batch = stack([self.prepare(r) for r in read_records(self.records, indices)])
        return {**batch, "mask": real.astype(np.float32)}
