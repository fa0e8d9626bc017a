"""Multi-label tagging: each row carries any subset of 5 labels (per-label sigmoids).

    python experiments/multilabel_csv.py --make-data runs/multilabel.csv
    jaxdl train --config experiments/multilabel_csv.py --workdir runs/multilabel
    python experiments/multilabel_csv.py --baselines      # scikit-learn on the same split

The CSV is scikit-learn's `make_multilabel_classification` (documents as bag-of-words
counts over 20 words, each drawing about 2 of 5 topics; seed 0, 2,000 rows), written as
f00..f19 and the 0/1 columns tag_0..tag_4. Several 0/1 label columns make the task
"multilabel"; summary.json reports micro/macro F1 at 0.5, subset accuracy, macro ROC AUC
and per-label ROC AUC and F1 on the test rows.
"""

import ml_collections

NUM_ROWS = 2000
NUM_FEATURES = 20
NUM_LABELS = 5
LABELS = ",".join(f"tag_{j}" for j in range(NUM_LABELS))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.task = "multilabel"
    c.model = {
        "name": "tabular_mlp",
        "num_classes": NUM_LABELS,
        "hidden": (64, 32),
        "dropout_rate": 0.1,
    }
    c.data = {"source": "csv:runs/multilabel.csv", "label_column": LABELS, "batch_size": 64}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 40
    c.log_every = 50
    c.best_metric = "val_macro_f1"
    return c


def make_data(out: str, rows: int = NUM_ROWS, seed: int = 0) -> None:
    """Write `rows` rows of make_multilabel_classification(random_state=seed) to `out`."""
    import csv
    from pathlib import Path

    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(
        n_samples=rows,
        n_features=NUM_FEATURES,
        n_classes=NUM_LABELS,
        n_labels=2,
        random_state=seed,
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"f{i:02d}" for i in range(NUM_FEATURES)), *LABELS.split(",")])
        writer.writerows([*map(int, xs), *map(int, ys)] for xs, ys in zip(x, y, strict=True))
    print(f"{path}: {rows} rows, label frequencies {y.mean(axis=0).round(3).tolist()}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--make-data":
        make_data(sys.argv[2])
    else:
        from jaxdl.training.baselines import main

        sys.exit(main(get_config(), sys.argv[1:]))
