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
import html
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kr_vlm import results
from kr_vlm.dashboard_figures import (
    accuracy_figure,
    all_groups,
    heat_maps_figure,
    rank_over_steps_figure,
    relative_update_figure,
    spectra_figure,
)
from kr_vlm.errors import CorruptFileError, MissingFileError, command_boundary
from kr_vlm.files import new_output_folder, write_text_atomic
from kr_vlm.metric_names import METRICS_FILE
from kr_vlm.rank_report import (
    DELTA_NORM_HTML,
    EFFECTIVE_RANK_EXPLANATION,
    HISTORY_FILE,
    RELATIVE_UPDATE_HTML,
    cap_text,
    fmt,
    html_page,
    html_table,
    image_tag,
    layer_group,
    layers_by_group,
    mean,
    normalised_mean_spectrum,
    png,
    rank_cap,
    relative_update,
)
from kr_vlm.results import Run as ResultsRun
from kr_vlm.results import labels
from kr_vlm.table_text import csv_text

PAGE_FILE = "rank_dashboard.html"
RUNS_CSV = "rank_dashboard_runs.csv"
LAYERS_CSV = "rank_dashboard_layers.csv"
SPECTRA_CSV = "rank_dashboard_spectra.csv"

# What each test set's role (kr_vlm.results) makes it in the accuracy plot.
CLEAN_ROLES = ("source", "base")
OTHER_ROLES = ("shift", "cross", "new")


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


def label_runs(runs: Sequence[RankRun]) -> None:
    """Set each run's ``settings`` and a ``label`` made of the settings in which the runs differ
    (``kr_vlm.results.labels.run_labels``); the folder name is added where labels would repeat."""
    for run in runs:
        run.settings = labels.run_settings(run.method, run.metrics)
    for run, label in zip(runs, labels.run_labels([run.settings for run in runs]), strict=True):
        run.label = label
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.folder.name})"


# ----------------------------------------------------------------------------------------------- CSV
def run_rows(runs: Sequence[RankRun]) -> list[dict[str, Any]]:
    """One row a run: its label, folder, the settings the runs differ in, caps, final ranks and accuracy."""
    differing = labels.differing_run_settings([run.settings for run in runs])
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
