"""The article's 3.1 MLP (512-256-128, ReLU) on scikit-learn's digits.

Shipped in the wheel as `jaxdl.configs.digits_mlp` (`jaxdl demo` runs it), so `--config digits_mlp`
works from any directory; this file keeps the repository path working:

    jaxdl train --config experiments/digits_mlp.py --workdir runs/digits_mlp
"""

from jaxdl.configs.digits_mlp import get_config

__all__ = ["get_config"]
