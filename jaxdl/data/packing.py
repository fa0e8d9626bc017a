"""Tokenized examples -> fixed-length rows, one example per row or several packed in one.

An example is its token ids [L] (L <= T) and a loss mask [L] (True on the tokens the model
learns to write). A row, what the train and eval steps read (T = data.seq_len):

    inputs       int32   [T]  the examples' tokens end to end; 0 on padding
    targets      int32   [T]  the next token of the same example; 0 at an example's last
                              token and on padding
    weights      float32 [T]  1.0 where targets[t] is a loss token of the same example, else
                              0 (never across an example boundary)
    segment_ids  int32   [T]  1, 2, ... for the row's 1st, 2nd, ... example; 0 on padding
    positions    int32   [T]  0, 1, ... restarting at each example; 0 on padding

Each example's tokens stand in its row exactly as they were, so a model that attends only
within a segment (and ropes by `positions`) sees each example as it would alone: packed and
unpacked rows hold the same (target, weight) pairs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def pack_bins(lengths: Sequence[int], seq_len: int, *, seed: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, each row's lengths summing to <= seq_len.

    Longest first (equal lengths in an order drawn from `seed`), each into the row with the
    least room that still fits it, else a new row. Deterministic given `seed`. Every length
    must be in [1, seq_len].
    """
    lengths = np.asarray(lengths, np.int64)
    assert lengths.size == 0 or (lengths.min() >= 1 and lengths.max() <= seq_len)
    drawn = np.random.default_rng(seed).permutation(len(lengths))
    order = drawn[np.argsort(-lengths[drawn], kind="stable")]
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of rows not yet full, sorted
    for i in order.tolist():
        need = int(lengths[i])
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = seq_len, len(bins)
            bins.append([])
        bins[row].append(i)
        if free - need:
            bisect.insort(room, (free - need, row))
    return bins


def build_rows(
    tokens: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    seq_len: int,
    *,
    packing: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Examples (ids int32 [L_i], loss mask bool [L_i]) -> stacked rows, each key [N, T].

    Unpacked: row i is example i, right-padded. Packed: the rows of `pack_bins`.
    """
    bins = (
        pack_bins([len(t) for t in tokens], seq_len, seed=seed)
        if packing
        else [[i] for i in range(len(tokens))]
    )
    rows = {k: np.zeros((len(bins), seq_len), np.int32) for k in ROW_KEYS}
    rows["weights"] = np.zeros((len(bins), seq_len), np.float32)
    for r, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(members, start=1):
            ids, mask, end = tokens[i], masks[i], start + len(tokens[i])
            rows["inputs"][r, start:end] = ids
            rows["targets"][r, start : end - 1] = ids[1:]
            rows["weights"][r, start : end - 1] = mask[1:]
            rows["segment_ids"][r, start:end] = segment
            rows["positions"][r, start:end] = np.arange(len(ids))
            start = end
    return rows


class Rows:
    """Stacked rows ({key: [N, T]}) as a random-access source of {key: [T]}."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[int(i)] for k, v in self.arrays.items()}
