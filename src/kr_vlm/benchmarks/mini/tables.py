"""The benchmark's tables. The protocol tables and frontiers are ``kr_vlm.results``' own (what
``scripts/aggregate_results.py`` prints for the same run folders); this module only says which runs each
mode holds, lays the 16-shot numbers of those tables out one row a method (`summary_table`), and adds the
table of the learning-rate choice (`rates_table`)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kr_vlm import results
from kr_vlm.benchmarks.mini.protocol import (
    AUTHORS,
    CLIP_LORA,
    SELECTION_SHOTS,
    BenchmarkMethod,
)
from kr_vlm.results import Run, Table
from kr_vlm.results.tables import cell_text


@dataclasses.dataclass(frozen=True)
class Mode:
    """A way to set each method's learning rate, and the recipe it runs."""

    key: str
    title: str
    recipe: str

    def rate(self, method: BenchmarkMethod, selection: Mapping[str, Any]) -> float | None:
        if self.key == "chosen":
            return selection.get(method.key, {}).get("chosen")
        return method.fixed_lr if self.key == "fixed" else method.authors_lr


MODES = (
    Mode(
        "chosen",
        "CLIP-LoRA's recipe in miniature, each method at the rate chosen on the validation digits",
        CLIP_LORA,
    ),
    Mode(
        "fixed",
        "CLIP-LoRA's recipe in miniature, one fixed rate for every adapter (full fine-tuning its own)",
        CLIP_LORA,
    ),
    Mode(
        "authors", "The KRAdapter / RandLoRA authors' recipe (mini_kr_randlora) at their fixed rates", AUTHORS
    ),
)


@dataclasses.dataclass
class BenchmarkRuns:
    """The finished runs' records (the JSON's ``runs``) and their run folders read by ``kr_vlm.results``."""

    records: list[dict[str, Any]]
    runs: dict[str, Run]  # by the record's folder

    @classmethod
    def read(cls, records: Sequence[dict[str, Any]], runs_dir: Path) -> BenchmarkRuns:
        by_folder = {str(run.folder.relative_to(runs_dir)): run for run in results.load_runs(runs_dir)}
        finished = [record for record in records if "error" not in record and record["folder"] in by_folder]
        return cls(finished, {record["folder"]: by_folder[record["folder"]] for record in finished})

    def select(self, recipe: str, method: str | None = None, lr: Any = "any") -> list[Run]:
        """The runs of `recipe` (and of `method`, at `lr` when given: None for zero-shot)."""
        return [
            self.runs[record["folder"]]
            for record in self.records
            if record["recipe"] == recipe
            and (method is None or record["method"] == method)
            and (lr == "any" or record["lr"] == lr)
        ]

    def method_of(self, folder: Path) -> str | None:
        """The benchmark method (key) of a run folder."""
        for record in self.records:
            if self.runs[record["folder"]].folder == folder:
                return record["method"]
        return None

    def params(self, method: str, recipe: str | None = None) -> str:
        """The method's trainable parameter counts (in `recipe`; the recipes adapt other linears)."""
        counts = sorted(
            {
                record["trainable_params"]
                for record in self.records
                if record["method"] == method and recipe in (None, record["recipe"])
            }
        )
        return "/".join(f"{count:,}" for count in counts) or "0"


# The 16-shot numbers of a mode: (column, the results table's protocol, its column, at shots 0 for zero-shot).
SUMMARY_COLUMNS = (
    ("digits (ID)", "few_shot", "digits"),
    ("shifted avg", "distribution_shift", "Target avg"),
    ("glyphs", "cross_dataset", "glyphs"),
    ("base", "base_to_new", "base"),
    ("new", "base_to_new", "new"),
    ("HM", "base_to_new", "hm"),
)


