"""`build_data`: config -> `Data`, the one object the trainer reads batches from.

    train: records --per-epoch shuffle, process shard, whole batches--> decode
           --train chain (random ops seeded by (seed, epoch, position))--> batch
    eval:  records --in order, padded to whole batches (mask 0)--> decode --eval chain--> batch

Train: `data.train_transforms` (augmentation) then `data.transforms`. Eval: only
`data.transforms`, which must be deterministic. See transforms.py for the syntax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxdl.data.batches import EvalBatches, TrainBatches
from jaxdl.data.loader import TrainIterator, eval_batches
from jaxdl.data.sources import Concat, Source, Subset, load_source, opt
from jaxdl.data.transforms import EvalChain, Op, TrainChain, parse_transforms


class Compose:
    """f_n(...f_1(x)): decode then the eval chain, as one picklable callable."""

    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for fn in self.fns:
            x = fn(x)
        return x


Spec = dict[str, tuple[tuple[int, ...], np.dtype]]
FOLD_SEED = 0


def _process_shard() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _spec_of(example: Mapping[str, np.ndarray]) -> Spec:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}


@dataclasses.dataclass
class Data:
    """Splits of one dataset, their example spec, and batch iterators."""

    kind: str  # "classification" or "lm"
    example_spec: Spec  # ONE example, e.g. {"image": ((8, 8, 1), float32), "label": ((), int32)}
    num_classes: int  # classes, or the vocabulary size for lm
    class_names: list[str] | None
    split_sizes: dict[str, int]
    preprocessing: dict  # JSON: source decoding + the eval transforms (for export)
    split_names: dict[str, str]  # our split -> where it comes from (TFDS split, folder, bytes)
    skipped_files: list[str]  # unreadable images skipped under data.skip_bad_files
    source: Source = dataclasses.field(repr=False)
    train_ops: list[Op] = dataclasses.field(repr=False)
    eval_ops: list[Op] = dataclasses.field(repr=False)

    def steps_per_epoch(self, batch_size: int, *, shard: tuple[int, int] | None = None) -> int:
        """Whole batches per epoch per process (the remainder is dropped)."""
        count = (shard or _process_shard())[1]
        return self.split_sizes["train"] // count // batch_size

    def train_iter(
        self,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> TrainIterator:
        """Infinite, per-epoch reshuffled batches of `batch_size` (per process)."""
        shard = shard or _process_shard()
        steps = self.steps_per_epoch(batch_size, shard=shard)
        if steps < 1:
            raise ValueError(
                f"data.batch_size: expected at most "
                f"{self.split_sizes['train'] // shard[1]} (train examples per "
                f"process), found {batch_size}. Fix: lower data.batch_size."
            )
        records, decode, ops = self.source.splits["train"], self.source.decode, self.train_ops
        if any(op.random for op in ops):
            prepare, augment = decode, TrainChain(ops)
        else:  # skip seeding a generator per example
            prepare, augment = Compose(decode, EvalChain(ops)), None
        make = lambda s: TrainBatches(
            records, prepare, augment, batch_size=batch_size, seed=s, shard=shard
        )
        return TrainIterator(
            make,
            seed=seed,
            batch_size=batch_size,
            steps_per_epoch=steps,
            shard=shard,
            num_workers=num_workers,
        )

    def eval_iter(
        self, split: str, batch_size: int, *, shard: tuple[int, int] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-order batches of exactly `batch_size`, padded, with "mask" float32 [B]."""
        if split not in self.source.splits:
            raise ValueError(
                f"data.eval_split: expected one of {sorted(self.split_sizes)}, found {split!r}."
            )
        prepare = Compose(self.source.decode, EvalChain(self.eval_ops))
        records = self.source.splits[split]
        shard = shard or _process_shard()
        return eval_batches(EvalBatches(records, prepare, batch_size=batch_size, shard=shard))


