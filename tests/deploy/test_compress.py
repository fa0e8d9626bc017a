"""int8 quantization, magnitude pruning, masked recovery, and compress_report end to end."""

import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdl.core import heads, steps
from jaxdl.core.state import TrainState
from jaxdl.deploy import export, predict, prune
from jaxdl.deploy.quantize import Int8Tensor, dequantize, quantize_kernel, quantize_params
from jaxdl.models import create_model

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_compress")

ROOT = Path(__file__).resolve().parents[2]


def test_per_channel_scales_on_a_hand_made_kernel():
    w = np.array([[1.0, -0.5, 0.0, 2.0], [-2.54, 0.25, 0.0, 1.0]], np.float32)  # [in=2, out=4]
    q = quantize_kernel(w)
    np.testing.assert_allclose(
        q.scale, np.array([2.54, 0.5, 1.0, 2.0], np.float32) / [127, 127, 1, 127], rtol=1e-7
    )
    assert q.values.dtype == np.int8
    # 1.0 / (2.54/127) = 50.0; -0.5 -> -127; 0.25 / (0.5/127) = 63.5 -> 64 (half to even)
    np.testing.assert_array_equal(q.values, [[50, -127, 0, 127], [-127, 64, 0, 64]])
    # An all-zero channel gets scale 1 (no division by zero) and stays exactly zero.
    assert float(q.scale[2]) == 1.0 and not q.values[:, 2].any()


def test_dequantized_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    kernel = (rng.normal(size=(3, 3, 8, 16)) * rng.uniform(0.01, 2, 16)).astype(np.float32)
    params = {
        "conv": {"kernel": kernel, "bias": rng.normal(size=16).astype(np.float32)},
        "norm": {"scale": np.ones((16,), np.float32)},
    }
    qtree, report = quantize_params(params)
    q = qtree["conv"]["kernel"]
    assert isinstance(q, Int8Tensor) and q.scale.shape == (16,)
    np.testing.assert_array_equal(q.scale, np.abs(kernel).max(axis=(0, 1, 2)) / np.float32(127))
    back = np.asarray(dequantize(qtree)["conv"]["kernel"])
    assert np.all(np.abs(back - kernel) <= q.scale / 2 * (1 + 1e-6))
    assert qtree["conv"]["bias"] is params["conv"]["bias"]  # 1-D leaves stay float
    assert report["quantized"] == ["conv/kernel"]
    assert report["bytes_before"] == (kernel.size + 16 + 16) * 4
    assert report["bytes_after"] == kernel.size + 16 * 4 + (16 + 16) * 4
    assert report["max_abs_error"] == pytest.approx(np.abs(back - kernel).max())


def test_int8_artifact_is_about_4x_smaller(tmp_path):
    model = create_model({"name": "mlp", "num_classes": 10, "hidden": (256, 256)})
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64)))
    sizes = {}
    for quantize in (None, "int8"):
        path = tmp_path / f"{quantize}.jaxexport"
        meta = export.export_model(
            model, variables, path, kind="classification", input_shape=(64,), quantize=quantize
        )
        sizes[quantize] = meta["artifact_bytes"]
        # no builder paths in the artifact, so its size does not depend on the checkout
        assert str(Path(export.__file__).parent).encode() not in path.read_bytes()
        probs = predict.load(path).predict(np.ones((2, 64), np.float32))
        assert probs.shape == (2, 10)
    kernel_bytes = (64 * 256 + 256 * 256 + 256 * 10) * 4
    assert sizes[None] > kernel_bytes
    assert 3.7 < sizes[None] / sizes["int8"] <= 4.0


