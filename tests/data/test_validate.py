"""validate_batch: each problem named with field, expected and found."""

import numpy as np
import pytest

from jaxdl.data import validate_batch

SPEC = {"image": ((4, 4, 1), np.dtype(np.float32)), "label": ((), np.dtype(np.int32))}


def _batch(**over):
    batch = {"image": np.zeros((3, 4, 4, 1), np.float32), "label": np.array([0, 1, 2], np.int32)}
    return {**batch, **over}


def test_good_batch_passes():
    validate_batch(_batch(mask=np.ones(3, np.float32)), SPEC, 3, split="val")


@pytest.mark.parametrize(
    "over, message",
    [
        (
            {"image": np.zeros((3, 4, 4, 3), np.float32)},
            r"data: batch 'image' \(train\) has shape \(3, 4, 4, 3\), expected \[B, 4, 4, 1\]",
        ),
        (
            {"image": np.zeros((3, 4, 4, 1), np.float64)},
            r"data: batch 'image' \(train\) has dtype float64, expected float32",
        ),
        (
            {"label": np.array([0, 1, 12], np.int32)},
            r"data: batch 'label' \(train\) holds 1 values outside \[0, 10\): found min 0 max 12\. "
            r"Fix: set model.num_classes to at least 13 or fix the labels\.",
        ),
        ({"label": np.array([-1, 1, 2], np.int32)}, r"outside \[0, 10\): found min -1 max 2"),
        (
            {"image": np.full((3, 4, 4, 1), np.nan, np.float32)},
            r"data: batch 'image' \(train\) holds 48 NaN/Inf values",
        ),
        ({"mask": np.ones(3, np.int32)}, r"batch 'mask' \(train\) has dtype int32"),
        ({"label": np.array([0, 1], np.int32)}, r"disagree on the batch size: \[2, 3\]"),
    ],
)
def test_problems(over, message):
    with pytest.raises(ValueError, match=message):
        validate_batch(_batch(**over), SPEC, 10, split="train")


def test_missing_field():
    with pytest.raises(ValueError, match=r"lacks fields \['label'\]; it has \['image'\]"):
        validate_batch({"image": np.zeros((3, 4, 4, 1), np.float32)}, SPEC, 10, split="train")


def test_token_range():
    spec = {"inputs": ((4,), np.int32), "targets": ((4,), np.int32)}
    batch = {"inputs": np.full((2, 4), 300, np.int32), "targets": np.zeros((2, 4), np.int32)}
    with pytest.raises(ValueError, match=r"'inputs' \(train\) holds 8 values outside \[0, 256\)"):
        validate_batch(batch, spec, 256, split="train")
