"""Data sources: `data.source` spec -> a `Source` (records per split and their decoder).

`load_source` is the one dispatch: it imports each source module (digits, imagefolder, text,
tabular, textfolder) on use; the synthetic and TFDS sources live here. What they all share
(`Source`, record containers, decoders, `opt`) is `jaxdl.data.records`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxdl.data.records import (
    ArrayImageDecode,
    Identity,
    Source,
    image_size,
    opt,
    pixel_scale,
    resolve_data_dir,
)
from jaxdl.errors import UserError

VALID_SOURCES = (
    '"digits", "tfds:NAME[/CONFIG]", "imagefolder:PATH", "text:PATH_OR_GLOB", "text:stdlib", '
    '"text:pydoc", "synthetic:images", "synthetic:tokens", "csv:PATH", "parquet:PATH", '
    '"sklearn:NAME", "textfolder:PATH", "jsonl:PATH", "none"'
)


# ---- synthetic -----------------------------------------------------------------------------


class SyntheticImages:
    """Uniform [0, 1) images and uniform labels, each a pure function of (seed, index)."""

    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int, seed: int, offset: int):
        self.n, self.shape, self.num_classes = n, shape, num_classes
        self.seed, self.offset = seed, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.offset + int(i)])
        label = int(rng.integers(self.num_classes))
        return {"image": rng.random(self.shape, dtype=np.float32), "label": label}


class SyntheticTokens:
    """Uniform token windows: inputs = w[:-1], targets = w[1:], from (seed, index)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int, offset: int):
        self.n, self.seq_len, self.vocab, self.seed, self.offset = n, seq_len, vocab, seed, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.offset + int(i)])
        w = rng.integers(0, self.vocab, self.seq_len + 1).astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:]}


