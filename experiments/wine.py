"""Wine cultivars (3 classes, 178 rows, 13 numeric features): multiclass on a table.

    jaxdl train --config experiments/wine.py --workdir runs/wine
    python experiments/wine.py --baselines      # scikit-learn on the same split

summary.json gains macro F1, per-class precision/recall and the confusion matrix (also
drawn as confusion.png).
"""

import ml_collections

from jaxdl.configs.tabular import tabular_config


def get_config() -> ml_collections.ConfigDict:
    c = tabular_config("sklearn:wine", task="classification", num_classes=3)
    c.data.batch_size = 16
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
