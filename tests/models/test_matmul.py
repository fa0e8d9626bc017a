"""bf16 compute's products (`jaxdl.models.matmul`): float32 accumulation in forward and
backward, float32 operands untouched, and a bf16 Llama that agrees with its float32 twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl.models import create_model, matmul

DIMS = (((2,), (0,)), ((), ()))


def _dots(fn, *args):
    """(operand dtypes, preferred dtype) of every dot_general in fn's jaxpr, backward included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(
                    (
                        tuple(str(v.aval.dtype) for v in eqn.invars),
                        str(eqn.params["preferred_element_type"]),
                    )
                )
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_float32_dense_product_is_the_plain_dot_general():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    w = jax.random.normal(jax.random.key(1), (8, 5))
    np.testing.assert_array_equal(
        matmul.dense_dot_general(x, w, DIMS), jax.lax.dot_general(x, w, DIMS)
    )
    assert _dots(lambda x, w: matmul.dense_dot_general(x, w, DIMS), x, w) == [
        (("float32", "float32"), "None")
    ]


def test_bf16_product_accumulates_in_float32_forward_and_backward():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    w = jax.random.normal(jax.random.key(1), (16, 24)) / 4

    def loss(x, w, dtype, dot):
        y = dot(x.astype(dtype), w.astype(dtype), DIMS)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    bf16 = lambda x, w: loss(x, w, jnp.bfloat16, matmul.dense_dot_general)  # noqa: E731
    dots = _dots(jax.grad(bf16, argnums=(0, 1)), x, w)
    assert len(dots) == 3  # forward, dx, dw
    assert all(d == (("bfloat16", "bfloat16"), "float32") for d in dots), dots
    ours = jax.jit(jax.grad(bf16, argnums=(0, 1)))(x, w)
    f32 = lambda x, w: loss(x, w, jnp.float32, jax.lax.dot_general)  # noqa: E731
    ref = jax.jit(jax.grad(f32, argnums=(0, 1)))(x, w)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * float(jnp.abs(b).max()))


def test_tied_logits_are_float32_in_bf16():
    h = jax.random.normal(jax.random.key(0), (1, 4, 16), jnp.bfloat16)
    e = jax.random.normal(jax.random.key(1), (32, 16), jnp.bfloat16)
    out = matmul.tied_logits(h, e)
    assert out.dtype == jnp.float32
    ref = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), e.astype(jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)  # exact products of bf16 values


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_llama_agrees_with_float32_and_trains(tie):
    cfg = {"name": "llama", "size": "tiny", "tie_embeddings": tie}
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 256)
    f32, bf16 = create_model(cfg), create_model({**cfg, "dtype": "bfloat16"})
    params = jax.jit(f32.init)(jax.random.key(0), tokens)["params"]
    want = jax.jit(f32.apply)({"params": params}, tokens)
    got = jax.jit(bf16.apply)({"params": params}, tokens)
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 5e-2

    def loss(p, model):
        return jnp.mean(jax.nn.logsumexp(model.apply({"params": p}, tokens), axis=-1))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g32, g16 = grad(params, f32), grad(params, bf16)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
    pairs = list(zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True))
    cos = sum(float(jnp.vdot(a, b)) for a, b in pairs)
    norm = np.sqrt(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(g16)))
    norm *= np.sqrt(sum(float(jnp.vdot(b, b)) for b in jax.tree.leaves(g32)))
    assert cos / norm > 0.99  # the same gradient direction


@pytest.mark.parametrize("shape, axis", [((1, 1, 16), 2), ((16, 1), 0)])
def test_bf16_vector_product_equals_the_matrix_product(shape, axis):
    """A one-row bf16 product (a decode step) runs as two rows; same values and shape."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (16, 24), jnp.bfloat16)
    dims = (((axis,), (0,)), ((), ()))
    expected = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    got = matmul._f32_accumulated(x, w, axis, 0)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # summation order
    tied = matmul.tied_logits(x.reshape(1, 1, 16), w.T)  # the tied head's transposed form
    np.testing.assert_allclose(tied, expected.reshape(1, 1, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_lookup_is_take_with_takes_gradient(dtype):
    table = jax.random.normal(jax.random.key(0), (10, 4)).astype(dtype)
    ids = jnp.array([[3, 3, 9], [0, 1, 2]])
    np.testing.assert_array_equal(matmul.embedding_lookup(table, ids), jnp.take(table, ids, 0))

    def loss(lookup):
        return lambda t: (lookup(t).astype(jnp.float32) ** 2).sum()

    got = jax.grad(loss(lambda t: matmul.embedding_lookup(t, ids)))(table)
    np.testing.assert_array_equal(got, jax.grad(loss(lambda t: jnp.take(t, ids, 0)))(table))


def test_bf16_generate_holds_no_float32_copy_of_the_weights():
    """XLA:CPU upcasts one-row bf16 products and bf16 gathers; inside the decode loop it
    hoisted the upcasts into float32 copies of every weight (2x the bf16 weights' memory
    and a conversion before the first token), and the embedding table's into a copy of it.
    Compiled, the loop's scratch is now below a quarter of the float32 weights and half the
    bf16 embedding table (a vocabulary large enough for a copy of it to show; the tied
    head's float32 [V, 8] product is a quarter of the table at this width)."""
    from jaxdl.lm import generate as G

    cfg = {"name": "llama", "size": "tiny", "dtype": "bfloat16", "vocab_size": 4096}
    model = create_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    f32_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    module = G.decoding_model(model, 32)
    logits, cache = G.prefill(module, params, jnp.zeros((1, 8), jnp.int32))
    compiled = G._generate.lower(
        module, params, cache, logits, jax.random.key(0), 1.0, jnp.array([0]),
        max_new_tokens=4, top_k=None, top_p=None, greedy=True,
    ).compile()  # fmt: skip
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < f32_bytes / 4
    assert temp < params["embed"]["embedding"].nbytes / 2


@pytest.mark.parametrize(
    "shape, axis",
    [((1, 1, 64), 2), ((3, 64), 1), ((2, 4, 64), 2), ((16, 64), 1), ((64, 5), 0), ((17, 64), 1)],
)
def test_few_bf16_rows_times_an_out_in_matrix(shape, axis):
    """x contracted with an [out, in] matrix (a transposed kernel, a tied head): at most
    FEW_ROWS rows run matrix-first (`_weight_first_product`), 17 as the plain product; the
    same values and shape either way, and compiled, no float32 copy of the matrix (which
    XLA:CPU makes when the product falls off its library kernels)."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    w_t = jax.random.normal(jax.random.key(1), (512, 64), jnp.bfloat16)
    dims = (((axis,), (1,)), ((), ()))
    expected = jax.lax.dot_general(x, w_t, dims, preferred_element_type=jnp.float32)
    got = matmul.contract(x, w_t, axis, 1, out_dtype=jnp.float32)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # summation order
    compiled = jax.jit(lambda x, w: matmul.contract(x, w, axis, 1)).lower(x, w_t).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < w_t.nbytes
