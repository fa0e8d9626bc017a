"""Any CSV or Parquet table: the task is inferred from the label column unless `task` is set.

    jaxdl train --config tabular --workdir runs/loans \
        --config.data.source=csv:runs/loans.csv --config.data.label_column=default

`tabular_config` is the base the table experiments (experiments/breast_cancer.py, wine.py,
diabetes.py, tabular_csv.py) start from: a `tabular_mlp` (64-32, dropout 0.1), AdamW, 60
epochs; each sets its source and task and changes only what differs.
"""

import ml_collections


def tabular_config(source: str, *, task: str | None = None, num_classes: int = 1):
    """The shared table config for `source` (``data.source``); `task` None: inferred."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    if task is not None:
        c.task = task
    c.model = {
        "name": "tabular_mlp",
        "num_classes": num_classes,
        "hidden": (64, 32),
        "dropout_rate": 0.1,
    }
    c.data = {"source": source, "batch_size": 32}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 60
    c.log_every = 20
    c.best_metric = "val_loss"  # defined for every task
    return c


def get_config() -> ml_collections.ConfigDict:
    c = tabular_config("csv:runs/loans.csv")
    c.data.label_column = "default"
    c.data.batch_size = 64
    c.num_epochs = 30
    c.log_every = 50
    return c