def _tree(rng):
    return {
        "a": {
            "kernel": rng.normal(size=(6, 5)).astype(np.float32),
            "bias": rng.normal(size=5).astype(np.float32),
        },
        "b": {"kernel": 3 * rng.normal(size=(5, 4)).astype(np.float32)},
    }


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_prune_global_exact(sparsity):
    params = _tree(np.random.default_rng(1))
    pruned, masks = prune.prune(params, sparsity, "global")
    n = 30 + 20
    assert prune.sparsity(pruned)["global"] == round(sparsity * n) / n
    kept = np.concatenate([np.abs(pruned[k]["kernel"][masks[k]["kernel"]]) for k in "ab"])
    dropped = np.concatenate([np.abs(params[k]["kernel"][~masks[k]["kernel"]]) for k in "ab"])
    assert kept.min() >= dropped.max()  # one global threshold
    assert masks["a"]["bias"].all()
    np.testing.assert_array_equal(pruned["a"]["bias"], params["a"]["bias"])
    for k in "ab":
        np.testing.assert_array_equal(pruned[k]["kernel"], params[k]["kernel"] * masks[k]["kernel"])


def test_prune_per_layer_exact():
    params = _tree(np.random.default_rng(2))
    pruned, masks = prune.prune(params, 0.5, "layer")
    layers = prune.sparsity(pruned)["layers"]
    assert layers == {"a/kernel": 15 / 30, "b/kernel": 10 / 20}
    for k in "ab":
        w, m = np.abs(params[k]["kernel"]), masks[k]["kernel"]
        assert w[m].min() >= w[~m].max()
    with pytest.raises(ValueError, match="sparsity"):
        prune.prune(params, 1.0)
    with pytest.raises(ValueError, match="scope"):
        prune.prune(params, 0.5, "row")


def test_recovery_steps_keep_pruned_weights_at_zero():
    model = create_model({"name": "mlp", "num_classes": 3, "hidden": (16,)})
    task = heads.make_head(
        "classification", {"name": "softmax_cross_entropy", "label_smoothing": 0.0}, 3
    )
    params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"])
    pruned, masks = prune.prune(params, 0.5)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), prune.keep_masked({"params": masks}))
    trainable = {"params": jax.tree.map(jnp.asarray, pruned)}
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=trainable,
        frozen={},
        model_state={},
        opt_state=tx.init(trainable),
        rng=jax.random.PRNGKey(1),
    )
    train_step = steps.make_train_step(model, task, tx)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {
            "image": rng.normal(size=(8, 8)).astype(np.float32),
            "label": rng.integers(0, 3, 8).astype(np.int32),
        }
        state, _ = train_step(state, batch)
    after = jax.device_get(state.params["params"])
    for layer in ("hidden_0", "head"):
        mask = masks[layer]["kernel"]
        assert not after[layer]["kernel"][~mask].any()  # exactly zero
        assert np.all(after[layer]["kernel"][mask] != pruned[layer]["kernel"][mask])
    assert prune.sparsity(after)["global"] == prune.sparsity(pruned)["global"] == 0.5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxdl.config import load_config
    from jaxdl.training.trainer import train

    path = tmp_path_factory.mktemp("run")
    cfg = load_config(
        ROOT / "experiments/digits_cnn.py", ["--config.num_steps=40", "--config.num_epochs=0"]
    )
    train(cfg, path, progress=False, echo=lambda *a: None)
    return path


def test_compress_report_end_to_end(workdir, tmp_path):
    import json

    study = runpy.run_path(str(ROOT / "experiments/compress_digits.py"))  # a study, not the API
    report = study["compress_report"](workdir, sparsity=0.5, recovery_steps=3, out_dir=tmp_path)
    summary = json.loads((workdir / "summary.json").read_text())
    assert report["baseline"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert report["baseline"]["artifact_bytes"] == (tmp_path / "baseline.jaxexport").stat().st_size
    assert 3.6 < report["int8"]["artifact_ratio"] <= 4.0
    assert abs(report["int8"]["accuracy_change"]) <= 0.02
    pruned = report["pruned"]
    assert pruned["achieved_sparsity"] == pruned["sparsity_after_recovery"] == 0.5
    assert pruned["recovery_steps"] == 3
    # The pruned artifact holds the recovered, still 50%-sparse kernels.
    assert pruned["artifact_zlib_bytes"] < 0.75 * report["baseline"]["artifact_zlib_bytes"]
