"""ViT import (timm and torchvision) against the libraries' own logits, torch-free; position
table resampling for fine-tuning at another image size.

The golden fixtures (tests/fixtures/make_vision_fixtures.py) are the libraries' own ViT
classes shrunk by ``model_args`` (32x32 images, 8x8 patches, width 32, 2 layers, 2 heads)
with weights of std 0.2 and random LayerNorm affines. The full-size ViT-B/16 checks live in
tests/interop/live/test_vision_live.py.
"""

import json
import re

import numpy as np
import pytest
from _hub_vision import FIXTURES, TOL, fine_tune, imported_fixture, logits
from safetensors.numpy import save_file

from jaxdl.config import default_config
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop import vit
from jaxdl.interop.readers import read_state_dict
from jaxdl.interop.vision import with_source_preprocessing
from jaxdl.models.vit import resample_posemb

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_vit_interop")

CASES = {
    "vit_timm_tiny": "timm:vit_tiny_patch16_224",
    "vit_torchvision_tiny": "torchvision:vit_b_16",
}
imported = imported_fixture(CASES)


def test_imported_vit_matches_the_library_logits(imported):
    name, _, config, variables, ref = imported
    diff = np.abs(logits(config, variables, ref["images"]) - ref["logits"]).max()
    assert diff <= TOL, (name, diff)
    assert np.abs(ref["logits"]).max() > 1.0
    model = config["model"]
    assert (model["patch_size"], model["embed_dim"], model["num_layers"]) == (8, 32, 2)
    assert (model["num_heads"], model["mlp_ratio"], model["num_classes"]) == (2, 2.0, 10)
    # Preprocessing travels with the import: the fixture's pretrained_cfg mean/std.
    mean = "(0.5, 0.5, 0.5)" if name == "vit_timm_tiny" else "(0.485, 0.456, 0.406)"
    (transform,) = config["data"]["transforms"]
    assert transform.startswith(f"normalize(mean={mean}")
    assert (config["data"]["image_size"], config["data"]["channels"]) == (32, 3)


def test_qkv_order_and_patch_transpose_fail_by_10x_the_tolerance(imported):
    _, _, config, variables, ref = imported
    flat = tree_lib.flatten(variables)
    qk_swapped = dict(flat)
    for path in flat:
        if "/attn/query/" in path:
            key = path.replace("/query/", "/key/")
            qk_swapped[path], qk_swapped[key] = flat[key], flat[path]
    transposed = dict(flat)
    transposed["params/patch_embed/kernel"] = np.swapaxes(flat["params/patch_embed/kernel"], 0, 1)
    for wrong in (qk_swapped, transposed):
        out = logits(config, tree_lib.unflatten(wrong), ref["images"])
        assert np.abs(out - ref["logits"]).max() > 10 * TOL


