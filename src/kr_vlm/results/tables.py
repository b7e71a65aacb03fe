"""The four protocol tables (few-shot, base-to-new, distribution shift, cross-dataset) from
``Measurements``, with published rows and Δ rows beside ours; ``Table`` renders Markdown and CSV records."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kr_vlm.results.labels import table_labels
from kr_vlm.results.references import Reference
from kr_vlm.results.runs import Measurements
from kr_vlm.results.summary import TARGET_PROTOCOLS, harmonic_mean
from kr_vlm.table_text import markdown_table


@dataclass(frozen=True)
class Cell:
    """Accuracies of one table cell, one a seed."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        return cell_text(self.mean, self.std if len(self.values) > 1 else None)


def cell_text(mean: float, std: float | None) -> str:
    """A table cell: ``71.2 ± 0.4`` over several seeds, ``71.2`` for one (``std`` None)."""
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


@dataclass
class Table:
    """One protocol's table: Markdown cells, and the same numbers unformatted (`records`) for CSV."""

    protocol: str
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", markdown_table(self.header, self.rows)]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"

    def record(self, name: str, label: str, shots: int, column: str, mean: float, cell: Cell | None) -> None:
        """One number of the table, unformatted, for the CSV (`cell`: its seeds' values, if it has them)."""
        self.records.append(
            {
                "protocol": self.protocol,
                "table": name,
                "method": label,
                "shots": shots,
                "column": column,
                "mean": f"{mean:.4f}",
                "std": "" if cell is None else f"{cell.std:.4f}",
                "seeds": "" if cell is None else len(cell.values),
            }
        )


CSV_FIELDS = ("protocol", "table", "method", "shots", "column", "mean", "std", "seeds")


def _seeds(cells: Iterable[Cell]) -> str:
    counts = sorted({len(cell.values) for cell in cells})
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _average(cells: Sequence[Cell | None]) -> float | None:
    """The mean of the cells' means; None unless every cell is there (an average over part of the
    columns is not the papers' average)."""
    if not cells or any(cell is None for cell in cells):
        return None
    return statistics.fmean(cell.mean for cell in cells)


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _column_table(
    protocol: str,
    title: str,
    name: str,
    columns: list[str],
    cells: Mapping[Any, Mapping[str, Cell]],
    average_of: list[str],
    average_name: str,
    references: Sequence[Reference],
) -> Table:
    """A table with one row per (method, shots, settings) and one column per test set, the average of
    `average_of` last. After the rows of each shot count come the published `references` of that
    count that share a column with ours, each with a Δ row (ours − published) for each of our rows."""
    table = Table(protocol, title, ["method", "shots", "seeds", *columns, average_name])
    labels = table_labels(cells)
    averages = {row: _average([cells[row].get(column) for column in average_of]) for row in cells}
    for shots in sorted({row[1] for row in cells}):
        ours = sorted((row for row in cells if row[1] == shots), key=labels.get)
        for row in ours:
            table.rows.append(
                [
                    labels[row],
                    str(shots),
                    _seeds(cells[row].values()),
                    *[str(cells[row][column]) if column in cells[row] else "–" for column in columns],
                    _format(averages[row]),
                ]
            )
            for column, cell in cells[row].items():
                table.record(name, labels[row], shots, column, cell.mean, cell)
            if averages[row] is not None:
                table.record(name, labels[row], shots, average_name, averages[row], None)
        for reference in references:
            if reference.shots != shots or not set(reference.top1) & set(columns):
                continue
            published = [reference.top1.get(column) for column in (*columns, average_name)]
            table.rows.append([f"{reference.name} (published)", str(shots), "", *map(_format, published)])
            # Our average is comparable with the published one only over the same datasets.
            covers_reference = set(reference.top1) - {average_name} <= set(average_of)
            for row in ours:
                means = [cells[row][column].mean if column in cells[row] else None for column in columns]
                means.append(averages[row] if covers_reference else None)
                differences = [
                    "–" if mine is None or theirs is None else f"{mine - theirs:+.1f}"
                    for mine, theirs in zip(means, published, strict=True)
                ]
                table.rows.append([f"Δ {labels[row]} − {reference.name}", str(shots), "", *differences])
            note = f"{reference.name} (published): {reference.source}"
            if note not in table.notes:
                table.notes.append(note)
    if references and not table.notes:
        published = sorted({column for ref in references for column in ref.top1} - {average_name})
        table.notes.append(
            f"No published row shares a column with these runs (published: {', '.join(published)})."
        )
    return table


