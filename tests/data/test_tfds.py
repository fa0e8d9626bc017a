"""tfds:NAME sources through tfds.testing.mock_data, and the source-spec errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdl.data import build_data, validate_batch
from jaxdl.errors import UserError

MOCK = dict(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE)


def test_mock_mnist(tmp_path):
    with tfds.testing.mock_data(**MOCK):
        data = build_data({"source": "tfds:mnist", "data_dir": str(tmp_path)}, seed=0)
        assert data.example_spec == {"image": ((28, 28, 1), np.float32), "label": ((), np.int32)}
        assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
        assert data.split_sizes == {"train": 20, "val": 20, "test": 20}
        assert data.split_names["train"] == "train"
        records = data.source.splits["train"]
        batches = list(data.eval_iter("val", 8, shard=(0, 1)))
        assert sum(b["mask"].sum() for b in batches) == 20 and len(batches) == 3
        first = records[0]
        np.testing.assert_array_equal(
            batches[0]["image"][0], first["image"].astype(np.float32) / 255
        )
        assert batches[0]["label"][0] == first["label"]
        train = next(data.train_iter(4, seed=0, shard=(0, 1)))
        validate_batch(train, data.example_spec, data.num_classes, split="train")


def test_mock_cifar10_with_split_slices(tmp_path):
    cfg = {
        "source": "tfds:cifar10",
        "data_dir": str(tmp_path),
        "train_split": "train[:90%]",
        "eval_split": "train[90%:]",
        "test_split": "test",
        "transforms": ["normalize(symmetric)"],
    }
    with tfds.testing.mock_data(**MOCK):
        data = build_data(cfg, seed=0)
        assert data.example_spec["image"] == ((32, 32, 3), np.float32)
        assert set(data.split_sizes) == {"train", "train[90%:]", "test"}
        batch = next(data.eval_iter("train[90%:]", 4, shard=(0, 1)))
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["image"].min() < 0


def test_label_out_of_range_caught_by_validate_batch(tmp_path):
    with tfds.testing.mock_data(**MOCK):
        with pytest.raises(UserError, match=r"model.num_classes: expected at least 10 \(the "):
            build_data({"source": "tfds:mnist", "data_dir": str(tmp_path)}, seed=0, num_classes=3)
        data = build_data({"source": "tfds:mnist", "data_dir": str(tmp_path)}, seed=0)
        batch = next(data.eval_iter("test", 20, shard=(0, 1)))
    labels = batch["label"]
    bad, hi = int(np.sum(labels >= 3)), int(labels.max())
    assert bad > 0
    message = (
        f"data: batch 'label' (test) holds {bad} values outside [0, 3): found min "
        f"{labels.min()} max {hi}. Fix: set model.num_classes to at least {hi + 1} "
        "or fix the labels."
    )
    with pytest.raises(ValueError) as err:
        validate_batch(batch, data.example_spec, 3, split="test")
    assert str(err.value) == message


def test_unprepared_dataset_names_dir_and_command(tmp_path):
    with pytest.raises(UserError) as err:
        build_data({"source": "tfds:mnist", "data_dir": str(tmp_path)}, seed=0)
    text = str(err.value)
    assert f"not prepared in {tmp_path}/mnist/" in text
    assert f"`tfds build mnist --data_dir {tmp_path} --file_format array_record`" in text


def test_unknown_tfds_name_and_prefix(tmp_path):
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_set'"):
        build_data({"source": "tfds:no_such_set", "data_dir": str(tmp_path)}, seed=0)
    with pytest.raises(
        ValueError, match='data.source: expected one of "digits", "tfds:NAME.*found \'hdf5:x.h5\''
    ):
        build_data({"source": "hdf5:x.h5"}, seed=0)
