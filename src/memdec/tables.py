"""The one table renderer: Markdown for reports and the README, aligned text for the terminal."""

from __future__ import annotations


def render_table(header: list[str], rows: list[list[str]], style: str = "markdown", align: str | None = None) -> list[str]:
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
