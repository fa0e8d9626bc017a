"""Fine-tune a pretrained digits SimpleCNN on new classes: fresh head, frozen backbone.

The article's 3.1/3.2 recipe: load a pretrained checkpoint, replace the last layer for the
new number of classes, train. Pretrain on digits 0-4, then fine-tune on 5-9:

    jaxdl train --config experiments/digits_cnn.py --workdir runs/digits_0_4 \\
        --config.data.classes=[0,1,2,3,4] --config.model.num_classes=5
    jaxdl train --config experiments/digits_finetune.py --workdir runs/digits_5_9 \\
        --config.init_from.checkpoint=runs/digits_0_4

The head (``params/head/kernel``, ``params/head/bias``, see jaxdl/models/cnn.py) keeps its
fresh init (``init_from.reinit``); every other layer is loaded and frozen, so only
128 * 5 + 5 = 645 parameters train and init_report.json lists what was loaded. Without
``init_from.checkpoint`` this trains a head on a random frozen backbone: set it.

Several tasks from the same checkpoint, each restored fresh (jaxdl.training.multitask.run_tasks):

    jaxdl train --config experiments/digits_finetune.py --workdir runs/digits_tasks \\
        --config.init_from.checkpoint=runs/digits_0_4 \\
        "--config.tasks=[{'name': '5-9'}, {'name': '7-9', 'data.classes': [7, 8, 9], \\
                          'model.num_classes': 3}]"
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "simple_cnn", "num_classes": 5}
    c.data = {"source": "digits", "batch_size": 32, "classes": [5, 6, 7, 8, 9]}
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 10
    c.log_every = 20
    c.init_from = {"checkpoint": "", "reinit": ["params/head/.*"]}
    c.partition = [("params/head/.*", {}), (".*", {"trainable": False})]
    return c