def synthetic_source(kind: str, cfg: Mapping, *, seed: int, num_classes: int | None) -> Source:
    """ "synthetic:images" / "synthetic:tokens": deterministic from `seed`, for benchmarks."""
    n = int(opt(cfg, "num_examples", 1024))
    n_eval = max(1, n // 10)
    if kind == "images":
        shape = tuple(int(d) for d in opt(cfg, "shape", (32, 32, 3)))
        classes = int(num_classes or 10)
        make = lambda count, off: SyntheticImages(count, shape, classes, seed, off)
        splits = {"train": make(n, 0), "val": make(n_eval, n), "test": make(n_eval, n + n_eval)}
        return Source(
            "classification",
            splits,
            ArrayImageDecode(scale=1.0),
            classes,
            None,
            {"source": "synthetic:images", "input": "image"},
        )
    if kind == "tokens":
        shape = opt(cfg, "shape")
        seq_len = int(shape[0]) if shape else int(opt(cfg, "seq_len", 128))
        vocab = int(num_classes or 256)
        make = lambda count, off: SyntheticTokens(count, seq_len, vocab, seed, off)
        splits = {"train": make(n, 0), "val": make(n_eval, n), "test": make(n_eval, n + n_eval)}
        return Source(
            "lm",
            splits,
            Identity(),
            vocab,
            None,
            {"source": "synthetic:tokens", "tokenizer": None, "vocab_size": vocab},
        )
    raise UserError(f"data.source: expected one of {VALID_SOURCES}, found 'synthetic:{kind}'.")


# ---- no data: a model's input alone -------------------------------------------------------


def no_data_source(cfg: Mapping, *, num_classes: int | None) -> Source:
    """ "none": a workdir that holds a model and no examples (an imported classifier).

    The model's input is 8-bit RGB or gray pixels at data.image_size (files of another size
    are resized to it), scaled to [0, 1], then data.transforms (the normalization its
    weights expect); data.class_names names its outputs. `export` and `predict` need no
    more; commands that need examples refuse it (`jaxdl.data.pipeline.build_data`).
    """
    size = image_size(cfg)
    if size is None:
        raise UserError(
            'data.image_size: data.source "none" (a model without data) needs the input '
            "size, found it unset. Fix: set data.image_size to the size the model takes."
        )
    channels = int(opt(cfg, "channels", 3))
    names = [str(n) for n in opt(cfg, "class_names", [])] or None
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise UserError(
            f"data.class_names: expected {num_classes} names (model.num_classes), found "
            f"{len(names)}. Fix: give one name per output or leave data.class_names empty."
        )
    decode = ArrayImageDecode(scale=255.0, image_size=size, channels=channels)
    return Source(
        "classification",
        {},
        decode,
        num_classes,
        names,
        {"source": "none", "input": "image", **decode.describe()},
        sample={"image": np.zeros((*size, channels), np.uint8), "label": 0},
    )


# ---- TFDS ----------------------------------------------------------------------------------


def _resolve_split(wanted: str, known: set[str], *, role: str, name: str) -> str | None:
    """Map a configured split to one the dataset has; the default "val" falls back to
    "validation" then "test". Unknown splits (prepared data) -> error; None = skip."""
    base = wanted.split("[")[0]
    if not known or base in known:
        return wanted
    if wanted == "val":
        for alt in ("validation", "test"):
            if alt in known:
                return alt
    if role == "test":
        return None
    raise UserError(
        f"data.{role}_split: TFDS dataset {name!r} has splits {sorted(known)}, found "
        f"{wanted!r}. Fix: set data.{role}_split to one of them or a slice like "
        "'train[:90%]'."
    )


def tfds_source(name: str, cfg: Mapping, *, num_classes: int | None) -> Source:
    """ "tfds:NAME[/CONFIG]": a TFDS dataset prepared in array_record format."""
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"data.source: TFDS has no dataset {name!r} (found 'tfds:{name}'). "
            "Fix: check the name with `tfds.list_builders()`."
        ) from None
    except ValueError as err:
        raise UserError(
            f"data.source: cannot open TFDS dataset {name!r}: {str(err).splitlines()[0]}"
        ) from None
    known = set(builder.info.splits.keys())
    wanted = {
        "train": opt(cfg, "train_split", "train"),
        "val": opt(cfg, "eval_split", "val"),
        "test": opt(cfg, "test_split", "test"),
    }
    # Our split names are the configured ones (the trainer looks splits up by them).
    roles = {"train": "train", "val": "eval", "test": "test"}
    names: dict[str, str] = {}
    for ours, split in wanted.items():
        resolved = _resolve_split(split, known, role=roles[ours], name=name)
        if resolved is not None:
            names["train" if ours == "train" else split] = resolved
    prepare = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
    try:
        records = builder.as_data_source(split=list(names.values()))
    except (NotImplementedError, ValueError, AssertionError, FileNotFoundError) as err:
        if not builder.is_prepared():
            raise UserError(
                f"data.source: TFDS dataset {name!r} is not prepared in {builder.data_dir} "
                f"(data.data_dir={data_dir}). Fix: run `{prepare}`."
            ) from None
        raise UserError(
            f"data.source: TFDS dataset {name!r} in {builder.data_dir} is not in "
            f"array_record format ({str(err).splitlines()[0]}). Fix: run "
            f"`{prepare}`."
        ) from None
    splits = dict(zip(names, records, strict=True))

    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if image_key not in features or label_key not in features:
        raise UserError(
            f"data.source: jaxdl reads TFDS image classification datasets with "
            f"features ({image_key!r}, {label_key!r}); {name!r} has "
            f"{sorted(features.keys())}."
        )
    image_feature, label_feature = features[image_key], features[label_key]
    size = image_size(cfg)
    if size is None and None in tuple(image_feature.shape[:2]):
        raise UserError(
            f"data.image_size: TFDS dataset {name!r} has images of varying size "
            f"{image_feature.shape}; found data.image_size unset. Fix: set "
            "data.image_size, e.g. 224."
        )
    classes = getattr(label_feature, "num_classes", None)
    if classes is None and num_classes is None:
        raise UserError(
            f"model.num_classes: TFDS dataset {name!r} has no ClassLabel feature "
            f"{label_key!r}; found no model.num_classes. Fix: set model.num_classes."
        )
    decode = ArrayImageDecode(
        scale=pixel_scale(image_feature.np_dtype),
        image_key=image_key,
        label_key=label_key,
        image_size=size,
        channels=opt(cfg, "channels"),
    )
    return Source(
        "classification",
        splits,
        decode,
        classes,
        list(label_feature.names) if classes is not None else None,
        {"source": f"tfds:{name}", "input": "image", **decode.describe()},
        split_names=names,
    )


# ---- dispatch ------------------------------------------------------------------------------


def load_source(
    cfg: Mapping, *, seed: int, num_classes: int | None, task: str | None = None
) -> Source:
    """`data.source` -> Source. Unknown forms -> ValueError listing the valid ones.

    ``task`` (config.task) picks a table's task; unset, tables infer it from the label.
    """
    spec = str(opt(cfg, "source", "digits"))
    prefix, _, rest = spec.partition(":")
    if (prefix == "jsonl" or (prefix == "parquet" and task == "sft")) and rest:
        from jaxdl.data.chat import chat_source

        return chat_source(spec, cfg, seed=seed)
    if prefix in ("csv", "parquet", "sklearn") and rest:
        from jaxdl.data.tabular import table_source

        return table_source(spec, cfg, seed=seed, task=task)
    if prefix == "textfolder" and rest:
        from jaxdl.data.textfolder import textfolder_source

        return textfolder_source(rest, cfg, seed=seed)
    if spec == "digits":
        from jaxdl.data.digits import digits_source

        return digits_source(cfg)
    if prefix == "tfds" and rest:
        return tfds_source(rest, cfg, num_classes=num_classes)
    if prefix == "imagefolder" and rest:
        from jaxdl.data.imagefolder import imagefolder_source

        return imagefolder_source(rest, cfg)
    if prefix == "text" and rest:
        from jaxdl.data.text import text_source

        return text_source(rest, cfg)
    if prefix == "synthetic" and rest:
        return synthetic_source(rest, cfg, seed=seed, num_classes=num_classes)
    if spec == "none":
        return no_data_source(cfg, num_classes=num_classes)
    raise UserError(f"data.source: expected one of {VALID_SOURCES}, found {spec!r}.")
