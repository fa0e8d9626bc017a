"""The records every source shares: `Source`, record containers, array decoders, `opt`.

Every source yields a `Source`: for each split a random-access sequence of raw records
(``len`` and ``[i]``, what grain calls a data source) plus one picklable callable that
turns a record into a canonical example:

    classification: {"image": float32 [H, W, C] in [0, 1], "label": int32 []}
    lm:             {"inputs": int32 [T], "targets": int32 [T]}

Raw classification records are dicts with an integer "label", so labels can be read
without decoding images (for stratified folds). Split names are "train", "val", "test".

Source modules (digits, imagefolder, text, tabular, ...) import this module and nothing
of `jaxdl.data.sources`, whose dispatch `load_source` imports them: no import circle.
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
    # Source-specific data_report.json entries; its "splits" add to each split's entry.
    report: dict = dataclasses.field(default_factory=dict)

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


# ---- splits --------------------------------------------------------------------------------


def split_rows(
    n: int, labels: np.ndarray | None, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Sorted row indices per split; stratified by ``labels`` [N] when given."""
    from sklearn.model_selection import train_test_split

    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise UserError(f"data.{key}: expected a fraction in (0, 1), found {value}.")
    if val_fraction + test_fraction >= 1:
        raise UserError(
            f"data.val_fraction + data.test_fraction: expected < 1, found "
            f"{val_fraction + test_fraction}. Fix: lower them."
        )
    idx = np.arange(n)
    if labels is not None:
        values, counts = np.unique(labels, return_counts=True)
        if counts.min() < 3:
            few = {int(v): int(c) for v, c in zip(values, counts, strict=True) if c < 3}
            raise UserError(
                f"data.label_column: a stratified train/val/test split needs at least 3 rows "
                f"per class, found {few} (class id: rows). Fix: add rows, merge the class, "
                "or drop it."
            )
    try:
        rest, test = train_test_split(
            idx, test_size=test_fraction, random_state=seed, stratify=labels
        )
        strat = None if labels is None else labels[rest]
        train, val = train_test_split(
            rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=strat
        )
    except ValueError as err:
        raise UserError(
            f"data: cannot split {n} rows into train/val/test "
            f"({str(err).splitlines()[0]}). Fix: add rows or change data.val_fraction / "
            "data.test_fraction."
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
