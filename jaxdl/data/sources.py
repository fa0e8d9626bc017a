"""Data sources: `data.source` spec -> random-access records per split, and their decoder.

Every source yields a `Source`: for each split a random-access sequence of raw records
(``len`` and ``[i]``, what grain calls a data source) plus one picklable callable that
turns a record into a canonical example:

    classification: {"image": float32 [H, W, C] in [0, 1], "label": int32 []}
    lm:             {"inputs": int32 [T], "targets": int32 [T]}

Raw classification records are dicts with an integer "label", so labels can be read
without decoding images (for stratified folds). Split names are "train", "val", "test".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.data.transforms import resize_image
from jaxdl.errors import UserError

VALID_SOURCES = (
    '"digits", "tfds:NAME[/CONFIG]", "imagefolder:PATH", "text:PATH_OR_GLOB", "text:stdlib", '
    '"text:pydoc", "synthetic:images", "synthetic:tokens", "csv:PATH", "parquet:PATH", '
    '"sklearn:NAME", "textfolder:PATH", "none"'
)
DEFAULT_DATA_DIR = "~/.cache/jaxdl/tfds"


def opt(cfg: Mapping, key: str, default: Any = None) -> Any:
    """`cfg[key]`, or `default` when missing or "unset" (None, "", 0, [])."""
    value = cfg.get(key, None)
    if value is None or (not isinstance(value, bool) and value in ("", 0, [], ())):
        return default
    return value


def resolve_data_dir(cfg: Mapping) -> str:
    """data.data_dir, else $JAXDL_DATA_DIR, else ~/.cache/jaxdl/tfds."""
    path = opt(cfg, "data_dir") or os.environ.get("JAXDL_DATA_DIR") or DEFAULT_DATA_DIR
    return str(Path(path).expanduser())


def image_size(cfg: Mapping) -> tuple[int, int] | None:
    """data.image_size (int = square, or [h, w]) as (h, w); None = the source's own size."""
    size = opt(cfg, "image_size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclasses.dataclass
class Source:
    """Raw records per split and the decoder shared by all splits."""

    kind: str  # a task kind of jaxdl.core.heads.KINDS
    splits: dict[str, Sequence]
    decode: Callable[[Any], dict[str, np.ndarray]]
    num_classes: int | None
    class_names: list[str] | None
    description: dict  # JSON: how a record becomes an example, for Data.preprocessing
    split_names: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"path", "reason"}
    # What the model and head take from the train split (tables): {"model": {...}, "head": {...}}
    task_fields: dict = dataclasses.field(default_factory=dict)
    # A raw record that fixes the example spec when there are no splits (source "none").
    sample: Any = None

    def labels(self, split: str) -> np.ndarray:
        """int64 [N] labels of a classification split: held in memory, or read from the raw
        records (no image decoding)."""
        return record_labels(self.splits[split])


# ---- fingerprints: what a run read ---------------------------------------------------------


def file_fingerprint(path: Path) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a data file (its contents)."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest}


def folder_fingerprint(root: Path, files: Sequence[str | Path]) -> dict[str, Any]:
    """{"path", "bytes", "sha256", "files"} of the files a folder source read: the digest
    covers each file's path below `root` and size (no contents: folders can be large), so
    added, removed, renamed or resized files change it."""
    digest = hashlib.sha256()
    total = 0
    for file in sorted(map(Path, files)):
        size = file.stat().st_size
        total += size
        digest.update(f"{file.relative_to(root).as_posix()}\t{size}\n".encode())
    return {
        "path": str(root.resolve()),
        "bytes": total,
        "sha256": digest.hexdigest(),
        "files": len(files),
    }


# ---- record containers ---------------------------------------------------------------------


class Subset:
    """records[indices] as a random-access source."""

    def __init__(self, records: Sequence, indices: Sequence[int]):
        self.records, self.indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.records[int(self.indices[i])]

    def cheap_labels(self, key: str = "label") -> np.ndarray | None:
        base = cheap_labels(self.records, key)
        return None if base is None else base[self.indices]


