"""Compare the weight updates of several runs: one self-contained HTML page, and the same data as CSV.

    python scripts/rank_dashboard.py logs/demo/multiruns/<time>        (or: kr-vlm-dashboard ...)
    python scripts/rank_dashboard.py <run folder> <run folder> ... -o comparison/

Every training run with the rank monitor on writes ``rank_history.json`` (and ``metrics.json`` once it has
been tested); a folder given here is a run folder or any folder above run folders, such as a sweep.
The page shows, per group of layers (tower × layer type), the effective rank of every run over the
steps, the final singular-value spectra (normalised), the relative update size ``‖ΔW‖_F / ‖W0‖_F``, a
heat map of every layer's effective rank over the steps for each run, each method's rank cap, and, for
tested runs, test accuracy against effective rank (on the training dataset, and averaged over shifted
domains, new classes or other datasets). Runs are labelled by the settings in which they differ
(method, shots, seed, learning rate, ...). When runs below the folders were tested at several update
scales (``adapter_scales``), the page adds each method's ID / OOD frontier (``kr_vlm.results.frontier``):
its figure and tables, from every ``metrics.json`` below the folders, evaluations included.

This module reads the runs' files only; it imports neither torch nor the training code.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kr_vlm import results
from kr_vlm.errors import CorruptFileError, MissingFileError, command_boundary
from kr_vlm.files import new_output_folder, write_text_atomic
from kr_vlm.rank_report import (
    DELTA_NORM_HTML,
    EFFECTIVE_RANK_EXPLANATION,
    RELATIVE_UPDATE_HTML,
    RELATIVE_UPDATE_LABEL,
    SIGMA_RATIO_LABEL,
    cap_text,
    fmt,
    html_page,
    html_table,
    image_tag,
    layer_group,
    layers_by_group,
    mean,
    method_styles,
    normalised_mean_spectrum,
    panel_grid,
    png,
    rank_cap,
    relative_update,
)
from kr_vlm.results import RECIPE_KEYS, config_settings
from kr_vlm.results import Run as ResultsRun

HISTORY_FILE = "rank_history.json"
METRICS_FILE = "metrics.json"
PAGE_FILE = "rank_dashboard.html"
RUNS_CSV = "rank_dashboard_runs.csv"
LAYERS_CSV = "rank_dashboard_layers.csv"
SPECTRA_CSV = "rank_dashboard_spectra.csv"

# A method's options (and targets) are compared among the runs of that method only: LoRA's r is not a
# difference between a LoRA run and a KRAdapter run.
METHOD_OPTIONS_PREFIX = "model.adapter."
# What each test set's role (kr_vlm.results) makes it in the accuracy plot.
CLEAN_ROLES = ("source", "base")
OTHER_ROLES = ("shift", "cross", "new")
# The settings a label names first, and how.
_LABEL_ORDER = ("method", "dataset", "shots", "seed")


@dataclass
class RankRun:
    """One run folder: its rank history, its test results if it was tested, and its label."""

    folder: Path
    history: dict[str, Any]
    metrics: dict[str, Any] | None
    label: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        if self.metrics and self.metrics.get("method"):
            return str(self.metrics["method"])
        return ", ".join((self.history.get("parameters") or {}).get("methods", [])) or "unknown"

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.history["layers"]

    def groups(self) -> dict[str, list[str]]:
        return layers_by_group(self.layers)

    def group_series(self, names: Sequence[str], values_of) -> list[float | None]:
        """The mean over ``names`` of ``values_of(layer info)`` at every evaluation."""
        series = [values_of(self.layers[name]) for name in names]
        return [mean(values[index] for values in series) for index in range(len(self.history["steps"]))]

    def final(self, metric: str, names: Iterable[str] | None = None) -> float | None:
        names = list(self.layers if names is None else names)
        return mean(self.layers[name][metric][-1] for name in names if self.layers[name][metric])

    def final_relative_update(self, names: Iterable[str] | None = None) -> float | None:
        names = list(self.layers if names is None else names)
        return mean(
            relative_update(self.layers[name])[-1] for name in names if self.layers[name]["frobenius_norm"]
        )

    def final_percent_of_cap(self, names: Iterable[str] | None = None) -> float | None:
        names = list(self.layers if names is None else names)
        return mean(
            100 * self.layers[name]["effective_rank"][-1] / rank_cap(self.layers[name])
            for name in names
            if self.layers[name]["effective_rank"] and self.layers[name]["effective_rank"][-1] is not None
        )

    def final_spectrum(self, names: Sequence[str]) -> list[float] | None:
        """The normalised mean spectrum of the layers, cut at their rank cap (past it: round-off)."""
        spectra = self.history.get("final_spectra") or {}
        spectrum = normalised_mean_spectrum(spectra[name] for name in names if name in spectra)
        return None if spectrum is None else spectrum[: max(rank_cap(self.layers[name]) for name in names)]

    def accuracy(self) -> tuple[float | None, float | None]:
        """Top-1 (percent) on the training dataset's own test set, and averaged over the other test sets
        (shifted domains, other datasets); None where the run has no such results."""
        if not self.metrics:
            return None, None
        roles = ResultsRun(self.folder / METRICS_FILE, self.metrics).test_roles()
        top1 = {name: values.get("top1") for name, values in (self.metrics.get("test") or {}).items()}

        def percent(wanted: Sequence[str]) -> list[float]:
            return [
                100 * top1[name]
                for name, role in roles.items()
                if role in wanted and top1.get(name) is not None
            ]

        clean = percent(CLEAN_ROLES)
        return (clean[0] if clean else None), mean(percent(OTHER_ROLES))


# -------------------------------------------------------------------------------------- reading runs
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptFileError(
            f"{path} is not valid JSON ({error}). A run still writing it may have been stopped; leave that "
            "run out, or run the dashboard again once it has finished."
        ) from None


def find_runs(folders: Sequence[str | Path]) -> list[RankRun]:
    """Every run at or below ``folders`` that has a ``rank_history.json``, in the order given (and, below
    a folder, in path order with job numbers counted as numbers)."""
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no such folder. Give run folders or folders of runs (sweeps).")
        found = sorted(folder.rglob(HISTORY_FILE), key=lambda path: _natural_key(path.relative_to(folder)))
        if not found:
            raise MissingFileError(
                f"No {HISTORY_FILE} at or below {folder}. Training runs write one when the rank monitor is on "
                "(callbacks.rank_monitor, part of callbacks=default)."
            )
        paths.extend(path.resolve() for path in found if path.resolve() not in paths)
    runs = []
    for path in paths:
        metrics_path = path.parent / METRICS_FILE
        metrics = _read_json(metrics_path) if metrics_path.is_file() else None
        runs.append(RankRun(path.parent, _read_json(path), metrics))
    label_runs(runs)
    return runs


def _natural_key(path: Path) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def run_settings(run: RankRun) -> dict[str, Any]:
    """What a run trained: its method, dataset, shots and seed, and its recipe (``kr_vlm.results``'s
    ``RECIPE_KEYS``: model and adapter config, optimizer, sampler, ...) as dotted keys."""
    settings: dict[str, Any] = {"method": run.method}
    if run.metrics:
        settings.update(
            {key: run.metrics[key] for key in _LABEL_ORDER[1:] if run.metrics.get(key) is not None}
        )
        recipe = config_settings(run.metrics.get("config") or {}, RECIPE_KEYS)
        settings.update({key: value for key, value in recipe.items() if key != "model.adapter.method"})
    return settings


def differing_settings(runs: Sequence[RankRun]) -> list[str]:
    """The settings in which some runs differ, ``_LABEL_ORDER`` first. A method's options count among the
    runs of that method only; a setting some runs lack (not tested, no config) is no difference."""
    keys = list(dict.fromkeys(key for run in runs for key in run.settings))

    def differs(key: str, among: Sequence[RankRun]) -> bool:
        values = {json.dumps(run.settings[key], default=str) for run in among if key in run.settings}
        return len(values) > 1

    by_method: dict[str, list[RankRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    differing = [
        key
        for key in keys
        if (
            any(differs(key, group) for group in by_method.values())
            if key.startswith(METHOD_OPTIONS_PREFIX)
            else differs(key, runs)
        )
    ]
    return [key for key in _LABEL_ORDER if key in differing] + [
        key for key in differing if key not in _LABEL_ORDER
    ]


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends in (``model.optimizer.lr`` -> ``lr``)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def label_runs(runs: Sequence[RankRun]) -> None:
    """Set each run's ``settings`` and a ``label`` made of the settings in which the runs differ (the
    method alone when they differ in nothing; the folder name is added where labels would repeat)."""
    for run in runs:
        run.settings = run_settings(run)
    differing = differing_settings(runs)
    names = _short_names(differing)
    for run in runs:
        parts = [_label_part(names[key], run.settings[key]) for key in differing if key in run.settings]
        run.label = ", ".join(parts) if parts else run.method
        if "method" not in differing and parts:
            run.label = f"{run.method}, {run.label}"
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.folder.name})"


def _label_part(name: str, value: Any) -> str:
    if name == "method":
        return str(value)
    if name == "shots":
        return f"{value} shots"
    if name == "seed":
        return f"seed {value}"
    if name == "dataset":
        return str(value)
    if isinstance(value, str) and value.startswith("["):  # a list, as _flatten keeps it
        value = ", ".join(map(str, json.loads(value))).join("[]")
    return f"{name}={value}"


# ------------------------------------------------------------------------------------------- figures
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
        axes.set_xlabel("step", fontsize="small")

    return _per_group_figure(
        runs,
        "Effective rank over steps (mean over the group's layers; dotted: each run's rank cap)",
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
        len(runs), "Effective rank of every layer over the steps (one colour scale)", columns=2
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
            vmin=0,
            vmax=top,
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
        figure.colorbar(image, ax=panels, shrink=0.8, label="effective rank")
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


# ----------------------------------------------------------------------------------------------- CSV
def run_rows(runs: Sequence[RankRun]) -> list[dict[str, Any]]:
    """One row a run: its label, folder, the settings the runs differ in, caps, final ranks and accuracy."""
    differing = differing_settings(runs)
    rows = []
    for run in runs:
        clean, shifted = run.accuracy()
        parameters = run.history.get("parameters") or {}
        row = {
            "label": run.label,
            "folder": str(run.folder),
            "method": run.method,
            **{key: run.settings.get(key) for key in differing if key != "method"},
            "steps": run.history.get("final_step"),
            "trainable_params": parameters.get("trainable"),
            "rank_cap": cap_text(rank_cap(info) for info in run.layers.values()),
            "effective_rank": run.final("effective_rank"),
            "percent_of_cap": run.final_percent_of_cap(),
            "relative_update": run.final_relative_update(),
            "top1_clean": clean,
            "top1_shifted": shifted,
        }
        for name, values in ((run.metrics or {}).get("test") or {}).items():
            if values.get("top1") is not None:
                row[f"top1/{name}"] = 100 * values["top1"]
        rows.append(row)
    return rows


def layer_rows(runs: Sequence[RankRun]) -> list[dict[str, Any]]:
    """One row a run, layer and evaluation: the data of the heat maps and the per-group curves."""
    rows = []
    for run in runs:
        for name, info in run.layers.items():
            relative = relative_update(info)
            for index, step in enumerate(run.history["steps"]):
                rows.append(
                    {
                        "label": run.label,
                        "layer": name,
                        "group": layer_group(info),
                        "rank_cap": rank_cap(info),
                        "step": step,
                        "effective_rank": info["effective_rank"][index],
                        "stable_rank": info["stable_rank"][index],
                        "frobenius_norm": info["frobenius_norm"][index],
                        "relative_update": relative[index],
                    }
                )
    return rows


def spectrum_rows(runs: Sequence[RankRun]) -> list[dict[str, Any]]:
    """One row a run, group and singular value index: the normalised final spectra as plotted."""
    rows = []
    for run in runs:
        for group, names in run.groups().items():
            for index, value in enumerate(run.final_spectrum(names) or [], start=1):
                rows.append({"label": run.label, "group": group, "index": index, "sigma_ratio": value})
    return rows


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    import io

    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- page
def frontier_sections(frontier_list: Sequence[results.Frontier]) -> list[str]:
    """The page's frontier: the figure, and each frontier's table with its notes (none without frontiers)."""
    if not frontier_list:
        return []
    from kr_vlm.results.frontier_figure import frontier_figure

    sections = [
        "<h2>ID / OOD frontier</h2>",
        image_tag(png(frontier_figure(frontier_list)), "ID against OOD top-1 over the update scale and the runs"),
    ]
    for table in map(results.frontier_table, frontier_list):
        notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in table.notes)
        sections += [f"<h3>{html.escape(table.title)}</h3>", html_table(table.header, table.rows), notes]
    return sections


def page(
    runs: Sequence[RankRun],
    title: str,
    output_dir: Path | None = None,
    frontier_list: Sequence[results.Frontier] = (),
) -> str:
    """The dashboard's HTML; run folders below ``output_dir`` are shown relative to it."""
    summary = run_rows(runs)
    run_table = html_table(
        [
            "run",
            "method",
            "steps",
            "trainable",
            "rank cap",
            "effective rank",
            "% of cap",
            RELATIVE_UPDATE_HTML,
            "top-1 % (clean)",
            "top-1 % (shifted)",
            "folder",
        ],
        [
            [
                row["label"],
                row["method"],
                row["steps"],
                _count(row["trainable_params"]),
                row["rank_cap"],
                fmt(row["effective_rank"]),
                fmt(row["percent_of_cap"], 1),
                fmt(row["relative_update"], 4),
                fmt(row["top1_clean"]),
                fmt(row["top1_shifted"]),
                _shown_path(Path(row["folder"]), output_dir),
            ]
            for row in summary
        ],
    )
    group_rows = [
        [
            run.label,
            group,
            cap_text(rank_cap(run.layers[name]) for name in names),
            fmt(run.final("effective_rank", names)),
            fmt(run.final_percent_of_cap(names), 1),
            fmt(run.final("stable_rank", names)),
            fmt(run.final("frobenius_norm", names), 4),
            fmt(run.final_relative_update(names), 4),
        ]
        for group in all_groups(runs)
        for run in runs
        if (names := run.groups().get(group))
    ]
    group_table = html_table(
        [
            "run",
            "group",
            "rank cap",
            "effective rank",
            "% of cap",
            "stable rank",
            DELTA_NORM_HTML,
            RELATIVE_UPDATE_HTML,
        ],
        group_rows,
    )
    sections = [
        f"<h1>{title}</h1>",
        f"<p>{len(runs)} runs, labelled by the settings they differ in. The same data is in "
        f"<code>{RUNS_CSV}</code>, <code>{LAYERS_CSV}</code> and <code>{SPECTRA_CSV}</code> beside this page.</p>",
        "<h2>Runs</h2>",
        run_table,
        '<p class="note">Effective rank, % of cap and relative update size: means over all adapted layers at the '
        "final step. Clean: the training dataset's test set (its base classes, base-to-new); shifted: the mean over "
        "its shifted domains, its new classes or other datasets.</p>",
        "<h2>Effective rank over steps</h2>",
        image_tag(png(rank_over_steps_figure(runs)), "effective rank over steps per group, one line per run"),
        "<h2>Every layer over the steps</h2>",
        image_tag(png(heat_maps_figure(runs)), "heat maps of every layer's effective rank over the steps"),
        "<h2>Final singular value spectra</h2>",
        image_tag(png(spectra_figure(runs)), "normalised final singular values per group"),
        "<h2>Relative update size</h2>",
        image_tag(png(relative_update_figure(runs)), "relative update size over steps per group"),
    ]
    accuracy = accuracy_figure(runs)
    if accuracy is not None:
        sections += [
            "<h2>Accuracy and effective rank</h2>",
            image_tag(png(accuracy), "test accuracy against effective rank"),
        ]
    sections += frontier_sections(frontier_list)
    sections += [
        "<h2>Final values per group</h2>",
        f"<details><summary>{len(group_rows)} rows</summary>{group_table}</details>",
        "<h2>What effective rank means</h2>",
        f"<p>{EFFECTIVE_RANK_EXPLANATION}</p>",
    ]
    return html_page(title, "\n".join(sections))


