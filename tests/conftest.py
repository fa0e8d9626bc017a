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
# Every program, however quick to compile: the tests' eager ops (a tiny program per op and
# shape) recur across the two workers and the subprocesses, and add up to minutes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _marked_for_one_worker(path: str) -> bool:
    """Whether the test module at ``path`` (relative to the rootdir) sets an xdist_group
    pytestmark."""
    try:
        with open(path, encoding="utf-8") as f:
            return "pytestmark = pytest.mark.xdist_group(" in f.read()
    except OSError:
        return False


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` as xdist documents it: a module marked xdist_group runs on one
    worker (its module-scoped fixtures, training runs, are made once, not once per worker),
    every other test goes to whichever worker is free. xdist 3.8 marks a grouped test by
    appending "@group" to its node id, which pytest 9's node ids no longer take, so the
    grouping is done here, by module, from the same markers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    marked: dict[str, bool] = {}

    class ModuleGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path not in marked:
                marked[path] = _marked_for_one_worker(os.path.join(str(config.rootpath), path))
            return path if marked[path] else nodeid

    return ModuleGroupScheduling(config, log)
