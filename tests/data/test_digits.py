"""The bundled digits source: a real TFDS dataset built offline, fixed stratified splits."""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxdl.data import build_data, validate_batch
from jaxdl.data.digits import split_indices


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def data(data_dir):
    return build_data({"source": "digits", "data_dir": data_dir}, seed=0)


def test_split_sizes_spec_and_no_tensorflow(data, data_dir):
    assert data.kind == "classification"
    assert data.split_sizes == {"train": 1257, "val": 180, "test": 360}
    assert data.example_spec == {"image": ((8, 8, 1), np.float32), "label": ((), np.int32)}
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert data.steps_per_epoch(32, shard=(0, 1)) == 1257 // 32
    files = sorted(p.name for p in (Path(data_dir) / "jaxdl_digits" / "2.0.0").glob("*record*"))
    assert files == [
        f"jaxdl_digits-{s}.array_record-00000-of-00001" for s in ("test", "train", "val")
    ]
    assert "tensorflow" not in sys.modules


def test_splits_are_stratified_and_disjoint(data):
    y = load_digits().target
    ids = {
        s: np.sort([int(data.source.splits[s][i]["id"]) for i in range(n)])
        for s, n in data.split_sizes.items()
    }
    assert all(np.array_equal(ids[s], idx) for s, idx in split_indices().items())
    assert len(np.unique(np.concatenate(list(ids.values())))) == 1797
    overall = np.bincount(y, minlength=10) / len(y)
    for s, idx in ids.items():
        share = np.bincount(y[idx], minlength=10) / len(idx)
        assert np.abs(share - overall).max() < 0.01, s


def test_eval_values_order_and_masks(data):
    digits = load_digits()
    records = data.source.splits["test"]
    batches = list(data.eval_iter("test", 64, shard=(0, 1)))
    assert [len(b["label"]) for b in batches] == [64] * 6
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 360 and masks[:360].all() and not masks[360:].any()
    images = np.concatenate([b["image"] for b in batches])[:360]
    labels = np.concatenate([b["label"] for b in batches])[:360]
    ids = [int(records[i]["id"]) for i in range(360)]
    np.testing.assert_array_equal(images[..., 0], digits.images[ids].astype(np.float32) / 16)
    np.testing.assert_array_equal(labels, digits.target[ids])
    assert images.min() == 0.0 and images.max() == 1.0
    again = np.concatenate([b["image"] for b in data.eval_iter("test", 64, shard=(0, 1))])
    np.testing.assert_array_equal(again[:360], images)
    validate_batch(batches[0], data.example_spec, data.num_classes, split="test")


def test_stored_as_8_bit_and_decoded_to_the_old_levels(data, data_dir):
    """Records hold uint8 0..255 like every image dataset; the model still sees k / 16, the
    values of the 0..16 storage (data version 1.0.0), so runs trained on it still fit."""
    from jaxdl.data.digits import JaxdlDigits

    digits = load_digits()
    records = data.source.splits["train"]
    ids = [int(records[i]["id"]) for i in range(len(records))]
    stored = np.stack([records[i]["image"][..., 0] for i in range(len(records))])
    assert stored.dtype == np.uint8 and stored.max() == 255
    np.testing.assert_array_equal(stored, np.round(digits.images[ids] * 255 / 16))
    decoded = np.stack([data.source.decode(records[i])["image"] for i in range(50)])
    np.testing.assert_array_equal(decoded[..., 0], digits.images[ids[:50]].astype(np.float32) / 16)
    assert data.preprocessing["pixel_scale"] == 255.0 and data.preprocessing["levels"] == 17
    assert Path(JaxdlDigits(data_dir=data_dir).data_dir).name == "2.0.0"


def test_a_data_dir_of_the_0_to_16_format_is_not_read_as_8_bit(tmp_path):
    """Version 1.0.0 (pixels 0..16) in the data dir: the 2.0.0 build goes beside it."""
    from jaxdl.data import digits as digits_lib

    class OldDigits(digits_lib.JaxdlDigits, skip_registration=True):
        name = "jaxdl_digits"
        VERSION = digits_lib.tfds.core.Version("1.0.0")

        def _generate_examples(self, indices):
            images, target = load_digits().images, load_digits().target
            for i in indices:
                image = images[i].astype(np.uint8)[..., None]
                yield int(i), {"image": image, "label": int(target[i]), "id": int(i)}

    old = OldDigits(data_dir=str(tmp_path), file_format="array_record")
    old.download_and_prepare(
        download_config=digits_lib.tfds.download.DownloadConfig(try_download_gcs=False)
    )
    assert old.as_data_source()["train"][0]["image"].max() <= 16
    data = build_data({"source": "digits", "data_dir": str(tmp_path)}, seed=0)
    images = next(data.eval_iter("test", 360, shard=(0, 1)))["image"]
    assert images.max() == 1.0 and sorted(
        p.name for p in (tmp_path / "jaxdl_digits").iterdir()
    ) == [
        "1.0.0",
        "2.0.0",
    ]


