import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import adapters


def test_low_rank_backward_pass_equals_autodiff():
    """`low_rank`'s own backward pass gives autodiff's gradients for x [B, T, in], a, b."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 5, 6))
    a = jax.random.normal(keys[1], (6, 3))
    b = jax.random.normal(keys[2], (3, 4))
    w = jax.random.normal(keys[3], (2, 5, 4))  # a non-uniform cotangent

    def loss(fn):
        return lambda x, a, b: jnp.sum(jnp.tanh(fn(x, a, b)) * w)

    ours = jax.grad(loss(lambda x, a, b: adapters.low_rank(x, a, b, 0.5)), argnums=(0, 1, 2))
    reference = jax.grad(loss(lambda x, a, b: 0.5 * (x @ a) @ b), argnums=(0, 1, 2))
    with jax.default_matmul_precision("highest"):
        for got, want in zip(ours(x, a, b), reference(x, a, b), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert float(jnp.max(jnp.abs(want))) > 0.1  # a gradient that could be wrong
