"""The one writer of kr_vlm's text tables: Markdown (results, benchmark pages, the console off a terminal)
and CSV (the same numbers for a spreadsheet or pandas)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Align = Literal["left", "right"]


def markdown_cell(value: Any) -> str:
    """A value as one Markdown table cell: ``|`` escaped and line breaks as ``<br>``, so that a cell never
    splits the row (a path, a label made of settings, a message)."""
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def markdown_table(
    header: Sequence[Any], rows: Sequence[Sequence[Any]], align: Sequence[Align] | Align = "left"
) -> str:
    """A Markdown (GitHub) table, one line a row, without a final newline. ``align``: every column's, or
    one a column (``right`` for numbers)."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    if len(aligns) != len(header):
        raise ValueError(f"{len(aligns)} alignments for {len(header)} columns")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under {len(header)} columns: {list(row)}")
    lines = [_row(header), "|" + "|".join("---:" if a == "right" else "---" for a in aligns) + "|"]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(markdown_cell(cell) for cell in cells) + " |"


def csv_text(rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> str:
    """Rows as CSV text with a header: ``fields`` (default: every key of the rows, in the order they first
    come); None and missing values are empty cells."""
    fields = list(fields) if fields is not None else list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()
