"""Tests for jaxdl.finetune.lora on a real Flax Dense -> Conv model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.core import tree as tree_lib
from jaxdl.finetune import lora

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_lora")

RANK, ALPHA = 2, 3.0
SCALE = ALPHA / RANK


class DenseConv(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, 4, 4, 3] -> [B, 4, 4, 6]
        x = nn.Dense(5)(x)
        return nn.Conv(6, (3, 3), padding="SAME")(x)


MODEL = DenseConv()
X = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))


@pytest.fixture(scope="module")
def variables():
    return {"params": MODEL.init(jax.random.key(1), X)["params"]}


def _randomize_b(adapters):
    """B drawn at random (a trained adapter) so the update is not zero."""
    flat = tree_lib.flatten(adapters)
    for i, path in enumerate(sorted(flat)):
        if path.endswith("/b"):
            flat[path] = jax.random.normal(jax.random.key(10 + i), flat[path].shape)
    return tree_lib.unflatten(flat)


def test_init_shapes_and_counts(variables):
    adapters = lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    flat = tree_lib.flatten(adapters)
    assert {p: v.shape for p, v in flat.items()} == {
        "params/Dense_0/kernel/a": (3, RANK),
        "params/Dense_0/kernel/b": (RANK, 5),
        "params/Conv_0/kernel/a": (3 * 3 * 5, RANK),  # conv kernel [3, 3, 5, 6]
        "params/Conv_0/kernel/b": (RANK, 6),
    }
    assert lora.num_adapter_params(adapters) == RANK * (3 + 5) + RANK * (45 + 6)
    np.testing.assert_array_equal(flat["params/Conv_0/kernel/b"], 0.0)
    a = flat["params/Conv_0/kernel/a"]
    assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(45) and float(jnp.std(a)) > 0.05


def test_targets_select_kernels_only(variables):
    assert lora.target_paths(variables, ".*") == ["params/Dense_0/kernel", "params/Conv_0/kernel"]
    assert lora.target_paths(variables, "params/Conv.*") == ["params/Conv_0/kernel"]


def test_target_matching_nothing_raises(variables):
    with pytest.raises(ValueError) as err:
        lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*query/kernel")
    msg = str(err.value)
    assert "lora.targets" in msg and "matched no kernel" in msg
    assert "params/Dense_0/kernel" in msg and "params/Conv_0/kernel" in msg


@pytest.mark.parametrize(
    "kwargs, field", [({"rank": 0}, "lora.rank"), ({"rank": 2, "alpha": -1.0}, "lora.alpha")]
)
def test_bad_hyperparameters_name_the_field(variables, kwargs, field):
    adapters = lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    with pytest.raises(ValueError, match=field):
        lora.apply(variables, adapters, **{"alpha": ALPHA, **kwargs})


def test_wrong_rank_adapters_raise(variables):
    adapters = lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    with pytest.raises(ValueError, match="do not fit kernel"):
        lora.apply(variables, adapters, rank=RANK + 1, alpha=ALPHA)


def test_zero_b_equals_base(variables):
    adapters = lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    adapted = lora.apply(variables, adapters, rank=RANK, alpha=ALPHA)
    jax.tree.map(np.testing.assert_array_equal, adapted, variables)
    np.testing.assert_array_equal(MODEL.apply(adapted, X), MODEL.apply(variables, X))


def test_apply_matches_hand_computation(variables):
    adapters = _randomize_b(
        lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    )
    adapted = lora.apply(variables, adapters, rank=RANK, alpha=ALPHA)
    ad = adapters["params"]
    # Dense: W + s * A @ B, element by element.
    a, b = np.asarray(ad["Dense_0"]["kernel"]["a"]), np.asarray(ad["Dense_0"]["kernel"]["b"])
    w = np.asarray(variables["params"]["Dense_0"]["kernel"])
    expected = np.array(
        [[w[i, o] + SCALE * sum(a[i, k] * b[k, o] for k in range(RANK)) for o in range(5)]
         for i in range(3)]
    )  # fmt: skip
    np.testing.assert_allclose(adapted["params"]["Dense_0"]["kernel"], expected, atol=1e-6, rtol=0)
    # Conv [kh, kw, cin, cout]: row of A for (i, j, c) is (i * kw + j) * cin + c.
    a, b = np.asarray(ad["Conv_0"]["kernel"]["a"]), np.asarray(ad["Conv_0"]["kernel"]["b"])
    w = np.asarray(variables["params"]["Conv_0"]["kernel"])
    expected = w.copy()
    for i, j, c, o in np.ndindex(*w.shape):
        row = (i * 3 + j) * 5 + c
        expected[i, j, c, o] += SCALE * sum(a[row, k] * b[k, o] for k in range(RANK))
    np.testing.assert_allclose(adapted["params"]["Conv_0"]["kernel"], expected, atol=1e-6, rtol=0)
    # Biases untouched.
    np.testing.assert_array_equal(
        adapted["params"]["Conv_0"]["bias"], variables["params"]["Conv_0"]["bias"]
    )


def _patches(h):
    """im2col for a 3x3 SAME conv: [B, H, W, C] -> [B, H, W, 9*C], ordered (di, dj, c)."""
    padded = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = h.shape[1:3]
    cols = [padded[:, di : di + height, dj : dj + width, :] for di in range(3) for dj in range(3)]
    return jnp.concatenate(cols, axis=-1)


def test_merged_equals_runtime_and_reference_on_flax_model(variables):
    adapters = _randomize_b(
        lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")
    )

    @jax.jit
    def runtime(params, adapters, x):
        return MODEL.apply(lora.apply(params, adapters, rank=RANK, alpha=ALPHA), x)

    merged = lora.merge(variables, adapters, rank=RANK, alpha=ALPHA)
    out_merged = MODEL.apply(merged, X)
    out_runtime = runtime(variables, adapters, X)
    np.testing.assert_allclose(out_merged, out_runtime, atol=1e-6, rtol=0)

    # Independent reference: base layers + s * (input @ A) @ B, the conv on im2col patches.
    p, ad = variables["params"], adapters["params"]
    low_rank = lambda v, name: SCALE * (v @ ad[name]["kernel"]["a"]) @ ad[name]["kernel"]["b"]
    h = X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] + low_rank(X, "Dense_0")
    base_conv = jax.lax.conv_general_dilated(
        h, p["Conv_0"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    reference = base_conv + p["Conv_0"]["bias"] + low_rank(_patches(h), "Conv_0")
    np.testing.assert_allclose(out_merged, reference, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(out_merged - MODEL.apply(variables, X)))) > 0.1


def test_gradients_reach_b_first(variables):
    adapters = lora.init_adapters(jax.random.key(2), variables, rank=RANK, targets=".*")

    def loss(adapters):
        out = MODEL.apply(lora.apply(variables, adapters, rank=RANK, alpha=ALPHA), X)
        return jnp.sum(out**2)

    grads = tree_lib.flatten(jax.jit(jax.grad(loss))(adapters))
    # With B = 0, dL/dA = 0 and dL/dB != 0: training starts by moving B.
    np.testing.assert_array_equal(grads["params/Conv_0/kernel/a"], 0.0)
    assert float(jnp.max(jnp.abs(grads["params/Conv_0/kernel/b"]))) > 0
    assert float(jnp.max(jnp.abs(grads["params/Dense_0/kernel/b"]))) > 0


@pytest.mark.parametrize(
    "model_cfg",
    [
        {"name": "transformer", "size": "tiny", "dropout_rate": 0.1},  # Dense: factored
        {"name": "transformer", "size": "tiny", "scan_layers": True},  # stacked: factored too
        {"name": "resnet", "depth": "tiny", "num_classes": 3, "small_inputs": True},  # convs
    ],
)
def test_factored_train_step_equals_merged(model_cfg):
    """x W + s (x A) B in the train step: the merged step's loss, grads and update, fewer
    FLOPs wherever a plain nn.Dense carries an adapter."""
    from jaxdl.config import default_config
    from jaxdl.core import steps
    from jaxdl.training.build import build

    cfg = default_config()
    cfg.model = model_cfg
    cfg.optimizer.name = "adam"
    cfg.lora = {"rank": 2, "alpha": 4.0, "targets": ".*kernel"}
    if model_cfg["name"] == "transformer":
        kind, spec, classes = "lm", {k: ((12,), jnp.int32) for k in ("inputs", "targets")}, None
        batch = {
            "inputs": jax.random.randint(jax.random.key(1), (2, 12), 0, 256),
            "targets": jax.random.randint(jax.random.key(2), (2, 12), 0, 256),
        }
    else:
        kind, classes = "classification", 3
        spec = {"image": ((8, 8, 3), jnp.float32), "label": ((), jnp.int32)}
        batch = {
            "image": jax.random.normal(jax.random.key(1), (4, 8, 8, 3)),
            "label": jnp.array([0, 1, 2, 1]),
        }
    setup = build(cfg, kind=kind, example_spec=spec, num_classes=classes, total_steps=10)
    # Non-zero B, so the low-rank term is live in the forward pass too.
    state = setup.state.replace(
        params={**setup.state.params, "lora": _randomize_b(setup.state.params["lora"])}
    )
    results, flops = {}, {}
    for factored in (None, True, False):  # None: the default, which factors
        kwargs = {} if factored is None else {"factored_lora": factored}
        step = steps.make_train_step(
            setup.model, setup.head, setup.tx, lora_cfg=setup.lora_cfg, **kwargs
        )
        own = jax.tree.map(jnp.copy, state)  # the step donates its state
        flops[factored] = step.lower(own, batch).compile().cost_analysis()["flops"]
        results[factored] = step(own, batch)
    assert flops[None] == flops[True]
    (s1, m1), (s0, m0) = results[True], results[False]
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if model_cfg["name"] == "resnet":
        assert flops[True] <= flops[False] * 1.01  # only the plain Dense head factors
    else:
        assert flops[True] < 0.9 * flops[False]
