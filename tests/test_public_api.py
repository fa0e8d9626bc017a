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
    # predict decodes image files with jaxdl.data.sources / transforms
    assert not _heavy_after(
        "import jaxdl.deploy.predict\n"
        "from jaxdl.data.sources import convert_channels\n"
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


def _package(module: str) -> str:
    """The package `module` lives in (a package lives in itself)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return module if spec.submodule_search_locations is not None else module.rpartition(".")[0]


def _private_names_across_packages() -> list[str]:
    """`from jaxdl.X import _name`, or `module._name` on an imported jaxdl module, where the
    importing module and X live in different packages of jaxdl (jaxdl has no relative
    imports)."""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(jaxdl.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        here = _package(module.removesuffix(".__init__"))
        tree = ast.parse(path.read_text())
        bound = {}  # local name -> the jaxdl module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname})
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxdl")):
                continue
            there = _package(node.module)
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if there == node.module and importlib.util.find_spec(full) is not None:
                    bound[alias.asname or alias.name] = full
                if alias.name.startswith("_") and there != here:
                    found.append(f"{module}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and bound[node.value.id].startswith("jaxdl")
                and _package(bound[node.value.id]) != here
            ):
                found.append(f"{module}: {bound[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another_package():
    assert _private_names_across_packages() == []
