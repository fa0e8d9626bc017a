"""Shared test setup: CPU only; each xdist worker builds the digits TFDS data in its own dir;
one persistent XLA compilation cache for the session's processes (the many `jaxdl train`
subprocesses compile the same small programs)."""

import os
import sys
import tempfile

# Tests in the subfolders (which mirror jaxdl/) share the CLI helpers of tests/test_cli.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault(
    "JAXDL_DATA_DIR", os.path.join(tempfile.gettempdir(), f"jaxdl-test-data-{_worker}")
)
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxdl-test-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