def _apply_fold(source: Source, eval_key: str, fold: tuple[int, int]) -> None:
    """Train = K-1 stratified folds of train + val, val = fold i (fixed seed)."""
    from sklearn.model_selection import StratifiedKFold

    i, k = fold
    if not (isinstance(k, int) and k >= 2 and isinstance(i, int) and 0 <= i < k):
        raise ValueError(f"fold: expected (i, K) with K >= 2 and 0 <= i < K, found {fold}.")
    if source.kind != "classification":
        raise ValueError(
            f"fold: cross-validation needs a classification source, found a {source.kind} source."
        )
    if source.split_names.get(eval_key) == source.split_names.get("test"):
        raise ValueError(
            f"fold: the {eval_key!r} split is the test split "
            f"({source.split_names.get('test')}), folds would train on test data. "
            "Fix: set data.train_split='train[:90%]', data.eval_split='train[90%:]'."
        )
    labels = np.concatenate([source.labels("train"), source.labels(eval_key)])
    combined = Concat([source.splits["train"], source.splits[eval_key]])
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=FOLD_SEED)
    train_idx, val_idx = list(folds.split(np.zeros(len(labels)), labels))[i]
    source.splits["train"] = Subset(combined, np.sort(train_idx))
    source.splits[eval_key] = Subset(combined, np.sort(val_idx))
    source.split_names["train"] = f"train+{eval_key} minus fold {i}/{k}"
    source.split_names[eval_key] = f"fold {i}/{k} of train+{eval_key}"


def build_data(
    data_cfg: Mapping,
    *,
    seed: int,
    num_classes: int | None = None,
    fold: tuple[int, int] | None = None,
) -> Data:
    """The data config (`data.*` keys; a plain dict works) -> Data.

    `num_classes` is what the model predicts (labels are checked against it); None takes
    the source's own count. `seed` only seeds synthetic data: splits are fixed.
    """
    source = load_source(data_cfg, seed=seed, num_classes=num_classes)
    eval_key = str(opt(data_cfg, "eval_split", "val"))
    if eval_key not in source.splits:
        raise ValueError(
            f"data.eval_split: expected one of {sorted(source.splits)}, found {eval_key!r}."
        )
    if fold is not None:
        _apply_fold(source, eval_key, tuple(fold))
    for name, records in source.splits.items():
        if not len(records):
            raise ValueError(
                f"data: split {name!r} ({source.split_names.get(name, name)}) is "
                "empty. Fix: add data or raise data.val_fraction."
            )

    eval_ops = parse_transforms(
        opt(data_cfg, "transforms", []), field="data.transforms", allow_random=False
    )
    train_ops = (
        parse_transforms(
            opt(data_cfg, "train_transforms", []), field="data.train_transforms", allow_random=True
        )
        + eval_ops
    )
    if source.kind == "lm" and train_ops:
        raise ValueError(
            f"data.transforms: a text source has no images to transform, found "
            f"{[op.name for op in train_ops]}. Fix: remove them."
        )

    # One example through each chain fixes the spec; both chains must agree on it.
    eval_example = EvalChain(eval_ops)(source.decode(source.splits[eval_key][0]))
    spec = _spec_of(eval_example)
    rng = np.random.Generator(np.random.Philox(0))
    train_spec = _spec_of(TrainChain(train_ops)(source.decode(source.splits["train"][0]), rng))
    if train_spec != spec:
        raise ValueError(
            f"data.train_transforms: train examples come out as {train_spec}, eval "
            f"examples as {spec}. Fix: end the train chain at the same size, e.g. "
            "random_resized_crop(S) with resize(S) in data.transforms."
        )

    if source.kind == "lm":
        classes = source.num_classes
    else:
        classes = num_classes if num_classes is not None else source.num_classes
    preprocessing: dict[str, Any] = {
        **source.description,
        "transforms": [op.describe() for op in eval_ops],
        "example_spec": {
            k: {"shape": list(s), "dtype": np.dtype(d).name} for k, (s, d) in spec.items()
        },
    }
    return Data(
        kind=source.kind,
        example_spec=spec,
        num_classes=int(classes),
        class_names=source.class_names,
        split_sizes={k: len(v) for k, v in source.splits.items()},
        preprocessing=preprocessing,
        split_names=dict(source.split_names),
        skipped_files=list(source.skipped_files),
        source=source,
        train_ops=train_ops,
        eval_ops=eval_ops,
    )
