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

from jaxdl.data.batches import EvalBatches, TrainBatches, materialize
from jaxdl.data.loader import TrainIterator, eval_batches
from jaxdl.data.records import (
    Concat,
    Identity,
    Source,
    Subset,
    cheap_labels,
    opt,
    record_labels,
)
from jaxdl.data.sources import load_source
from jaxdl.data.transforms import EvalChain, Op, TrainChain, parse_transforms
from jaxdl.errors import UserError


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
DEFAULT_CACHE_MB = 256


def _process_shard() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _spec_of(example: Mapping[str, np.ndarray]) -> Spec:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}


@dataclasses.dataclass
class Data:
    """Splits of one dataset, their example spec, and batch iterators."""

    kind: str  # the task: a kind of jaxdl.core.heads.KINDS
    example_spec: Spec  # ONE example, e.g. {"image": ((8, 8, 1), float32), "label": ((), int32)}
    num_classes: int  # classes, or the vocabulary size for lm
    class_names: list[str] | None
    split_sizes: dict[str, int]
    preprocessing: dict  # JSON: source decoding + the eval transforms (for export)
    split_names: dict[str, str]  # our split -> where it comes from (TFDS split, folder, bytes)
    skipped: list[dict[str, str]]  # files the source did not read: {"path", "reason"}
    source: Source = dataclasses.field(repr=False)
    train_ops: list[Op] = dataclasses.field(repr=False)
    eval_ops: list[Op] = dataclasses.field(repr=False)
    cache_mb: float = 0.0  # data.cache_mb: materialize a split that fits in this many MB
    task_fields: dict = dataclasses.field(default_factory=dict)  # see Source.task_fields
    _caches: dict = dataclasses.field(default_factory=dict, repr=False)

    def _cache(self, split: str, prepare: Any, *, chain: str) -> dict | None:
        """The split with `prepare` applied, stacked, if it fits in `cache_mb` (memoized).

        `chain` names what `prepare` does ("decode", "train" or "eval" transforms): the same
        split prepared two ways is two caches.

        Small datasets (digits, MNIST-sized) then cost one numpy gather per batch instead of
        a record read and decode per example: the host work that otherwise competes with
        the step for this machine's cores.
        """
        key = (split, chain)
        if key not in self._caches:
            records = self.source.splits[split]
            example_bytes = sum(v.nbytes for v in map(np.asarray, prepare(records[0]).values()))
            fits = example_bytes * len(records) <= self.cache_mb * 2**20
            self._caches[key] = materialize(records, prepare) if fits else None
        return self._caches[key]

    @property
    def report(self) -> dict[str, Any]:
        """What the run reads (data_report.json): examples per split and per class, and the
        files the source skipped with the reason, e.g.
        {"splits": {"train": {"examples": 1257, "per_class": {"0": 125, ...}}, ...},
         "skipped": [{"path": "cats/._1.jpg", "reason": "hidden file"}]}.
        per_class is None where labels cannot be counted without reading every record (TFDS).
        A source's own entries (`Source.report`: chat data's rows cut and dropped, loss tokens)
        join them.
        """
        label_key = getattr(self.source.decode, "label_key", "label")
        splits: dict[str, dict[str, Any]] = {}
        for name, records in self.source.splits.items():
            entry: dict[str, Any] = {"examples": len(records)}
            if self.kind == "classification":
                labels = cheap_labels(records, label_key)
                entry["per_class"] = None if labels is None else self._per_class(labels)
            splits[name] = {**entry, **self.source.report.get("splits", {}).get(name, {})}
        extra = {k: v for k, v in self.source.report.items() if k != "splits"}
        report = {**extra, "splits": splits, "skipped": [dict(s) for s in self.skipped]}
        if "columns" in self.preprocessing:  # tables: what each column became and why
            report["columns"] = self.preprocessing["columns"]
        return {**report, "fit": self.fit} if self.fit is not None else report

    @property
    def fit(self) -> dict[str, Any] | None:
        """What training fitted to and read of this data (tables: statistics, vocabularies;
        classes; the fingerprint of the file or folder), JSON; None for sources that fit
        nothing and have no files of their own (digits, TFDS, text). data_report.json keeps
        it, so export needs no data (`from_fit`) and evaluate sees a changed file."""
        if not self.task_fields and "fingerprint" not in self.preprocessing:
            return None
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing,
            "task_fields": self.task_fields,
        }

    @classmethod
    def from_fit(cls, fit: Mapping[str, Any]) -> Data:
        """A Data without examples that describes the inputs of `fit` (`Data.fit`), as
        training saw them: what export needs, without reading the data again."""
        spec = {
            k: (tuple(v["shape"]), np.dtype(v["dtype"]))
            for k, v in fit["preprocessing"]["example_spec"].items()
        }
        source = Source(fit["kind"], {}, Identity(), fit["num_classes"], fit["class_names"], {})
        return cls(
            kind=fit["kind"],
            example_spec=spec,
            num_classes=int(fit["num_classes"]),
            class_names=fit["class_names"],
            split_sizes={},
            preprocessing=dict(fit["preprocessing"]),
            split_names={},
            skipped=[],
            source=source,
            train_ops=[],
            eval_ops=[],
            task_fields=dict(fit["task_fields"]),
        )

    def _per_class(self, labels: np.ndarray) -> dict[str, int]:
        counts = np.bincount(labels, minlength=self.num_classes)
        names = self.class_names or [str(c) for c in range(len(counts))]
        return {str(names[c]): int(n) for c, n in enumerate(counts)}

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
            raise UserError(
                f"data.batch_size: expected at most "
                f"{self.split_sizes['train'] // shard[1]} (train examples per "
                f"process), found {batch_size}. Fix: lower data.batch_size."
            )
        records, decode, ops = self.source.splits["train"], self.source.decode, self.train_ops
        if any(op.random for op in ops):
            prepare, augment = decode, TrainChain(ops)
        else:  # skip seeding a generator per example
            prepare, augment = Compose(decode, EvalChain(ops)), None
        # Worker processes decode for themselves: a cache would be pickled to each of them.
        chain = "decode" if augment else "train"
        cache = None if num_workers else self._cache("train", prepare, chain=chain)
        make = lambda s: TrainBatches(
            records, prepare, augment, batch_size=batch_size, seed=s, shard=shard, cache=cache
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
            raise UserError(
                f"data.eval_split: expected one of {sorted(self.split_sizes)}, found {split!r}."
            )
        prepare = Compose(self.source.decode, EvalChain(self.eval_ops))
        records = self.source.splits[split]
        shard = shard or _process_shard()
        cache = self._cache(split, prepare, chain="eval")
        batches = EvalBatches(records, prepare, batch_size=batch_size, shard=shard, cache=cache)
        return eval_batches(batches)


def _apply_fold(source: Source, eval_key: str, fold: tuple[int, int]) -> None:
    """Train = K-1 stratified folds of train + val, val = fold i (fixed seed)."""
    from sklearn.model_selection import StratifiedKFold

    i, k = fold
    if not (isinstance(k, int) and k >= 2 and isinstance(i, int) and 0 <= i < k):
        raise UserError(f"fold: expected (i, K) with K >= 2 and 0 <= i < K, found {fold}.")
    if source.kind not in ("classification", "binary"):
        raise UserError(
            f"fold: cross-validation needs a classification source, found a {source.kind} source."
        )
    if source.split_names.get(eval_key) == source.split_names.get("test"):
        raise UserError(
            f"fold: the {eval_key!r} split is the test split "
            f"({source.split_names.get('test')}), folds would train on test data. "
            "Fix: set data.train_split='train[:90%]', data.eval_split='train[90%:]'."
        )
    labels = np.concatenate([source.labels("train"), source.labels(eval_key)])
    if k > len(labels):
        raise UserError(
            f"--folds: expected at most {len(labels)} (the train and {eval_key} examples that "
            f"folds divide), found {k}. Fix: use fewer folds, e.g. --folds 5."
        )
    combined = Concat([source.splits["train"], source.splits[eval_key]])
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=FOLD_SEED)
    train_idx, val_idx = list(folds.split(np.zeros(len(labels)), labels))[i]
    source.splits["train"] = Subset(combined, np.sort(train_idx))
    source.splits[eval_key] = Subset(combined, np.sort(val_idx))
    source.split_names["train"] = f"train+{eval_key} minus fold {i}/{k}"
    source.split_names[eval_key] = f"fold {i}/{k} of train+{eval_key}"


