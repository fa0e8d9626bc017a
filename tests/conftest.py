"""Shared test setup: CPU only; each xdist worker builds the digits TFDS data in its own dir."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault(
    "JAXDL_DATA_DIR", os.path.join(tempfile.gettempdir(), f"jaxdl-test-data-{_worker}")
)
