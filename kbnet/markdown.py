"""The one Markdown table writer of the project: benchmark tables, evaluation summaries and per-image reports.

One layout everywhere, so reports read alike and tests parse them alike: a GitHub pipe table, one space inside
each pipe, the leading text columns (names, labels) aligned left and the columns after them (measurements) right,
so numbers line up by their last digit in a rendered table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], text_columns: int = 1) -> str:
    """``header`` and ``rows`` (cells as ``str`` writes them) as a table without a final newline; the first
    ``text_columns`` columns are left-aligned, the others right-aligned. A row of another length than the header
    would shift its cells under the wrong columns, so it is refused."""
    body = [[str(cell) for cell in row] for row in rows]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"table row {i} has {len(row)} cells, the header {len(header)}: {row}")
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(line) + " |" for line in [list(header), align, *body])
