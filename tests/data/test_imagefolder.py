"""imagefolder: sources from digits written as PNG files, and every bad-input error."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jaxdl.data import build_data, prefetch_to_device
from jaxdl.errors import UserError

CLASSES = ["five", "one", "zero"]  # sorted -> labels 0, 1, 2
DIGIT_OF = {"zero": 0, "one": 1, "five": 5}


def _pixels():
    """{class: [uint8 8x8 images]} from sklearn digits, 6 per class (0..16 -> 0..240)."""
    d = load_digits()
    return {
        c: [
            (d.images[i] * 15).astype(np.uint8) for i in np.flatnonzero(d.target == DIGIT_OF[c])[:6]
        ]
        for c in CLASSES
    }


def _write(root, split_counts, ext="png"):
    pixels = _pixels()
    start = 0
    for split, count in split_counts.items():
        for c in CLASSES:
            folder = root / split / c if split else root / c
            folder.mkdir(parents=True)
            for k, img in enumerate(pixels[c][start : start + count]):
                Image.fromarray(img).save(folder / f"{k:02d}.{ext}")
        start += count
    return pixels


def test_train_val_layout_labels_and_pixels(tmp_path):
    pixels = _write(tmp_path, {"train": 4, "val": 2})
    data = build_data({"source": f"imagefolder:{tmp_path}", "channels": 1}, seed=0)
    assert data.class_names == CLASSES and data.num_classes == 3
    assert data.split_sizes == {"train": 12, "val": 6}
    assert data.example_spec == {"image": ((8, 8, 1), np.float32), "label": ((), np.int32)}
    batch = next(data.eval_iter("val", 8, shard=(0, 1)))
    np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(batch["mask"], [1] * 6 + [0] * 2)
    expected = [pixels[c][4 + k] for c in CLASSES for k in range(2)]
    np.testing.assert_array_equal(batch["image"][:6, ..., 0], np.stack(expected) / np.float32(255))


def test_gray_to_rgb_resize_and_test_split(tmp_path):
    _write(tmp_path, {"train": 3, "val": 2, "test": 1})
    data = build_data({"source": f"imagefolder:{tmp_path}", "image_size": 12}, seed=0)
    assert data.split_sizes == {"train": 9, "val": 6, "test": 3}
    assert data.example_spec["image"] == ((12, 12, 3), np.float32)
    batch = next(data.train_iter(3, seed=0, shard=(0, 1)))
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])


def test_class_folders_split_by_val_fraction(tmp_path):
    _write(tmp_path, {"": 6})
    data = build_data({"source": f"imagefolder:{tmp_path}", "val_fraction": 0.34}, seed=0)
    assert data.split_sizes == {"train": 12, "val": 6}
    labels = data.source.labels("val")
    np.testing.assert_array_equal(np.bincount(labels), [2, 2, 2])


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=f"image folder {tmp_path / 'nope'} does not"):
        build_data({"source": f"imagefolder:{tmp_path / 'nope'}"}, seed=0)


def test_folder_without_class_folders(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=f"{tmp_path} has no class subfolders"):
        build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)


def test_empty_class_folder(tmp_path):
    _write(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "val" / "zero" / "00.png").unlink()
    (tmp_path / "val" / "zero" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'val' / 'zero'} holds no"):
        build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)


def test_val_class_unknown_to_train(tmp_path):
    _write(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "val" / "seven").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "val" / "seven" / "x.png")
    with pytest.raises(ValueError, match="has classes \\['seven'\\] that the train folder lacks"):
        build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)


def test_corrupt_jpeg_raises_or_is_skipped(tmp_path):
    _write(tmp_path, {"train": 3, "val": 2}, ext="jpg")
    bad = tmp_path / "train" / "one" / "99.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)
    with pytest.raises(ValueError, match=f"cannot read image {bad} .*skip_bad_files=True"):
        for _ in data.eval_iter("train", 4, shard=(0, 1)):
            pass
    skipping = build_data({"source": f"imagefolder:{tmp_path}", "skip_bad_files": True}, seed=0)
    [skipped] = skipping.skipped
    assert skipped["path"] == str(bad) and skipped["reason"].startswith("unreadable (")
    assert skipping.split_sizes == {"train": 9, "val": 6}
    masks = sum(b["mask"].sum() for b in skipping.eval_iter("train", 4, shard=(0, 1)))
    assert masks == 9


def test_mixed_sizes_need_image_size(tmp_path):
    _write(tmp_path, {"train": 2, "val": 1})
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "train" / "one" / "big.png")
    data = build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)
    with pytest.raises(ValueError, match="big.png is 10x10, expected 8x8.*set data.image_size"):
        for _ in data.eval_iter("train", 7, shard=(0, 1)):
            pass


def test_decode_error_surfaces_through_prefetch(tmp_path):
    _write(tmp_path, {"train": 2, "val": 1})
    bad = tmp_path / "train" / "zero" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = {"source": f"imagefolder:{tmp_path}"}
    data = build_data({**source, "cache_mb": 0}, seed=0)  # decoded per batch, in a thread
    batches = prefetch_to_device(data.train_iter(7, seed=0, shard=(0, 1)))
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        next(batches)
    batches.close()
    cached = build_data(source, seed=0)  # decoded once, when the iterator is made
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        cached.train_iter(7, seed=0, shard=(0, 1))
