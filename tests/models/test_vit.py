"""The ViT classifier: parameter counts, patching, pooling, bidirectional attention, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from jaxdl.core.tree import flatten, num_params
from jaxdl.models import create_model
from jaxdl.models.vit import ViT

IMAGES = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))


def _shapes(model, images=IMAGES):
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def test_tiny_parameter_count_by_hand():
    d, hidden, patch, channels, classes, layers = 32, 64, 4, 1, 10, 2
    tokens = (8 // patch) ** 2 + 1  # 4 patches + the class token
    per_block = 2 * (2 * d) + 4 * (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    expected = (
        patch * patch * channels * d
        + d  # patch_embed
        + d  # cls
        + tokens * d  # pos_embed
        + layers * per_block
        + 2 * d  # ln_f
        + d * classes
        + classes  # head
    )
    assert expected == 18_218
    model = create_model({"name": "vit", "size": "tiny", "num_classes": 10})
    assert num_params(_shapes(model)) == expected
    assert num_params(_shapes(ViT(size="tiny", pool="mean"))) == expected - 2 * d  # no cls


def test_vit_b16_parameter_count():
    model = ViT(size="B", num_classes=1000)
    shapes = _shapes(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert num_params(shapes) == 86_567_656
    paths = flatten(shapes)
    assert paths["patch_embed/kernel"].shape == (16, 16, 3, 768)
    assert paths["pos_embed"].shape == (1, 197, 768)
    assert paths["head/kernel"].shape == (768, 1000)
    assert paths["block_11/attn/query/kernel"].shape == (768, 768)


def _random_head(params):
    head = params["head"]
    return {
        **params,
        "head": {
            "kernel": jax.random.normal(jax.random.key(5), head["kernel"].shape),
            "bias": head["bias"],
        },
    }


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_attention_is_bidirectional(pool):
    # The class token sits first; with causal attention it could never see the last patch.
    model = ViT(size="tiny", pool=pool, patch_size=2)
    params = _random_head(model.init(jax.random.key(0), IMAGES)["params"])
    logits = model.apply({"params": params}, IMAGES)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    last_patch_changed = IMAGES.at[:, 7, 7, 0].add(1.0)
    changed = model.apply({"params": params}, last_patch_changed)
    assert float(jnp.abs(changed - logits).min()) > 1e-6


def test_fresh_head_predicts_uniform():
    model = ViT(size="tiny")
    params = model.init(jax.random.key(0), IMAGES)["params"]
    np.testing.assert_array_equal(model.apply({"params": params}, IMAGES), np.zeros((2, 10)))


def test_bad_patch_size_and_pool():
    with pytest.raises(ValueError, match=r"model\.patch_size: expected a divisor .* 8x8, found 3"):
        ViT(size="tiny", patch_size=3).init(jax.random.key(0), IMAGES)
    with pytest.raises(ValueError, match=r"model\.pool: expected one of \['cls', 'mean'\]"):
        ViT(size="tiny", pool="max").init(jax.random.key(0), IMAGES)
    with pytest.raises(ValueError, match=r"model\.size: expected one of \['B', 'S', 'Ti', 'tiny'"):
        ViT(size="L").init(jax.random.key(0), IMAGES)


def test_learns_digits():
    digits = load_digits()
    x = jnp.asarray(digits.images[:256, :, :, None] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:256])
    model = ViT(size="tiny")  # 4x4 patches
    params = model.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
    accuracy = float((model.apply({"params": params}, x).argmax(-1) == y).mean())
    assert float(loss) < 1.0 < np.log(10)  # starts at ln 10 = 2.30 (zero head)
    assert accuracy > 0.8  # 0.92 with this seed
