"""The benchmark's report: ``mini_benchmark.md`` (the setup, the machine and its load, the 16-shot table of
each mode, what the numbers say, the rate choice, the frontiers and every run's protocol tables),
``.csv`` (every number of those tables, with the section it belongs to), ``.json`` (the runs' records
and the rate choice), ``.png`` and the frontier figures. The numbers are read from the run folders by
``kr_vlm.results``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kr_vlm import results
from kr_vlm.benchmarks.mini.figures import frontier_png, per_method_frontiers, summary_figure
from kr_vlm.benchmarks.mini.findings import findings
from kr_vlm.benchmarks.mini.protocol import (
    AUTHORS,
    CLIP_LORA,
    EXPERIMENTS,
    METHODS_BY_KEY,
    SELECTION_SHOTS,
    max_steps,
)
from kr_vlm.benchmarks.mini.tables import (
    MODES,
    BenchmarkRuns,
    rates_table,
    recipe_frontiers,
    recipe_tables,
    summary_table,
)
from kr_vlm.files import write_file_atomic, write_json_atomic, write_text_atomic
from kr_vlm.rank_report import png
from kr_vlm.results import CSV_FIELDS, Table
from kr_vlm.table_text import csv_text

NAME = "mini_benchmark"
FRONTIER_FIGURES = {CLIP_LORA: f"{NAME}_frontier.png", AUTHORS: f"{NAME}_frontier_authors.png"}
RECIPE_TITLES = {
    CLIP_LORA: "CLIP-LoRA's recipe in miniature (mini_kr_fewshot), every rate tried",
    AUTHORS: "the KRAdapter / RandLoRA authors' recipe (mini_kr_randlora) at their rates",
}


class Report:
    """Every table and figure of one benchmark, from its results (``run_benchmark``) and runs folder."""

    def __init__(self, benchmark: Mapping[str, Any], runs_dir: Path) -> None:
        self.benchmark = benchmark
        self.settings = benchmark["settings"]
        self.selection = benchmark["selection"]
        self.methods = [METHODS_BY_KEY[key] for key in self.settings["methods"]]
        self.data = BenchmarkRuns.read(benchmark["runs"], runs_dir)
        recipes = self.settings["recipes"]
        self.modes = [mode for mode in MODES if mode.recipe in recipes]
        self.summaries = [summary_table(mode, self.methods, self.data, self.selection) for mode in self.modes]
        self.rates = rates_table(self.methods, self.selection, self.data)
        self.protocol_tables = {recipe: recipe_tables(self.data, recipe) for recipe in recipes}
        self.frontiers = {recipe: recipe_frontiers(self.data, recipe) for recipe in recipes}
        self.frontier_tables = {
            recipe: [results.frontier_table(frontier) for frontier in frontier_list]
            for recipe, frontier_list in self.frontiers.items()
        }

    def sections(self) -> list[tuple[str, Table]]:
        """Every table with the CSV section it belongs to, in the order of the Markdown."""
        found = [
            (f"summary_{mode.key}", table) for mode, table in zip(self.modes, self.summaries, strict=True)
        ]
        found.append(("rates", self.rates))
        for recipe, tables in self.frontier_tables.items():
            found += [(f"frontier_{recipe}", table) for table in tables]
        for recipe, tables in self.protocol_tables.items():
            found += [(f"runs_{recipe}", table) for table in tables]
        return found

    def frontier_readings(self) -> dict[str, dict[str, dict[str, float]]]:
        """{protocol: {method key: the frontier table's readings}} of CLIP-LoRA's recipe, one method at a
        time (``frontier_table`` of the method's own runs)."""
        readings: dict[str, dict[str, dict[str, float]]] = {}
        panels, _ = per_method_frontiers(self.frontiers.get(CLIP_LORA, []), self.data)
        for frontier in panels:
            method = self.data.method_of(frontier.runs[0].folder)
            values = {
                record["column"]: float(record["mean"]) for record in results.frontier_table(frontier).records
            }
            readings.setdefault(frontier.panel.protocol, {})[method] = values
        return readings

    def summary_numbers(self) -> list[tuple[str, dict[str, dict[str, float]]]]:
        """Each mode's title and {method key: {summary column: mean}}."""
        keys = {method.label: method.key for method in self.methods}
        found = []
        for table in self.summaries:
            numbers: dict[str, dict[str, float]] = {}
            for record in table.records:
                numbers.setdefault(keys[record["method"]], {})[record["column"]] = float(record["mean"])
            found.append((table.title.split(":")[0], numbers))
        return found

    def markdown(self, command: str) -> str:
        lines = [*self._header(command), "## 16 shots, each mode", ""]
        lines += [table.markdown() for table in self.summaries]
        lines += [f"![16-shot results]({NAME}.png)", "", "## What the numbers say", ""]
        lines += findings(self.summary_numbers(), self.selection, self.frontier_readings())
        lines += ["## Learning rates", "", self.rates.markdown()]
        lines += ["## ID / OOD frontiers (`kr_vlm.results.frontier`)", ""]
        for recipe, tables in self.frontier_tables.items():
            if tables:
                lines += [
                    f"Frontiers of {RECIPE_TITLES[recipe]}:",
                    "",
                    f"![frontier]({FRONTIER_FIGURES[recipe]})",
                    "",
                ]
                lines += [table.markdown() for table in tables]
        for recipe, tables in self.protocol_tables.items():
            lines += [f"## Every run of {RECIPE_TITLES[recipe]} (`kr_vlm.results` protocol tables)", ""]
            lines += [table.markdown() for table in tables]
        return "\n".join(lines)

    def _header(self, command: str) -> list[str]:
        settings, timing, machine = self.settings, self.benchmark["timing"], self.benchmark["machine"]
        before, after = timing["load_average_before"], timing["load_average_after"]
        low, high = timing["load_1min_during"]
        steps = ", ".join(
            f"{max_steps(shots, settings['steps'])} steps at {shots} shots" for shots in settings["shots"]
        )
        return [
            "# The mini benchmark",
            "",
            "Every method on the miniature CLIP that ships with kr_vlm (`model=mini`), offline; every run is the "
            "train task on a config composed from `configs/` (the protocol and every choice: "
            "`kr_vlm.benchmarks.mini`; the README's section says how to read this file).",
            "",
            f"- command: `{command}`",
            f"- date: {self.benchmark['date']}; machine: {machine['cpu']}, {machine['cores']} cores, "
            f"{machine['workers']} worker processes of one thread; torch {machine['torch']}",
            f"- wall time {timing['wall_time_s'] / 60:.1f} min, CPU time {timing['cpu_time_s'] / 60:.1f} min (all "
            f"processes) for {timing['runs']} runs; load average (1, 5, 15 min) at the start "
            f"{_loads(before)}, at the end {_loads(after)}; 1-minute load between {low:.1f} and {high:.1f} "
            "during the run",
            f"- recipes: {', '.join(EXPERIMENTS[recipe] for recipe in settings['recipes'])}; methods: "
            f"{', '.join(method.label for method in self.methods)}",
            f"- {SELECTION_SHOTS} shots (and {_others(settings['shots'])}); seeds "
            f"{', '.join(map(str, settings['seeds']))}; CLIP-LoRA's recipe: {steps}; validation: "
            f"{settings['val_shots']} digits a class (`data.val_shots`); update scales α tested: "
            f"{', '.join(f'{alpha:g}' for alpha in settings['alphas'])} (α = 0: the recipe's zero-shot run)",
            f"- grids: fixed rate x 2^k, k in {list(settings['grid_exponents'])}, widened by x2 at most "
            f"{settings['max_widening']} times a method while the pick is at an edge",
            "",
        ]

    def write(self, out_dir: Path, command: str) -> dict[str, Path]:
        """``mini_benchmark.{md,csv,json,png}`` and the frontier figures in `out_dir`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {kind: out_dir / f"{NAME}.{kind}" for kind in ("md", "csv", "json", "png")}
        write_json_atomic(paths["json"], {**self.benchmark, "command": command})
        write_text_atomic(paths["md"], self.markdown(command))
        rows = [{"section": section, **record} for section, table in self.sections() for record in table.records]
        write_text_atomic(paths["csv"], csv_text(rows, ("section", *CSV_FIELDS)))
        _write_bytes(paths["png"], png(summary_figure(self.summaries)))
        for recipe, frontier_list in self.frontiers.items():
            if frontier_list:
                path = out_dir / FRONTIER_FIGURES[recipe]
                per_method = self.data if recipe == CLIP_LORA else None
                title = f"ID / OOD frontier over α and the learning rate: {RECIPE_TITLES[recipe]}"
                _write_bytes(path, frontier_png(frontier_list, per_method, title))
                paths[f"frontier_{recipe}"] = path
        return paths


def _write_bytes(path: Path, content: bytes) -> None:
    write_file_atomic(path, lambda handle: handle.write(content))


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


def _others(shots: Sequence[int]) -> str:
    others = [str(count) for count in shots if count != SELECTION_SHOTS]
    return f"{', '.join(others)} shots at the chosen and fixed rates" if others else "no other shot count"


def write_outputs(
    benchmark: Mapping[str, Any], runs_dir: Path, out_dir: Path, command: str
) -> dict[str, Path]:
    """The report of a finished benchmark in `out_dir`."""
    return Report(benchmark, runs_dir).write(out_dir, command)