class Relabeled:
    """records[indices] with each record's label mapped through `table` (old -> new)."""

    def __init__(self, records: Any, indices: np.ndarray, table: dict[int, int], label_key: str):
        self.records, self.indices = records, np.asarray(indices, np.int64)
        self.table, self.label_key = dict(table), label_key

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        record = dict(self.records[int(self.indices[i])])
        record[self.label_key] = self.table[int(record[self.label_key])]
        return record

    def cheap_labels(self, key: str = "label") -> np.ndarray | None:
        base = cheap_labels(self.records, key)
        if base is None or key != self.label_key:
            return None
        return np.asarray([self.table[int(c)] for c in base[self.indices]], np.int64)


def _keep_classes(source: Source, classes: list, num_classes: int | None) -> None:
    """data.classes: keep these labels in every split, relabelled 0..k-1 in the given order."""
    known = source.num_classes
    if source.kind != "classification":
        raise UserError(
            f"data.classes: applies to classification sources, found a {source.kind} source. "
            "Fix: set data.classes=[]."
        )
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int | np.integer)]
    bad += [c for c in classes if c not in bad and (c < 0 or (known is not None and c >= known))]
    if bad or len(set(classes)) != len(classes):
        raise UserError(
            f"data.classes: expected distinct int labels in [0, {known}), found {classes}. "
            "Fix: list each label of the source once, e.g. [5, 6, 7, 8, 9]."
        )
    if num_classes is not None and num_classes < len(classes):
        raise UserError(
            f"model.num_classes: expected at least {len(classes)} (data.classes keeps "
            f"{len(classes)} classes), found {num_classes}. Fix: set model.num_classes="
            f"{len(classes)}."
        )
    label_key = getattr(source.decode, "label_key", "label")
    table = {int(c): new for new, c in enumerate(classes)}
    for name, records in source.splits.items():
        keep = np.flatnonzero(np.isin(record_labels(records, label_key), list(table)))
        source.splits[name] = Relabeled(records, keep, table, label_key)
        source.split_names[name] = f"{source.split_names.get(name, name)}, classes {classes}"
    source.num_classes = len(classes)
    if source.class_names is not None:
        source.class_names = [source.class_names[c] for c in classes]
    source.description = {**source.description, "classes": [int(c) for c in classes]}


