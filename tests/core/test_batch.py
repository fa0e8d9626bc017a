"""check_batch: the one set of batch rules the steps and the data layer share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.core import steps
from jaxdl.core.batch import Fixes, check_batch
from jaxdl.errors import UserError

SPEC = {"image": ((4, 4, 1), jnp.float32), "label": ((), jnp.int32)}


def _batch(n=3, **over):
    batch = {"image": np.zeros((n, 4, 4, 1), np.float32), "label": np.arange(n, dtype=np.int32)}
    return {**batch, **over}


@pytest.mark.parametrize(
    "over, message",
    [
        # A scalar label with no batch dimension: its rank is wrong, [B] expected.
        ({"label": np.int32(1)}, r"batch 'label' \(step\) has shape \(\), expected \[B\]\. Fix: "),
        ({"image": np.zeros((3, 4, 4, 1), np.float16)}, r"has dtype float16, expected float32"),
        ({"mask": np.ones((3, 1), np.float32)}, r"'mask' \(step\) .* shape \(3, 1\), expected"),
        ({"mask": np.ones(2, np.float32)}, r"disagree on the batch size: \[2, 3\]"),
    ],
)
def test_shape_rules(over, message):
    with pytest.raises(UserError, match=message):
        check_batch(_batch(**over), SPEC, where="step")


def test_values_are_checked_only_with_num_classes():
    bad = _batch(image=np.full((3, 4, 4, 1), np.inf, np.float32), label=np.array([0, 1, 9]))
    bad["label"] = bad["label"].astype(np.int32)
    check_batch(bad, SPEC, where="step")  # shapes and dtypes are right
    with pytest.raises(UserError, match=r"holds 48 NaN/Inf values\. Fix: remove or impute"):
        check_batch(bad, SPEC, where="step", num_classes=10)
    bad["image"] = np.zeros((3, 4, 4, 1), np.float32)
    with pytest.raises(UserError, match=r"holds 1 values outside \[0, 5\): found min 0 max 9"):
        check_batch(bad, SPEC, where="step", num_classes=5)
    check_batch(bad, SPEC, where="step", num_classes=10)


def test_caller_names_and_fixes_appear_in_the_message():
    fixes = Fixes(shape="check data.image_size")
    with pytest.raises(UserError) as err:
        check_batch(
            _batch(image=np.zeros((3, 8, 8, 1), np.float32)),
            SPEC,
            where="val",
            prefix="data: ",
            fixes=fixes,
        )
    assert str(err.value) == (
        "data: batch 'image' (val) has shape (3, 8, 8, 1), expected [B, 4, 4, 1]. "
        "Fix: check data.image_size."
    )


def test_shape_structs_need_no_values():
    structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()}
    check_batch(structs, SPEC, where="step")
    structs["image"] = jax.ShapeDtypeStruct((3, 4, 4, 2), jnp.float32)
    with pytest.raises(UserError, match=r"expected \[B, 4, 4, 1\]"):
        check_batch(structs, SPEC, where="step")


def test_every_step_kind_runs_the_check_before_tracing():
    # The check runs on the host before the jitted step, so no model is ever applied here.
    spec = {"image": ((3,), jnp.float32), "label": ((), jnp.int32)}
    batch = {"image": np.zeros((2, 5), np.float32), "label": np.zeros(2, np.int32)}
    model, tx = nn.Dense(2), optax.sgd(0.1)
    made = {
        "train_step": steps.make_train_step(model, None, tx, batch_spec=spec),
        "eval_step": steps.make_eval_step(model, None, batch_spec=spec),
    }
    for where, step in made.items():
        with pytest.raises(UserError, match=rf"'image' \({where}\) has shape \(2, 5\)"):
            step(None, batch)
    stacked = {k: np.stack([v] * 4) for k, v in batch.items()}  # [K=4, B=2, ...]
    train_steps = steps.make_train_steps(model, None, tx, batch_spec=spec)
    with pytest.raises(UserError, match=r"'image' \(train_steps\) has shape \(2, 5\)"):
        train_steps(None, stacked)
