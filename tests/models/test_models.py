"""Registered models: exact parameter counts, shapes, names, dropout and BatchNorm modes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.core.tree import flatten, num_params
from jaxdl.models import create_model
from jaxdl.models.resnet import ResNet18, ResNet50


def _shapes(model, shape):
    """Variables as ShapeDtypeStructs: counts parameters without computing (fast for 224)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _init(model, shape, seed=0):
    # The partitionable threefry compiles ~4x slower on XLA:CPU (20 s vs 6 s for the tiny
    # ResNet's init); these tests need some random values, not a particular stream.
    with jax.threefry_partitionable(False):
        x = jax.random.normal(jax.random.key(seed + 1), shape)
        return jax.jit(model.init)(jax.random.key(seed), x), x


def test_mlp_param_count_and_names():
    model = create_model({"name": "mlp", "num_classes": 10})
    variables = _shapes(model, (1, 64))
    expected = 64 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert num_params(variables) == expected == 198_794
    assert set(flatten(variables)) == {
        f"params/{layer}/{p}"
        for layer in ("hidden_0", "hidden_1", "hidden_2", "head")
        for p in ("kernel", "bias")
    }


def test_simple_cnn_param_count_on_digits():
    model = create_model({"name": "simple_cnn", "num_classes": 10})
    # 8x8 -> pool -> 4x4 -> pool -> 2x2, so fc sees 2*2*128 features.
    expected = (3 * 3 * 1 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (2 * 2 * 128 * 128 + 128)
    expected += 128 * 10 + 10
    assert num_params(_shapes(model, (1, 8, 8, 1))) == expected == 141_450


def test_simple_cnn_param_count_matches_article_at_224():
    model = create_model({"name": "simple_cnn", "num_classes": 10})
    variables = _shapes(model, (1, 224, 224, 3))
    # The article's fc(128*56*56 -> 128): 224 -> 112 -> 56 through the two 2x2 pools.
    assert variables["params"]["fc"]["kernel"].shape == (128 * 56 * 56, 128)
    expected = (3 * 3 * 3 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (128 * 56 * 56 * 128 + 128)
    expected += 128 * 10 + 10
    assert num_params(variables) == expected == 51_457_290


@pytest.mark.parametrize(
    "depth, expected",
    [(18, 11_689_512), ("18", 11_689_512), (50, 25_557_032)],  # "18": as a CLI flag gives it
)
def test_resnet_param_count_matches_torchvision(depth, expected):
    model = create_model({"name": "resnet", "num_classes": 1000, "depth": depth})
    variables = _shapes(model, (1, 224, 224, 3))
    assert num_params(variables["params"]) == expected
    # BatchNorm running statistics live outside params: a mean and a var per BN scale.
    flat = flatten(variables["params"])
    bn_scales = sum(v.size for k, v in flat.items() if "bn" in k and k.endswith("scale"))
    assert num_params(variables["batch_stats"]) == 2 * bn_scales
    width = 2048 if int(depth) == 50 else 512
    assert variables["params"]["head"]["kernel"].shape == (width, 1000)
    assert "layer4_1/conv2/kernel" in flat and "stem_bn/scale" in flat


def test_resnet_partials_are_the_registered_model():
    for partial, depth in ((ResNet18, 18), (ResNet50, 50)):
        registered = create_model({"name": "resnet", "num_classes": 5, "depth": depth})
        assert partial(num_classes=5) == registered


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_param_counts(cell):
    model = create_model({"name": "rnn", "num_classes": 10, "cell": cell, "num_layers": 2})
    f, h = 8, 128  # digits 8x8x1 read as 8 steps of 8 features
    if cell == "lstm":  # 4 gates; input kernels without bias, recurrent kernels with bias
        layer = lambda n_in: 4 * n_in * h + 4 * (h * h + h)
    else:  # 3 gates; input kernels with bias, recurrent without, except the candidate's
        layer = lambda n_in: 3 * (n_in * h + h) + 3 * h * h + h
    variables = _shapes(model, (1, 8, 8, 1))
    assert num_params(variables) == layer(f) + layer(h) + h * 10 + 10
    assert {k.split("/")[1] for k in flatten(variables)} == {f"{cell}_0", f"{cell}_1", "head"}


def test_rnn_reads_image_rows_as_time_steps():
    model = create_model({"name": "rnn", "num_classes": 3, "hidden": 16})
    forward = jax.jit(model.apply)
    variables, x = _init(model, (2, 8, 4, 2))
    logits = forward(variables, x)
    np.testing.assert_allclose(logits, forward(variables, x.reshape(2, 8, 8)), rtol=1e-6)
    # The first row reaches the final hidden state through all 8 steps.
    assert not np.allclose(logits, forward(variables, x.at[:, 0].add(1.0)))


@pytest.mark.parametrize(
    "cfg, shape",
    [
        ({"name": "mlp"}, (3, 8, 8, 1)),
        ({"name": "mlp", "dtype": "bfloat16"}, (3, 8, 8, 1)),
        ({"name": "simple_cnn"}, (3, 8, 8, 1)),
        ({"name": "simple_cnn", "dtype": "bfloat16"}, (3, 32, 32, 3)),
        ({"name": "simple_cnn"}, (3, 7, 9, 2)),  # odd sizes: pooling floors
        ({"name": "resnet", "depth": "tiny", "small_inputs": True}, (3, 8, 8, 1)),
        ({"name": "resnet", "depth": "tiny", "dtype": "bfloat16"}, (3, 32, 32, 3)),
        ({"name": "resnet", "depth": 50, "small_inputs": True}, (3, 8, 8, 3)),
        ({"name": "rnn", "cell": "lstm"}, (3, 5, 4)),
        ({"name": "rnn", "cell": "gru", "num_layers": 2, "dtype": "bfloat16"}, (3, 8, 8, 1)),
    ],
)
def test_output_shape_dtype_and_head(cfg, shape):
    # Abstract evaluation traces the full forward pass without compiling it.
    model = create_model({**cfg, "num_classes": 7})
    variables = _shapes(model, shape)
    for train in (False, True):
        logits = jax.eval_shape(
            lambda v, x, train=train: model.apply(
                v, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
            )[0],
            variables,
            jax.ShapeDtypeStruct(shape, jnp.float32),
        )
        assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert set(variables["params"]["head"]) == {"kernel", "bias"}
    # Compute dtype changes; parameters stay float32 for the optimizer.
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_compute_stays_close_to_float32():
    cfg = {"name": "mlp", "num_classes": 5, "hidden": (32,)}
    model32, model16 = create_model(cfg), create_model({**cfg, "dtype": jnp.bfloat16})
    variables, x = _init(model32, (4, 16))
    out32, out16 = model32.apply(variables, x), model16.apply(variables, x)
    assert not np.array_equal(out32, out16)  # bf16 really was used
    np.testing.assert_allclose(out16, out32, atol=0.05)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
def test_mlp_activation_by_name(activation):
    model = create_model(
        {"name": "mlp", "num_classes": 2, "hidden": (3,), "activation": activation}
    )
    variables, x = _init(model, (2, 4))
    p = variables["params"]
    fn = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "gelu": jax.nn.gelu}
    h = fn[activation](x @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"])
    expected = h @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_dropout_changes_outputs_only_in_train_mode():
    model = create_model({"name": "mlp", "num_classes": 4, "hidden": (64,), "dropout_rate": 0.5})
    variables, x = _init(model, (2, 16))
    eval_a = model.apply(variables, x)
    eval_b = model.apply(variables, x, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_a2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, train_a2)  # the key alone decides the mask


def test_batchnorm_updates_stats_in_train_and_uses_them_in_eval():
    cfg = {"name": "resnet", "depth": "tiny", "num_filters": 4, "small_inputs": True}
    model = create_model({**cfg, "num_classes": 3})
    # One compiled forward per mode, all on one batch shape (eager Flax compiles op by op).
    forward = jax.jit(
        lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]),
        static_argnums=2,
    )
    variables, x = _init(model, (4, 8, 8, 1))
    x = x * 3.0 + 2.0  # far from the initial running mean 0 / var 1
    old = variables["batch_stats"]["stem_bn"]
    _, updates = forward(variables, x, True)
    new = updates["batch_stats"]["stem_bn"]
    # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic of the stem conv output.
    conv = jax.lax.conv_general_dilated(
        x, variables["params"]["stem_conv"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    np.testing.assert_allclose(new["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Eval normalises with the running stats: example 0's logits ignore the rest of the
    # batch, and they change when the stored stats change. Train mode uses batch stats.
    trained = {**variables, **updates}
    others_changed = x.at[1:].multiply(-2.0)
    evaluated, eval_updates = forward(trained, x, False)
    chex.assert_trees_all_equal(eval_updates, {"batch_stats": trained["batch_stats"]})
    np.testing.assert_allclose(
        forward(trained, others_changed, False)[0][0], evaluated[0], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(forward(variables, x, False)[0][0], evaluated[0])
    train_a, train_b = forward(trained, x, True)[0], forward(trained, others_changed, True)[0]
    assert not np.allclose(train_a[0], train_b[0])


def test_simple_cnn_rejects_images_too_small_to_pool_twice():
    model = create_model({"name": "simple_cnn", "num_classes": 2})
    with pytest.raises(ValueError, match="at least 4 pixels"):
        _shapes(model, (1, 3, 8, 1))


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({"name": "mlp", "activation": "swishy"}, "model.activation"),
        ({"name": "rnn", "cell": "vanilla"}, "model.cell"),
        ({"name": "resnet", "depth": 20}, "model.depth"),
        ({"name": "simple_cnn", "widht": 3}, "model.widht"),
        ({"name": "mlp", "depth": 18}, "model.depth"),
        ({"name": "resnt"}, "model.name"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(cfg, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        create_model({**cfg, "num_classes": 10})


def test_max_pool_2x2_equals_flax_max_pool_in_values_and_gradients():
    import flax.linen as nn

    from jaxdl.models.cnn import max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 3))  # odd height: VALID drops a row
    ref = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool_2x2(x), ref)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(max_pool_2x2(v))))(x)
    g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(nn.max_pool(v, (2, 2), strides=(2, 2)))))(x)
    np.testing.assert_array_equal(g, g_ref)
