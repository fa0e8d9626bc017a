"""Byte-level text sources: windows decode back to the source bytes."""

import numpy as np
import pytest

from jaxdl.data import build_data, validate_batch
from jaxdl.data.text import stdlib_files
from jaxdl.errors import UserError

TEXT = ("The quick brown fox jumps over the lazy dog. Ünïcödé bytes count too.\n" * 30).encode()


def _decode(batches):
    """Eval batches (in order) -> the bytes their real windows cover."""
    inputs = np.concatenate([b["inputs"][b["mask"] > 0] for b in batches])
    targets = np.concatenate([b["targets"][b["mask"] > 0] for b in batches])
    return bytes(inputs.reshape(-1).astype(np.uint8)) + bytes([int(targets[-1, -1])])


def test_windows_decode_back_to_source_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT[:1000])
    (tmp_path / "b.txt").write_bytes(TEXT[1000:])
    cfg = {"source": f"text:{tmp_path}/*.txt", "seq_len": 16, "val_fraction": 0.1}
    data = build_data(cfg, seed=0, num_classes=10)  # num_classes is ignored for bytes
    n_val = int(len(TEXT) * 0.1)
    train, val = TEXT[:-n_val], TEXT[-n_val:]
    assert data.kind == "lm" and data.num_classes == 256
    assert data.example_spec == {"inputs": ((16,), np.int32), "targets": ((16,), np.int32)}
    assert data.split_sizes == {"train": (len(train) - 1) // 16, "val": (n_val - 1) // 16}
    batches = list(data.eval_iter("val", 5, shard=(0, 1)))
    assert sum(b["mask"].sum() for b in batches) == data.split_sizes["val"]
    covered = data.split_sizes["val"] * 16 + 1
    assert _decode(batches) == val[:covered]
    assert (
        _decode(list(data.eval_iter("train", 7, shard=(0, 1))))
        == train[: data.split_sizes["train"] * 16 + 1]
    )
    batch = next(data.train_iter(4, seed=0, shard=(0, 1)))
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    validate_batch(batch, data.example_spec, data.num_classes, split="train")


def test_test_fraction_holds_out_a_test_split_of_its_own(tmp_path):
    (tmp_path / "a.txt").write_bytes(TEXT)
    cfg = {"source": f"text:{tmp_path}/a.txt", "seq_len": 16, "val_fraction": 0.1}
    data = build_data({**cfg, "test_fraction": 0.25}, seed=0)
    n_val, n_test = int(len(TEXT) * 0.1), int(len(TEXT) * 0.25)
    n_train = len(TEXT) - n_val - n_test
    assert data.split_names == {
        "train": f"bytes[0:{n_train}]",
        "val": f"bytes[{n_train}:{n_train + n_val}]",
        "test": f"bytes[{n_train + n_val}:{len(TEXT)}]",
    }
    test = list(data.eval_iter("test", 8, shard=(0, 1)))
    assert _decode(test) == TEXT[n_train + n_val :][: data.split_sizes["test"] * 16 + 1]
    val = list(data.eval_iter("val", 8, shard=(0, 1)))
    assert _decode(val) == TEXT[n_train : n_train + n_val][: data.split_sizes["val"] * 16 + 1]
    with pytest.raises(UserError, match="val_fraction \\+ data.test_fraction: expected < 1"):
        build_data({**cfg, "test_fraction": 0.9}, seed=0)


def test_pydoc_corpus():
    from pydoc_data.topics import topics

    data = build_data({"source": "text:pydoc", "seq_len": 64}, seed=0)
    corpus = "\n".join(topics[k] for k in sorted(topics)).encode()
    assert data.preprocessing["corpus_bytes"] == len(corpus)
    first = data.source.splits["train"][0]
    assert bytes(first["inputs"].astype(np.uint8)) == corpus[:64]


def test_stdlib_corpus_capped():
    files = stdlib_files()
    assert all("test" not in f.parts for f in files) and len(files) > 100
    data = build_data({"source": "text:stdlib", "seq_len": 32, "max_bytes": 5000}, seed=0)
    assert data.preprocessing["corpus_bytes"] == 5000
    first = bytes(data.source.splits["train"][0]["inputs"].astype(np.uint8))
    assert first == files[0].read_bytes()[:32]


def test_text_errors(tmp_path):
    with pytest.raises(UserError, match=f"text:{tmp_path}/\\*.md matches no files"):
        build_data({"source": f"text:{tmp_path}/*.md"}, seed=0)
    (tmp_path / "tiny.txt").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="data.seq_len: .* each split needs at least"):
        build_data({"source": f"text:{tmp_path}/tiny.txt", "seq_len": 64}, seed=0)
    (tmp_path / "big.txt").write_bytes(TEXT)
    with pytest.raises(ValueError, match="data.transforms: a text source has no images"):
        build_data(
            {"source": f"text:{tmp_path}/big.txt", "seq_len": 8, "transforms": ["resize(8)"]},
            seed=0,
        )


def test_max_bytes_reads_only_what_it_keeps(tmp_path):
    """A 1 KB cut of a 256 MB file (sparse: no disk used) reads 1 KB, not the file."""
    import tracemalloc

    from jaxdl.data.text import read_corpus

    head = tmp_path / "a.txt"
    head.write_bytes(TEXT[:600])
    big = tmp_path / "b.txt"
    with open(big, "wb") as f:
        f.write(b"xyz")
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        corpus = read_corpus(str(tmp_path / "*.txt"), 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert corpus == TEXT[:600] + b"xyz" + bytes(397)
    assert peak < 2**20, peak
