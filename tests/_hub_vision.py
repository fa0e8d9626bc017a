"""What the ResNet and ViT import tests share: the golden fixtures (made by
tests/fixtures/make_vision_fixtures.py), imported once per module, their logits, and an
import -> `jaxdl train` fine-tuning run."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdl.checkpoint.read import load_variables
from jaxdl.interop import import_checkpoint
from jaxdl.models import create_model
from jaxdl.testing import subprocess_env

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
EXPERIMENTS = Path(__file__).parents[1] / "experiments"
TOL = 1e-4  # max |logit difference| from the source library's own forward pass


def imported_fixture(cases: dict[str, str]):
    """A module-scoped fixture over `cases` (fixture folder -> KIND): (fixture name,
    workdir, config, variables, reference) of one imported fixture."""

    @pytest.fixture(scope="module", params=sorted(cases))
    def imported(request, tmp_path_factory):
        name = request.param
        out = tmp_path_factory.mktemp("import") / name
        import_checkpoint(cases[name], str(FIXTURES / name), out)
        config = json.loads((out / "config.json").read_text())
        reference = dict(np.load(FIXTURES / name / "reference.npz"))
        return name, out, config, load_variables(out), reference

    return imported


def logits(config: dict, variables: dict, images: np.ndarray) -> np.ndarray:
    """The imported model's eval-mode logits [B, C] at full matmul precision."""
    model = create_model(config["model"])
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply(variables, images, train=False))


def fine_tune(tmp_path: Path, kind: str, fixture: str, experiment: str) -> tuple[Path, Path]:
    """Import `fixture` as `kind`, then `jaxdl train` experiments/`experiment` from it for 2
    steps on 16x16 digits (a real subprocess): (imported workdir, run workdir)."""
    imported = tmp_path / "imported"
    import_checkpoint(kind, str(FIXTURES / fixture), imported)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", "train", "--config", str(EXPERIMENTS / experiment)]
        + ["--workdir", str(run), "--no-progress", "--config.num_epochs=0"]
        + ["--config.num_steps=2", "--config.data.image_size=16"],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "IMPORTED": str(imported)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["test_loss"])
    return imported, run
