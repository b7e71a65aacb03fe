"""The field's four results tables from kr_vlm's run folders, and the protocol summary of one run.

Every run writes ``metrics.json`` (`kr_vlm.cli`): the top-1 accuracy of each test set, and
``test_roles``, what each test set measures (set by the DataModule): ``source`` (the training
dataset, all classes), ``base`` / ``new`` (its two halves, base-to-new), ``shift`` (a shifted
version of the source, e.g. ImageNet-A, digits_rotated), ``cross`` (another dataset). From those:

- few-shot: datasets x shots, the mean ± std over seeds of the source accuracy, and the average
  over datasets (CoOp's and CLIP-LoRA's few-shot tables);
- base-to-new: base, new and their harmonic mean per dataset, and the average over datasets
  (CoCoOp's Table 1: the HM of the averaged base and new accuracies);
- distribution shift: the source, each shifted set and the average over the shifted sets only
  (CoCoOp's Table 3: the source is not averaged with the targets);
- cross-dataset: the source, each other dataset and the average over the targets (CoCoOp's Table 2).

Runs are grouped by what was trained: the method, the training dataset, classes, shots and seed,
and the training recipe (`RECIPE_KEYS`: model and adapter config, optimizer, sampler, ...). An
evaluation (``eval.py``) of adapters whose training run is also found counts with that training
run, never as another seed: its ``metrics.json`` names the adapters it tested (``adapters_from``,
or ``adapters_dir`` / ``ckpt_path`` in its config), and the run folder above them is the training
run's. A test set that two runs of the same trained model measured is counted once, the training
run's first.

This module reads JSON only (no torch), so ``scripts/aggregate_results.py`` starts quickly.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kr_vlm import metric_names

log = logging.getLogger(__name__)

PROTOCOLS = ("few_shot", "base_to_new", "distribution_shift", "cross_dataset")
# The roles of `protocol_summary`'s target sets, and the metrics.json key of each one's summary.
TARGET_PROTOCOLS = {"shift": "distribution_shift", "cross": "cross_dataset"}
# Config entries (dotted, under metrics.json's `config`) that make two training runs different models;
# `model` stands for every entry below it. Paths, loggers, callbacks and test settings are left out.
RECIPE_KEYS = (
    "model",
    "data.sampler",
    "data.fraction",
    "data.train_templates",
    "data.batch_size",
    "trainer.max_steps",
)
# Entries of `model` that say where weights come from, not what they are.
_NOT_RECIPE = ("cache_dir", "allow_download")
# How a run was evaluated: part of a table's row (zero-shot CLIP with one template or seven is two rows).
EVALUATION_KEYS = ("data.eval_templates", "data.classnames")
# Settings at these values are as good as absent: runs from before the setting existed, and data configs
# without it (digits_ood), group with the runs that have it at its default.
_DEFAULT_SETTINGS = {"data.classnames": "default"}
REFERENCE_FILE = "reference_results.json"


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H: 2·b·n / (b + n) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def protocol_summary(test: Mapping[str, Mapping[str, float]], roles: Mapping[str, str]) -> dict[str, Any]:
    """What ``metrics.json`` records about the protocols, from top-1 per test set and each set's role.

    Always ``test_roles``; with a base and a new test set ``base_to_new: {base, new, hm}``; with
    shifted sets ``distribution_shift`` and with other datasets ``cross_dataset``, each
    ``{source, targets: {set: top1}, target_average}`` (the source is not in the average).
    """
    top1 = {name: values.get(metric_names.TOP1) for name, values in test.items()}
    by_role: dict[str, list[str]] = defaultdict(list)
    for name, role in roles.items():
        if top1.get(name) is not None:
            by_role[role].append(name)
    summary: dict[str, Any] = {"test_roles": dict(roles)}
    if by_role["base"] and by_role["new"]:
        base, new = top1[by_role["base"][0]], top1[by_role["new"][0]]
        summary["base_to_new"] = {"base": base, "new": new, "hm": harmonic_mean(base, new)}
    source = top1[by_role["source"][0]] if by_role["source"] else None
    for role, key in TARGET_PROTOCOLS.items():
        targets = {name: top1[name] for name in by_role[role]}
        if targets:
            average = statistics.fmean(targets.values())
            summary[key] = {"source": source, "targets": targets, "target_average": average}
    return summary


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """One line a protocol of ``protocol_summary`` for the console, in percent."""
    lines = []
    if "base_to_new" in metrics:
        b2n = metrics["base_to_new"]
        lines.append(
            f"base-to-new: base {_percent(b2n['base'])}, new {_percent(b2n['new'])}, HM {_percent(b2n['hm'])}"
        )
    for key in TARGET_PROTOCOLS.values():
        if key in metrics:
            part = metrics[key]
            lines.append(
                f"{key.replace('_', ' ')}: source {_percent(part['source'])}, "
                f"target average {_percent(part['target_average'])} over {len(part['targets'])} sets"
            )
    return lines


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


# ---------------------------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class Run:
    """One ``metrics.json`` and what was trained to get it."""

    path: Path
    metrics: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> dict[str, Any]:
        return self.metrics.get("config") or {}

    @property
    def adapters_source(self) -> str | None:
        """The adapters an evaluation tested (a folder or a checkpoint); None for a training run."""
        source = self.metrics.get("adapters_from")
        if source is None and "adapters_dir" in self.config:  # eval.yaml has the key, train.yaml not
            source = self.config.get("adapters_dir") or self.config.get("ckpt_path")
        return None if source in (None, "zero-shot") else str(source)

    @property
    def is_evaluation(self) -> bool:
        return "adapters_from" in self.metrics or "adapters_dir" in self.config

    def test_roles(self) -> dict[str, str]:
        """Each test set's role; for a metrics.json without ``test_roles`` (older runs), from the names:
        the dataset itself, ``<dataset>_base`` / ``_new``, ``<dataset>_<shift>``, and any other as cross."""
        if "test_roles" in self.metrics:
            return dict(self.metrics["test_roles"])
        dataset = self.metrics.get("dataset")
        roles = {}
        for name in self.metrics.get("test", {}):
            if name == dataset:
                roles[name] = "source"
            elif name in (f"{dataset}_base", f"{dataset}_new"):
                roles[name] = name.rpartition("_")[2]
            else:
                roles[name] = "shift" if name.startswith(f"{dataset}_") else "cross"
        return roles


def read_run(path: Path) -> Run | None:
    """The `Run` of one metrics.json; None, with a warning, for a file that is not a kr_vlm run's
    results (not valid JSON, e.g. still being written, or without `test` results)."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        log.warning("Skipping %s: not readable as JSON (%s).", path, error)
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        log.warning("Skipping %s: it has no `test` results.", path)
        return None
    return Run(Path(path), metrics)


