"""An imported image classifier keeps its own conventions: its workdir has no data of its
own (data.source "none"), its input size, channels, normalization and class names; `jaxdl
export` and `predict` use them, and commands that need examples refuse in one line."""

import json
import shutil

import jax
import numpy as np
import pytest
from _hub_vision import FIXTURES
from PIL import Image

import jaxdl
from jaxdl.cli import main
from jaxdl.data.transforms import parse_transform, resize_image
from jaxdl.deploy.predict import predict_files
from jaxdl.interop import import_checkpoint
from jaxdl.training.evaluate import export_workdir

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_imported_vision")

CASES = {
    "resnet_basic_tiny": "timm:resnet18",
    "vit_timm_tiny": "timm:vit_tiny_patch16_224",
    "vit_torchvision_tiny": "torchvision:vit_b_16",
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    """(workdir, artifact) of one fixture imported and exported."""
    root = tmp_path_factory.mktemp("imported")
    import_checkpoint(CASES[request.param], str(FIXTURES / request.param), root / "w")
    export_workdir(root / "w", root / "m.jaxexport")
    return root / "w", root / "m.jaxexport"


def photo(path, height: int, width: int, seed: int = 0):
    """An ordinary 8-bit RGB PNG of random pixels; returns its pixels uint8 [H, W, 3]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def own_preprocessing(workdir, pixels: np.ndarray) -> np.ndarray:
    """The model's own preprocessing, from its source's conventions: 0..255 -> [0, 1],
    resized to the input size, then the normalization its weights expect."""
    data = json.loads((workdir / "config.json").read_text())["data"]
    size = (data["image_size"], data["image_size"])
    image = resize_image(pixels.astype(np.float32) / 255, size)
    (normalize,) = data["transforms"]
    return parse_transform(normalize)({"image": image}, None)["image"]


def test_the_workdir_holds_the_models_conventions_not_digits(exported):
    workdir, artifact = exported
    data = json.loads((workdir / "config.json").read_text())["data"]
    assert data["source"] == "none" and data["channels"] == 3
    side = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    size = data["image_size"]
    assert side["input"]["shape"] == [None, size, size, 3]
    steps = [op["name"] for op in side["preprocessing"]["in_artifact"]]
    assert steps == ["scale", "normalize", "softmax"]  # no digits quantization
    mean = side["preprocessing"]["in_artifact"][1]["mean"]
    assert len(mean) in (1, 3) and mean != [0.0]


@pytest.mark.parametrize("height, width", [(None, None), (100, 80)], ids=["input-size", "other"])
def test_export_and_predict_match_load_model_on_an_rgb_photo(exported, tmp_path, height, width):
    workdir, artifact = exported
    model, variables = jaxdl.load_model(workdir)
    size = json.loads((workdir / "config.json").read_text())["data"]["image_size"]
    pixels = photo(tmp_path / "photo.png", height or size, width or size)
    logits = model.apply(variables, own_preprocessing(workdir, pixels)[None], train=False)
    expected = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    (result,) = predict_files(artifact, [tmp_path / "photo.png"], top_k=len(expected))
    got = {int(r["class"]): r["prob"] for r in result["top_k"]}
    np.testing.assert_allclose([got[c] for c in range(len(expected))], expected, atol=2e-5)
    assert expected.max() - np.sort(expected)[-2] > 1e-3  # the argmax is not a tie


def test_evaluate_and_train_refuse_a_workdir_without_data(exported, capsys):
    workdir, _ = exported
    assert main(["evaluate", "--workdir", str(workdir)]) == 2
    assert main(["train", "--config", str(workdir / "config.json"), "--workdir", "x"]) == 2
    evaluate, train = capsys.readouterr().err.strip().splitlines()
    assert "has no data to evaluate" in evaluate and str(workdir) in evaluate
    assert 'found "none"' in train and "init_from.checkpoint" in train


def test_class_names_come_from_the_source(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "resnet_basic_tiny", source)
    config = json.loads((source / "config.json").read_text())
    names = [f"kind {i}" for i in range(10)]
    (source / "config.json").write_text(json.dumps({**config, "label_names": names}))
    import_checkpoint("timm:resnet18", str(source), tmp_path / "w")
    export_workdir(tmp_path / "w", tmp_path / "m.jaxexport")
    photo(tmp_path / "p.png", 64, 64)
    (result,) = predict_files(tmp_path / "m.jaxexport", [tmp_path / "p.png"], top_k=10)
    assert sorted(r["class"] for r in result["top_k"]) == sorted(names)

    (source / "config.json").write_text(json.dumps({**config, "label_names": names[:3]}))
    assert main(["import", "timm:resnet18", "--from", str(source), "--out", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "pretrained, words",
    [
        ({"mean": [0.5, 0.5, 0.5]}, ["expected mean and std", "std=None"]),
        ({"mean": [0.5], "std": "0.5"}, ["expected mean and std", "std='0.5'"]),
        ({"input_size": 224}, ["pretrained_cfg.input_size: expected [channels, height, width]"]),
        ([1, 2], ["pretrained_cfg: expected an object"]),
    ],
    ids=["mean-alone", "std-string", "input-size-int", "not-an-object"],
)
def test_a_source_config_with_missing_or_odd_fields_is_one_line(
    tmp_path, capsys, pretrained, words
):
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "resnet_basic_tiny", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "pretrained_cfg": pretrained}))
    out = tmp_path / "w"
    assert main(["import", "timm:resnet18", "--from", str(source), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    for word in ["--from: config.json's pretrained_cfg", *words]:
        assert word in line, line
    assert not out.exists()
