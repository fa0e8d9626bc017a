"""The transform spec language and the ops' exact effects."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jaxdl.data import build_data, parse_transform, parse_transforms
from jaxdl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Normalize,
    OneHot,
    RandomFlip,
    RandomResizedCrop,
    Resize,
)


def _image(h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).random((h, w, c), dtype=np.float32)


def test_parse_forms():
    assert parse_transform("resize(224)") == Resize((224, 224))
    assert parse_transform("resize((32, 48))") == Resize((32, 48))
    assert parse_transform(("center_crop", {"size": 7})) == CenterCrop((7, 7))
    assert parse_transform({"name": "random_flip", "p": 1.0}) == RandomFlip(1.0)
    assert parse_transform("random_flip") == RandomFlip(0.5)
    assert parse_transform("normalize(imagenet)") == Normalize(IMAGENET_MEAN, IMAGENET_STD)
    assert parse_transform("normalize(symmetric)") == Normalize((0.5,), (0.5,))
    assert parse_transform("normalize(mean=0.1, std=(2,))") == Normalize((0.1,), (2.0,))
    assert parse_transform("random_resized_crop(16, scale=(0.5, 1))") == RandomResizedCrop(
        (16, 16), (0.5, 1.0)
    )
    assert parse_transform("one_hot(3)") == OneHot(3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blur(3)", "unknown transform 'blur'.*valid: center_crop, normalize"),
        ("resize(", "cannot parse 'resize\\('"),
        ("resize(1, 2, 3)", "bad arguments in 'resize\\(1, 2, 3\\)'"),
        ("normalize(fancy)", "normalize expects one of \\['imagenet', 'symmetric', 'unit'\\]"),
        (42, "expected a string like 'resize\\(224\\)'"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_transform(spec)


def test_random_ops_refused_in_eval_chain():
    with pytest.raises(
        ValueError,
        match="data.transforms: 'random_flip' is random.*move it to data.train_transforms",
    ):
        parse_transforms(["resize(8)", "random_flip"], field="data.transforms", allow_random=False)


def test_deterministic_ops_exact():
    img = _image()
    ex = {"image": img, "label": np.int32(2)}
    np.testing.assert_array_equal(CenterCrop((4, 6))(ex, None)["image"], img[2:6, 1:7])
    np.testing.assert_array_equal(Resize((8, 8))(ex, None)["image"], img)
    const = {"image": np.full((9, 7, 2), 0.25, np.float32)}
    np.testing.assert_allclose(Resize((3, 5))(const, None)["image"], 0.25, atol=1e-6)
    ref = np.asarray(
        Image.fromarray(np.ascontiguousarray(img[..., 1])).resize((4, 4), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(Resize((4, 4))(ex, None)["image"][..., 1], ref)
    out = parse_transform("normalize(imagenet)")(ex, None)["image"]
    np.testing.assert_allclose(
        out, (img - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-6
    )
    np.testing.assert_allclose(
        parse_transform("normalize(symmetric)")(ex, None)["image"], 2 * img - 1, atol=1e-6
    )
    np.testing.assert_array_equal(OneHot(4)(ex, None)["label"], [0, 0, 1, 0])
    with pytest.raises(ValueError, match="normalize has 3 channel means, the images have 1"):
        parse_transform("normalize(imagenet)")({"image": _image(c=1)}, None)
    with pytest.raises(ValueError, match="center_crop\\(9, 9\\) needs images at least"):
        CenterCrop((9, 9))(ex, None)


def test_random_ops_seeded_and_exact_where_known():
    img = _image()
    ex = {"image": img}
    rng = lambda s: np.random.Generator(np.random.Philox(s))
    np.testing.assert_array_equal(RandomFlip(1.0)(ex, rng(0))["image"], img[:, ::-1])
    assert RandomFlip(0.0)(ex, rng(0)) is ex
    full = RandomResizedCrop((4, 4), scale=(1.0, 1.0), ratio=(1.0, 1.0))(ex, rng(0))
    np.testing.assert_array_equal(full["image"], Resize((4, 4))(ex, None)["image"])
    for spec in ("random_rotation(30)", "random_scale", "random_resized_crop(8)"):
        op = parse_transform(spec)
        a, b, c = (op(ex, rng(s))["image"] for s in (1, 1, 2))
        assert a.shape == img.shape and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), spec
    unscaled = parse_transform("random_scale(scale=(1, 1))")(ex, rng(0))["image"]
    np.testing.assert_allclose(unscaled, img, atol=1e-5)


def test_article_chain_on_digits(tmp_path):
    cfg = {
        "source": "digits",
        "data_dir": str(tmp_path),
        "channels": 3,
        "transforms": ["resize(32)", "normalize(imagenet)"],
        "train_transforms": ["random_resized_crop(32, scale=(0.5, 1.0))", "random_flip"],
    }
    data = build_data(cfg, seed=0)
    assert data.example_spec["image"] == ((32, 32, 3), np.float32)
    assert data.preprocessing["transforms"] == [
        {"name": "resize", "size": [32, 32]},
        {"name": "normalize", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    ]
    batch = next(data.eval_iter("val", 2, shard=(0, 1)))
    record = data.source.splits["val"][0]
    levels = load_digits().images[int(record["id"])][..., None].astype(np.float32) / 16
    raw = np.repeat(levels, 3, axis=-1)
    expected = (
        Resize((32, 32))({"image": raw}, None)["image"] - np.array(IMAGENET_MEAN)
    ) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(batch["image"][0], expected, rtol=1e-5, atol=1e-6)
    train = next(data.train_iter(4, seed=0, shard=(0, 1)))
    assert train["image"].shape == (4, 32, 32, 3)

    bad = {
        **cfg,
        "transforms": ["normalize(imagenet)"],
        "train_transforms": ["random_resized_crop(16)"],
    }
    with pytest.raises(ValueError, match="data.train_transforms: train examples come out as"):
        build_data(bad, seed=0)