def _shown_path(folder: Path, output_dir: Path | None) -> str:
    if output_dir is not None and folder.is_relative_to(output_dir.resolve()):
        return str(folder.relative_to(output_dir.resolve()))
    return str(folder)


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def write_dashboard(
    runs: Sequence[RankRun],
    output_dir: Path,
    title: str = "Effective rank across runs",
    frontier_list: Sequence[results.Frontier] = (),
) -> list[Path]:
    """Write the page and the three CSV files into ``output_dir``; returns their paths."""
    files = {
        PAGE_FILE: page(runs, title, output_dir, frontier_list),
        RUNS_CSV: csv_text(run_rows(runs)),
        LAYERS_CSV: csv_text(layer_rows(runs)),
        SPECTRA_CSV: csv_text(spectrum_rows(runs)),
    }
    for name, text in files.items():
        write_text_atomic(output_dir / name, text)
    return [output_dir / name for name in files]


def main(argv: Sequence[str] | None = None) -> int:
    """``kr-vlm-dashboard <run or sweep folders...> [-o folder]``."""
    parser = argparse.ArgumentParser(
        prog="rank_dashboard.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or folders above them (a sweep)")
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        help="where to write the page and the CSV files (default: the folder given, when there is one, "
        "else a new folder, logs/rank_dashboard/<date>_<time>)",
    )
    parser.add_argument("--title", default="Effective rank across runs", help="the page's title")
    args = parser.parse_args(argv)
    with command_boundary():
        runs = find_runs(args.folders)
        output_dir = args.output_dir or (
            args.folders[0] if len(args.folders) == 1 else new_output_folder("rank_dashboard")
        )
        tested = [run for folder in args.folders for run in results.load_runs(folder)]
        scaled = any("test_by_scale" in run.metrics for run in tested)
        written = write_dashboard(runs, output_dir, args.title, results.frontiers(tested) if scaled else ())
        print(f"{len(runs)} runs: {', '.join(run.label for run in runs)}; written to {output_dir}:")
        for path in written:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
