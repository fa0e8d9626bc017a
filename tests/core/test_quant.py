"""int8 and NF4 quantization of kernels: layouts, code book, round-trip error bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxdl.core import quant
from jaxdl.errors import UserError


def _kernel(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 0.02


def test_nf4_code_book_is_qlora_normal_float4():
    # bitsandbytes' float32 table, as QLoRA ships it
    assert quant.NF4_CODE.dtype == np.float32
    assert quant.NF4_CODE.tolist()[:4] == [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
    ]
    assert quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[-1] == 1.0
    assert quant.NF4_CODE[8] == np.float32(0.07958029955625534)
    # The construction (QLoRA appendix, `create_normal_map(0.9677083)`): 8 positive and 7
    # negative N(0, 1) quantiles over equal-probability bins, an exact zero, scaled to [-1, 1].
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4_CODE, values / values.max(), atol=1e-6)
    assert np.all(np.diff(quant.NF4_CODE) > 0)


def test_int8_layout_and_error_within_half_a_step():
    w = _kernel((96, 40)).at[:, 3].set(0.0)  # an all-zero output channel
    q = quant.quantize_int8(w)
    assert q["qint8"].dtype == jnp.int8 and q["qint8"].shape == (96, 40)
    assert q["scale"].dtype == jnp.float32 and q["scale"].shape == (40,)
    np.testing.assert_allclose(q["scale"], np.abs(np.asarray(w)).max(0) / 127, rtol=1e-6)
    assert int(jnp.abs(q["qint8"]).max()) == 127
    back = quant.dequantize_int8(q)
    err = np.abs(np.asarray(back) - np.asarray(w))
    assert np.all(err <= np.asarray(q["scale"]) / 2 * (1 + 1e-6))
    assert np.all(back[:, 3] == 0.0)
    assert float(err.max()) > 0  # really rounded


def test_nf4_layout_codes_and_block_absmax():
    w = _kernel((128, 24), seed=1).at[64:, 5].set(0.0)  # one all-zero block
    q = quant.quantize_nf4(w)
    assert q["nf4"].dtype == jnp.uint8 and q["nf4"].shape == (64, 24)
    assert q["absmax"].dtype == jnp.float32 and q["absmax"].shape == (2, 24)
    blocks = np.asarray(w).reshape(2, 64, 24)
    np.testing.assert_array_equal(q["absmax"], np.abs(blocks).max(1))
    codes = np.asarray(quant.nf4_codes(q["nf4"]))
    assert codes.shape == (128, 24) and codes.max() <= 15
    # packing: row 2i in the high nibble, 2i + 1 in the low one
    np.testing.assert_array_equal(np.asarray(q["nf4"]), codes[0::2] * 16 + codes[1::2])

    back = np.asarray(quant.dequantize_nf4(q)).reshape(2, 64, 24)
    absmax = np.asarray(q["absmax"])[:, None, :]
    # every value is one of the 16 code values times its block's absmax, exactly
    np.testing.assert_array_equal(back, quant.NF4_CODE[codes.reshape(2, 64, 24)] * absmax)
    # ... and the nearest one: no other code is closer to w / absmax
    normed = blocks / np.where(absmax > 0, absmax, 1)
    dist = np.abs(normed[..., None] - quant.NF4_CODE)
    chosen = np.take_along_axis(dist, codes.reshape(2, 64, 24)[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, dist.min(-1), atol=1e-7)
    half_gap = np.max(np.diff(quant.NF4_CODE)) / 2
    assert np.all(np.abs(back - blocks) <= half_gap * absmax + 1e-9)
    assert np.all(back[1, :, 5] == 0.0)
    # the block maximum itself comes back exactly (code +-1)
    assert np.all(np.abs(back).max(1) == np.abs(blocks).max(1))


def test_quantize_kernels_picks_frozen_2d_kernels_and_round_trips():
    tree = {
        "params": {
            "embed": {"embedding": _kernel((256, 64))},
            "q": {"kernel": _kernel((64, 32)), "bias": jnp.zeros(32)},
            "norm": {"scale": jnp.ones(64)},
            "conv": {"kernel": _kernel((3, 3, 4, 8))},
        }
    }
    stored = quant.quantize_kernels(tree, "nf4")
    p = stored["params"]
    assert quant.kind_of(p["q"]["kernel"]) == "nf4"
    assert p["embed"]["embedding"] is tree["params"]["embed"]["embedding"]
    assert p["conv"]["kernel"] is tree["params"]["conv"]["kernel"]  # 4-D: stays float
    assert quant.quantized_bytes(stored) == {"params/q/kernel": 32 * 32 + 4 * 32}
    back = jax.jit(quant.dequantize_tree)(stored)
    assert back["params"]["q"]["kernel"].shape == (64, 32)
    np.testing.assert_array_equal(
        back["params"]["q"]["kernel"], quant.dequantize_nf4(p["q"]["kernel"])
    )
    assert jax.tree.structure(back) == jax.tree.structure(tree)


def test_nf4_refuses_an_input_axis_that_is_not_a_multiple_of_64():
    tree = {"params": {"o_proj": {"kernel": jnp.zeros((96, 8))}}}
    with pytest.raises(UserError, match=r"lora.quantize='nf4': kernel params/o_proj/kernel"):
        quant.quantize_kernels(tree, "nf4")
    assert quant.kind_of(quant.quantize_kernels(tree, "int8")["params"]["o_proj"]["kernel"])
    with pytest.raises(UserError, match="lora.quantize: expected None, 'int8' or 'nf4'"):
        quant.quantize_kernels(tree, "q4")
