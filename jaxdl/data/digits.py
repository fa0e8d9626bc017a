"""The bundled "digits" source: scikit-learn's 1,797 real 8x8 digit images as a TFDS dataset.

Stored and fed like every other image dataset: uint8 0..255 (scikit-learn's 17 levels
0..16 as round(255 k / 16)), so an exported digits model takes an ordinary 8-bit PNG.
Decoding snaps values back to the 17 levels, so the model sees k / 16 exactly, as it did
when the data was stored as 0..16 (version 1.0.0): checkpoints of those runs still fit.

Built offline on first use by a `tfds.core.GeneratorBasedBuilder` into
``<data_dir>/jaxdl_digits/2.0.0/`` in array_record format (tfds 4.9.10 builds and reads
array_record without TensorFlow), read back through the builder's `as_data_source` (what
`tfds.data_source` calls) and held in memory. The train/val/test split (70/10/20,
stratified) is fixed by `SPLIT_SEED`, not by the run seed, so every run sees the same
test set: 1,257 / 180 / 360 examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from jaxdl.data.records import (
    ArrayImageDecode,
    InMemoryRecords,
    Source,
    image_size,
    opt,
    resolve_data_dir,
)

SPLIT_SEED = 0
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2
LEVELS = 17  # load_digits pixels are integers 0..16


def to_uint8(images: np.ndarray) -> np.ndarray:
    """load_digits values 0..16 -> uint8 0..255 (16 -> 255), the stored form."""
    return np.round(np.asarray(images, np.float64) * 255.0 / (LEVELS - 1)).astype(np.uint8)


def split_indices() -> dict[str, np.ndarray]:
    """Indices into `load_digits()` for each split, stratified by label, sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    train, val = train_test_split(
        rest,
        test_size=VAL_FRACTION / (1 - TEST_FRACTION),
        stratify=y[rest],
        random_state=SPLIT_SEED,
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class JaxdlDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits: image uint8 [8, 8, 1] (0..255), label 0..9, id = row in load_digits."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "sklearn load_digits, stratified 70/10/20 split (seed 0).",
        "2.0.0": "Pixels stored as uint8 0..255 (round(255 k / 16)) instead of 0..16.",
    }
    # No checksums file to look up. tfds 4.9.10 derives `code_path` through
    # `importlib_resources`, which it only installs for Python < 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants a package metadata folder.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 handwritten digits (UCI), 17 levels as 0..255.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "id": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in indices:
            image = to_uint8(digits.images[i])[..., None]
            yield int(i), {"image": image, "label": int(digits.target[i]), "id": int(i)}


def prepare_digits(data_dir: str) -> JaxdlDigits:
    """Build the dataset into `data_dir` unless already there; return the builder."""
    builder = JaxdlDigits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder


def digits_source(cfg: Mapping) -> Source:
    """The "digits" source, prepared on first use in data.data_dir, read into memory
    (115 KB; tfds's per-record deserialization would otherwise dominate a step)."""
    builder = prepare_digits(resolve_data_dir(cfg))
    splits = builder.as_data_source()
    decode = ArrayImageDecode(
        scale=255.0, image_size=image_size(cfg), channels=opt(cfg, "channels"), levels=LEVELS
    )
    return Source(
        "classification",
        {name: InMemoryRecords(splits[name]) for name in ("train", "val", "test")},
        decode,
        10,
        [str(d) for d in range(10)],
        {"source": "digits", "input": "image", **decode.describe()},
        split_names={"train": "train", "val": "val", "test": "test"},
    )
