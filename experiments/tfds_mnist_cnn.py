"""SimpleCNN on MNIST read through TFDS (`tfds.data_source`, array_record; no TensorFlow).

    tfds build mnist --data_dir ~/tensorflow_datasets --file_format array_record
    jaxdl train --config experiments/tfds_mnist_cnn.py --workdir runs/mnist_cnn

MNIST has no validation split; the last 10% of train serves as one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "simple_cnn", "num_classes": 10}
    c.data = {
        "source": "tfds:mnist",
        "data_dir": "~/tensorflow_datasets",
        "train_split": "train[:90%]",
        "eval_split": "train[90%:]",
        "test_split": "test",
        "batch_size": 64,
        "transforms": ["normalize(unit)"],
    }
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 3
    c.log_every = 100
    return c
