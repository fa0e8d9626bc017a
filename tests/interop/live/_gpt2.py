"""torch-side helper of the GPT-2 parity checks: random weights made hard to fool."""

from __future__ import annotations

import torch


@torch.no_grad()
def randomize_gpt2(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Weights N(0, std); LayerNorm scale 1 + N(0, 0.3), bias N(0, 0.3). -> model in eval mode.

    GPT-2's own init (std 0.02, unit LayerNorms) would let a transposed square kernel or a
    LayerNorm without its affine pass unnoticed; these do not.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            p.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
        else:
            p.copy_(std * noise)
    return model.eval()
