"""Medical diagnosis (the article's chapter 6): malignant vs benign tumours, binary.

    jaxdl train --config experiments/breast_cancer.py --workdir runs/breast_cancer
    python experiments/breast_cancer.py --baselines      # scikit-learn on the same split

scikit-learn's Wisconsin breast cancer table (569 rows, 30 numeric features), split
70/10/20 stratified with the run seed, standardized on the train rows. The positive class
is "malignant"; the summary reports ROC AUC, PR AUC, F1/precision/recall at 0.5 and the
threshold that maximizes F1 on val.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.task = "binary"
    c.model = {"name": "tabular_mlp", "num_classes": 1, "hidden": (64, 32), "dropout_rate": 0.1}
    c.data = {"source": "sklearn:breast_cancer", "batch_size": 32}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 60
    c.log_every = 20
    c.best_metric = "val_roc_auc"
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