class Concat:
    """Several random-access sources end to end."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part][i - int(self.offsets[part])]

    def cheap_labels(self, key: str = "label") -> np.ndarray | None:
        parts = [cheap_labels(p, key) for p in self.parts]
        return None if any(p is None for p in parts) else np.concatenate(parts)


class InMemoryRecords:
    """All records of a small source held as stacked numpy arrays (one read at build)."""

    def __init__(self, records: Sequence):
        rows = list(records.__getitems__(list(range(len(records)))))
        self.arrays = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def cheap_labels(self, key: str = "label") -> np.ndarray | None:
        return self.arrays.get(key)


def cheap_labels(records: Sequence, key: str = "label") -> np.ndarray | None:
    """int [N] labels of `records` when held in memory (no record read, no decode), else None.

    Record containers that can answer cheaply define ``cheap_labels(key)``; TFDS sources
    cannot (each record is deserialized whole), so their ClassLabel metadata stands in.
    """
    method = getattr(records, "cheap_labels", None)
    return None if method is None else method(key)


def record_labels(records: Sequence, key: str = "label") -> np.ndarray:
    """int64 [N] labels of `records`: held in memory, or read from the raw records (no image
    decoding)."""
    held = cheap_labels(records, key)
    if held is not None:
        return np.asarray(held, np.int64)
    return np.asarray([int(records[i][key]) for i in range(len(records))], np.int64)


# ---- decoding arrays -----------------------------------------------------------------------


def convert_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """[H, W, c] -> [H, W, channels]: gray<->RGB (ITU-R 601 luma, as Pillow), drop alpha."""
    have = image.shape[-1]
    if channels is None or have == channels:
        return image
    if have == 4:
        image, have = image[..., :3], 3
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = np.asarray([0.299, 0.587, 0.114], np.float32)
        return (image @ luma)[..., None].astype(np.float32)
    if have == channels:
        return image
    raise UserError(
        f"data.channels: cannot convert {have}-channel images to {channels}. "
        "Fix: set data.channels to 1, 3 or 0 (native)."
    )


def quantize_levels(x: np.ndarray, levels: int) -> np.ndarray:
    """float32 values in [0, 1] -> the nearest of `levels` evenly spaced values k / (levels - 1).

    Digits are 17-level images stored as 8-bit (k -> round(255 k / 16)); this maps every
    8-bit value back to the level the model trained on, exactly (k / 16 is a float32).
    """
    steps = np.float32(levels - 1)
    return np.round(x * steps) / steps


def pixel_scale(dtype: Any) -> float:
    """The value of full intensity for images stored as `dtype`: the integer maximum (255 for
    uint8, 65535 for uint16, so 16-bit images are scaled, not clipped), 1.0 for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


class ArrayImageDecode:
    """Record with an image array -> {"image": float32 [0, 1] HWC, "label": int32}.

    `scale` is the pixel maximum (255 for uint8, 1 for floats); `levels`, when set, snaps
    the scaled values to that many evenly spaced levels (`quantize_levels`).
    """

    def __init__(
        self,
        *,
        scale: float,
        image_key: str = "image",
        label_key: str = "label",
        image_size: tuple[int, int] | None = None,
        channels: int | None = None,
        levels: int | None = None,
    ):
        self.scale, self.image_key, self.label_key = float(scale), image_key, label_key
        self.image_size, self.channels, self.levels = image_size, channels, levels

    def describe(self) -> dict[str, Any]:
        size = list(self.image_size) if self.image_size else None
        out = {"pixel_scale": self.scale, "channels": self.channels, "image_size": size}
        return {**out, "levels": self.levels} if self.levels else out

    def __call__(self, record: Mapping) -> dict[str, np.ndarray]:
        image = np.asarray(record[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        image = image.astype(np.float32) / np.float32(self.scale)
        if self.levels:
            image = quantize_levels(image, self.levels)
        image = convert_channels(image, self.channels)
        if self.image_size is not None:
            image = resize_image(image, self.image_size)
        return {"image": image, "label": np.asarray(record[self.label_key], np.int32)}


class Identity:
    """Records that are already examples (text windows, synthetic tokens)."""

    def __call__(self, record):
        return record


# ---- synthetic -----------------------------------------------------------------------------


class SyntheticImages:
    """Uniform [0, 1) images and uniform labels, each a pure function of (seed, index)."""

    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int, seed: int, offset: int):
        self.n, self.shape, self.num_classes = n, shape, num_classes
        self.seed, self.offset = seed, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.offset + int(i)])
        label = int(rng.integers(self.num_classes))
        return {"image": rng.random(self.shape, dtype=np.float32), "label": label}


