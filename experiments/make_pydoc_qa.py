"""Write the pydoc question-answer set (chat rows from Python's own documentation).

    python experiments/make_pydoc_qa.py runs/pydoc_qa [--seed 0]
    jaxdl train --config sft --config.data.source=jsonl:runs/pydoc_qa ...

train.jsonl / val.jsonl / test.jsonl of {"topic", "messages"} rows, held out by topic: see
`jaxdl.data.pydoc_qa` for how the questions and answers are cut from `pydoc_data.topics`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdl.data.pydoc_qa import write_pydoc_qa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_pydoc_qa(args.out, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


if __name__ == "__main__":
    main()
