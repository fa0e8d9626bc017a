"""The "imagefolder:PATH" source: one subfolder per class, as torchvision's ImageFolder.

Layouts:
    PATH/train/<class>/*.jpg, PATH/val/<class>/..., optional PATH/test/<class>/...
    PATH/<class>/*.jpg          val = a stratified `data.val_fraction` of each class (seed 0)
PATH/train/ without val/ is split the same way. Labels follow the sorted class names of
the train folder, which needs at least two. Files with the suffixes in
`jaxdl.data.images.IMAGE_SUFFIXES` (JPEG, PNG, BMP, GIF, WebP, TIFF, PPM/PGM) anywhere
below a class folder are read with Pillow (16-bit scaled to 8), converted to
`data.channels` (default 3) and resized to `data.image_size` (default: the first image's
size, every image must then match). Hidden files and folders (``.ipynb_checkpoints/``,
``._x.jpg``), macOS archive folders (``__MACOSX/``) and other files are skipped, each listed
with its reason in `Source.skipped`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdl.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, open_image
from jaxdl.data.records import Source, folder_fingerprint, image_size, opt
from jaxdl.errors import UserError

SPLIT_SEED = 0


def _bad_file(path: str, err: Exception) -> UserError:
    return UserError(
        f"data.source: cannot read image {path} ({type(err).__name__}: {err}). "
        "Fix: remove or replace the file, or set data.skip_bad_files=True."
    )


def _load(path: str, channels: int, size, resize: bool, max_pixels: int) -> np.ndarray:
    """read_image without wording Pillow's errors (OSError, ValueError, SyntaxError)."""
    mode = "L" if channels == 1 else "RGB"
    img = open_image(path, mode, max_pixels=max_pixels, field="data.max_image_pixels")
    if resize and size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if size is not None and array.shape[:2] != size:
        raise UserError(
            f"data.image_size: images in one batch must share a size; {path} is "
            f"{array.shape[0]}x{array.shape[1]}, expected {size[0]}x{size[1]}. "
            "Fix: set data.image_size, e.g. 224."
        )
    return array.astype(np.float32) / np.float32(255.0)