def _first_per_class(source: Source, per_class: int) -> None:
    """data.examples_per_class: the first N train records of each class, in record order.

    A fixed rule (not the run seed), so every seed and method sees the same examples.
    """
    if source.kind != "classification":
        raise UserError(
            f"data.examples_per_class: applies to classification sources, found a "
            f"{source.kind} source. Fix: set data.examples_per_class=0."
        )
    label_key = getattr(source.decode, "label_key", "label")
    records = source.splits["train"]
    labels = record_labels(records, label_key)
    present, counts = np.unique(labels, return_counts=True)
    if counts.min() < per_class:
        short = {int(c): int(n) for c, n in zip(present, counts, strict=True) if n < per_class}
        raise UserError(
            f"data.examples_per_class: expected at least {per_class} train examples per class, "
            f"found {short} (class: count). Fix: lower data.examples_per_class."
        )
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in present]))
    source.splits["train"] = Subset(records, keep)
    name = source.split_names.get("train", "train")
    source.split_names["train"] = f"{name}, first {per_class} per class"


def _check_labels_fit(source: Source, num_classes: int) -> None:
    """Refuse, before training, a source whose labels do not fit [0, num_classes).

    The source's class count (TFDS ClassLabel, class folders) is checked first; then every
    split whose labels are in memory is scanned in full. The train step checks each batch
    on the device too (`jaxdl.core.heads.label_flags`), for sources that cannot be scanned.
    """
    spec = source.description.get("source", "the source")
    if source.num_classes is not None and source.num_classes > num_classes:
        raise UserError(
            f"model.num_classes: expected at least {source.num_classes} (the classes of "
            f"{spec}), found {num_classes}, so labels would have to lie in "
            f"[0, {num_classes}). Fix: set model.num_classes={source.num_classes}, or keep "
            "fewer classes with data.classes."
        )
    label_key = getattr(source.decode, "label_key", "label")
    for name, records in source.splits.items():
        labels = cheap_labels(records, label_key)
        if labels is None or not len(labels):
            continue
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = int(np.count_nonzero((labels < 0) | (labels >= num_classes)))
            fix = "make every label a class index >= 0"
            if lo >= 0:
                fix = f"set model.num_classes to at least {hi + 1}, or fix the labels"
            raise UserError(
                f"data: split {name!r} ({source.split_names.get(name, name)}) holds {bad} "
                f"labels outside [0, {num_classes}) (model.num_classes): found min {lo} "
                f"max {hi}. Fix: {fix}."
            )


