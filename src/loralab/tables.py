"""Result tables as text: Markdown, CSV or LaTeX, for `report`, `sweep` and `merge --latency`."""

from __future__ import annotations

import csv
import io


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    """The table as Markdown, CSV or LaTeX (booktabs)."""
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        return buffer.getvalue()
    if fmt == "latex":
        escape = lambda text: text.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
        lines.append(" & ".join(map(escape, header)) + r" \\")
        lines.append(r"\midrule")
        lines += [" & ".join(map(escape, row)) + r" \\" for row in rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
