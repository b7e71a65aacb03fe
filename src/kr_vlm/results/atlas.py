"""The KRAdapter / RandLoRA papers' vision-language table from kr_vlm's runs on aTLAS's 22 datasets.

RandLoRA (Albert et al., ICLR 2025) and KRAdapter (arXiv 2508.00230) train CLIP on the 22 datasets of aTLAS
at 1, 2, 4 and 16 shots per class and on 50 % and 100 % of the training data, and report the top-1 on each
dataset's test split and its average over the 22. From the runs `kr_vlm.results.measure` reads:

- `atlas22_dataset_table`: one row per (method and settings, budget), one column per dataset in aTLAS's
  order (aTLAS's names), and the average over the 22 (shown only when all 22 are there);
- `atlas22_summary_table`: one row per method and settings, one column per budget, each cell the average
  over the 22 datasets: the papers' main table.

A budget is the runs' `data.fraction` (``50 %``) or `shots` (``16 shots``; ``zero-shot`` at 0). Cells are
means over seeds. This module reads JSON only (no torch).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from kr_vlm.atlas_names import ATLAS22, ATLAS_NAMES
from kr_vlm.results.runs import Measurements
from kr_vlm.results.tables import Cell, Table

AVERAGE = "Average (22)"
FRACTION_KEY = "data.fraction"


def _budget(shots: int, settings: dict[str, Any]) -> tuple[int, float, str]:
    """Sortable budget: zero-shot, shots ascending, then fractions ascending, and its column name."""
    fraction = settings.get(FRACTION_KEY)
    if fraction is not None:
        return (2, float(fraction), f"{100 * float(fraction):g} %")
    if shots == 0:
        return (0, 0.0, "zero-shot")
    return (1, float(shots), f"{shots} shot{'s' if shots != 1 else ''}")


def _collect(measurements: Measurements) -> dict[tuple[str, tuple], dict[tuple, dict[str, list[float]]]]:
    """`cells[(method, settings without the fraction)][budget][dataset]`: the source top-1 of each seed."""
    cells: dict[tuple[str, tuple], dict[tuple, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for trained, sets in measurements.values.items():
        if trained.dataset not in ATLAS_NAMES or trained.classes != "all":
            continue
        role, top1 = sets.get(trained.dataset, (None, None))
        if role != "source":
            continue
        settings = dict(trained.settings)
        budget = _budget(trained.shots, settings)
        recipe = tuple((key, value) for key, value in trained.settings if key != FRACTION_KEY)
        cells[(trained.method, recipe)][budget][trained.dataset].append(top1)
    return cells


def _labels(rows: list[tuple[str, tuple]]) -> dict[tuple[str, tuple], str]:
    """The method, and the settings in which rows of the same method differ."""
    labels = {}
    for method in {row[0] for row in rows}:
        same = [row for row in rows if row[0] == method]
        keys = sorted({key for row in same for key, _ in row[1]})
        differing = [key for key in keys if len({dict(row[1]).get(key) for row in same}) > 1]
        for row in same:
            parts = [f"{key.rpartition('.')[2]}={dict(row[1]).get(key)}" for key in differing]
            labels[row] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


def _average(by_dataset: dict[str, list[float]]) -> float | None:
    if any(dataset not in by_dataset for dataset in ATLAS22):
        return None
    return statistics.fmean(statistics.fmean(by_dataset[dataset]) for dataset in ATLAS22)


def atlas22_dataset_table(measurements: Measurements) -> Table | None:
    """Top-1 % per dataset of aTLAS's 22 and their average, one row per method and budget."""
    cells = _collect(measurements)
    if not cells:
        return None
    labels = _labels(list(cells))
    header = ["method", "budget", "seeds", *(ATLAS_NAMES[name] for name in ATLAS22), AVERAGE]
    table = Table(
        "atlas22",
        f"aTLAS's 22 datasets: {measurements.metric_label} % on each test split (mean ± std over seeds) and "
        "the average over the 22",
        header,
    )
    for row in sorted(cells, key=labels.get):
        for budget in sorted(cells[row]):
            by_dataset = cells[row][budget]
            per_dataset = {dataset: Cell(tuple(values)) for dataset, values in by_dataset.items()}
            seeds = sorted({len(cell.values) for cell in per_dataset.values()})
            seed_count = str(seeds[0]) if seeds[0] == seeds[-1] else f"{seeds[0]}–{seeds[-1]}"
            average = _average(by_dataset)
            table.rows.append(
                [
                    labels[row],
                    budget[2],
                    seed_count,
                    *(str(per_dataset[name]) if name in per_dataset else "–" for name in ATLAS22),
                    "–" if average is None else f"{average:.1f}",
                ]
            )
            name = f"atlas22 {budget[2]}"
            for dataset, cell in per_dataset.items():
                table.record(name, labels[row], int(budget[1]), dataset, cell.mean, cell)
            if average is not None:
                table.record(name, labels[row], int(budget[1]), AVERAGE, average, None)
    table.notes.append(
        f"Columns in the order of aTLAS's DATASETS.md, by aTLAS's names ({', '.join(f'{ATLAS_NAMES[n]} = {n}' for n in ATLAS22)}). "
        "The average is shown only for rows with all 22 datasets."
    )
    return table


def atlas22_summary_table(measurements: Measurements) -> Table | None:
    """The average top-1 % over aTLAS's 22 datasets, one row per method, one column per budget."""
    cells = _collect(measurements)
    if not cells:
        return None
    labels = _labels(list(cells))
    budgets = sorted({budget for row in cells.values() for budget in row})
    table = Table(
        "atlas22_summary",
        f"aTLAS's 22 datasets: average {measurements.metric_label} % over the 22 (the papers' table)",
        ["method", *(budget[2] for budget in budgets)],
    )
    for row in sorted(cells, key=labels.get):
        averages = [_average(cells[row][budget]) if budget in cells[row] else None for budget in budgets]
        table.rows.append([labels[row], *("–" if value is None else f"{value:.1f}" for value in averages)])
        for budget, value in zip(budgets, averages, strict=True):
            if value is not None:
                table.record("atlas22 average", labels[row], int(budget[1]), budget[2], value, None)
    if any(_average(by_budget[budget]) is None for by_budget in cells.values() for budget in by_budget):
        table.notes.append(
            "A cell is shown only when all 22 datasets were run at that budget ('–' otherwise)."
        )
    return table


def atlas22_tables(measurements: Measurements) -> list[Table]:
    """Both tables, where runs on aTLAS's datasets are found (none otherwise)."""
    tables = [atlas22_summary_table(measurements), atlas22_dataset_table(measurements)]
    return [table for table in tables if table is not None]