class SyntheticTokens:
    """Uniform token windows: inputs = w[:-1], targets = w[1:], from (seed, index)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int, offset: int):
        self.n, self.seq_len, self.vocab, self.seed, self.offset = n, seq_len, vocab, seed, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.offset + int(i)])
        w = rng.integers(0, self.vocab, self.seq_len + 1).astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:]}


def synthetic_source(kind: str, cfg: Mapping, *, seed: int, num_classes: int | None) -> Source:
    """ "synthetic:images" / "synthetic:tokens": deterministic from `seed`, for benchmarks."""
    n = int(opt(cfg, "num_examples", 1024))
    n_eval = max(1, n // 10)
    if kind == "images":
        shape = tuple(int(d) for d in opt(cfg, "shape", (32, 32, 3)))
        classes = int(num_classes or 10)
        make = lambda count, off: SyntheticImages(count, shape, classes, seed, off)
        splits = {"train": make(n, 0), "val": make(n_eval, n), "test": make(n_eval, n + n_eval)}
        return Source(
            "classification",
            splits,
            ArrayImageDecode(scale=1.0),
            classes,
            None,
            {"source": "synthetic:images", "input": "image"},
        )
    if kind == "tokens":
        shape = opt(cfg, "shape")
        seq_len = int(shape[0]) if shape else int(opt(cfg, "seq_len", 128))
        vocab = int(num_classes or 256)
        make = lambda count, off: SyntheticTokens(count, seq_len, vocab, seed, off)
        splits = {"train": make(n, 0), "val": make(n_eval, n), "test": make(n_eval, n + n_eval)}
        return Source(
            "lm",
            splits,
            Identity(),
            vocab,
            None,
            {"source": "synthetic:tokens", "tokenizer": None, "vocab_size": vocab},
        )
    raise UserError(f"data.source: expected one of {VALID_SOURCES}, found 'synthetic:{kind}'.")


# ---- no data: a model's input alone -------------------------------------------------------


def no_data_source(cfg: Mapping, *, num_classes: int | None) -> Source:
    """ "none": a workdir that holds a model and no examples (an imported classifier).

    The model's input is 8-bit RGB or gray pixels at data.image_size (files of another size
    are resized to it), scaled to [0, 1], then data.transforms (the normalization its
    weights expect); data.class_names names its outputs. `export` and `predict` need no
    more; commands that need examples refuse it (`jaxdl.data.pipeline.build_data`).
    """
    size = image_size(cfg)
    if size is None:
        raise UserError(
            'data.image_size: data.source "none" (a model without data) needs the input '
            "size, found it unset. Fix: set data.image_size to the size the model takes."
        )
    channels = int(opt(cfg, "channels", 3))
    names = [str(n) for n in opt(cfg, "class_names", [])] or None
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise UserError(
            f"data.class_names: expected {num_classes} names (model.num_classes), found "
            f"{len(names)}. Fix: give one name per output or leave data.class_names empty."
        )
    decode = ArrayImageDecode(scale=255.0, image_size=size, channels=channels)
    return Source(
        "classification",
        {},
        decode,
        num_classes,
        names,
        {"source": "none", "input": "image", **decode.describe()},
        sample={"image": np.zeros((*size, channels), np.uint8), "label": 0},
    )


# ---- TFDS ----------------------------------------------------------------------------------


def _resolve_split(wanted: str, known: set[str], *, role: str, name: str) -> str | None:
    """Map a configured split to one the dataset has; the default "val" falls back to
    "validation" then "test". Unknown splits (prepared data) -> error; None = skip."""
    base = wanted.split("[")[0]
    if not known or base in known:
        return wanted
    if wanted == "val":
        for alt in ("validation", "test"):
            if alt in known:
                return alt
    if role == "test":
        return None
    raise UserError(
        f"data.{role}_split: TFDS dataset {name!r} has splits {sorted(known)}, found "
        f"{wanted!r}. Fix: set data.{role}_split to one of them or a slice like "
        "'train[:90%]'."
    )


def tfds_source(name: str, cfg: Mapping, *, num_classes: int | None) -> Source:
    """ "tfds:NAME[/CONFIG]": a TFDS dataset prepared in array_record format."""
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"data.source: TFDS has no dataset {name!r} (found 'tfds:{name}'). "
            "Fix: check the name with `tfds.list_builders()`."
        ) from None
    except ValueError as err:
        raise UserError(
            f"data.source: cannot open TFDS dataset {name!r}: {str(err).splitlines()[0]}"
        ) from None
    known = set(builder.info.splits.keys())
    wanted = {
        "train": opt(cfg, "train_split", "train"),
        "val": opt(cfg, "eval_split", "val"),
        "test": opt(cfg, "test_split", "test"),
    }
    # Our split names are the configured ones (the trainer looks splits up by them).
    roles = {"train": "train", "val": "eval", "test": "test"}
    names: dict[str, str] = {}
    for ours, split in wanted.items():
        resolved = _resolve_split(split, known, role=roles[ours], name=name)
        if resolved is not None:
            names["train" if ours == "train" else split] = resolved
    prepare = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
    try:
        records = builder.as_data_source(split=list(names.values()))
    except (NotImplementedError, ValueError, AssertionError, FileNotFoundError) as err:
        if not builder.is_prepared():
            raise UserError(
                f"data.source: TFDS dataset {name!r} is not prepared in {builder.data_dir} "
                f"(data.data_dir={data_dir}). Fix: run `{prepare}`."
            ) from None
        raise UserError(
            f"data.source: TFDS dataset {name!r} in {builder.data_dir} is not in "
            f"array_record format ({str(err).splitlines()[0]}). Fix: run "
            f"`{prepare}`."
        ) from None
    splits = dict(zip(names, records, strict=True))

    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if image_key not in features or label_key not in features:
        raise UserError(
            f"data.source: jaxdl reads TFDS image classification datasets with "
            f"features ({image_key!r}, {label_key!r}); {name!r} has "
            f"{sorted(features.keys())}."
        )
    image_feature, label_feature = features[image_key], features[label_key]
    size = image_size(cfg)
    if size is None and None in tuple(image_feature.shape[:2]):
        raise UserError(
            f"data.image_size: TFDS dataset {name!r} has images of varying size "
            f"{image_feature.shape}; found data.image_size unset. Fix: set "
            "data.image_size, e.g. 224."
        )
    classes = getattr(label_feature, "num_classes", None)
    if classes is None and num_classes is None:
        raise UserError(
            f"model.num_classes: TFDS dataset {name!r} has no ClassLabel feature "
            f"{label_key!r}; found no model.num_classes. Fix: set model.num_classes."
        )
    decode = ArrayImageDecode(
        scale=pixel_scale(image_feature.np_dtype),
        image_key=image_key,
        label_key=label_key,
        image_size=size,
        channels=opt(cfg, "channels"),
    )
    return Source(
        "classification",
        splits,
        decode,
        classes,
        list(label_feature.names) if classes is not None else None,
        {"source": f"tfds:{name}", "input": "image", **decode.describe()},
        split_names=names,
    )


# ---- dispatch ------------------------------------------------------------------------------


def load_source(
    cfg: Mapping, *, seed: int, num_classes: int | None, task: str | None = None
) -> Source:
    """`data.source` -> Source. Unknown forms -> ValueError listing the valid ones.

    ``task`` (config.task) picks a table's task; unset, tables infer it from the label.
    """
    spec = str(opt(cfg, "source", "digits"))
    prefix, _, rest = spec.partition(":")
    if prefix in ("csv", "parquet", "sklearn") and rest:
        from jaxdl.data.tabular import table_source

        return table_source(spec, cfg, seed=seed, task=task)
    if prefix == "textfolder" and rest:
        from jaxdl.data.textfolder import textfolder_source

        return textfolder_source(rest, cfg, seed=seed)
    if spec == "digits":
        from jaxdl.data.digits import digits_source

        return digits_source(cfg)
    if prefix == "tfds" and rest:
        return tfds_source(rest, cfg, num_classes=num_classes)
    if prefix == "imagefolder" and rest:
        from jaxdl.data.imagefolder import imagefolder_source

        return imagefolder_source(rest, cfg)
    if prefix == "text" and rest:
        from jaxdl.data.text import text_source

        return text_source(rest, cfg)
    if prefix == "synthetic" and rest:
        return synthetic_source(rest, cfg, seed=seed, num_classes=num_classes)
    if spec == "none":
        return no_data_source(cfg, num_classes=num_classes)
    raise UserError(f"data.source: expected one of {VALID_SOURCES}, found {spec!r}.")
