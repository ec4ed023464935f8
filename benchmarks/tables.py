"""Markdown tables for the benchmarks' reports; no torch, so a report can be written where torch is missing."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table: the first `text_columns` columns left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "| " + " | ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in pairs) + " |"

    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    print(markdown_table(header, rows))
