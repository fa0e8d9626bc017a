"""Any CSV: the task is inferred from the label column unless `task` is set.

    python experiments/make_tabular_csv.py runs/loans.csv
    jaxdl train --config experiments/tabular_csv.py --workdir runs/loans \
        --config.data.source=csv:runs/loans.csv --config.data.label_column=default
    python experiments/tabular_csv.py --baselines \
        --config.data.source=csv:runs/loans.csv --config.data.label_column=default

Two label values -> binary, a few integers or strings -> classification, other numbers
-> regression, "a,b,c" (several 0/1 columns) -> multilabel; `jaxdl train` prints what it
chose and why. Columns without a numeric value are categorical (embedded by
`tabular_mlp`); list others in data.categorical_columns. Missing numeric values take the
train mean (data.missing="mean"), or are an error ("error").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "tabular_mlp", "num_classes": 1, "hidden": (64, 32), "dropout_rate": 0.1}
    c.data = {"source": "csv:runs/loans.csv", "label_column": "default", "batch_size": 64}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 30
    c.log_every = 50
    c.best_metric = "val_loss"  # defined for every task
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
