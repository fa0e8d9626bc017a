"""`jaxdl demo`: the README's main job, on data every install has.

``--task digits``: the article's MLP (3.1) and SimpleCNN (5.2.2) trained and evaluated on
scikit-learn's digits, with a table of accuracy, parameters and time.
"""

from __future__ import annotations

from pathlib import Path

from jaxdl import config as config_lib
from jaxdl.logging import write_json

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _experiment_config(name: str):
    """An experiment's config: the packaged copy, else the repository's experiments/."""
    from importlib import resources

    packaged = resources.files("jaxdl") / "experiments" / f"{name}.py"
    path = Path(str(packaged)) if packaged.is_file() else EXPERIMENTS / f"{name}.py"
    return config_lib.load_config(path)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> an aligned text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [
        [format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_digits(workdir: Path) -> list[dict]:
    from jaxdl.trainer import train

    rows = []
    for name in ("digits_mlp", "digits_cnn"):
        print(f"\n== {name}: training on scikit-learn digits ==")
        summary = train(_experiment_config(name), workdir / name)
        rows.append(
            {
                "model": name,
                "test_accuracy": summary["test_accuracy"],
                "params": summary["params"],
                "wall_s": summary["wall_s"],
            }
        )
    table = format_table(
        rows,
        [
            ("model", "model", ""),
            ("test_accuracy", "test acc", ".4f"),
            ("params", "params", ","),
            ("wall_s", "time (s)", ".1f"),
        ],
    )
    print("\n" + table)
    write_json(workdir / "summary.json", {"task": "digits", "rows": rows})
    return rows


def run_demo(workdir: str | Path, task: str = "digits") -> list[dict]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if task == "digits":
        return run_digits(workdir)
    raise ValueError(f"--task: expected one of ['digits'], found {task!r}.")
