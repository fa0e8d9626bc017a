"""ResNet import (`jaxdl import timm:resnet50 ...`) against timm's own logits, torch-free.

The golden fixtures (tests/fixtures/make_vision_fixtures.py) are timm ResNets narrowed by
``model_args`` (one block per stage, stages 8-64 wide behind timm's 64-wide stem) with
weights of std 0.2 and perturbed BatchNorm statistics; their logits come from timm. The
full-size torchvision/timm ResNet-50 checks live in tests/interop/live/test_vision_live.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _hub_vision import FIXTURES, TOL, fine_tune, imported_fixture, logits

from jaxdl.checkpoint.read import load_variables
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint, resnet
from jaxdl.interop.readers import read_state_dict, sha256
from jaxdl.testing import subprocess_env

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_resnet_interop")

CASES = {"resnet_basic_tiny": "timm:resnet18", "resnet_bottleneck_tiny": "timm:resnet50"}
imported = imported_fixture(CASES)


def test_imported_resnet_matches_timm_logits(imported):
    name, _, config, variables, ref = imported
    diff = np.abs(logits(config, variables, ref["images"]) - ref["logits"]).max()
    assert diff <= TOL, (name, diff)
    assert np.abs(ref["logits"]).max() > 1.0  # the reference is not near zero everywhere
    block = "bottleneck" if name == "resnet_bottleneck_tiny" else "basic"
    model = config["model"]
    assert model["depth"] == (50 if block == "bottleneck" else 18)
    assert (model["stage_sizes"], model["num_filters"], model["stem_filters"]) == (
        [1, 1, 1, 1],
        8,
        64,
    )
    assert config["data"]["channels"] == 3 and config["data"]["image_size"] == 64


def test_import_report_names_every_leaf_and_the_source(imported):
    name, out, _, variables, _ = imported
    report = json.loads((out / "import_report.json").read_text())
    state, _ = read_state_dict(FIXTURES / name / "model.safetensors")
    assert sorted(report["loaded"]) == sorted(tree_lib.flatten(variables))
    assert report["ignored"] == sorted(k for k in state if k.endswith("num_batches_tracked"))
    assert report["unexpected"] == report["missing"] == report["dtype_cast"] == []
    assert report["renamed"]["batch_stats/stem_bn/var"] == "bn1.running_var"
    (source,) = report["source"]["files"]
    assert source["sha256"] == sha256(FIXTURES / name / "model.safetensors")
    assert report["source"]["kind"] == CASES[name]


def test_mean_var_swap_and_kernel_transpose_fail_by_10x_the_tolerance(imported):
    """The fixtures are hard to fool: the two classic porting mistakes change the logits."""
    _, _, config, variables, ref = imported
    flat = tree_lib.flatten(variables)
    swapped = dict(flat)
    for path in flat:
        if path.endswith("/mean"):
            var = path[: -len("mean")] + "var"
            swapped[path], swapped[var] = flat[var], flat[path]
    transposed = {
        p: np.swapaxes(v, 0, 1) if v.ndim == 4 and v.shape[0] == 3 else v for p, v in flat.items()
    }
    for wrong in (swapped, transposed):
        out = logits(config, tree_lib.unflatten(wrong), ref["images"])
        # A negative mean read as a variance gives NaN: also a failure, so NaN counts as inf.
        diff = np.nan_to_num(np.abs(out - ref["logits"]), nan=np.inf)
        assert diff.max() > 10 * TOL


def test_kind_and_model_args_are_checked():
    state, _ = read_state_dict(FIXTURES / "resnet_basic_tiny" / "model.safetensors")
    with pytest.raises(UserError, match="KIND: expected one of"):
        resnet.convert_state("timm:resnet20", state)
    with pytest.raises(UserError, match=r"cannot reproduce \['stem_type'\]"):
        resnet.convert_state("timm:resnet18", state, {"stem_type": "deep"})
    with pytest.raises(UserError, match="doubles its width per stage"):
        resnet.convert_state("timm:resnet18", state, {"channels": [8, 8, 8, 8]})
    with pytest.raises(UserError, match="'fc.weight'"):
        resnet.convert_state("timm:resnet18", {"head.weight": np.zeros((2, 2))})


def jaxdl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", *args],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **(env or {})},
    )


def _bottleneck_weights(tmp_path: Path) -> Path:
    """The bottleneck fixture's weights alone (no config.json with its model_args)."""
    weights = tmp_path / "resnet50.safetensors"
    shutil.copyfile(FIXTURES / "resnet_bottleneck_tiny" / "model.safetensors", weights)
    return weights


def _truncated(tmp_path: Path) -> Path:
    folder = tmp_path / "truncated"
    shutil.copytree(FIXTURES / "resnet_basic_tiny", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.parametrize(
    "kind, source, words",
    [
        # ResNet-50 (bottleneck) weights named as a ResNet-18.
        ("timm:resnet18", _bottleneck_weights, ["1-1-1-1 bottleneck", "expects 2-2-2-2 basic"]),
        ("timm:resnet18", _truncated, ["truncated or corrupt", "model.safetensors"]),
        ("torchvision:resnet50", lambda p: p / "nowhere.pth", ["no file or folder", "nowhere"]),
    ],
    ids=["other-architecture", "truncated", "missing"],
)
def test_bad_input_is_one_line_exit_2_and_no_workdir(tmp_path, kind, source, words):
    out = tmp_path / "runs" / "imported"
    done = jaxdl("import", kind, "--from", str(source(tmp_path)), "--out", str(out))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdl: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not (out.parent.exists() and os.listdir(out.parent))  # no temporary left either


def test_imported_resnet_fine_tunes_with_a_new_head(tmp_path):
    """import -> `jaxdl train` with init_from and a re-initialised head, on digits."""
    imported, run = fine_tune(
        tmp_path, "timm:resnet18", "resnet_basic_tiny", "imported_resnet_digits.py"
    )
    report = json.loads((run / "init_report.json").read_text())
    assert report["reinitialized"] == ["params/head/bias", "params/head/kernel"]
    assert len(report["loaded"]) == len(tree_lib.flatten(load_variables(imported))) - 2
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["transforms"] == [
        "normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
    ]
    assert config["data"]["channels"] == 3


def test_a_config_json_of_another_architecture_is_refused(tmp_path):
    with pytest.raises(
        UserError, match="config.json says 'resnet50'. Fix: import it as timm:resnet50"
    ):
        import_checkpoint("timm:resnet18", str(FIXTURES / "resnet_bottleneck_tiny"), tmp_path / "w")
    assert not (tmp_path / "w").exists()
