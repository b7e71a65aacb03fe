"""What the command line shows: log records of other libraries kept off the console, tables as Markdown
and lines unbroken in files and pipes, rich tables in a terminal."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console
from rich.table import Table

from kr_vlm.console import ConsoleLogFilter, markdown_table, print_table, stdout_console


@pytest.mark.parametrize(
    ("name", "level", "shown"),
    [
        ("kr_vlm.cli", logging.INFO, True),
        ("hydra.core.utils", logging.INFO, True),
        ("root", logging.INFO, False),  # open_clip's dozen lines a model
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, False),  # GPU available, tips, max_steps
        ("kr_vlm_other", logging.INFO, False),
        ("root", logging.WARNING, True),
        ("lightning.pytorch.utilities.rank_zero", logging.ERROR, True),
    ],
)
def test_the_console_shows_kr_vlm_and_hydra_and_every_warning(name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    assert ConsoleLogFilter().filter(record) is shown


def parameter_like_table() -> Table:
    table = Table(title="Parameters ([b]kradapter[/b])", show_footer=True)
    table.add_column("tower", footer="total")
    table.add_column("trainable", justify="right", footer="3,000")
    table.add_row("vision", "1,000")
    table.add_row("[green]text|x[/green]", "2,000")
    return table


def test_a_table_is_markdown_outside_a_terminal():
    assert markdown_table(parameter_like_table()).splitlines() == [
        "Parameters (kradapter)",
        "",
        "| tower | trainable |",
        "|---|---:|",
        "| vision | 1,000 |",
        "| text\\|x | 2,000 |",
        "| total | 3,000 |",
    ]


def test_tables_and_long_lines_in_a_pipe_are_never_wrapped(capsys):
    path = "/a/very/long/path/" + "x" * 150 + "/metrics.json"
    table = Table(title="Datasets")
    table.add_column("note")
    table.add_row(path)
    print_table(table)  # pytest's captured stdout is not a terminal
    stdout_console().print(f"  metrics.json: {path}")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Datasets", "", "| note |", "|---|", f"| {path} |", f"  metrics.json: {path}"]


def test_a_terminal_gets_the_rich_table():
    terminal = Console(file=io.StringIO(), force_terminal=True, width=60, color_system=None)
    print_table(parameter_like_table(), terminal)
    drawn = terminal.file.getvalue()
    assert "┏" in drawn and "| vision |" not in drawn and "3,000" in drawn
