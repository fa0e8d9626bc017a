"""jax.export artifacts: round trip, sidecar, image files, int8, LMs, CLI errors.

One tiny digits CNN run (60 steps) is trained once for the module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdl import cli
from jaxdl.config import load_config
from jaxdl.core import steps
from jaxdl.deploy import artifact as artifact_format
from jaxdl.deploy import export, predict
from jaxdl.deploy.quantize import dequantize, quantize_params

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_export")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxdl.training.trainer import train

    path = tmp_path_factory.mktemp("run")
    cfg = load_config(
        ROOT / "experiments/digits_cnn.py", ["--config.num_steps=60", "--config.num_epochs=0"]
    )
    train(cfg, path, progress=False, echo=lambda *a: None)
    return path


@pytest.fixture(scope="module")
def run(workdir):
    from jaxdl.training.evaluate import restore_run

    return restore_run(workdir)


@pytest.fixture(scope="module")
def artifact(run, workdir, tmp_path_factory):
    """The run exported in-process (`export_workdir` itself runs in the CLI test)."""
    path = tmp_path_factory.mktemp("export") / "digits.jaxexport"
    meta = export.export_run(*run, path, workdir=workdir)
    return path, meta


@pytest.fixture(scope="module")
def test_images():
    """The digits test split as stored: uint8 [N, 8, 8] 8-bit values 0..255, labels [N]."""
    from sklearn.datasets import load_digits

    from jaxdl.data.digits import split_indices, to_uint8

    digits, idx = load_digits(), split_indices()["test"]
    return to_uint8(digits.images[idx]), digits.target[idx]


def in_process_probs(run, params, raw):
    """The trained model run the training way: x = level k / 16 of the 8-bit value, eval mode,
    softmax."""
    cfg, setup, data = run
    state = setup.state
    if params is not None:
        state = state.replace(params={"params": params}, frozen={})
    x = (np.round(raw.astype(np.float32) * np.float32(16 / 255)) / np.float32(16.0))[..., None]
    logits = steps.make_predict(setup.model, None if params is not None else setup.lora_cfg)(
        state, jnp.asarray(x)
    )
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def test_round_trip_symbolic_batch(run, artifact, test_images):
    path, _ = artifact
    predictor = predict.load(path)
    assert str(predictor.exported.in_avals[0].shape[0]) == "b"
    raw = test_images[0]
    for batch in (1, 5):
        got = predictor.predict(raw[:batch, ..., None].astype(np.float32))
        want = in_process_probs(run, None, raw[:batch])
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_sidecar(artifact):
    path, meta = artifact
    on_disk = json.loads(artifact_format.sidecar_path(path).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["model"] == "simple_cnn"
    assert meta["kind"] == "classification"
    assert meta["input"] == {"name": "image", "shape": [None, 8, 8, 1], "dtype": "float32"}
    assert meta["output"]["shape"] == [None, 10]
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["jax_version"] == jax.__version__
    assert meta["format_version"] == artifact_format.FORMAT_VERSION == 1
    assert meta["platforms"] == ["cpu"]
    assert meta["quantization"] is None
    assert meta["step"] == 60
    prep = meta["preprocessing"]
    assert prep["in_artifact"] == [
        {"name": "scale", "divide_by": 255.0},
        {"name": "quantize", "levels": 17},
        {"name": "softmax"},
    ]
    assert prep["host"] == []
    assert prep["image_file"]["mode"] == "L"
    assert prep["image_file"]["decode_size"] == [8, 8]
    assert prep["image_file"]["resize"] is None
    assert meta["artifact_bytes"] == path.stat().st_size


def test_png_files_match_in_process_and_evaluate(run, artifact, workdir, test_images, tmp_path):
    from jaxdl.training.evaluate import evaluate_workdir

    path, _ = artifact
    raw, labels = test_images
    files = []
    for i, image in enumerate(raw):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image, "L").save(files[-1])
    results = predict.predict_files(path, files, top_k=10)
    want = in_process_probs(run, None, raw)
    for result, row in zip(results, want, strict=True):
        probs = {int(c["class"]): c["prob"] for c in result["top_k"]}
        np.testing.assert_allclose([probs[c] for c in range(10)], row, atol=1e-6, rtol=0)
        assert int(result["top_k"][0]["class"]) == int(np.argmax(row))
    predicted = np.array([int(r["top_k"][0]["class"]) for r in results])
    accuracy = evaluate_workdir(workdir)["accuracy"]
    assert np.mean(predicted == labels) == pytest.approx(accuracy, abs=1e-9)


def test_an_ordinary_8_bit_png_is_taken(run, artifact, test_images, tmp_path):
    """Any 0..255 grayscale PNG of a digit, not only values on the dataset's 17 levels."""
    path, _ = artifact
    raw = test_images[0][:4].astype(np.int64)
    noisy = np.clip(raw + np.random.default_rng(0).integers(-6, 7, raw.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    assert noisy.max() == 255 and len(set(noisy.ravel()) - set(raw.ravel())) > 10
    files = []
    for i, image in enumerate(noisy):
        files.append(tmp_path / f"n{i}.png")
        Image.fromarray(image, "L").save(files[-1])
    results = predict.predict_files(path, files, top_k=10)
    for result, row in zip(results, in_process_probs(run, None, noisy), strict=True):
        probs = {int(c["class"]): c["prob"] for c in result["top_k"]}
        np.testing.assert_allclose([probs[c] for c in range(10)], row, atol=1e-6, rtol=0)


def test_int8_and_multi_platform_export(run, artifact, test_images, tmp_path):
    cfg, setup, data = run
    path, meta = artifact
    raw = test_images[0][:5]
    q_path = tmp_path / "q.jaxexport"
    q_meta = export.export_run(cfg, setup, data, q_path, platforms=("cpu", "cuda"), quantize="int8")
    assert q_meta["platforms"] == ["cpu", "cuda"]
    assert q_meta["quantization"]["kernels"] == 4
    assert 3.6 < meta["artifact_bytes"] / q_meta["artifact_bytes"] <= 4.0
    params = steps.model_params(setup.state.params, setup.state.frozen, setup.lora_cfg)
    dequantized = dequantize(quantize_params(jax.device_get(params))[0])
    got = predict.load(q_path).predict(raw[..., None].astype(np.float32))
    np.testing.assert_allclose(got, in_process_probs(run, dequantized, raw), atol=1e-6, rtol=0)


def test_language_model_export(tmp_path):
    from jaxdl.lm.tokenizer import decode
    from jaxdl.models import create_model

    model = create_model({"name": "transformer", "size": "tiny", "num_layers": 1, "max_len": 16})
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    apply = jax.jit(model.apply)  # eager Flax dispatch is slow
    path = tmp_path / "lm.jaxexport"
    meta = export.export_model(
        model,
        variables,
        path,
        kind="lm",
        input_shape=(16,),
        metadata={"vocabulary": {"tokenizer": "bytes", "vocab_size": 256}},
    )
    assert meta["input"]["shape"] == [None, 16] and meta["output"]["shape"] == [None, 256]
    predictor = predict.load(path)
    tokens = np.random.default_rng(0).integers(0, 256, (3, 16)).astype(np.int32)
    lengths = np.array([16, 5, 1], np.int32)
    probs = np.asarray(jax.nn.softmax(apply(variables, tokens), axis=-1))
    got = predictor.predict(tokens, lengths)
    np.testing.assert_allclose(got, probs[np.arange(3), lengths - 1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(predictor.predict(tokens[:1]), probs[:1, -1], atol=1e-6, rtol=0)

    # Greedy continuation; the reference right-pads the last 16 tokens (causal, as checked
    # above) so that one compiled apply serves every step.
    prompt = list(b"def f(x):\n    return x + 1")  # longer than the window of 16
    seq = list(prompt)
    for _ in range(8):
        context = seq[-16:]
        window = np.zeros((1, 16), np.int32)
        window[0, : len(context)] = context
        seq.append(int(np.argmax(apply(variables, window)[0, len(context) - 1])))
    assert predictor.generate(prompt, 8) == seq[len(prompt) :]
    text = tmp_path / "prompt.txt"
    text.write_bytes(bytes(prompt))
    [result] = predict.predict_files(predictor, [text], top_k=3, max_new_tokens=8)
    assert result["continuation"] == decode(seq[len(prompt) :])
    assert len(result["top_k"]) == 3


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_export_and_predict(workdir, artifact, test_images, tmp_path):
    out = tmp_path / "cli.jaxexport"
    assert (
        cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--platform", "cpu"]) == 0
    )
    meta = json.loads(artifact_format.sidecar_path(out).read_text())
    assert meta["model"] == "simple_cnn" and meta["workdir"] == str(workdir.resolve())
    assert meta["step"] == 60 and meta["platforms"] == ["cpu"]
    png = tmp_path / "x.png"
    Image.fromarray(test_images[0][0], "L").save(png)
    code, stdout, stderr = _cli("predict", out, png, "--top-k", "3", "--json")
    assert code == 0, stderr
    assert json.loads(stdout) == predict.predict_files(artifact[0], [png], top_k=3)


def test_cli_errors_are_one_line_exit_2(artifact, test_images, tmp_path):
    path, meta = artifact
    png = tmp_path / "x.png"
    Image.fromarray(test_images[0][0], "L").save(png)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(big)

    corrupt = tmp_path / "corrupt.jaxexport"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    artifact_format.sidecar_path(corrupt).write_text(json.dumps(meta))

    old = tmp_path / "old.jaxexport"
    old.write_bytes(path.read_bytes())
    artifact_format.sidecar_path(old).write_text(
        json.dumps({**meta, "jax_version": "99.0.0", "format_version": 7})
    )
    cases = {
        "is corrupt": [corrupt, png],
        "does not exist": [tmp_path / "missing.jaxexport", png],
        "built with jax 99.0.0 (format 7); this is jax": [old, png],
        "preprocessing does not resize": [path, big],
    }
    for expected, args in cases.items():
        code, stdout, stderr = _cli("predict", *args)
        assert code == 2, (expected, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxdl: error: "), stderr
        assert expected in lines[0], lines[0]
    with pytest.raises(ValueError, match="re-export with `jaxdl export`"):
        predict.load(old)
