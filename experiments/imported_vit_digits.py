"""Fine-tune an imported timm/torchvision ViT on digits at another image size: new head.

Import first (here the tiny random-weight timm ViT of the test fixtures, 32x32 images with
8x8 patches; a real ``timm:vit_base_patch16_224`` folder imports the same way), then train:

    jaxdl import timm:vit_tiny_patch16_224 --from tests/fixtures/hub/vit_timm_tiny \\
        --out runs/imported_vit
    jaxdl train --config experiments/imported_vit_digits.py --workdir runs/vit_digits

``IMPORTED=DIR`` picks another imported workdir (the model section is read from it). The
digits are resized to 24x24, so the 4x4 patch grid the weights were made for becomes 3x3:
init_from resamples the position table bilinearly (init_report.json lists it under
"resampled"). The import's normalization ([-1, 1] for timm ViTs) applies because this
config sets no transforms; the head is re-initialised.
"""

import os

import ml_collections

from jaxdl.interop.workdir import imported_model

IMPORTED = os.environ.get("IMPORTED", "runs/imported_vit")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = imported_model(IMPORTED, num_classes=10)
    c.data = {"source": "digits", "batch_size": 64, "image_size": 24}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 5
    c.log_every = 20
    c.init_from = {"checkpoint": IMPORTED, "reinit": ["params/head/.*"]}
    return c
