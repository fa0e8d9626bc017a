"""torch-side helpers of the vision parity checks: import torchvision, make hard references.

The PyPI torchvision wheel next to the CPU torch wheel fails at import with "operator
torchvision::nms does not exist": its compiled ops library does not load, and its Python
side registers fake kernels for ops it expects that library to define. Defining the schemas
of those ops (never called here: classification models use none of them) lets it import;
`import_torchvision` does that once, only for ops that are missing. timm imports
torchvision, so call it before importing timm.

`randomize` makes a reference hard to fool: weights of std 0.2, BatchNorm running statistics
measured on random images then perturbed (so a mean/var swap or a wrong eps shows), random
BatchNorm and LayerNorm affine parameters.
"""

from __future__ import annotations

import torch

# Ops torchvision's _meta_registrations.py registers fake kernels for at import.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: list[torch.library.Library] = []  # kept alive: dropping it undefines the ops


def import_torchvision():
    """`import torchvision`, defining the op schemas its fake-kernel registrations need."""
    missing = [name for name in _SCHEMAS if not hasattr(torch.ops.torchvision, name)]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            lib.define(_SCHEMAS[name])
        _LIBRARY.append(lib)
    import torchvision

    return torchvision


@torch.no_grad()
def randomize(model: torch.nn.Module, images: torch.Tensor, seed: int = 0, std: float = 0.2):
    """Random weights (std `std`), BatchNorm stats measured on `images` then perturbed,
    random norm affines. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, scale: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * scale + mean)

    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    for module in model.modules():
        if isinstance(module, norms):
            if module.weight is not None:
                normal(module.weight, 0.3, 1.0)
                normal(module.bias, 0.3)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            normal(module.weight, std)
            if module.bias is not None:
                normal(module.bias, std)
    for name, param in model.named_parameters():  # ViT class token and position table
        if "token" in name or "pos_emb" in name:
            normal(param, std)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if batch_norms:
        # One pass in train mode with momentum None (a plain average) sets the running
        # statistics to the batch's, so activations stay O(1) through a deep net.
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        model(images)
        for bn in batch_norms:
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.5, 2.0, generator=gen))
    return model.eval()
