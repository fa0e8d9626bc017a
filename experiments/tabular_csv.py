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

from jaxdl.configs.tabular import get_config

if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
