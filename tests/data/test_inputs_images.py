"""Image files as people have them: 16-bit, WebP/GIF/TIFF/PPM/PGM, hidden files and folders,
decompression bombs, and the data report that says what was read and what was skipped."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from test_cli import QUICK, assert_user_error, jaxdl

from jaxdl.data import build_data
from jaxdl.data.images import open_image
from jaxdl.data.pipeline import format_report
from jaxdl.errors import UserError


def bomb_png(path, side: int = 60_000) -> None:
    """A 100-byte PNG that declares side x side 8-bit gray pixels (3.6e9 for the default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def digit_images(per_class: int = 4) -> dict[str, list[np.ndarray]]:
    d = load_digits()
    return {
        str(c): [(d.images[i] * 15).astype(np.uint8) for i in np.flatnonzero(d.target == c)][
            :per_class
        ]
        for c in (0, 1)
    }


def test_16_bit_png_and_tiff_are_scaled_not_clipped(tmp_path):
    wide = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520
    for suffix in ("png", "tif"):
        path = tmp_path / f"wide.{suffix}"
        Image.fromarray(wide).save(path)
        assert Image.open(path).mode == "I;16"
        got = np.asarray(open_image(path, "L", max_pixels=10**6, field="x"))
        np.testing.assert_array_equal(got, np.round(wide / 257.0).astype(np.uint8))
        assert len(np.unique(got)) == 64  # clipping would leave 0, 255 and almost nothing else


def test_a_float_tiff_is_refused_not_clipped(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(UserError, match=f"image {path}: 32-bit floating-point pixels"):
        open_image(path, "L", max_pixels=10**6, field="x")


def test_every_common_format_is_read_and_hidden_files_are_not(tmp_path):
    images = digit_images()
    formats = ["png", "webp", "gif", "tif", "tiff", "ppm", "pgm", "bmp"]
    for c, pixels in images.items():
        folder = tmp_path / c
        folder.mkdir()
        for k, suffix in enumerate(formats):
            image = Image.fromarray(pixels[k % len(pixels)])
            if suffix == "ppm":
                image = image.convert("RGB")
            image.save(folder / f"{k}.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
        (folder / f"._0.{formats[0]}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (folder / ".ipynb_checkpoints").mkdir()
        Image.fromarray(pixels[0]).save(folder / ".ipynb_checkpoints" / "0-checkpoint.png")
        (folder / "notes.txt").write_text("where these came from")
    (tmp_path / "__MACOSX" / "0").mkdir(parents=True)  # what unzipping a macOS archive leaves
    (tmp_path / "__MACOSX" / "0" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "LICENSE").write_text("CC-BY")
    data = build_data(
        {"source": f"imagefolder:{tmp_path}", "channels": 1, "val_fraction": 0.25}, seed=0
    )
    assert data.split_sizes == {"train": 12, "val": 4}  # 8 formats x 2 classes
    batch = next(data.eval_iter("train", 12, shard=(0, 1)))
    lossless = batch["image"][..., 0] * 255  # every format but lossy WebP's chroma is exact
    assert {int(round(v)) for v in np.unique(lossless)} <= set(range(0, 241, 15))
    report = data.report
    assert report["splits"] == {
        "train": {"examples": 12, "per_class": {"0": 6, "1": 6}},
        "val": {"examples": 4, "per_class": {"0": 2, "1": 2}},
    }
    skipped = {(s["path"].removeprefix(f"{tmp_path}/"), s["reason"]) for s in report["skipped"]}
    assert skipped == {
        ("LICENSE", "file beside the class folders"),
        ("__MACOSX", "archive metadata folder"),
    } | {
        (f"{c}/{name}", reason)
        for c in ("0", "1")
        for name, reason in [
            ("._0.png", "hidden file"),
            (".ipynb_checkpoints", "hidden folder"),
            ("notes.txt", "not an image file (.txt)"),
        ]
    }
    assert format_report(report).splitlines() == [
        "data: train: 12 examples (0: 6, 1: 6)",
        "data: val: 4 examples (0: 2, 1: 2)",
        "data: skipped 8 files (1 file beside the class folders, 1 archive metadata folder, "
        "2 hidden folder, 2 hidden file, 2 not an image file); see data_report.json",
    ]


def test_a_one_class_folder_is_refused(tmp_path):
    (tmp_path / "cats").mkdir()
    for k in range(20):  # enough for a val split: without the check it trains to accuracy 1
        Image.fromarray(np.full((4, 4), k, np.uint8)).save(tmp_path / "cats" / f"{k}.png")
    with pytest.raises(UserError, match=r"has one class folder \('cats'\); a classifier needs"):
        build_data({"source": f"imagefolder:{tmp_path}"}, seed=0)


def test_the_pixel_cap_is_ours_and_pillows_is_left_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow alone would refuse 144 pixels
    assert open_image(path, "L", max_pixels=144, field="data.max_image_pixels").size == (12, 12)
    assert Image.MAX_IMAGE_PIXELS == 10
    with pytest.raises(UserError) as err:
        open_image(path, "L", max_pixels=143, field="data.max_image_pixels")
    assert str(err.value).startswith(
        f"data.max_image_pixels: {path} is 12x12 = 144 pixels, more than the cap of 143"
    )


def image_folder(root, bomb: bool = False):
    for c, pixels in digit_images().items():
        for split, part in (("train", pixels[:3]), ("val", pixels[3:])):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(part):
                Image.fromarray(image).save(folder / f"{k}.png")
    if bomb:
        bomb_png(root / "train" / "1" / "9.png")
    (root / "train" / "0" / ".DS_Store").write_bytes(b"\x00")


def train_args(folder, workdir, *extra):
    return [
        "train",
        "--config",
        "experiments/digits_mlp.py",
        "--workdir",
        str(workdir),
        "--no-progress",
        *QUICK,
        f"--config.data.source=imagefolder:{folder}",
        "--config.data.channels=1",
        "--config.data.batch_size=2",
        "--config.model.num_classes=2",
        *extra,
    ]


def test_train_writes_the_data_report(tmp_path):
    image_folder(tmp_path / "images")
    done = jaxdl(*train_args(tmp_path / "images", tmp_path / "w", "--config.num_steps=4"))
    assert done.returncode == 0, done.stderr
    assert "data: train: 6 examples (0: 3, 1: 3)" in done.stdout
    report = json.loads((tmp_path / "w" / "data_report.json").read_text())
    fit = report.pop("fit")  # what export uses and evaluate checks (tests/training/test_data_fit)
    assert report == {
        "splits": {
            "train": {"examples": 6, "per_class": {"0": 3, "1": 3}},
            "val": {"examples": 2, "per_class": {"0": 1, "1": 1}},
        },
        "skipped": [{"path": str(tmp_path / "images/train/0/.DS_Store"), "reason": "hidden file"}],
    }
    assert fit["class_names"] == ["0", "1"] and fit["preprocessing"]["fingerprint"]["files"] == 8


def test_a_decompression_bomb_is_refused_in_train_and_predict(tmp_path):
    image_folder(tmp_path / "images", bomb=True)
    bomb = tmp_path / "images" / "train" / "1" / "9.png"
    assert bomb.stat().st_size < 100
    done = jaxdl(*train_args(tmp_path / "images", tmp_path / "w"))
    assert_user_error(done, "data.max_image_pixels:", str(bomb), "60000x60000", "Fix:")

    image_folder(tmp_path / "ok")
    trained = jaxdl(*train_args(tmp_path / "ok", tmp_path / "w2", "--config.num_steps=2"))
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "m.jaxexport"
    exported = jaxdl("export", "--workdir", str(tmp_path / "w2"), "--out", str(model))
    assert exported.returncode == 0, exported.stderr
    sidecar = json.loads((tmp_path / "m.jaxexport.json").read_text())
    assert sidecar["preprocessing"]["image_file"]["max_image_pixels"] == 89_478_485
    assert_user_error(jaxdl("predict", str(model), str(bomb)), "max_image_pixels:", "60000x60000")
    assert_user_error(
        jaxdl("predict", str(model), str(tmp_path / "ok")), "is a directory", "Fix: pass the files"
    )


def test_array_images_are_scaled_by_their_dtype():
    from jaxdl.data.records import ArrayImageDecode, pixel_scale

    assert [pixel_scale(t) for t in (np.uint8, np.uint16, np.float32)] == [255.0, 65535.0, 1.0]
    wide = np.array([[0, 32768, 65535]], np.uint16)[..., None]
    decode = ArrayImageDecode(scale=pixel_scale(wide.dtype))
    image = decode({"image": wide, "label": 0})["image"]
    np.testing.assert_allclose(image[0, :, 0], [0.0, 32768 / 65535, 1.0])


@pytest.mark.parametrize("scale", [255.0, 65535.0])
def test_predict_reads_a_16_bit_png_on_the_models_scale(tmp_path, scale):
    from jaxdl.deploy.predict import load_image

    path = tmp_path / "wide.png"
    Image.fromarray(np.array([[0, 32768, 65535, 1000]], np.uint16)).save(path)
    spec = {"mode": "L", "decode_size": [1, 4], "resize": None, "pixel_scale": scale}
    meta = {
        "preprocessing": {"image_file": {**spec, "encoding": ""}, "host": []},
        "input": {"shape": [None, 1, 4, 1]},
    }
    got = load_image(path, meta)[0, :, 0]
    np.testing.assert_allclose(got, np.array([0, 128, 255, 4]) * scale / 255, rtol=1e-6)
