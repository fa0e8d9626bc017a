"""Write a loan-default CSV (the article's financial risk) with categorical columns and gaps.

    python experiments/make_tabular_csv.py runs/loans.csv [--rows 4000] [--seed 0]

Columns: age, income, loan_amount, late_payments (numeric; age and income have missing
cells), employment, region, home_owner (categorical strings), default ("yes"/"no").
Default depends on the debt-to-income ratio, late payments, employment, region and an
age x income interaction, so both linear and tree models have something to find. The
draw is a pure function of --seed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

EMPLOYMENT = ("salaried", "self_employed", "unemployed", "retired", "student")
REGIONS = tuple(f"region_{i:02d}" for i in range(12))


def make_rows(rows: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    age = rng.integers(19, 80, rows).astype(float)
    employment = rng.choice(EMPLOYMENT, rows, p=[0.55, 0.15, 0.08, 0.12, 0.10])
    income = np.exp(rng.normal(10.4, 0.5, rows)) * np.where(employment == "unemployed", 0.3, 1.0)
    loan = np.exp(rng.normal(9.3, 0.8, rows))
    late = rng.poisson(np.where(employment == "unemployed", 2.0, 0.6))
    region = rng.choice(REGIONS, rows)
    region_risk = dict(zip(REGIONS, rng.normal(0.0, 0.6, len(REGIONS)), strict=True))
    owner = rng.random(rows) < 0.45 + 0.005 * (age - 40)
    emp_risk = {"salaried": -0.4, "self_employed": 0.3, "unemployed": 1.2, "retired": 0.0}
    emp_risk["student"] = 0.6
    logit = (
        -3.0
        + 1.6 * np.log1p(loan / income * 10)
        + 0.45 * late
        + np.array([emp_risk[e] for e in employment])
        + np.array([region_risk[r] for r in region])
        - 0.5 * owner
        + 0.8 * ((age < 30) & (income < np.median(income)))
    )
    default = rng.random(rows) < 1 / (1 + np.exp(-logit))
    out = []
    for i in range(rows):
        out.append(
            {
                "age": "" if rng.random() < 0.05 else str(int(age[i])),
                "income": "" if rng.random() < 0.08 else f"{income[i]:.0f}",
                "loan_amount": f"{loan[i]:.0f}",
                "late_payments": str(int(late[i])),
                "employment": str(employment[i]),
                "region": str(region[i]),
                "home_owner": "yes" if owner[i] else "no",
                "default": "yes" if default[i] else "no",
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = make_rows(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rate = sum(r["default"] == "yes" for r in rows) / len(rows)
    print(f"wrote {args.out}: {len(rows)} rows, default rate {rate:.3f}")


if __name__ == "__main__":
    main()
