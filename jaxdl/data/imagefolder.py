"""The "imagefolder:PATH" source: one subfolder per class, as torchvision's ImageFolder.

Layouts:
    PATH/train/<class>/*.jpg, PATH/val/<class>/..., optional PATH/test/<class>/...
    PATH/<class>/*.jpg          val = a stratified `data.val_fraction` of each class (seed 0)
PATH/train/ without val/ is split the same way. Labels follow the sorted class names of
the train folder. JPEG, PNG and BMP files are read with Pillow, converted to
`data.channels` (default 3) and resized to `data.image_size` (default: the first image's
size, every image must then match).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdl.data.sources import Source, image_size, opt
from jaxdl.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_SEED = 0


def _bad_file(path: str, err: Exception) -> ValueError:
    return ValueError(
        f"data.source: cannot read image {path} ({type(err).__name__}: {err}). "
        "Fix: remove or replace the file, or set data.skip_bad_files=True."
    )


def read_image(
    path: str, channels: int, size: tuple[int, int] | None, resize: bool = True
) -> np.ndarray:
    """File -> float32 [H, W, channels] in [0, 1]; resized (bilinear, antialiased) to size,
    or, with resize=False, checked to be that size."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if resize and size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises on bad files
        raise _bad_file(path, err) from None
    if array.ndim == 2:
        array = array[..., None]
    if size is not None and array.shape[:2] != size:
        raise UserError(
            f"data.image_size: images in one batch must share a size; {path} is "
            f"{array.shape[0]}x{array.shape[1]}, expected {size[0]}x{size[1]}. "
            "Fix: set data.image_size, e.g. 224."
        )
    return array.astype(np.float32) / np.float32(255.0)


class FileImageDecode:
    """{"path", "label"} -> {"image": float32 [H, W, C] in [0, 1], "label": int32}."""

    def __init__(self, channels: int, size: tuple[int, int], resize: bool):
        self.channels, self.size, self.resize = channels, size, resize

    def __call__(self, record: Mapping) -> dict[str, np.ndarray]:
        image = read_image(record["path"], self.channels, self.size, self.resize)
        return {"image": image, "label": np.asarray(record["label"], np.int32)}


class FileRecords:
    """[{"path": str, "label": int}] as a random-access source."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.label_array = paths, np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"path": self.paths[i], "label": int(self.label_array[i])}

    def cheap_labels(self, key: str = "label") -> np.ndarray:
        assert key == "label", key
        return self.label_array


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UserError(
            f"data.source: image folder {root} does not exist. Fix: point "
            "imagefolder: at a folder with one subfolder per class."
        )
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise UserError(
            f"data.source: {root} has no class subfolders; expected "
            f"{root}/<class>/<image files>. Fix: put each class's images in a "
            "subfolder named after the class."
        )
    return dirs


def _images(folder: Path) -> list[str]:
    files = sorted(
        str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(
            f"data.source: class folder {folder} holds no images "
            f"({', '.join(IMAGE_SUFFIXES)}). Fix: add images or remove the folder."
        )
    return files


def _scan(root: Path, classes: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a split folder; `classes` fixes the label order."""
    dirs = _class_dirs(root)
    names = [d.name for d in dirs]
    if classes is not None:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise UserError(
                f"data.source: {root} has classes {extra} that the train folder "
                f"lacks (train classes: {classes}). Fix: make the folders match."
            )
    classes = classes or names
    paths, labels = [], []
    for d in dirs:
        files = _images(d)
        paths += files
        labels += [classes.index(d.name)] * len(files)
    return paths, labels, classes


def _stratified_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: round(fraction * n_c) of each class to val, fixed seed."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _drop_bad(records: FileRecords, channels: int, size, skipped: list[str]) -> FileRecords:
    keep_paths, keep_labels = [], []
    for path, label in zip(records.paths, records.label_array, strict=True):
        try:
            read_image(path, channels, size)
        except ValueError:
            skipped.append(path)
            continue
        keep_paths.append(path)
        keep_labels.append(int(label))
    return FileRecords(keep_paths, keep_labels)


def imagefolder_source(path: str, cfg: Mapping) -> Source:
    """ "imagefolder:PATH" -> Source with splits train, val and (if PATH/test exists) test."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data.source: image folder {root} does not exist. Fix: point "
            "imagefolder: at a folder with train/ and val/ or class folders."
        )
    channels = int(opt(cfg, "channels", 3))
    if channels not in (1, 3):
        raise UserError(f"data.channels: expected 1 or 3 for image files, found {channels}.")
    train_root = root / "train" if (root / "train").is_dir() else root
    paths, labels, classes = _scan(train_root, None)
    splits: dict[str, FileRecords] = {}
    names = {"train": str(train_root)}
    if (root / "val").is_dir() and train_root != root:
        splits["train"] = FileRecords(paths, labels)
        splits["val"] = FileRecords(*_scan(root / "val", classes)[:2])
        names["val"] = str(root / "val")
    else:
        fraction = float(opt(cfg, "val_fraction", 0.1))
        if not 0.0 < fraction < 1.0:
            raise UserError(f"data.val_fraction: expected a number in (0, 1), found {fraction}.")
        tr, va = _stratified_split(np.asarray(labels), fraction)
        splits["train"] = FileRecords([paths[i] for i in tr], [labels[i] for i in tr])
        splits["val"] = FileRecords([paths[i] for i in va], [labels[i] for i in va])
        names = {"train": f"{train_root} minus val", "val": f"{fraction:g} of {train_root}"}
    if (root / "test").is_dir() and train_root != root:
        splits["test"] = FileRecords(*_scan(root / "test", classes)[:2])
        names["test"] = str(root / "test")

    size = image_size(cfg)
    skipped: list[str] = []
    if opt(cfg, "skip_bad_files", False):
        splits = {k: _drop_bad(v, channels, size, skipped) for k, v in splits.items()}
    if not len(splits["train"]):
        raise UserError(
            f"data.source: every train image in {train_root} is unreadable "
            f"({len(skipped)} skipped). Fix: check the files."
        )
    resize = size is not None
    if not resize:  # every image must match the first one's size
        size = read_image(splits["train"].paths[0], channels, None).shape[:2]
    decode = FileImageDecode(channels, size, resize)
    return Source(
        "classification",
        dict(splits),
        decode,
        len(classes),
        classes,
        {
            "source": f"imagefolder:{path}",
            "input": "image",
            "pixel_scale": 255.0,
            "channels": channels,
            "image_size": list(size),
        },
        split_names=names,
        skipped_files=skipped,
    )
