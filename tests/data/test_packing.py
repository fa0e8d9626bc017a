"""Packing: best-fit decreasing bins, the row layout, and packed = unpacked per example."""

import json

import numpy as np
import pytest
from test_chat import TWO_TURNS, WITH_SYSTEM, make_tokenizer, write_jsonl

from jaxdl.data import build_data
from jaxdl.data.packing import build_rows, pack_bins


def test_best_fit_decreasing_fills_rows_and_is_deterministic():
    lengths = [1, 6, 2, 5, 1, 3, 4, 2]  # 24 tokens: three full rows of 8
    bins = pack_bins(lengths, 8, seed=0)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[1, 1, 2, 4], [2, 6], [3, 5]]
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert pack_bins(lengths, 8, seed=0) == bins
    # the seed orders equal lengths only: the same rows of lengths for every seed
    for seed in range(5):
        other = pack_bins(lengths, 8, seed=seed)
        assert [[lengths[i] for i in b] for b in other] == [[lengths[i] for i in b] for b in bins]
    assert {tuple(pack_bins(lengths, 8, seed=s)[0]) for s in range(8)} != {tuple(bins[0])}


def test_rows_keep_examples_apart():
    tokens = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
    masks = [np.array([0, 1, 1], bool), np.array([1, 1], bool)]
    packed = build_rows(tokens, masks, 6, packing=True, seed=0)
    np.testing.assert_array_equal(packed["inputs"], [[5, 6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(packed["targets"], [[6, 7, 0, 9, 0, 0]])
    np.testing.assert_array_equal(packed["weights"], [[1, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 0, 1, 0]])
    unpacked = build_rows(tokens, masks, 4, packing=False, seed=0)
    np.testing.assert_array_equal(unpacked["inputs"], [[5, 6, 7, 0], [8, 9, 0, 0]])
    np.testing.assert_array_equal(unpacked["weights"], [[1, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(unpacked["segment_ids"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert {k: v.dtype.name for k, v in packed.items()} == {
        "inputs": "int32",
        "targets": "int32",
        "weights": "float32",
        "segment_ids": "int32",
        "positions": "int32",
    }


def examples_of(arrays: dict) -> list[dict[str, tuple]]:
    """Each segment of each row: its inputs, (target, weight) pairs and positions."""
    out = []
    for r in range(len(arrays["inputs"])):
        seg = arrays["segment_ids"][r]
        for s in range(1, int(seg.max()) + 1):
            at = seg == s
            out.append(
                {
                    "inputs": tuple(arrays["inputs"][r][at].tolist()),
                    "pairs": tuple(
                        zip(
                            arrays["targets"][r][at].tolist(),
                            arrays["weights"][r][at].tolist(),
                            strict=True,
                        )
                    ),
                    "positions": tuple(arrays["positions"][r][at].tolist()),
                }
            )
    return out


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_packed_and_unpacked_hold_the_same_examples(tmp_path, template):
    """Every conversation's tokens stand unchanged in one segment of the packed rows, with
    the same (target, weight) pairs and positions 0.. as in its own unpacked row."""
    path = make_tokenizer(tmp_path / "tok", template)
    rows = []
    for i in range(12):
        turns = [dict(m) for m in TWO_TURNS[: 2 + 2 * (i % 2)]]
        turns[1]["content"] = f"Answer {i}: " + "yes " * (i % 5)
        rows.append({"messages": WITH_SYSTEM[:1] + turns if i % 3 == 0 else turns})
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "val.jsonl", rows[:5])
    cfg = {"source": f"jsonl:{tmp_path / 'd'}", "tokenizer": path, "seq_len": 160}
    packed = build_data({**cfg, "packing": True}, seed=1)
    unpacked = build_data({**cfg, "packing": False}, seed=1)
    for split in ("train", "val"):
        a = examples_of(packed.source.splits[split].arrays)
        b = examples_of(unpacked.source.splits[split].arrays)
        key = lambda e: e["inputs"]
        assert sorted(a, key=key) == sorted(b, key=key)
        assert all(e["positions"] == tuple(range(len(e["inputs"]))) for e in a)
        for e in a:  # the last token of an example predicts nothing
            assert e["pairs"][-1] == (0, 0.0)
        assert packed.report["splits"][split]["loss_tokens"] == sum(
            w for e in b for _, w in e["pairs"]
        )
    assert unpacked.split_sizes["train"] == 12 and packed.split_sizes["train"] < 12
    lengths = [len(e["inputs"]) for e in examples_of(unpacked.source.splits["train"].arrays)]
    assert packed.split_sizes["train"] == len(pack_bins(lengths, 160, seed=1))
    batch = next(iter(packed.train_iter(2, seed=0, shard=(0, 1))))
    assert batch["inputs"].shape == (2, 160) and batch["weights"].dtype == np.float32
    assert json.loads(json.dumps(packed.report))["packing"] is True


def test_a_llama_scores_packed_rows_as_unpacked_ones(tmp_path):
    """The contract with the model: a tiny Llama given segment_ids and positions gives every
    weighted target the same log-probability packed as alone (so the same loss)."""
    import jax
    import jax.numpy as jnp

    from jaxdl.models.llama import Llama

    path = make_tokenizer(tmp_path / "tok", "chatml")
    rows = [{"messages": TWO_TURNS}, {"messages": WITH_SYSTEM}, {"messages": TWO_TURNS[:2]}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "val.jsonl", rows)
    cfg = {"source": f"jsonl:{tmp_path / 'd'}", "tokenizer": path, "seq_len": 256}
    model = Llama(
        vocab_size=514, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_len=256,
    )  # fmt: skip
    params = model.init(jax.random.key(0), jnp.zeros((1, 256), jnp.int32))

    def weighted_logprobs(packing: bool) -> tuple[float, float, int]:
        arrays = build_data({**cfg, "packing": packing}, seed=0).source.splits["val"].arrays
        logits = model.apply(
            params,
            jnp.asarray(arrays["inputs"]),
            positions=jnp.asarray(arrays["positions"]),
            segment_ids=jnp.asarray(arrays["segment_ids"]),
        )
        logp = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(logp, jnp.asarray(arrays["targets"])[..., None], -1)[..., 0]
        weights = jnp.asarray(arrays["weights"])
        return float(-(picked * weights).sum()), float(weights.sum()), len(arrays["inputs"])

    packed_nll, packed_tokens, packed_rows = weighted_logprobs(True)
    nll, tokens, unpacked_rows = weighted_logprobs(False)
    assert (packed_rows, unpacked_rows) == (1, 3) and packed_tokens == tokens > 0
    np.testing.assert_allclose(packed_nll / packed_tokens, nll / tokens, rtol=1e-5)