def method_numbers(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """One method's 16-shot (or zero-shot) numbers, read off ``kr_vlm.results``' protocol tables of its
    runs: {summary column: that table's record}."""
    found = {}
    for table in results.protocol_tables(results.measure(runs)):
        for record in table.records:
            if record["shots"] not in (0, SELECTION_SHOTS) or record["table"] == "Average":
                continue
            for column, protocol, name in SUMMARY_COLUMNS:
                if (record["protocol"], record["column"]) == (protocol, name):
                    found[column] = record
    return found


def _cell(record: Mapping[str, Any] | None) -> str:
    """A protocol table's cell again, from its CSV record (`results.Table.record`)."""
    if record is None:
        return "–"
    several = record["std"] != "" and record["seeds"] > 1
    return cell_text(float(record["mean"]), float(record["std"]) if several else None)


def summary_table(mode: Mode, methods: Sequence[BenchmarkMethod], data: BenchmarkRuns, selection) -> Table:
    """One row a method (zero-shot first) of the mode's 16-shot results: ID top-1, the shifted average,
    glyphs, base-to-new. Its records (for the CSV) are the protocol tables' own, the method relabelled."""
    header = ["method", "lr", "trainable params", *(column for column, _, _ in SUMMARY_COLUMNS)]
    table = Table(f"summary_{mode.key}", f"{mode.title}: top-1 % at {SELECTION_SHOTS} shots", header)
    for method in methods:
        rate = mode.rate(method, selection) if method.trains else None
        if method.trains and rate is None:
            params = data.params(method.key, mode.recipe)
            table.rows.append([method.label, "–", params, *["–"] * len(SUMMARY_COLUMNS)])
            continue
        numbers = method_numbers(data.select(mode.recipe, method.key, rate))
        if not numbers:
            continue
        lr = "–" if rate is None else f"{rate:g}"
        table.rows.append(
            [
                method.label,
                lr,
                data.params(method.key, mode.recipe),
                *(_cell(numbers.get(column)) for column, _, _ in SUMMARY_COLUMNS),
            ]
        )
        table.records += [
            {**record, "method": method.label, "column": column} for column, record in numbers.items()
        ]
    table.notes.append(
        "Mean ± std over seeds. Shifted avg: the mean over the four shifted digits domains (each domain's "
        "seeds averaged first); HM: the harmonic mean of the mean base and new top-1."
    )
    return table


def rates_table(
    methods: Sequence[BenchmarkMethod], selection: Mapping[str, Any], data: BenchmarkRuns
) -> Table:
    """Each method's linears, size, trainable parameters, every rate tried with its mean validation top-1
    over the seeds, the chosen rate and whether it lies at an edge; the fixed and the authors' rates."""
    table = Table(
        "rates",
        "Methods and learning rates: mean ± std validation top-1 % over the seeds at each rate (CLIP-LoRA's "
        f"recipe, {SELECTION_SHOTS} shots), the chosen one in bold",
        [
            "method",
            "linears (both towers)",
            "size",
            "trainable params",
            "validation top-1 % by lr",
            "chosen lr",
            "fixed lr",
            "authors' lr",
        ],
    )
    for method in methods:
        entry = selection.get(method.key)
        grid, chosen = "–", "–"
        if entry is not None:
            grid = ", ".join(_rate_text(entry, rate) for rate in entry["rates"])
            chosen = "–" if entry["chosen"] is None else f"{entry['chosen']:g} ({edge_text(entry)})"
            for rate in entry["rates"]:
                mean = entry["mean_val_top1"][f"{rate:g}"]
                if mean is not None:
                    table.record(
                        "validation", method.label, SELECTION_SHOTS, f"lr={rate:g}", 100 * mean, None
                    )
        fixed = "–" if method.fixed_lr is None else f"{method.fixed_lr:g}"
        authors = "–" if method.authors_lr is None else f"{method.authors_lr:g}"
        params = data.params(method.key, CLIP_LORA)
        table.rows.append([method.label, method.linears, method.size, params, grid, chosen, fixed, authors])
    return table


def _rate_text(entry: Mapping[str, Any], rate: float) -> str:
    values = [value for value in entry["val_top1"][f"{rate:g}"].values()]
    mean = entry["mean_val_top1"][f"{rate:g}"]
    if mean is None:
        diverged = sum(value is None for value in values)
        shown = f"diverged ({diverged} of {len(values)} seeds)"
    else:
        percents = [100 * value for value in values]
        spread = f" ± {statistics.stdev(percents):.1f}" if len(percents) > 1 else ""
        shown = f"{100 * mean:.1f}{spread}"
    text = f"{rate:g}: {shown}"
    return f"**{text}**" if rate == entry["chosen"] else text


def edge_text(entry: Mapping[str, Any]) -> str:
    """Where a chosen rate lies among the rates tried, and how the grid was widened to get there."""
    widened = (
        f", after {entry['widenings']} widening{'s' if entry['widenings'] != 1 else ''}"
        if entry["widenings"]
        else ""
    )
    if entry["edge"] is None:
        return f"inside{widened}"
    limit = ": widening limit reached" if entry["limit_reached"] else ""
    return f"at the {entry['edge']} edge{widened}{limit}"


def recipe_tables(data: BenchmarkRuns, recipe: str) -> list[Table]:
    """``kr_vlm.results``' protocol tables of every run of a recipe (every rate of every grid)."""
    return results.protocol_tables(results.measure(data.select(recipe)))


def recipe_frontiers(data: BenchmarkRuns, recipe: str) -> list[results.Frontier]:
    """``kr_vlm.results``' ID / OOD frontiers of a recipe's runs (its own zero-shot the origin)."""
    return results.frontiers(data.select(recipe))
