"""LoRA fine-tuning of the stdlib-pretrained GPT on English text (`pydoc_data.topics`).

Shipped in the wheel as `jaxdl.configs.lm_pydoc_lora` (`jaxdl demo` runs it), so
`--config lm_pydoc_lora` works from any directory; this file keeps the repository path working:

    jaxdl train --config experiments/lm_pydoc_lora.py --workdir runs/lm_pydoc_lora
"""

from jaxdl.configs.lm_pydoc_lora import get_config

__all__ = ["get_config"]
