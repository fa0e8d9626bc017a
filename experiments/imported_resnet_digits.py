"""Fine-tune an imported timm/torchvision ResNet on digits: new 10-class head, all layers train.

Import first (here the tiny random-weight timm ResNet of the test fixtures; a real
``resnet18.pth`` state dict imports the same way with ``--from resnet18.pth``), then train:

    jaxdl import timm:resnet18 --from tests/fixtures/hub/resnet_basic_tiny \\
        --out runs/imported_resnet
    jaxdl train --config experiments/imported_resnet_digits.py --workdir runs/resnet_digits

``IMPORTED=DIR`` picks another imported workdir (the model section is read from it). The
8x8 grey digits are resized to 32x32 and given 3 channels; the import's normalization
(ImageNet mean/std, in its config.json) applies because this config sets no transforms.
The head is re-initialised (``init_from.reinit``): the import's has 1000 (or 10) classes.
"""

import os

import ml_collections

from jaxdl.interop.workdir import imported_model

IMPORTED = os.environ.get("IMPORTED", "runs/imported_resnet")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = imported_model(IMPORTED, num_classes=10)
    c.data = {"source": "digits", "batch_size": 64, "image_size": 32}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 5
    c.log_every = 20
    c.init_from = {"checkpoint": IMPORTED, "reinit": ["params/head/.*"]}
    return c