def test_second_build_reuses_prepared_files(data_dir):
    from jaxdl.data.digits import JaxdlDigits

    before = JaxdlDigits(data_dir=data_dir).info.splits["train"].num_examples
    again = build_data({"source": "digits", "data_dir": data_dir}, seed=1)
    assert before == 1257 and again.split_sizes["train"] == 1257


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("JAXDL_DATA_DIR", data_dir)
    data = build_data({"source": "digits", "data_dir": ""}, seed=0)
    assert data.split_sizes["val"] == 180


def test_channels_and_image_size(data_dir):
    data = build_data(
        {"source": "digits", "data_dir": data_dir, "channels": 3, "image_size": 16}, seed=0
    )
    assert data.example_spec["image"] == ((16, 16, 3), np.float32)
    batch = next(data.eval_iter("val", 4, shard=(0, 1)))
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_kfold_partitions_train_plus_val(data_dir):
    y = load_digits().target
    vals = []
    for i in range(3):
        data = build_data({"source": "digits", "data_dir": data_dir}, seed=0, fold=(i, 3))
        assert data.split_sizes["train"] + data.split_sizes["val"] == 1437
        assert data.split_sizes["test"] == 360
        src = data.source.splits
        tr = {int(src["train"][j]["id"]) for j in range(data.split_sizes["train"])}
        va = [int(src["val"][j]["id"]) for j in range(data.split_sizes["val"])]
        assert not tr & set(va)
        counts = np.bincount(y[va], minlength=10)
        expected = (
            np.bincount(
                y[np.concatenate([split_indices()["train"], split_indices()["val"]])], minlength=10
            )
            / 3
        )
        assert np.abs(counts - expected).max() <= 1
        vals.append(set(va))
    assert len(vals[0] | vals[1] | vals[2]) == 1437


def test_bad_fold_and_eval_split(data_dir):
    with pytest.raises(ValueError, match=r"fold: expected \(i, K\)"):
        build_data({"source": "digits", "data_dir": data_dir}, seed=0, fold=(3, 3))
    with pytest.raises(ValueError, match="data.eval_split: expected one of"):
        build_data({"source": "digits", "data_dir": data_dir, "eval_split": "dev"}, seed=0)


@pytest.mark.parametrize("train_transforms", [[], ["random_rotation(15)", "random_flip"]])
def test_memory_cache_gives_the_same_batches(data_dir, train_transforms):
    cfg = {"source": "digits", "data_dir": data_dir, "train_transforms": train_transforms}
    cached = build_data(cfg, seed=0)
    uncached = build_data({**cfg, "cache_mb": 0}, seed=0)
    steps = cached.steps_per_epoch(64, shard=(0, 1))
    a, b = (
        cached.train_iter(64, seed=3, shard=(0, 1)),
        uncached.train_iter(64, seed=3, shard=(0, 1)),
    )
    for _ in range(steps + 2):  # across an epoch boundary: the cache is reused, not mutated
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    evals = zip(cached.eval_iter("val", 64), uncached.eval_iter("val", 64), strict=True)
    for x, y in evals:
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])
    assert cached._caches[("train", "decode" if train_transforms else "train")] is not None
    assert all(v is None for v in uncached._caches.values())
    tiny = build_data({**cfg, "cache_mb": 0.01}, seed=0)  # 10 KB: the split does not fit
    next(tiny.train_iter(64, seed=3, shard=(0, 1)))
    assert all(v is None for v in tiny._caches.values())


@pytest.mark.parametrize("value", [-1, "big", True])
def test_bad_cache_mb(data_dir, value):
    with pytest.raises(ValueError, match=r"data.cache_mb: expected a number of MB >= 0"):
        build_data({"source": "digits", "data_dir": data_dir, "cache_mb": value}, seed=0)


def test_train_and_eval_chains_of_one_split_are_cached_apart(data_dir):
    """A deterministic train-only transform: train batches get it, eval of "train" does not."""
    cfg = {"source": "digits", "data_dir": data_dir, "train_transforms": ["normalize(symmetric)"]}
    for first in ("train", "eval"):  # whichever is asked first must not serve the other
        data = build_data(cfg, seed=0)
        reference = build_data({**cfg, "cache_mb": 0}, seed=0)
        calls = {
            "train": lambda d: next(d.train_iter(32, seed=1, shard=(0, 1)))["image"],
            "eval": lambda d: next(iter(d.eval_iter("train", 32, shard=(0, 1))))["image"],
        }
        order = [first, *(k for k in calls if k != first)]
        for kind in order:
            np.testing.assert_array_equal(calls[kind](data), calls[kind](reference))
        assert calls["eval"](data).min() >= 0 > calls["train"](data).min()  # [0,1] vs [-1,1]
