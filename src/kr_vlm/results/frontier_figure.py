"""The frontier figure: one plot a frontier, ID top-1 against OOD top-1, every run a line through its
update scales α (from zero-shot, the star, to α = 1, the large marker); a colour per method, a marker and
line style per configuration (learning rate), shared by its seeds. Drawn with the dashboard's figure
helpers (``kr_vlm.rank_report``); matplotlib is imported only here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kr_vlm.rank_report import method_styles, panel_grid
from kr_vlm.results.frontier import AXES, Frontier, _swept_text
from kr_vlm.results.labels import table_labels

TITLE = "ID / OOD frontier over the update scale α and the learning rate"
COLUMNS = 2


def frontier_figure(
    frontier_list: Sequence[Frontier],
    titles: Sequence[str] | None = None,
    columns: int = COLUMNS,
    title: str = TITLE,
) -> Any:
    """A matplotlib ``Figure`` of every frontier (``kr_vlm.rank_report.png`` renders it), in rows of
    `columns` plots, each titled by its panel's name or by `titles`."""
    figure, panels = panel_grid(len(frontier_list), title, columns=columns)
    # Square-ish plots with room for the axis labels: the grid's default cells are for line plots.
    columns = min(columns, len(frontier_list))
    rows = -(-len(frontier_list) // columns)
    height = 4.6 * rows + 0.6
    figure.set_size_inches(5.5 * columns, height)
    figure.subplots_adjust(
        left=0.12 / columns, right=0.98, bottom=0.5 / height, top=1 - 0.8 / height, hspace=0.45, wspace=0.3
    )
    titles = [frontier.panel.name for frontier in frontier_list] if titles is None else titles
    for axes, frontier, panel_title in zip(panels, frontier_list, titles, strict=True):
        methods = frontier.methods()
        labels = table_labels(methods)
        configurations = [(row, swept) for row in sorted(methods, key=labels.get) for swept in methods[row]]
        styles = method_styles([labels[row] for row, _ in configurations])
        for (row, swept), style in zip(configurations, styles, strict=True):
            for index, run in enumerate(methods[row][swept]):
                alphas = sorted(run.points)
                xs = [run.points[alpha][0] for alpha in alphas]
                ys = [run.points[alpha][1] for alpha in alphas]
                label = f"{labels[row]}, {_swept_text(swept)}" if index == 0 else None
                axes.plot(xs, ys, markersize=4, linewidth=1, alpha=0.85, label=label, **style)
                if 1.0 in run.points:
                    axes.plot(*run.points[1.0], marker=style["marker"], color=style["color"], markersize=8)
        if frontier.zero_shot is not None:
            axes.plot(
                *frontier.zero_shot,
                marker="*",
                color="black",
                markersize=13,
                linestyle="none",
                label="zero-shot",
                zorder=5,
            )
        id_axis, ood_axis = AXES[frontier.panel.protocol]
        axes.set_title(panel_title, fontsize="small")
        axes.set_xlabel(f"ID top-1 % ({id_axis})", fontsize="x-small")
        axes.set_ylabel(f"OOD top-1 % ({ood_axis})", fontsize="x-small")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="xx-small", loc="best")
    return figure
