"""Aligned plain-text tables for terminal output (plan, multi-task and demo summaries)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], footer: int = 0) -> str:
    """Cells (already formatted as strings) -> aligned lines with a rule under the header.

    The first column (a name) is left-aligned, the others (numbers) right-aligned; the last
    ``footer`` rows (e.g. a total) get a rule of their own above them.
    """
    table = [list(header), *map(list, rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        rest = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *rest]).rstrip()

    lines = [fmt(line) for line in table]
    rule = "-" * max(map(len, lines))
    body = lines[1:]
    if footer:
        body = [*body[:-footer], rule, *body[-footer:]]
    return "\n".join([lines[0], rule, *body])
