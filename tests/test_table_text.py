"""The one writer of Markdown and CSV tables (`kr_vlm.table_text`) and the tables that use it."""

from __future__ import annotations

import csv
import io

import pytest

from kr_vlm.results import Table
from kr_vlm.table_text import csv_text, markdown_table


def cells_of(line: str) -> list[str]:
    """The cells of a Markdown table row, as a Markdown reader splits them (on unescaped pipes)."""
    parts, cell, escaped = [], "", False
    for char in line.strip()[1:-1]:
        if char == "|" and not escaped:
            parts.append(cell.strip())
            cell = ""
        else:
            cell += char
        escaped = char == "\\"
    return [*parts, cell.strip()]


def test_pipes_and_line_breaks_stay_inside_their_cell():
    text = markdown_table(["run", "top-1"], [["lora (targets=[q|v])", "71.2"], ["two\nlines", "3"]], ["left", "right"])
    lines = text.splitlines()
    assert lines[1] == "|---|---:|"
    assert [len(cells_of(line)) for line in lines] == [2, 2, 2, 2]
    assert cells_of(lines[2])[0] == "lora (targets=[q\\|v])" and cells_of(lines[3])[0] == "two<br>lines"


def test_a_row_of_another_width_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells under 2 columns"):
        markdown_table(["a", "b"], [["only one"]])


def test_results_tables_escape_their_labels():
    table = Table("few_shot", "Few-shot", ["method", "shots"], rows=[["kradapter (sampler=a|b)", "16"]])
    row = table.markdown().splitlines()[4]
    assert cells_of(row) == ["kradapter (sampler=a\\|b)", "16"]


def test_csv_text_reads_back_with_empty_cells_for_none():
    rows = [{"label": "a, b", "value": 1.5}, {"label": 'say "x"', "extra": None}]
    read = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert read == [
        {"label": "a, b", "value": "1.5", "extra": ""},
        {"label": 'say "x"', "value": "", "extra": ""},
    ]
