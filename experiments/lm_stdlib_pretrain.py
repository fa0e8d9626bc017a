"""Pretrain the small byte-level GPT on the Python standard library's own sources.

Shipped in the wheel as `jaxdl.configs.lm_stdlib_pretrain` (`jaxdl demo` runs it), so
`--config lm_stdlib_pretrain` works from any directory; this file keeps the repository path working:

    jaxdl train --config experiments/lm_stdlib_pretrain.py --workdir runs/lm_stdlib_pretrain
"""

from jaxdl.configs.lm_stdlib_pretrain import get_config

__all__ = ["get_config"]
