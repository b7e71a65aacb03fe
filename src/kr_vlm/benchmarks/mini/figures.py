"""The benchmark's figures: the 16-shot results of each mode as bars (``mini_benchmark.png``), and the ID /
OOD frontiers drawn by ``kr_vlm.results.frontier_figure`` (``mini_benchmark_frontier.png``: one row a
method, over α and the learning rates, CLIP-LoRA's recipe; ``mini_benchmark_frontier_authors.png``: the
authors' recipe)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kr_vlm.benchmarks.mini.protocol import METHODS_BY_KEY
from kr_vlm.benchmarks.mini.tables import SUMMARY_COLUMNS, BenchmarkRuns
from kr_vlm.results import Frontier, Table

# The panels of a method's row, left to right.
PROTOCOL_ORDER = ("distribution_shift", "cross_dataset", "base_to_new")
# The summary columns the bars show: ID, then each protocol's OOD target.
BARS = ("digits (ID)", "shifted avg", "glyphs", "new")


def summary_figure(tables: Sequence[Table]) -> Any:
    """One panel a mode: for each method, bars of its ID top-1 and of each OOD target (zero-shot first)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5 * len(tables), 5.2))
    axes_list = figure.subplots(1, len(tables), squeeze=False)[0]
    columns = [column for column, _, _ in SUMMARY_COLUMNS]
    for axes, table in zip(axes_list, tables, strict=True):
        width = 0.8 / len(BARS)
        for index, bar in enumerate(BARS):
            position = columns.index(bar) + 3  # after method, lr, trainable params
            values = [_mean(row[position]) for row in table.rows]
            offset = (index - (len(BARS) - 1) / 2) * width
            axes.bar([i + offset for i in range(len(table.rows))], values, width, label=bar)
        axes.set_xticks(
            range(len(table.rows)), [row[0] for row in table.rows], rotation=35, ha="right", fontsize=7
        )
        axes.set_ylim(0, 100)
        axes.set_ylabel("top-1 %")
        axes.set_title(table.title.split(":")[0], fontsize=8, wrap=True)
        axes.grid(axis="y", alpha=0.3)
    handles, labels = axes_list[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(BARS), fontsize=8, frameon=False)
    figure.suptitle("Mini benchmark, 16 shots: ID (digits) and OOD top-1, mean over seeds")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return figure


def _mean(cell: str) -> float:
    return 0.0 if cell == "–" else float(cell.split(" ")[0])


def per_method_frontiers(
    frontier_list: Sequence[Frontier], data: BenchmarkRuns
) -> tuple[list[Frontier], list[str]]:
    """Each frontier cut into one a method (the method's runs, the panel's zero-shot), in rows of the
    benchmark's methods and columns of `PROTOCOL_ORDER`, and a title for each."""
    by_protocol = {frontier.panel.protocol: frontier for frontier in frontier_list}
    rows: dict[str, dict[str, Frontier]] = {}
    for protocol in PROTOCOL_ORDER:
        frontier = by_protocol.get(protocol)
        if frontier is None:
            continue
        for runs_of_row in frontier.methods().values():
            members = [run for runs in runs_of_row.values() for run in runs]
            method = data.method_of(members[0].folder)
            rows.setdefault(method, {})[protocol] = dataclasses.replace(frontier, runs=members)
    panels, titles = [], []
    for method in [key for key in METHODS_BY_KEY if key in rows]:
        for protocol in PROTOCOL_ORDER:
            if protocol in rows[method]:
                panel = rows[method][protocol]
                panels.append(panel)
                titles.append(f"{METHODS_BY_KEY[method].label}: {protocol.replace('_', ' ')}")
    return panels, titles


def frontier_png(frontier_list: Sequence[Frontier], data: BenchmarkRuns | None, title: str) -> bytes:
    """The frontier figure as PNG bytes: per method (with `data`) or every method in one panel a protocol."""
    from kr_vlm.rank_report import png
    from kr_vlm.results.frontier_figure import frontier_figure

    if data is None:
        ordered = sorted(frontier_list, key=lambda frontier: PROTOCOL_ORDER.index(frontier.panel.protocol))
        figure: Any = frontier_figure(ordered, columns=len(PROTOCOL_ORDER), title=title)
    else:
        panels, titles = per_method_frontiers(frontier_list, data)
        figure = frontier_figure(panels, titles=titles, columns=len(PROTOCOL_ORDER), title=title)
    return png(figure)
