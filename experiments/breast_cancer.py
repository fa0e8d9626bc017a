"""Medical diagnosis (the article's chapter 6): malignant vs benign tumours, binary.

    jaxdl train --config experiments/breast_cancer.py --workdir runs/breast_cancer
    python experiments/breast_cancer.py --baselines      # scikit-learn on the same split

scikit-learn's Wisconsin breast cancer table (569 rows, 30 numeric features), split
70/10/20 stratified with the run seed, standardized on the train rows. The positive class
is "malignant"; the summary reports ROC AUC, PR AUC, F1/precision/recall at 0.5 and the
threshold that maximizes F1 on val.
"""

import ml_collections

from jaxdl.configs.tabular import tabular_config


def get_config() -> ml_collections.ConfigDict:
    c = tabular_config("sklearn:breast_cancer", task="binary")
    c.best_metric = "val_roc_auc"
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
