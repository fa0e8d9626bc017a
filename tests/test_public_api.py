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
