"""What the command line shows, in a terminal, a file or a pipe.

A rich table is drawn to the terminal's width; written to a file or a pipe, rich assumes 80 columns
and wraps cells and paths mid-token, so there tables are printed as Markdown and lines are never
wrapped. Log records of other libraries (open_clip, Lightning) stay out of the console and go to the
run's log file only (``ConsoleLogFilter``, set in ``configs/hydra/default.yaml``).
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kr_vlm import table_text

# Loggers whose INFO records the console shows; everyone's warnings and errors are shown too.
CONSOLE_LOGGERS = ("kr_vlm", "hydra", "__main__")


class ConsoleLogFilter(logging.Filter):
    """Pass warnings and errors, and INFO (or lower) records of kr_vlm and Hydra only.

    open_clip logs a dozen INFO lines on the root logger for every model it builds, Lightning its
    device lines, tips and ``max_steps reached``: the run's log file keeps them, the console does not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == name or record.name.startswith(f"{name}.") for name in CONSOLE_LOGGERS)


def lightning_logs_through_the_run_log() -> None:
    """Send Lightning's log records through the handlers Hydra set up (the console, filtered by
    ``ConsoleLogFilter``, and the run's log file) and nowhere else.

    Importing ``lightning`` gives its logger a console handler of its own. ``configs/hydra/default.yaml``
    removes it when Lightning was imported before Hydra set up logging; the command line imports it
    afterwards (when a run starts, not for ``--help``), so the handler is removed here.
    """
    import lightning  # noqa: F401  (what adds the handler)

    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def stdout_console() -> Console:
    """A rich console on stdout that never breaks a line itself (a terminal wraps long lines softly, and
    a path or a command then copies whole)."""
    return Console(soft_wrap=True, highlight=False)


def _plain(cell: object) -> str:
    return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)


def markdown_table(table: Table) -> str:
    """``table`` as a Markdown table (title above it, footers as a last row), markup removed."""
    columns = table.columns
    cells = [[_plain(cell) for cell in column.cells] for column in columns]
    rows = [list(row) for row in zip(*cells, strict=True)]
    if table.show_footer:
        rows.append([_plain(column.footer) for column in columns])
    text = table_text.markdown_table(
        [_plain(column.header) for column in columns],
        rows,
        ["right" if column.justify == "right" else "left" for column in columns],
    )
    return f"{_plain(table.title)}\n\n{text}" if table.title else text


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table``: drawn by rich in a terminal, as Markdown (``markdown_table``) anywhere else."""
    console = console or stdout_console()
    if console.is_terminal:
        console.print(table)
    else:
        console.print(markdown_table(table), markup=False)