def read_image(
    path: str,
    channels: int,
    size: tuple[int, int] | None,
    resize: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """File -> float32 [H, W, channels] in [0, 1]; resized (bilinear, antialiased) to size,
    or, with resize=False, checked to be that size. Images over `max_pixels` are refused."""
    try:
        return _load(path, channels, size, resize, max_pixels)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises on bad files
        raise _bad_file(path, err) from None


class FileImageDecode:
    """{"path", "label"} -> {"image": float32 [H, W, C] in [0, 1], "label": int32}."""

    def __init__(self, channels: int, size: tuple[int, int], resize: bool, max_pixels: int):
        self.channels, self.size, self.resize = channels, size, resize
        self.max_pixels = max_pixels

    def __call__(self, record: Mapping) -> dict[str, np.ndarray]:
        image = read_image(record["path"], self.channels, self.size, self.resize, self.max_pixels)
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


Skipped = list[dict[str, str]]  # [{"path": ..., "reason": ...}]
# Folders an archive tool leaves beside the data (macOS zips): never a class.
_ARCHIVE_FOLDERS = ("__MACOSX",)


def _not_data(p: Path) -> str | None:
    """Why a folder entry is not data (hidden, archive metadata), or None if it may be."""
    kind = "folder" if p.is_dir() else "file"
    if p.name.startswith("."):
        return f"hidden {kind}"
    if p.name in _ARCHIVE_FOLDERS:
        return "archive metadata folder"
    return None


def _class_dirs(root: Path, skipped: Skipped) -> list[Path]:
    if not root.is_dir():
        raise UserError(
            f"data.source: image folder {root} does not exist. Fix: point "
            "imagefolder: at a folder with one subfolder per class."
        )
    dirs = []
    for p in sorted(root.iterdir()):
        reason = _not_data(p)
        if reason:
            skipped.append({"path": str(p), "reason": reason})
        elif p.is_dir():
            dirs.append(p)
        else:
            skipped.append({"path": str(p), "reason": "file beside the class folders"})
    if not dirs:
        raise UserError(
            f"data.source: {root} has no class subfolders; expected "
            f"{root}/<class>/<image files>. Fix: put each class's images in a "
            "subfolder named after the class."
        )
    return dirs


def _images(folder: Path, skipped: Skipped) -> list[str]:
    """Image files anywhere below `folder`, sorted; everything else goes to `skipped`."""
    files = []
    for parent, dirnames, filenames in os.walk(folder):
        for d in sorted(dirnames):
            reason = _not_data(Path(parent, d))
            if reason:
                skipped.append({"path": os.path.join(parent, d), "reason": reason})
                dirnames.remove(d)  # os.walk does not descend into what is removed
        for name in filenames:
            path = os.path.join(parent, name)
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith("."):
                skipped.append({"path": path, "reason": "hidden file"})
            elif suffix not in IMAGE_SUFFIXES:
                skipped.append({"path": path, "reason": f"not an image file ({suffix or name})"})
            else:
                files.append(path)
    if not files:
        raise UserError(
            f"data.source: class folder {folder} holds no images "
            f"({', '.join(IMAGE_SUFFIXES)}). Fix: add images or remove the folder."
        )
    return sorted(files)


def _scan(
    root: Path, classes: list[str] | None, skipped: Skipped
) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a split folder; `classes` fixes the label order."""
    dirs = _class_dirs(root, skipped)
    names = [d.name for d in dirs]
    if classes is not None:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise UserError(
                f"data.source: {root} has classes {extra} that the train folder "
                f"lacks (train classes: {classes}). Fix: make the folders match."
            )
    elif len(names) < 2:
        raise UserError(
            f"data.source: {root} has one class folder ({names[0]!r}); a classifier needs at "
            "least two, or every prediction is that class. Fix: add a folder per class "
            f"next to {names[0]!r}, or point imagefolder: at the folder that holds them."
        )
    classes = classes or names
    paths, labels = [], []
    for d in dirs:
        files = _images(d, skipped)
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


def _drop_bad(records: FileRecords, decode: FileImageDecode, skipped: Skipped) -> FileRecords:
    """data.skip_bad_files: records whose image reads, the others listed in `skipped`."""
    keep_paths, keep_labels = [], []
    size = decode.size if decode.resize else None
    for path, label in zip(records.paths, records.label_array, strict=True):
        try:
            _load(path, decode.channels, size, True, decode.max_pixels)
        except UserError as err:  # too many pixels, another size
            reason = f"refused ({str(err).split(' Fix: ')[0]})"
        except (OSError, ValueError, SyntaxError) as err:
            reason = f"unreadable ({type(err).__name__}: {err})"
        else:
            keep_paths.append(path)
            keep_labels.append(int(label))
            continue
        skipped.append({"path": path, "reason": reason})
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
    max_pixels = opt(cfg, "max_image_pixels", DEFAULT_MAX_PIXELS)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise UserError(
            f"data.max_image_pixels: expected a number of pixels >= 1, found {max_pixels!r}. "
            f"Fix: e.g. {DEFAULT_MAX_PIXELS} (Pillow's default)."
        )
    skipped: Skipped = []
    has_train = (root / "train").is_dir()
    train_root = root / "train" if has_train else root
    if has_train:  # the split folders are not classes; anything else beside them is skipped
        for p in sorted(root.iterdir()):
            if p.name not in ("train", "val", "test"):
                kind = "folder" if p.is_dir() else "file"
                reason = _not_data(p) or f"{kind} beside train/"
                skipped.append({"path": str(p), "reason": reason})
    paths, labels, classes = _scan(train_root, None, skipped)
    splits: dict[str, FileRecords] = {}
    names = {"train": str(train_root)}
    if (root / "val").is_dir() and has_train:
        splits["train"] = FileRecords(paths, labels)
        splits["val"] = FileRecords(*_scan(root / "val", classes, skipped)[:2])
        names["val"] = str(root / "val")
    else:
        fraction = float(opt(cfg, "val_fraction", 0.1))
        if not 0.0 < fraction < 1.0:
            raise UserError(f"data.val_fraction: expected a number in (0, 1), found {fraction}.")
        tr, va = _stratified_split(np.asarray(labels), fraction)
        splits["train"] = FileRecords([paths[i] for i in tr], [labels[i] for i in tr])
        splits["val"] = FileRecords([paths[i] for i in va], [labels[i] for i in va])
        names = {"train": f"{train_root} minus val", "val": f"{fraction:g} of {train_root}"}
    if (root / "test").is_dir() and has_train:
        splits["test"] = FileRecords(*_scan(root / "test", classes, skipped)[:2])
        names["test"] = str(root / "test")

    size = image_size(cfg)
    resize = size is not None
    if opt(cfg, "skip_bad_files", False):
        probe = FileImageDecode(channels, size, resize, max_pixels)
        splits = {k: _drop_bad(v, probe, skipped) for k, v in splits.items()}
    if not len(splits["train"]):
        raise UserError(
            f"data.source: every train image in {train_root} is unreadable "
            f"({len(skipped)} skipped). Fix: check the files."
        )
    if not resize:  # every image must match the first one's size
        size = read_image(splits["train"].paths[0], channels, None, max_pixels=max_pixels)
        size = size.shape[:2]
    decode = FileImageDecode(channels, size, resize, max_pixels)
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
            "fingerprint": folder_fingerprint(
                root, [p for records in splits.values() for p in records.paths]
            ),
        },
        split_names=names,
        skipped=skipped,
    )
