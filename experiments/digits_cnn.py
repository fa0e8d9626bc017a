"""The article's 5.2.2 SimpleCNN (conv 64 -> conv 128 -> fc 128 -> 10) on digits.

Shipped in the wheel as `jaxdl.configs.digits_cnn` (`jaxdl demo` runs it), so `--config digits_cnn`
works from any directory; this file keeps the repository path working:

    jaxdl train --config experiments/digits_cnn.py --workdir runs/digits_cnn
"""

from jaxdl.configs.digits_cnn import get_config

__all__ = ["get_config"]
