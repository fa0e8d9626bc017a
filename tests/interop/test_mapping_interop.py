"""The mapping engine: strict one-to-one filling, transforms, stacked (scanned) targets."""

import jax
import numpy as np
import pytest

from jaxdl.checkpoint.deferred import Deferred
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop.mapping import Rule, convert, oihw_to_hwio, split, transpose


def _target(shapes: dict[str, tuple], dtype=np.float32) -> dict:
    tree: dict = {}
    for path, shape in shapes.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, dtype)
    return tree


RULES = [
    Rule(r"params/layer_(\d+)/q/kernel", "h.{0}.qkv.weight", split(1, 0, 3)),
    Rule(r"params/layer_(\d+)/k/kernel", "h.{0}.qkv.weight", split(1, 1, 3)),
    Rule(r"params/layer_(\d+)/v/kernel", "h.{0}.qkv.weight", split(1, 2, 3)),
    Rule(r"params/layer_(\d+)/out/kernel", "h.{0}.proj.weight", transpose),
]


def _source(layers: int) -> dict:
    rng = np.random.default_rng(0)
    src = {}
    for i in range(layers):
        src[f"h.{i}.qkv.weight"] = rng.normal(size=(4, 12)).astype(np.float32)
        src[f"h.{i}.proj.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
        src[f"h.{i}.attn.bias"] = np.ones(3, np.float32)
    return src


def _layer_shapes(prefix: str, lead: tuple = ()) -> dict:
    return {
        f"{prefix}/q/kernel": (*lead, 4, 4),
        f"{prefix}/k/kernel": (*lead, 4, 4),
        f"{prefix}/v/kernel": (*lead, 4, 4),
        f"{prefix}/out/kernel": (*lead, 4, 3),
    }


def test_convert_fills_split_and_transposed_leaves_and_reports():
    src = _source(2)
    target = _target({**_layer_shapes("params/layer_0"), **_layer_shapes("params/layer_1")})
    out, report = convert(src, target, RULES, ignore=[r"h\.\d+\.attn\.bias"])
    np.testing.assert_array_equal(
        out["params"]["layer_1"]["k"]["kernel"], src["h.1.qkv.weight"][:, 4:8]
    )
    np.testing.assert_array_equal(
        out["params"]["layer_0"]["out"]["kernel"], src["h.0.proj.weight"].T
    )
    assert report["ignored"] == ["h.0.attn.bias", "h.1.attn.bias"]
    assert (
        len(report["loaded"]) == 8
        and report["renamed"]["params/layer_0/v/kernel"] == "h.0.qkv.weight"
    )
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []


def test_convert_stacked_targets_match_the_per_layer_form():
    src = _source(3)
    flat, _ = convert(
        src,
        _target(
            {**{k: v for i in range(3) for k, v in _layer_shapes(f"params/layer_{i}").items()}}
        ),
        RULES,
        ignore=[r".*attn\.bias"],
    )
    stacked, report = convert(
        src,
        _target(_layer_shapes("params/layers", (3,))),
        RULES,
        ignore=[r".*attn\.bias"],
        stacked={"params/layers": "params/layer_{}"},
    )
    got = stacked["params"]["layers"]["v"]["kernel"]
    assert got.shape == (3, 4, 4)
    for i in range(3):
        np.testing.assert_array_equal(got[i], flat["params"][f"layer_{i}"]["v"]["kernel"])
    assert report["renamed"]["params/layers/q/kernel"] == [f"h.{i}.qkv.weight" for i in range(3)]
    assert "params/layers/q/kernel" in report["loaded"]


def test_convert_names_every_problem_in_one_line():
    src = _source(1)
    src["h.0.extra"] = np.zeros(2, np.float32)
    del src["h.0.proj.weight"]
    target = _target({**_layer_shapes("params/layer_0"), "params/norm/scale": (4,)})
    with pytest.raises(UserError) as err:
        convert(src, target, RULES)
    message = str(err.value)
    assert "\n" not in message
    for name in ("params/norm/scale", "h.0.proj.weight", "h.0.extra", "h.0.attn.bias"):
        assert name in message


def test_convert_shape_mismatch_and_dtype_cast():
    src = {"w": np.zeros((2, 3), np.float16)}
    with pytest.raises(
        UserError, match=r"shape mismatch: params/w source \(2, 3\) vs model \(3, 2\)"
    ):
        convert(src, _target({"params/w": (3, 2)}), [Rule("params/w", "w")])
    out, report = convert(src, _target({"params/w": (3, 2)}), [Rule("params/w", "w", transpose)])
    assert out["params"]["w"].dtype == np.float32
    assert report["dtype_cast"] == [["params/w", "float16", "float32"]]


def test_oihw_to_hwio():
    x = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    y = oihw_to_hwio(x, (5, 7, 3, 2))
    assert y.shape == (5, 7, 3, 2) and y[4, 6, 2, 1] == x[1, 2, 4, 6]


class _CountingView(dict):
    """A source that, like SafetensorsView and GGUF's HfView, can stand in for its tensors;
    it counts the tensors read."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        return super().__getitem__(key)

    def stand_in(self, key):
        value = super().__getitem__(key)
        return np.broadcast_to(np.zeros((), value.dtype), value.shape)


def test_deferred_convert_reads_nothing_until_made_and_equals_the_eager_one():
    src = _source(3)
    targets = {
        "per_layer": (_target(_layer_shapes("params/layer_0")), {}),
        "stacked": (
            _target(_layer_shapes("params/layers", (3,)), dtype=np.float16),
            {"params/layers": "params/layer_{}"},
        ),
    }
    for target, stacked in targets.values():
        src_i = src if stacked else {k: v for k, v in src.items() if k.startswith("h.0.")}
        view = _CountingView(src_i)
        _CountingView.reads = 0
        lazy, lazy_report = convert(
            view, target, RULES, ignore=[r".*attn\.bias"], stacked=stacked, defer=True
        )
        assert _CountingView.reads == 0
        eager, report = convert(src_i, target, RULES, ignore=[r".*attn\.bias"], stacked=stacked)
        assert lazy_report == report
        for (path, leaf), want in zip(
            tree_lib.flatten(lazy).items(), tree_lib.flatten(eager).values(), strict=True
        ):
            assert isinstance(leaf, Deferred) and (leaf.shape, leaf.dtype) == (
                want.shape,
                want.dtype,
            ), path
            made = leaf.make()
            assert made.dtype == want.dtype and made.flags.c_contiguous
            np.testing.assert_array_equal(made, want)
        assert _CountingView.reads > 0
    # shapes are checked on the stand-ins, before anything is read
    _CountingView.reads = 0
    with pytest.raises(UserError, match=r"shape mismatch: params/w source \(2, 3\)"):
        convert(
            _CountingView({"w": np.zeros((2, 3))}),
            _target({"params/w": (3, 2)}),
            [Rule("params/w", "w")],
            defer=True,
        )
    assert _CountingView.reads == 0
