"""Gradient accumulation is exact, and the SFT loss is a mean over the batch's loss tokens:
K micro-batches of B rows give the update of one batch of K * B rows, whatever tokens each
row's weights select; packed and unpacked rows give the same per-token loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.core import heads
from jaxdl.core.state import TrainState
from jaxdl.core.steps import eval_step, train_step
from jaxdl.models import create_model

MODEL = create_model({"name": "llama", "size": "tiny", "num_layers": 1})
HEAD = heads.make_head("sft", {}, 0)
T = 16


def sft_batch(rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, size=(rows, T + 1))
    weights = np.zeros((rows, T), np.float32)
    for r in range(rows):  # a different number of loss tokens in every row, some none
        start = rng.integers(0, T)
        weights[r, start : start + rng.integers(0, T)] = 1.0
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "weights": jnp.asarray(weights),
        "segment_ids": jnp.ones((rows, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T), (rows, T)).astype(jnp.int32),
        "mask": jnp.ones((rows,), jnp.float32),
    }


def fresh_state(tx):
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    return TrainState.create({"params": params}, tx, jax.random.key(1))


def test_sft_loss_is_the_mean_over_loss_tokens():
    batch = sft_batch(4)
    state = fresh_state(optax.sgd(0.1))
    logits = MODEL.apply({"params": state.params["params"]}, batch["inputs"])
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = np.asarray(batch["weights"])
    loss, metrics = HEAD.loss(logits, batch)
    np.testing.assert_allclose(loss, (np.asarray(per_token) * w).sum() / w.sum(), rtol=1e-6)
    assert float(metrics["loss_tokens"]) == w.sum()
    # not the mean of the rows' means (the rows hold different numbers of loss tokens)
    row_means = (np.asarray(per_token) * w).sum(1) / np.maximum(w.sum(1), 1)
    assert abs(float(loss) - row_means[w.sum(1) > 0].mean()) > 1e-4


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    batch = sft_batch(8, seed=3)
    tx = optax.sgd(1.0)
    whole, m1 = jax.jit(lambda s, b: train_step(s, b, model=MODEL, head=HEAD, tx=tx))(
        fresh_state(tx), batch
    )
    micro, m4 = jax.jit(lambda s, b: train_step(s, b, model=MODEL, head=HEAD, tx=tx, accumulate=4))(
        fresh_state(tx), batch
    )
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(micro.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert int(micro.step) == 1  # one optimizer update, not four


def test_accumulation_of_a_row_mean_head():
    """Heads without loss sums (a mean over rows) accumulate as the mean over all rows."""
    mlp = create_model({"name": "mlp", "num_classes": 3, "hidden": [8]})
    loss_cfg = {"name": "softmax_cross_entropy", "label_smoothing": 0.0, "class_weights": None}
    head = heads.make_head("classification", loss_cfg, 3, input_key="features")
    x = jax.random.normal(jax.random.key(2), (6, 5))
    batch = {"features": x, "label": jnp.array([0, 1, 2, 1, 0, 2])}
    params = mlp.init(jax.random.key(0), x)["params"]
    tx = optax.sgd(0.5)
    run = lambda k: train_step(
        TrainState.create({"params": params}, tx, jax.random.key(1)),
        batch,
        model=mlp,
        head=head,
        tx=tx,
        accumulate=k,
    )[0]
    for a, b in zip(jax.tree.leaves(run(1).params), jax.tree.leaves(run(3).params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_packed_rows_give_the_unpacked_per_token_loss():
    a = sft_batch(2, seed=5)
    lengths = (7, 9)
    rows = {k: v for k, v in a.items()}
    # unpacked: example i in row i, padded after its length (segment 0, weight 0)
    seg = np.zeros((2, T), np.int32)
    weights = np.zeros((2, T), np.float32)
    for i, n in enumerate(lengths):
        seg[i, :n] = 1
        weights[i, 2:n] = 1.0  # the "answer": all but the first two tokens
    unpacked = {**rows, "segment_ids": jnp.asarray(seg), "weights": jnp.asarray(weights)}
    # packed: both examples in one row, positions restarting, segments 1 and 2
    take = lambda key, i: np.asarray(unpacked[key])[i, : lengths[i]]
    packed = {
        key: jnp.asarray(np.concatenate([take(key, 0), take(key, 1)])[None])
        for key in ("inputs", "targets", "weights")
    }
    packed["segment_ids"] = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
    packed["positions"] = jnp.asarray([list(range(7)) + list(range(9))], jnp.int32)
    packed["mask"] = jnp.ones((1,), jnp.float32)
    state = fresh_state(optax.sgd(0.1))
    sums_u = eval_step(state, unpacked, model=MODEL, head=HEAD)
    sums_p = eval_step(state, packed, model=MODEL, head=HEAD)
    assert float(sums_u["count"]) == float(sums_p["count"]) > 0
    np.testing.assert_allclose(
        sums_p["loss"] / sums_p["count"], sums_u["loss"] / sums_u["count"], rtol=1e-4
    )
