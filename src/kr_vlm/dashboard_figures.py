"""The rank dashboard's figures (``kr_vlm.dashboard``): one plot a group of layers with one line a run, the
heat maps of every layer, and accuracy against effective rank. Effective ranks are drawn on
``rank_report.rank_axis`` (log above 1), so that methods with caps of 2 and of hundreds share a plot."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import SymLogNorm

from kr_vlm.rank_report import (
    RELATIVE_UPDATE_LABEL,
    SIGMA_RATIO_LABEL,
    method_styles,
    panel_grid,
    rank_axis,
    rank_cap,
    relative_update,
)

if TYPE_CHECKING:
    from kr_vlm.dashboard import RankRun


def _run_styles(runs: Sequence[RankRun]) -> list[dict[str, Any]]:
    """A colour per method, and a line style and marker per run within its method."""
    return method_styles([run.method for run in runs])


def all_groups(runs: Sequence[RankRun]) -> list[str]:
    """Every group of any run, in the order they come in the runs' models."""
    return list(dict.fromkeys(group for run in runs for group in run.groups()))


def _per_group_figure(runs: Sequence[RankRun], title: str, ylabel: str, draw) -> Any:
    """One plot a group, one line a run (``draw(axes, run, names, style)`` draws it)."""
    groups = all_groups(runs)
    figure, panels = panel_grid(len(groups), title)
    styles = _run_styles(runs)
    for axes, group in zip(panels, groups, strict=True):
        for run, style in zip(runs, styles, strict=True):
            names = run.groups().get(group)
            if names:
                draw(axes, run, names, style)
        if not axes.lines:
            axes.text(0.5, 0.5, "not recorded", transform=axes.transAxes, ha="center", color="0.5")
        axes.set_title(group, fontsize="medium")
        axes.set_ylabel(ylabel, fontsize="small")
    handles, labels = panels[0].get_legend_handles_labels() if panels else ([], [])
    if handles:
        figure.legend(handles, labels, loc="lower center", ncols=min(4, len(labels)), fontsize="small")
    return figure


def rank_over_steps_figure(runs: Sequence[RankRun]) -> Any:
    def draw(axes, run, names, style):
        series = run.group_series(names, lambda info: info["effective_rank"])
        axes.plot(run.history["steps"], _nan(series), label=run.label, markersize=3, **style)
        cap = max(rank_cap(run.layers[name]) for name in names)
        axes.axhline(cap, color=style["color"], linestyle=(0, (2, 3)), linewidth=1, alpha=0.7)
        rank_axis(axes)
        axes.set_xlabel("step", fontsize="small")

    return _per_group_figure(
        runs,
        "Effective rank over steps (mean over the group's layers; dotted: each run's rank cap; log scale above 1)",
        "effective rank",
        draw,
    )


def relative_update_figure(runs: Sequence[RankRun]) -> Any:
    def draw(axes, run, names, style):
        series = run.group_series(names, relative_update)
        axes.plot(run.history["steps"], _nan(series), label=run.label, markersize=3, **style)
        axes.set_xlabel("step", fontsize="small")

    return _per_group_figure(
        runs,
        f"Relative update size {RELATIVE_UPDATE_LABEL} (mean over the group's layers)",
        "relative size",
        draw,
    )


def spectra_figure(runs: Sequence[RankRun]) -> Any:
    def draw(axes, run, names, style):
        spectrum = run.final_spectrum(names)
        if spectrum is not None:
            style = {**style, "marker": style["marker"] if len(spectrum) <= 8 else None}
            axes.plot(range(1, len(spectrum) + 1), spectrum, label=run.label, markersize=4, **style)
        axes.set_yscale("log")
        axes.set_xlabel("index $i$ (up to the rank cap)", fontsize="small")

    return _per_group_figure(
        runs,
        f"Final singular values {SIGMA_RATIO_LABEL} (mean over the group's layers)",
        SIGMA_RATIO_LABEL,
        draw,
    )


def heat_maps_figure(runs: Sequence[RankRun]) -> Any:
    """For each run, every layer's effective rank (rows, grouped) over the evaluations (columns), on one
    colour scale for all runs."""
    top = max((rank_cap(info) for run in runs for info in run.layers.values()), default=1)
    figure, panels = panel_grid(
        len(runs), "Effective rank of every layer over the steps (one colour scale, log above 1)", columns=2
    )
    image = None
    for axes, run in zip(panels, runs, strict=True):
        groups = run.groups()
        order = [name for names in groups.values() for name in names]
        matrix = np.array([_nan(run.layers[name]["effective_rank"]) for name in order], dtype=float)
        steps = run.history["steps"]
        image = axes.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            # The colours of rank_axis: a rank 2 update is not lost beside a rank 100 one.
            norm=SymLogNorm(linthresh=1, linscale=0.5, vmin=0, vmax=top),
            extent=(-0.5, len(steps) - 0.5, len(order) - 0.5, -0.5),
        )
        starts = np.cumsum([0] + [len(names) for names in groups.values()])
        for start in starts[1:-1]:
            axes.axhline(start - 0.5, color="white", linewidth=0.8)
        axes.set_yticks([(begin + end - 1) / 2 for begin, end in zip(starts[:-1], starts[1:], strict=True)])
        axes.set_yticklabels(list(groups), fontsize="x-small")
        ticks = sorted({0, len(steps) - 1, (len(steps) - 1) // 2})
        axes.set_xticks(ticks)
        axes.set_xticklabels([str(steps[tick]) for tick in ticks], fontsize="x-small")
        axes.set_xlabel("step", fontsize="small")
        axes.set_title(run.label, fontsize="medium")
    if image is not None:
        figure.colorbar(image, ax=panels, shrink=0.8, label="effective rank (log above 1)")
    return figure


def accuracy_figure(runs: Sequence[RankRun]) -> Any | None:
    """Top-1 against the final effective rank (mean over all layers), clean and shifted; None when no run
    was tested."""
    points = [
        (run, style, run.final("effective_rank"), run.accuracy())
        for run, style in zip(runs, _run_styles(runs), strict=True)
    ]
    points = [
        point for point in points if point[2] is not None and any(value is not None for value in point[3])
    ]
    if not points:
        return None
    figure, panels = panel_grid(
        2, "Test accuracy against effective rank (mean over all layers, final step)", columns=2
    )
    for which, (axes, title) in enumerate(
        zip(panels, ("clean: the training dataset", "shifted: other domains, classes, datasets"), strict=True)
    ):
        for run, style, rank, accuracy in points:
            if accuracy[which] is not None:
                axes.plot(
                    [rank],
                    [accuracy[which]],
                    linestyle="none",
                    marker=style["marker"],
                    color=style["color"],
                    markersize=7,
                    label=run.label,
                )
        axes.margins(0.2)
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("effective rank", fontsize="small")
        axes.set_ylabel("top-1 %", fontsize="small")
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncols=min(4, len(labels)), fontsize="small")
    return figure


def _nan(values: Iterable[float | None]) -> list[float]:
    return [math.nan if value is None else value for value in values]
