"""Reading the Markdown tables the benchmarks print."""

from __future__ import annotations


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]