def build_data(
    data_cfg: Mapping,
    *,
    seed: int,
    num_classes: int | None = None,
    fold: tuple[int, int] | None = None,
    task: str | None = None,
    need_examples: bool = True,
) -> Data:
    """The data config (`data.*` keys; a plain dict works) -> Data.

    `num_classes` is what the model predicts (labels are checked against it); None takes
    the source's own count. `seed` only seeds synthetic data: splits are fixed.
    `data.classes` keeps those labels in every split, relabelled 0..k-1 in the given order;
    `data.examples_per_class` then keeps the first N train records of each class.
    `task` (config.task) chooses a table's task; other sources must agree with it.
    ``need_examples=False`` accepts data.source "none" (no splits: what export and predict
    of an imported model need); the default refuses it.
    """
    source = load_source(data_cfg, seed=seed, num_classes=num_classes, task=task)
    if task and task != source.kind:
        raise UserError(
            f"task: data.source {opt(data_cfg, 'source', 'digits')!r} gives a {source.kind} "
            f"task, found task={task!r}. Fix: leave task unset or use a matching source."
        )
    if not source.splits and need_examples:
        raise UserError(
            'data.source: expected a source of examples, found "none" (a model without '
            "data, e.g. an imported one). Fix: train with a config that sets data.source "
            "and init_from.checkpoint=THE_IMPORTED_WORKDIR."
        )
    eval_key = str(opt(data_cfg, "eval_split", "val"))
    if source.splits and eval_key not in source.splits:
        raise UserError(
            f"data.eval_split: expected one of {sorted(source.splits)}, found {eval_key!r}."
        )
    classes = list(opt(data_cfg, "classes", []))
    if classes:
        _keep_classes(source, classes, num_classes)
    if fold is not None:
        _apply_fold(source, eval_key, tuple(fold))
    per_class = opt(data_cfg, "examples_per_class", 0)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise UserError(
            f"data.examples_per_class: expected an int >= 0, found {per_class!r}. Fix: 0 keeps all."
        )
    if per_class:
        _first_per_class(source, per_class)
    for name, records in source.splits.items():
        if not len(records):
            raise UserError(
                f"data: split {name!r} ({source.split_names.get(name, name)}) is "
                "empty. Fix: add data or raise data.val_fraction."
            )
    if source.kind == "classification" and num_classes is not None:
        _check_labels_fit(source, num_classes)

    eval_ops = parse_transforms(
        opt(data_cfg, "transforms", []), field="data.transforms", allow_random=False
    )
    train_ops = (
        parse_transforms(
            opt(data_cfg, "train_transforms", []), field="data.train_transforms", allow_random=True
        )
        + eval_ops
    )
    if source.kind in ("lm", "sft") and train_ops:
        raise UserError(
            f"data.transforms: a text source has no images to transform, found "
            f"{[op.name for op in train_ops]}. Fix: remove them."
        )

    # One example through each chain fixes the spec; both chains must agree on it.
    eval_record = source.splits[eval_key][0] if source.splits else source.sample
    train_record = source.splits["train"][0] if source.splits else source.sample
    spec = _spec_of(EvalChain(eval_ops)(source.decode(eval_record)))
    rng = np.random.Generator(np.random.Philox(0))
    train_spec = _spec_of(TrainChain(train_ops)(source.decode(train_record), rng))
    if train_spec != spec:
        raise UserError(
            f"data.train_transforms: train examples come out as {train_spec}, eval "
            f"examples as {spec}. Fix: end the train chain at the same size, e.g. "
            "random_resized_crop(S) with resize(S) in data.transforms."
        )

    if source.kind in ("lm", "sft") or source.task_fields:  # the data fixes the output width
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
        skipped=list(source.skipped),
        source=source,
        train_ops=train_ops,
        eval_ops=eval_ops,
        cache_mb=_cache_mb(data_cfg),
        task_fields=dict(source.task_fields),
    )


def format_report(report: Mapping[str, Any]) -> str:
    """`Data.report` as a few printable lines: one per split, then the skipped files."""
    lines = []
    for name, split in report["splits"].items():
        line = f"data: {name}: {split['examples']:,} examples"
        if split.get("per_class") is not None:
            counts = ", ".join(f"{c}: {n:,}" for c, n in split["per_class"].items())
            line += f" ({counts})"
        if "loss_tokens" in split:  # chat data: rows read, and what the loss sees
            line += f" from {split['rows']:,} rows, {split['loss_tokens']:,} loss tokens"
        if split.get("rows_cut") or split.get("rows_dropped"):
            line += f"; {split['rows_cut']:,} rows cut, {split['rows_dropped']:,} dropped"
        lines.append(line)
    skipped = report["skipped"]
    if skipped:
        reasons: dict[str, int] = {}
        for item in skipped:
            kind = item["reason"].split(" (")[0]  # "unreadable (OSError: ...)" -> "unreadable"
            reasons[kind] = reasons.get(kind, 0) + 1
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        lines.append(f"data: skipped {len(skipped)} files ({why}); see data_report.json")
    for name, column in report.get("columns", {}).items():
        if "flag" in column:
            lines.append(f"data: column {name!r} became {column['became']}: {column['flag']}")
    return "\n".join(lines)


def _cache_mb(data_cfg: Mapping) -> float:
    value = data_cfg.get("cache_mb", None)
    value = DEFAULT_CACHE_MB if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UserError(
            f"data.cache_mb: expected a number of MB >= 0, found {value!r}. Fix: 0 never "
            f"caches; the default {DEFAULT_CACHE_MB} caches decoded splits up to that size."
        )
    return float(value)
