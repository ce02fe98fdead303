"""The one table renderer: Markdown for reports and the README, aligned text for the terminal; and the
statistics helpers its cells show (a 95% Wilson interval of an accuracy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence


def render_table(
    header: list[str], rows: list[list[str]], style: str = "markdown", align: str | None = None
) -> list[str]:
    """Lines of a table of strings. ``style``: ``markdown`` or ``text`` (columns padded to width).

    ``align``: one character per column, ``<`` (left) or ``>`` (right); default: the first
    column left, the others right (text style only: Markdown leaves alignment to the viewer).
    """
    if style == "markdown":
        return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
               ["| " + " | ".join(row) + " |" for row in rows]
    if style != "text":
        raise ValueError(f"unknown table style {style!r}")
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return [" ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)).rstrip() for line in [header, *rows]]



@dataclass(frozen=True)
class Column:
    """One column of a result table: its header, the cell of a row, its alignment in text (``<`` or ``>``)."""

    header: str
    cell: Callable[[Any], str]
    align: str = ">"


def render_columns(rows: Sequence, columns: Sequence[Column], style: str = "markdown") -> list[str]:
    """The result table of ``rows``, one cell per column and row: the renderer of every table of results
    (``memdec eval``'s, the report's and its terminal summary)."""
    body = [[c.cell(r) for c in columns] for r in rows]
    return render_table([c.header for c in columns], body, style, align="".join(c.align for c in columns))


# --- statistics helpers ------------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n], got {correct} of {n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))


def accuracy_entry(acc: float, n: int) -> dict:
    """One system's accuracy on one task: ``acc``, ``n``, ``correct`` and the 95% Wilson interval."""
    correct = int(round(acc * n))
    lo, hi = wilson_interval(correct, n)
    return {"acc": round(acc, 6), "n": n, "correct": correct, "ci95": [round(lo, 6), round(hi, 6)]}