def few_shot_table(measurements: Measurements, references: Sequence[Reference] = ()) -> Table | None:
    """Datasets x (method, shots): the source accuracy of every model trained on all classes."""
    cells: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for trained, sets in measurements.values.items():
        role, top1 = sets.get(trained.dataset, (None, None))
        if role == "source":
            cells[trained.row][trained.dataset].append(top1)
    if not cells:
        return None
    datasets = sorted({dataset for row in cells.values() for dataset in row})
    return _column_table(
        "few_shot",
        f"Few-shot: {measurements.metric_label} % on each dataset's test set (mean ± std over seeds)",
        "few_shot",
        datasets,
        _cells(cells),
        datasets,
        "Average",
        [ref for ref in references if ref.protocol == "few_shot"],
    )


def _cells(lists: Mapping[Any, Mapping[str, list[float]]]) -> dict[Any, dict[str, Cell]]:
    return {
        row: {column: Cell(tuple(values)) for column, values in columns.items()}
        for row, columns in lists.items()
    }


def target_tables(measurements: Measurements, role: str, references: Sequence[Reference] = ()) -> list[Table]:
    """One table per source dataset: the source, each target set of `role` (``shift`` or ``cross``) and
    the average over the targets alone."""
    protocol = TARGET_PROTOCOLS[role]
    by_source: dict[str, dict[Any, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    targets: dict[str, list[str]] = defaultdict(list)
    for trained, sets in measurements.values.items():
        if not any(set_role == role for set_role, _ in sets.values()):
            continue
        row = by_source[trained.dataset][trained.row]
        for test_set, (set_role, top1) in sets.items():
            if set_role == "source" or set_role == role:
                row[test_set].append(top1)
            if set_role == role and test_set not in targets[trained.dataset]:
                targets[trained.dataset].append(test_set)
    kind = "Distribution shift" if role == "shift" else "Cross-dataset transfer"
    tables = []
    for source in sorted(by_source):
        columns = [source, *targets[source]]
        tables.append(
            _column_table(
                protocol,
                f"{kind}: trained on {source}, {measurements.metric_label} % (mean ± std over seeds; the "
                "average is over the targets)",
                source,
                columns,
                _cells(by_source[source]),
                targets[source],
                "Target avg",
                [ref for ref in references if ref.protocol == protocol],
            )
        )
    return tables


def base_to_new_table(measurements: Measurements) -> Table | None:
    """Base / new / HM per dataset and (method, shots), and their average over the datasets: base and
    new are averaged over seeds, the HM is that of the averages (CoCoOp's Table 1)."""
    pairs: dict[Any, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for trained, sets in measurements.values.items():
        base = [top1 for role, top1 in sets.values() if role == "base"]
        new = [top1 for role, top1 in sets.values() if role == "new"]
        if base and new:
            pairs[trained.row][trained.dataset].append((base[0], new[0]))
    if not pairs:
        return None
    table = Table(
        "base_to_new",
        f"Base-to-new generalisation: {measurements.metric_label} % on the base and new classes and their "
        "harmonic mean (mean ± std over seeds; HM of the means)",
        ["dataset", "method", "shots", "seeds", "base", "new", "HM"],
    )
    labels = table_labels(pairs)
    datasets = sorted({dataset for row in pairs.values() for dataset in row})
    ordered = sorted(pairs, key=lambda row: (row[1], labels[row]))
    for dataset in datasets:
        for row in ordered:
            if dataset not in pairs[row]:
                continue
            base = Cell(tuple(b for b, _ in pairs[row][dataset]))
            new = Cell(tuple(n for _, n in pairs[row][dataset]))
            hm = harmonic_mean(base.mean, new.mean)
            table.rows.append(
                [dataset, labels[row], str(row[1]), str(len(base.values)), str(base), str(new), f"{hm:.1f}"]
            )
            for column, cell in (("base", base), ("new", new)):
                table.record(dataset, labels[row], row[1], column, cell.mean, cell)
            table.record(dataset, labels[row], row[1], "hm", hm, None)
    for row in ordered:
        if len(pairs[row]) != len(datasets):
            continue  # the average is over every dataset of the table, or not shown
        base = statistics.fmean(statistics.fmean(b for b, _ in seeds) for seeds in pairs[row].values())
        new = statistics.fmean(statistics.fmean(n for _, n in seeds) for seeds in pairs[row].values())
        hm = harmonic_mean(base, new)
        seeds = _seeds(Cell(tuple(b for b, _ in values)) for values in pairs[row].values())
        table.rows.append(
            ["Average", labels[row], str(row[1]), seeds, f"{base:.1f}", f"{new:.1f}", f"{hm:.1f}"]
        )
        for column, value in (("base", base), ("new", new), ("hm", hm)):
            table.record("Average", labels[row], row[1], column, value, None)
    return table


def protocol_tables(measurements: Measurements, references: Sequence[Reference] = ()) -> list[Table]:
    """Every table the measurements fill, in the order of `PROTOCOLS`."""
    tables = [few_shot_table(measurements, references), base_to_new_table(measurements)]
    tables += target_tables(measurements, "shift", references)
    tables += target_tables(measurements, "cross", references)
    return [table for table in tables if table is not None]
