"""Labels outside [0, model.num_classes): refused before training where the source can be
scanned, and on every train batch (an on-device flag) where it cannot, whatever the loss."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdl.config import default_config
from jaxdl.core.heads import finalize
from jaxdl.data import build_data
from jaxdl.data.pipeline import _check_labels_fit
from jaxdl.data.records import ArrayImageDecode, Source
from jaxdl.errors import UserError
from jaxdl.training.trainer import train

N_TRAIN, BATCH = 40, 8


def mnist_records(n: int, bad_index: int | None = None) -> list[dict]:
    """Mock MNIST records whose first pixel is the record's index; label 12 at bad_index."""
    records = []
    for i in range(n):
        image = np.zeros((28, 28, 1), np.uint8)
        image[0, 0, 0] = i
        label = 12 if i == bad_index else i % 10
        records.append({"image": image, "label": label})
    return records


def mocked_mnist(bad_index: int | None):
    def as_data_source(self, split, **kwargs):
        return [mnist_records(N_TRAIN if s == "train" else 16, bad_index) for s in split]

    return tfds.testing.mock_data(
        policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source
    )


def config(tmp_path, **overrides):
    cfg = default_config()
    cfg.model = {"name": "mlp", "num_classes": 10, "hidden": (16,)}
    cfg.data.source = "tfds:mnist"
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.batch_size = BATCH
    cfg.num_steps = N_TRAIN // BATCH  # one epoch, checked once at its end (log_every > it)
    cfg.log_every = 100
    for key, value in overrides.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    return cfg


@pytest.mark.parametrize(
    "overrides",
    [{"loss.label_smoothing": 0.1}, {"loss.name": "mse"}, {}],
    ids=["label_smoothing", "mse", "cross_entropy"],
)
def test_a_bad_label_in_a_later_batch_is_refused(tmp_path, overrides):
    cfg = config(tmp_path, **overrides)
    with mocked_mnist(None):  # where each record lands: record i has first pixel i
        data = build_data(cfg.data, seed=cfg.seed, num_classes=10)
        it = data.train_iter(BATCH, seed=cfg.seed, shard=(0, 1))
        steps = [
            sorted(np.round(next(it)["image"][:, 0, 0, 0] * 255).astype(int))
            for _ in range(cfg.num_steps)
        ]
    bad_step = 4  # not the first batch, which the host validates
    bad_index = steps[bad_step - 1][0]
    with mocked_mnist(bad_index), pytest.raises(UserError) as err:
        train(cfg, tmp_path / "run", progress=False, echo=lambda *a: None)
    message = str(err.value)
    assert message.startswith(f"data: the train batch of step {bad_step} (steps 1..5 checked)")
    assert "holds label 12, outside [0, model.num_classes)" in message
    assert "Fix: set model.num_classes to at least 13" in message
    assert "learning_rate" not in message
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_a_source_with_more_classes_than_the_model_is_refused_before_training():
    with pytest.raises(UserError) as err:
        build_data({"source": "digits"}, seed=0, num_classes=5)
    assert str(err.value).startswith(
        "model.num_classes: expected at least 10 (the classes of digits), found 5"
    )


class Labels:
    """Records whose labels are held in memory (as `InMemoryRecords`)."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": np.zeros((2, 2, 1), np.float32), "label": int(self.labels[i])}

    def cheap_labels(self, key):
        return self.labels


def test_every_label_of_an_in_memory_split_is_checked():
    labels = [0, 1, 2] * 30 + [7] + [1] * 20  # one bad label, far from the first batch
    source = Source(
        "classification",
        {"train": Labels(labels), "val": Labels([0, 1])},
        ArrayImageDecode(scale=1.0),
        None,  # no class count to compare: only the scan can tell
        None,
        {"source": "test"},
    )
    _check_labels_fit(source, 8)  # 7 fits 8 classes
    with pytest.raises(UserError) as err:
        _check_labels_fit(source, 3)
    assert str(err.value) == (
        "data: split 'train' (train) holds 1 labels outside [0, 3) (model.num_classes): "
        "found min 0 max 7. Fix: set model.num_classes to at least 8, or fix the labels."
    )


def test_evaluation_refuses_sums_over_bad_labels():
    sums = {"loss": 3.0, "accuracy": 2.0, "count": 4.0, "bad_labels": 0.0}
    assert finalize(sums, "classification") == {"loss": 0.75, "accuracy": 0.5}
    with pytest.raises(UserError, match="2 evaluation examples hold labels outside"):
        finalize({**sums, "bad_labels": 2.0}, "classification")
