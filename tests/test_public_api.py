"""The public surface: lazy names, and a serving import that stays light."""

import subprocess
import sys

import jaxdl

# What a served artifact must never pay for: the optimizer, checkpoints, the input pipeline.
HEAVY = (
    "orbax",
    "grain",
    "tensorflow_datasets",
    "optax",
    "jaxdl.training",
    "jaxdl.checkpoint",
    "jaxdl.data.loader",
    "jaxdl.data.pipeline",
)


def _heavy_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.split() if m.startswith(HEAVY)}


def test_serving_an_artifact_does_not_load_the_training_stack():
    # predict decodes image files with jaxdl.data.records / transforms
    assert not _heavy_after(
        "import jaxdl.deploy.predict\n"
        "from jaxdl.data.records import convert_channels\n"
        "from jaxdl.data.transforms import parse_transform, resize_image"
    )


def test_import_jaxdl_is_lazy_and_every_public_name_resolves():
    assert not _heavy_after("import jaxdl")
    for name in jaxdl.__all__:
        assert getattr(jaxdl, name) is not None, name
    assert set(jaxdl.__all__) <= set(dir(jaxdl))


def test_load_model_gives_the_logits_the_run_was_scored_with(tmp_path):
    import numpy as np

    from jaxdl.data import build_data

    cfg = jaxdl.load_config(
        "experiments/digits_cnn.py",
        ["--config.num_epochs=0", "--config.num_steps=30", "--config.eval_every=30"],
    )
    summary = jaxdl.train(cfg, tmp_path, progress=False, echo=lambda *_: None)
    model, variables = jaxdl.load_model(tmp_path)
    data = build_data(cfg.data, seed=cfg.seed, num_classes=cfg.model.num_classes)
    correct = total = 0
    for batch in data.eval_iter("test", 128):
        logits = model.apply(variables, batch["image"])
        mask = batch["mask"].astype(bool)
        correct += int((logits.argmax(-1) == batch["label"])[mask].sum())
        total += int(mask.sum())
    assert total == 360
    np.testing.assert_allclose(correct / total, summary["test_accuracy"], atol=1e-9)


def test_deploy_never_imports_training_orbax_or_grain():
    import ast
    from pathlib import Path

    deploy = Path(jaxdl.__file__).parent / "deploy"
    for path in deploy.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in getattr(node, "names", [])]
                bad = [n for n in names if n.startswith(("jaxdl.training", "orbax", "grain"))]
                assert not bad, f"{path.name} imports {bad}"


def test_core_imports_nothing_above_it():
    """core -> core, models, errors only: finetune builds on core (LoRA's adapters live in
    jaxdl.core.adapters because the train step applies them)."""
    import ast
    from pathlib import Path

    core = Path(jaxdl.__file__).parent / "core"
    allowed = ("jaxdl.core", "jaxdl.models", "jaxdl.errors")
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names if isinstance(node, ast.Import)]
                bad = [n for n in names if n.startswith("jaxdl") and not n.startswith(allowed)]
                assert not bad, f"core/{path.name} imports {bad}"