def load_runs(folder: Path) -> list[Run]:
    """Every run below ``folder`` (each ``metrics.json``, in path order)."""
    return [run for path in sorted(Path(folder).rglob("metrics.json")) if (run := read_run(path)) is not None]


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        items: dict[str, Any] = {}
        for key, item in value.items():
            items.update(_flatten(item, f"{prefix}.{key}"))
        return items
    return {prefix: json.dumps(value) if isinstance(value, list) else value}


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def config_settings(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The entries of a run's config under ``keys`` (dotted; a key stands for every entry below it), as
    flat dotted keys; unset entries and where weights come from (``cache_dir``, ...) left out."""
    settings: dict[str, Any] = {}
    for key in keys:
        settings.update(_flatten(_select(config, key), key))
    return {
        key: value
        for key, value in settings.items()
        if value is not None
        and key.rpartition(".")[2] not in _NOT_RECIPE
        and _DEFAULT_SETTINGS.get(key) != value
    }


@dataclass(frozen=True)
class Trained:
    """What a run's model was trained as: the row of a table it belongs to, and the seed."""

    method: str
    dataset: str
    classes: str  # all, base or new
    shots: int
    seed: Any
    settings: tuple[tuple[str, Any], ...]  # recipe and evaluation settings, sorted

    @property
    def row(self) -> tuple[str, int, tuple[tuple[str, Any], ...]]:
        return (self.method, self.shots, self.settings)


def _trained(training: Run, evaluation: Run) -> Trained:
    """The `Trained` of `evaluation`'s results, whose model `training` trained (the same run for a
    training run)."""
    metrics, config = training.metrics, training.config
    subsample = _select(config, "data.subsample") or "all"
    settings = config_settings(config, RECIPE_KEYS) | config_settings(evaluation.config, EVALUATION_KEYS)
    return Trained(
        method=str(metrics.get("method") or "none"),
        dataset=str(metrics.get("dataset")),
        classes="base" if subsample == "base_to_new" else subsample,
        shots=int(metrics.get("shots") or 0),
        seed=metrics.get("seed"),
        settings=tuple(sorted(settings.items())),
    )


def _training_run(run: Run, by_folder: Mapping[Path, Run]) -> Run | None:
    """The training run of an evaluation's adapters: the run folder that holds them (``<run>/adapters``
    or ``<run>/checkpoints/<name>.ckpt``), among the runs read or else on disk."""
    source = Path(run.adapters_source).expanduser().absolute()
    for folder in source.parents[:2]:
        if folder in by_folder:
            return by_folder[folder]
        if (folder / "metrics.json").is_file():
            return read_run(folder / "metrics.json")
    return None


@dataclass
class Measurements:
    """Top-1 accuracies (percent) of trained models: `values[trained][test set] = (role, top1)`."""

    metric: str = metric_names.TOP1
    values: dict[Trained, dict[str, tuple[str, float]]] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def metric_label(self) -> str:
        """``top-1`` for ``top1``: how the tables' titles name the metric."""
        return self.metric.replace("top", "top-")

    def add(self, trained: Trained, test_set: str, role: str, top1: float) -> None:
        sets = self.values.setdefault(trained, {})
        if test_set in sets:  # the same model measured again (a re-evaluation): counted once
            self.duplicates += 1
            return
        sets[test_set] = (role, top1)


def measure(runs: Sequence[Run], metric: str = metric_names.TOP1) -> Measurements:
    """Every run's `metric` per test set, keyed by the model that was trained (training runs first)."""
    by_folder = {run.folder.absolute(): run for run in runs if not run.is_evaluation}
    measurements = Measurements(metric)
    for run in sorted(runs, key=lambda run: run.is_evaluation):
        training = run
        if run.adapters_source is not None:
            training = _training_run(run, by_folder) or run
            if training is run:
                log.warning(
                    "%s: the training run of %s was not found; the evaluation counts as a model of its own.",
                    run.path,
                    run.adapters_source,
                )
        trained = _trained(training, run)
        roles = run.test_roles()
        # An evaluation on another dataset than the training one: every set it tested is a cross-dataset target.
        other_dataset = run.metrics.get("dataset") != training.metrics.get("dataset")
        for test_set, values in run.metrics["test"].items():
            if metric not in values:
                raise KeyError(f"{run.path}: test set {test_set!r} has no {metric!r} metric")
            if values[metric] is None:  # a non-finite result, written as null
                log.warning("%s: %s has no finite %s; left out.", run.path, test_set, metric)
                continue
            role = "cross" if other_dataset else roles.get(test_set, "cross")
            measurements.add(trained, test_set, role, 100.0 * values[metric])
    return measurements


# ---------------------------------------------------------------------------------------------- tables


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
        if len(self.values) == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


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
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
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


def _labels(rows: Iterable[tuple[str, int, tuple[tuple[str, Any], ...]]]) -> dict[Any, str]:
    """A label for each row: the method, and the settings in which rows of the same method and shots
    differ (rows of other shots differ in the shots column already)."""
    rows = list(rows)
    labels = {}
    for method, shots in {row[:2] for row in rows}:
        same = [row for row in rows if row[:2] == (method, shots)]
        keys = sorted({key for row in same for key, _ in row[2]})
        differing = [key for key in keys if len({dict(row[2]).get(key) for row in same}) > 1]
        short = {key: key.rpartition(".")[2] for key in differing}
        clashes = {name for name in short.values() if list(short.values()).count(name) > 1}
        for row in same:
            settings = dict(row[2])
            parts = [
                f"{key if short[key] in clashes else short[key]}={settings.get(key)}" for key in differing
            ]
            labels[row] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


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
    labels = _labels(cells)
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
    labels = _labels(pairs)
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


# ---------------------------------------------------------------------------------- published numbers


@dataclass(frozen=True)
class Reference:
    """A published row: top-1 % per column (dataset, or `Average` / `Target avg`), and where it is from."""

    name: str
    protocol: str
    shots: int
    top1: dict[str, float]
    source: str


def load_references(path: str | Path | None = None) -> list[Reference]:
    """The published rows of `path`, or of the file shipped with kr_vlm (`REFERENCE_FILE`).

    The file is JSON: ``{"references": [{"name", "protocol", "source", "rows": {"<shots>": {column:
    top1 %}}}]}``, with a protocol of ``few_shot``, ``distribution_shift`` or ``cross_dataset``.
    """
    if path is None:
        text = resources.files("kr_vlm").joinpath(REFERENCE_FILE).read_text()
    else:
        text = Path(path).read_text()
    references = []
    for entry in json.loads(text)["references"]:
        if entry["protocol"] not in ("few_shot", *TARGET_PROTOCOLS.values()):
            raise ValueError(
                f"{path or REFERENCE_FILE}: unknown protocol {entry['protocol']!r} of {entry['name']!r}"
            )
        for shots, top1 in entry["rows"].items():
            references.append(
                Reference(entry["name"], entry["protocol"], int(shots), dict(top1), entry["source"])
            )
    return references
