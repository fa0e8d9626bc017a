"""The article's 5.2 setup on any image folder: ImageFolder('train') / ImageFolder('val'),
Resize(224), ImageNet normalization, SimpleCNN, batch 32, seed 42.

    jaxdl train --config experiments/imagefolder_cnn.py \
        --config.data.source=imagefolder:PATH --workdir runs/folder_cnn

PATH holds train/ and val/ (optionally test/), one subfolder per class; a PATH of class
folders alone is split by data.val_fraction. Small images train faster at a smaller size:
--config.data.image_size=32.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "simple_cnn", "num_classes": 10}
    c.data = {
        "source": "imagefolder:data/images",
        "image_size": 224,
        "channels": 3,
        "batch_size": 32,
        # The article's chain in one line: Resize(224) -> ToTensor -> Normalize(ImageNet).
        "transforms": ["normalize(imagenet)"],
        "train_transforms": ["random_scale(scale=(0.9, 1.1))"],
    }
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 10
    c.log_every = 20
    return c
