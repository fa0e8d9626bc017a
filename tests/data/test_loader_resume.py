"""Train iterators: per-epoch reshuffle, sharding, exact resume (also via device prefetch)."""

import json

import numpy as np
import pytest

from jaxdl.data import build_data, prefetch_to_device

N, BS = 96, 8  # 12 steps per epoch


def _data(**extra):
    cfg = {"source": "synthetic:images", "shape": [6, 6, 1], "num_examples": N, **extra}
    return build_data(cfg, seed=3, num_classes=4)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(
        set(x) == set(y) and all(np.array_equal(np.asarray(x[k]), y[k]) for k in x)
        for x, y in zip(xs, ys, strict=True)
    )


def _rows(batches):
    return [b.tobytes() for batch in batches for b in np.asarray(batch["image"])]


def test_epochs_are_permutations_reshuffled_each_epoch():
    data = _data()
    assert data.steps_per_epoch(BS, shard=(0, 1)) == 12
    batches = _take(data.train_iter(BS, seed=0, shard=(0, 1)), 36)
    epochs = [_rows(batches[12 * e : 12 * (e + 1)]) for e in range(3)]
    source = data.source.splits["train"]
    everything = sorted(source[i]["image"].tobytes() for i in range(N))
    for rows in epochs:
        assert sorted(rows) == everything
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = _rows(_take(data.train_iter(BS, seed=1, shard=(0, 1)), 12))
    assert other_seed != epochs[0] and sorted(other_seed) == everything


def test_drop_remainder_per_epoch():
    data = _data(num_examples=100)  # 12 whole batches, 4 examples dropped each epoch
    batches = _take(data.train_iter(BS, seed=0, shard=(0, 1)), 24)
    e0, e1 = _rows(batches[:12]), _rows(batches[12:])
    assert len(set(e0)) == 96 and len(set(e1)) == 96 and set(e0) != set(e1)


def test_process_shards_partition_each_epoch():
    data = _data()
    assert data.steps_per_epoch(BS, shard=(0, 2)) == 6
    a = _rows(_take(data.train_iter(BS, seed=0, shard=(0, 2)), 6))
    b = _rows(_take(data.train_iter(BS, seed=0, shard=(1, 2)), 6))
    assert not set(a) & set(b) and len(set(a) | set(b)) == N


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_hold_contiguous_blocks_of_the_one_process_batch(processes):
    """Process p's batch k is rows [p*B, (p+1)*B) of the one-process global batch k, each
    augmented identically: dropout masks and augmentation follow the row's place."""
    data = _data(train_transforms=["random_flip", "random_resized_crop(6, scale=(0.5, 1.0))"])
    whole = _take(data.train_iter(BS * processes, seed=5, shard=(0, 1)), 15)  # > 1 epoch
    parts = [_take(data.train_iter(BS, seed=5, shard=(p, processes)), 15) for p in range(processes)]
    for k, batch in enumerate(whole):
        for p in range(processes):
            block = {key: v[p * BS : (p + 1) * BS] for key, v in batch.items()}
            assert _same([parts[p][k]], [block]), (k, p)


@pytest.mark.parametrize("stop", [5, 12, 17])  # mid-epoch, at and across the boundary
def test_resume_matches_uninterrupted_run_with_augmentation(stop):
    data = _data(
        train_transforms=[
            "random_flip",
            "random_rotation(20)",
            "random_resized_crop(6, scale=(0.5, 1.0))",
        ]
    )
    reference = _take(data.train_iter(BS, seed=7, shard=(0, 1)), stop + 8)
    first = data.train_iter(BS, seed=7, shard=(0, 1))
    assert _same(_take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.get_state()))
    assert state["step"] == stop and state["epoch"] == stop // 12
    resumed = data.train_iter(BS, seed=0, shard=(0, 1))  # the state carries the seed
    resumed.set_state(state)
    assert _same(_take(resumed, 8), reference[stop:])


def test_augmentation_differs_across_epochs_but_not_runs():
    data = _data(train_transforms=["random_rotation(30)"])
    a = _take(data.train_iter(BS, seed=2, shard=(0, 1)), 24)
    b = _take(data.train_iter(BS, seed=2, shard=(0, 1)), 24)
    assert _same(a, b)
    plain = _data()
    p = _take(plain.train_iter(BS, seed=2, shard=(0, 1)), 24)
    # Same shuffle, different rotations per epoch: the rotated rows of epoch 0 and 1 differ
    # while the un-augmented order repeats the same examples.
    assert [r for r in _rows(p[:12])] != _rows(a[:12])
    assert sorted(_rows(p[:12])) == sorted(_rows(p[12:]))
    assert sorted(_rows(a[:12])) != sorted(_rows(a[12:]))


def test_prefetch_state_is_last_consumed_batch():
    data = _data(train_transforms=["random_flip"])
    reference = _take(data.train_iter(BS, seed=5, shard=(0, 1)), 20)
    batches = prefetch_to_device(data.train_iter(BS, seed=5, shard=(0, 1)), size=3)
    got = _take(batches, 10)
    assert _same([{k: np.asarray(v) for k, v in b.items()} for b in got], reference[:10])
    state = batches.get_state()
    assert state["step"] == 10  # not the read-ahead position
    batches.close()
    again = prefetch_to_device(data.train_iter(BS, seed=5, shard=(0, 1)), size=2)
    again.set_state(state)
    rest = [{k: np.asarray(v) for k, v in b.items()} for b in _take(again, 10)]
    assert _same(rest, reference[10:])
    assert again.get_state()["step"] == 20
    again.close()


def test_state_from_another_batch_size_is_refused():
    data = _data()
    it = data.train_iter(BS, seed=0, shard=(0, 1))
    state = {**it.get_state(), "batch_size": 16}
    with pytest.raises(ValueError, match="batch_size 16, this run has 8"):
        it.set_state(state)


def test_batch_larger_than_split_is_refused():
    with pytest.raises(ValueError, match="data.batch_size: expected at most 96"):
        _data().train_iter(128, seed=0, shard=(0, 1))


def test_synthetic_tokens_are_shifted_windows():
    data = build_data(
        {"source": "synthetic:tokens", "seq_len": 16, "num_examples": 32}, seed=0, num_classes=50
    )
    assert data.kind == "lm" and data.num_classes == 50
    assert data.example_spec == {"inputs": ((16,), np.int32), "targets": ((16,), np.int32)}
    batch = next(data.train_iter(4, seed=0, shard=(0, 1)))
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < 50


def test_prefetch_places_batches_with_a_sharding():
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    data = _data()
    batches = prefetch_to_device(data.train_iter(BS, seed=0, shard=(0, 1)), sharding=sharding)
    batch = next(batches)
    assert batch["image"].sharding == sharding and batch["label"].shape == (BS,)
    batches.close()
