"""ResNet-50/18 and ViT-B/16 import against torchvision and timm themselves, at full size.

Random weights made hard to fool (`_torchvision.randomize`), saved as the users' files are
(``torch.save`` of a state dict -> .pth; safetensors), imported with `jaxdl import`'s code
path, then compared: max abs logit difference <= 1e-4 at float32, jaxdl at highest matmul
precision. The tiny golden fixtures are re-made and re-checked here too, so a drift of the
libraries shows.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from _torchvision import import_torchvision, randomize
from safetensors.torch import save_file

from jaxdl.checkpoint.read import load_variables
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint
from jaxdl.models import create_model

torchvision = import_torchvision()
import timm  # noqa: E402  (after torchvision's op schemas are defined)

sys.path.insert(0, str(Path(__file__).parents[2] / "fixtures"))
import make_vision_fixtures  # noqa: E402

TOL = 1e-4
# Linear layers at width 768: std 0.2 * sqrt(32 / 768), the tiny fixtures' gain per matmul.
# At std 0.2 the attention logits of a 768-wide model reach the hundreds and float32 rounding
# alone moves the output by more than the tolerance, whoever computes it.
VIT_STD = 0.2 * (32 / 768) ** 0.5


def _save(model: torch.nn.Module, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    return path


def _compare(kind: str, model: torch.nn.Module, images: torch.Tensor, weights: Path, out: Path):
    """Import `weights` as `kind` into `out`; -> (max abs logit diff, max abs logit)."""
    with torch.no_grad():
        want = model(images).numpy()
    import_checkpoint(kind, str(weights), out)
    config = json.loads((out / "config.json").read_text())
    jax_model = create_model(config["model"])
    with jax.default_matmul_precision("highest"):
        got = np.asarray(
            jax_model.apply(load_variables(out), images.permute(0, 2, 3, 1).numpy(), train=False)
        )
    return float(np.abs(got - want).max()), float(np.abs(want).max())


@pytest.mark.parametrize(
    "kind, build, suffix",
    [
        ("torchvision:resnet50", lambda: torchvision.models.resnet50(), ".pth"),
        ("timm:resnet50", lambda: timm.create_model("resnet50"), ".safetensors"),
        ("torchvision:resnet18", lambda: torchvision.models.resnet18(), ".pth"),
    ],
)
def test_resnet_matches_the_library(tmp_path, kind, build, suffix):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model = randomize(build(), images, seed=0)
    # ResNet-50's logits are O(30) at std 0.2 over 2048 features; float32 rounding through
    # 50 layers is ~5e-6 of that, whoever computes it. A quarter of the head keeps them O(5).
    with torch.no_grad():
        model.fc.weight.mul_(0.25)
        model.fc.bias.mul_(0.25)
    weights = _save(model, tmp_path / f"resnet{suffix}")
    diff, scale = _compare(kind, model, images, weights, tmp_path / "w")
    assert diff <= TOL and scale > 1.0, (diff, scale)


@pytest.mark.parametrize(
    "kind, build",
    [
        ("timm:vit_base_patch16_224", lambda: timm.create_model("vit_base_patch16_224")),
        ("torchvision:vit_b_16", lambda: torchvision.models.vit_b_16()),
    ],
)
def test_vit_b16_matches_the_library(tmp_path, kind, build):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model = randomize(build(), images, seed=1, std=VIT_STD)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    weights = _save(model, tmp_path / "vit.safetensors")
    diff, scale = _compare(kind, model, images, weights, tmp_path / "w")
    assert diff <= TOL and scale > 1.0, (diff, scale)


def test_resnet50_weights_named_as_resnet18_say_which_kind_fits(tmp_path):
    weights = _save(torchvision.models.resnet50(), tmp_path / "resnet50.pth")
    with pytest.raises(UserError, match="Fix: import it as torchvision:resnet50"):
        import_checkpoint("torchvision:resnet18", str(weights), tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", sorted(make_vision_fixtures.FIXTURES))
def test_golden_fixtures_still_match_the_libraries(tmp_path, name):
    """The generator, re-run: the libraries' logits agree with the committed ones."""
    make_vision_fixtures.write(tmp_path, name, seed=list(make_vision_fixtures.FIXTURES).index(name))
    fresh = np.load(tmp_path / name / "reference.npz")
    committed = np.load(Path(make_vision_fixtures.__file__).parent / "hub" / name / "reference.npz")
    np.testing.assert_allclose(fresh["logits"], committed["logits"], atol=TOL)