def test_library_default_normalization_and_model_args(tmp_path):
    """Without pretrained_cfg: timm ViTs expect [-1, 1], torchvision ImageNet mean/std. Without
    model_args the KIND's full-size preset does not fit the tiny weights: refused."""
    for name, expected in (("vit_timm_tiny", "symmetric"), ("vit_torchvision_tiny", "imagenet")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(
            (FIXTURES / name / "model.safetensors").read_bytes()
        )
        with pytest.raises(UserError, match="the state dict is a ViT of 2 layers 32 wide"):
            vit.import_vit(CASES[name], folder)
        model_args = json.loads((FIXTURES / name / "config.json").read_text())["model_args"]
        (folder / "config.json").write_text(json.dumps({"model_args": model_args}))
        data = vit.import_vit(CASES[name], folder).config["data"]
        assert data == {
            "source": "none",
            "image_size": 32,
            "channels": 3,
            "transforms": [f"normalize({expected})"],
            "class_names": [],
        }


def test_unknown_kind_and_model_args_are_refused():
    state, _ = read_state_dict(FIXTURES / "vit_timm_tiny" / "model.safetensors")
    with pytest.raises(UserError, match="KIND: expected one of"):
        vit.convert_state("timm:vit_huge_patch14_224", state)
    with pytest.raises(UserError, match=r"cannot reproduce \['qk_norm'\]"):
        vit.convert_state("timm:vit_tiny_patch16_224", state, {"qk_norm": True})
    with pytest.raises(UserError, match="'heads.head.weight'"):
        vit.convert_state("torchvision:vit_b_16", state)


@pytest.mark.parametrize(
    "kind, args, message",
    [
        (
            "timm:vit_tiny_patch16_224",
            {"embed_dim": 32, "num_heads": 3},
            "num_heads=3 (config.json model_args) does not divide embed_dim=32",
        ),
        (
            "timm:vit_tiny_patch16_224",
            {"embed_dim": 32},
            "num_heads=3 (timm:vit_tiny_patch16_224's preset) does not divide embed_dim=32",
        ),
        ("timm:vit_tiny_patch16_224", {"depth": "2"}, "depth='2' (config.json model_args)"),
        ("torchvision:vit_b_16", {"hidden_dim": 30, "num_heads": 4}, "num_heads=4 (config"),
    ],
)
def test_bad_sizes_name_the_sources_own_keyword(kind, args, message):
    state, _ = read_state_dict(FIXTURES / "vit_timm_tiny" / "model.safetensors")
    with pytest.raises(UserError, match=re.escape(message)) as err:
        vit.convert_state(kind, state, args)
    assert "model.num_heads" not in str(err.value)


def test_resample_posemb_is_bilinear_on_the_grid_and_keeps_the_class_token():
    grid = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    table = np.concatenate([[[7.0]], grid.reshape(4, 1)])[None]  # [1, 1 + 2*2, 1]
    out = resample_posemb(table, (1, 17, 1), num_prefix=1)
    assert out[0, 0, 0] == 7.0
    # Half-pixel centres, edges clamped: row 0 of the 4x4 grid is 0, 1/4, 3/4, 1.
    np.testing.assert_allclose(out[0, 1:5, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4)[:, 0], [0.0, 0.5, 1.5, 2.0], atol=1e-6)
    same = resample_posemb(table, table.shape, num_prefix=1)
    np.testing.assert_array_equal(same, table)
    mean_pool = resample_posemb(grid.reshape(1, 4, 1), (1, 1, 1), num_prefix=0)
    np.testing.assert_allclose(mean_pool[0, 0, 0], 1.5, atol=1e-6)  # antialiased: the mean
    with pytest.raises(UserError, match="pos_embed"):
        resample_posemb(table, (1, 7, 1), num_prefix=1)  # 6 patches: not a square grid


def test_imported_vit_fine_tunes_at_another_image_size(tmp_path):
    """import (32x32) -> `jaxdl train` on 16x16 digits: the position table is resampled
    (4x4 -> 2x2 patches), the head re-initialised, the import's normalization applied."""
    _, run = fine_tune(
        tmp_path, "timm:vit_tiny_patch16_224", "vit_timm_tiny", "imported_vit_digits.py"
    )
    report = json.loads((run / "init_report.json").read_text())
    assert report["resampled"] == [["params/pos_embed", [1, 17, 32], [1, 5, 32]]]
    assert report["reinitialized"] == ["params/head/bias", "params/head/kernel"]
    assert "params/pos_embed" in report["loaded"]
    tuned_cfg = json.loads((run / "config.json").read_text())
    assert tuned_cfg["data"]["transforms"] == [
        "normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))"
    ]
    assert tuned_cfg["data"]["channels"] == 3


def test_half_precision_weights_load_as_float32_and_are_reported_cast(tmp_path):
    name = "vit_timm_tiny"
    state, _ = read_state_dict(FIXTURES / name / "model.safetensors")
    folder = tmp_path / "fp16"
    folder.mkdir()
    save_file({k: v.astype(np.float16) for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text((FIXTURES / name / "config.json").read_text())
    imported = vit.import_vit(CASES[name], folder)
    flat = tree_lib.flatten(imported.variables)
    assert {v.dtype for v in flat.values()} == {np.dtype(np.float32)}
    assert sorted(p for p, src, dst in imported.report["dtype_cast"]) == sorted(flat)
    assert {(src, dst) for _, src, dst in imported.report["dtype_cast"]} == {("float16", "float32")}
    ref = np.load(FIXTURES / name / "reference.npz")
    out = logits(imported.config, imported.variables, ref["images"])
    np.testing.assert_allclose(out, ref["logits"], atol=0.05)  # fp16 rounding of the weights


def test_init_from_an_imported_workdir_inherits_its_preprocessing_unless_set(imported):
    _, out, config, _, _ = imported
    cfg = default_config()
    cfg.init_from.checkpoint = str(out / "checkpoints" / "0")  # a step folder names it too
    inherited = with_source_preprocessing(cfg)
    assert inherited.data.transforms == config["data"]["transforms"]
    assert inherited.data.channels == 3 and cfg.data.transforms == []  # a copy
    cfg.data.transforms, cfg.data.channels = ["normalize(unit)"], 1
    own = with_source_preprocessing(cfg)
    assert (own.data.transforms, own.data.channels) == (["normalize(unit)"], 1)
    cfg.init_from.checkpoint = str(out.parent)  # not an imported workdir: nothing to inherit
    cfg.data.transforms = []
    assert with_source_preprocessing(cfg).data.transforms == []


def test_torchvision_legacy_mlp_names_import_alike():
    """torchvision's released vit_b_16 weights name the MLP linear_1/linear_2 (not 0/3)."""
    name = "vit_torchvision_tiny"
    state, _ = read_state_dict(FIXTURES / name / "model.safetensors")
    legacy = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in state.items()
    }
    assert legacy.keys() != state.keys()
    model_args = json.loads((FIXTURES / name / "config.json").read_text())["model_args"]
    model, _, variables, _ = vit.convert_state(CASES[name], legacy, model_args)
    ref = np.load(FIXTURES / name / "reference.npz")
    config = {"model": model}
    np.testing.assert_allclose(logits(config, variables, ref["images"]), ref["logits"], atol=TOL)
