"""The in-distribution / out-of-distribution frontier of every method, over the update scale α and the
learning rate.

A point is one trained model at one update scale α (``adapter_scales``: ``W0 + α ΔW``, WiSE-FT's
interpolation; a training run's zero-shot baseline is its α = 0): its ID top-1, on the training
dataset's own test set, against its OOD top-1, the protocol's own target (``protocol_summary``): the
average over the shifted sets (distribution shift), over the other datasets (cross-dataset), or the new
classes (base-to-new, whose ID is the base classes). Methods are compared where the field compares them
(WiSE-FT, Wortsman et al. CVPR 2022; CLAP, Silva-Rodríguez et al. CVPR 2024): along these curves, not at
one point picked on a small validation set.

A frontier (``Panel``) holds the runs of one protocol, training dataset, shot count and base model. In
it, a *method* is a method with its settings but the swept ones (``SWEPT_KEYS``: the learning rate), its
*configurations* are the swept values, and each configuration's curve is the mean over its seeds at each
α that all of them tested. Zero-shot is the common origin: the mean of every α = 0 point and every
zero-shot run (``adapter=none``) of the panel. ``frontier_table`` gives, per method, the OOD top-1
where the ID top-1 first reaches zero-shot + 50 %, 75 % and 100 % of the method's best gain over
zero-shot, interpolated linearly along the curve (ordered by α, from zero-shot) of the configuration
that reaches that best ID. ``points_rows`` lists every point with the folders it was read from.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kr_vlm import metric_names
from kr_vlm.results.labels import table_labels
from kr_vlm.results.runs import Run, trained_models
from kr_vlm.results.summary import protocol_summary
from kr_vlm.results.tables import Table

# Each protocol's (ID, OOD) entries in its protocol_summary, and how a title names them.
FRONTIER_PROTOCOLS = {
    "distribution_shift": (("distribution_shift", "source"), ("distribution_shift", "target_average")),
    "cross_dataset": (("cross_dataset", "source"), ("cross_dataset", "target_average")),
    "base_to_new": (("base_to_new", "base"), ("base_to_new", "new")),
}
AXES = {
    "distribution_shift": ("the training dataset's test set", "the average over its shifted sets"),
    "cross_dataset": ("the training dataset's test set", "the average over the other datasets"),
    "base_to_new": ("the base classes", "the new classes"),
}
# Settings along which a method moves on its frontier; every other setting makes another method.
SWEPT_KEYS = ("model.optimizer.lr",)
# The shares of a method's best ID gain over zero-shot at which the table reads its OOD top-1.
GAIN_SHARES = (0.5, 0.75, 1.0)
POINTS_FIELDS = (
    "protocol",
    "dataset",
    "shots",
    "model",
    "method",
    "swept",
    "seed",
    "alpha",
    "id_top1",
    "ood_top1",
    "run_folder",
    "read_from",
)


@dataclass(frozen=True)
class Panel:
    """One frontier: the runs of one protocol on one training dataset, shot count and base model."""

    protocol: str
    dataset: str
    shots: int
    model: str

    @property
    def name(self) -> str:
        return f"{self.protocol}: {self.dataset}, {self.shots} shots, {self.model}"


@dataclass
class FrontierRun:
    """One trained model's points on one panel: ``points[α] = (ID, OOD)`` top-1 %, and the metrics.json
    files each point was read from."""

    panel: Panel
    method: str
    settings: tuple[tuple[str, Any], ...]  # everything but the swept settings
    swept: tuple[tuple[str, Any], ...]
    seed: Any
    folder: Path  # the training run's
    points: dict[float, tuple[float, float]] = field(default_factory=dict)
    read_from: dict[float, list[str]] = field(default_factory=dict)

    @property
    def row(self) -> tuple[str, int, tuple[tuple[str, Any], ...]]:
        """The method row (as ``kr_vlm.results.labels.table_labels`` labels rows): method, shots, settings."""
        return (self.method, self.panel.shots, self.settings)


def _model_name(metrics: Mapping[str, Any]) -> str:
    """The base model: open_clip's name, and where its weights came from (a tag or a file's name)."""
    name = metrics.get("model") or ((metrics.get("config") or {}).get("model") or {}).get("clip", {}).get("name")
    weights = Path(str(metrics.get("pretrained") or "")).name
    return f"{name} ({weights})" if weights and weights != name else str(name)


def _id_and_ood(test: Mapping[str, Mapping[str, float]], roles: Mapping[str, str]) -> dict[str, tuple]:
    """Each frontier protocol's (ID, OOD) top-1 % of one model at one α (the protocols it has)."""
    summary = protocol_summary(test, roles)
    points = {}
    for protocol, ((id_key, id_entry), (ood_key, ood_entry)) in FRONTIER_PROTOCOLS.items():
        if protocol in summary:
            in_distribution, out_of_distribution = summary[id_key][id_entry], summary[ood_key][ood_entry]
            if in_distribution is not None and out_of_distribution is not None:
                points[protocol] = (100.0 * in_distribution, 100.0 * out_of_distribution)
    return points


def frontier_runs(runs: Sequence[Run]) -> list[FrontierRun]:
    """Every trained model's points, one ``FrontierRun`` a model and protocol. An evaluation of a training
    run's adapters (``eval.py adapters_dir=...``) adds its scales and sets to that model; a test set that
    two runs measured at the same α counts once, the training run's first."""
    tested: dict[tuple, dict[float, dict[str, tuple[str, float, str]]]] = {}
    folders: dict[tuple, Path] = {}
    for run, training, trained, roles in trained_models(runs):
        key = (trained, _model_name(training.metrics))
        folders.setdefault(key, training.folder)
        for alpha, test in run.tests_by_scale().items():
            sets = tested.setdefault(key, {}).setdefault(alpha, {})
            for name, values in test.items():
                if values.get(metric_names.TOP1) is not None and name not in sets:
                    sets[name] = (roles[name], values[metric_names.TOP1], str(run.path))
    by_model: dict[tuple, FrontierRun] = {}
    for (trained, model), by_scale in tested.items():
        swept = tuple((key, value) for key, value in trained.settings if key in SWEPT_KEYS)
        settings = tuple((key, value) for key, value in trained.settings if key not in SWEPT_KEYS)
        for alpha, sets in sorted(by_scale.items()):
            test = {name: {metric_names.TOP1: top1} for name, (_, top1, _) in sets.items()}
            roles = {name: role for name, (role, _, _) in sets.items()}
            for protocol, point in _id_and_ood(test, roles).items():
                panel = Panel(protocol, trained.dataset, trained.shots, model)
                frontier_run = by_model.setdefault(
                    (trained, model, protocol),
                    FrontierRun(
                        panel, trained.method, settings, swept, trained.seed, folders[trained, model]
                    ),
                )
                frontier_run.points[alpha] = point
                frontier_run.read_from[alpha] = sorted({path for _, _, path in sets.values()})
    return list(by_model.values())


def _mean_point(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    points = list(points)
    return statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)


@dataclass
class Frontier:
    """One panel: its trained runs, its zero-shot runs (``adapter=none``), and zero-shot (the mean of
    ``zero_shot_count`` results at α = 0 or zero-shot; None if nothing measured it)."""

    panel: Panel
    runs: list[FrontierRun]
    zero_shot_runs: list[FrontierRun]
    zero_shot: tuple[float, float] | None
    zero_shot_count: int

    def methods(self) -> dict[tuple, dict[tuple, list[FrontierRun]]]:
        """The trained runs by method row, then by swept settings (configuration)."""
        methods: dict[tuple, dict[tuple, list[FrontierRun]]] = {}
        for run in self.runs:
            methods.setdefault(run.row, {}).setdefault(run.swept, []).append(run)
        return methods

    def curve(self, seeds: Sequence[FrontierRun]) -> dict[float, tuple[float, float]]:
        """A configuration's curve: the mean over its seeds at each α that all of them tested."""
        shared = set.intersection(*(set(run.points) for run in seeds))
        return {alpha: _mean_point(run.points[alpha] for run in seeds) for alpha in sorted(shared)}


def frontiers(runs: Sequence[Run]) -> list[Frontier]:
    """The frontiers the runs fill, one a panel (sorted), zero-shot runs matched to panels of their
    protocol, dataset and model whatever their shot count."""
    all_runs = frontier_runs(runs)
    panels = sorted({run.panel for run in all_runs if run.method != "none"}, key=lambda p: p.name)
    result = []
    for panel in panels:
        members = [run for run in all_runs if run.panel == panel and run.method != "none"]
        zero_shot_runs = [
            run
            for run in all_runs
            if run.method == "none"
            and (run.panel.protocol, run.panel.dataset, run.panel.model)
            == (panel.protocol, panel.dataset, panel.model)
        ]
        origins = [point for run in members for alpha, point in run.points.items() if alpha == 0]
        origins += [point for run in zero_shot_runs for point in run.points.values()]
        zero_shot = _mean_point(origins) if origins else None
        result.append(Frontier(panel, members, zero_shot_runs, zero_shot, len(origins)))
    return result


def ood_where_id_reaches(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The OOD top-1 where the ID top-1 first reaches ``target`` along ``curve`` (``(ID, OOD)`` points in
    order), linearly interpolated between the two points around it; None if it never does."""
    if not curve:
        return None
    if curve[0][0] >= target:
        return curve[0][1]
    for (id0, ood0), (id1, ood1) in zip(curve, curve[1:], strict=False):
        if id1 >= target:
            return ood0 + (target - id0) / (id1 - id0) * (ood1 - ood0)
    return None


def _swept_text(swept: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{key.rpartition('.')[2]}={value}" for key, value in swept) or "–"


def frontier_table(frontier: Frontier) -> Table:
    """Per method: its best ID top-1 (and where: configuration and α), and its OOD top-1 where its ID
    first reaches zero-shot + 50 %, 75 %, 100 % of its best gain (``ood_where_id_reaches`` along the
    curve, from zero-shot, of the configuration with the best ID)."""
    panel = frontier.panel
    id_axis, ood_axis = AXES[panel.protocol]
    shares = [f"OOD at +{round(100 * share)} %" for share in GAIN_SHARES]
    table = Table(
        "frontier",
        f"ID / OOD frontier, {panel.name}: top-1 % (ID: {id_axis}; OOD: {ood_axis})",
        ["method", "runs", "best ID at", "best ID", *shares],
    )
    methods = frontier.methods()
    labels = table_labels(methods)
    zero_shot = frontier.zero_shot
    for row in sorted(methods, key=labels.get):
        curves = {swept: curve for swept, seeds in methods[row].items() if (curve := frontier.curve(seeds))}
        if not curves:
            table.notes.append(f"{labels[row]}: its seeds were tested at no update scale in common; left out.")
            continue
        best_swept, best_alpha = max(
            ((swept, alpha) for swept, curve in curves.items() for alpha in curve),
            key=lambda where: curves[where[0]][where[1]][0],
        )
        best_id = curves[best_swept][best_alpha][0]
        readings: list[float | None] = [None] * len(GAIN_SHARES)
        if zero_shot is not None and best_id > zero_shot[0]:
            curve = list(curves[best_swept].values())
            if 0.0 not in curves[best_swept]:
                curve.insert(0, zero_shot)
            readings = [
                ood_where_id_reaches(curve, zero_shot[0] + share * (best_id - zero_shot[0]))
                for share in GAIN_SHARES
            ]
        runs = sum(len(seeds) for seeds in methods[row].values())
        where = f"{_swept_text(best_swept)}, α={best_alpha:g}"
        table.rows.append([labels[row], str(runs), where, f"{best_id:.1f}", *map(_cell, readings)])
        table.record(panel.name, labels[row], panel.shots, "best ID", best_id, None)
        for column, value in zip(shares, readings, strict=True):
            if value is not None:
                table.record(panel.name, labels[row], panel.shots, column, value, None)
    if zero_shot is None:
        table.notes.append(
            "No zero-shot result among these runs, so no gain: test at adapter_scales=[0,...,1], train with "
            "zero_shot_baseline=true, or add a zero-shot run (adapter=none)."
        )
    else:
        table.notes.append(
            f"Zero-shot, the common origin: ID {zero_shot[0]:.1f}, OOD {zero_shot[1]:.1f} (mean of "
            f"{frontier.zero_shot_count} results at α = 0 or zero-shot). A dash: the method's best ID is not "
            "above zero-shot."
        )
    return table


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def points_rows(frontier_list: Sequence[Frontier]) -> list[dict[str, Any]]:
    """One row a point of every frontier, zero-shot runs' included: where it is, the run folder it belongs
    to, and the metrics.json files it was read from (``;``-separated)."""
    rows = []
    for frontier in frontier_list:
        labels = table_labels(frontier.methods())
        for run in [*frontier.runs, *frontier.zero_shot_runs]:
            for alpha, (in_distribution, out_of_distribution) in run.points.items():
                rows.append(
                    {
                        "protocol": frontier.panel.protocol,
                        "dataset": frontier.panel.dataset,
                        "shots": frontier.panel.shots,
                        "model": frontier.panel.model,
                        "method": labels.get(run.row, run.method),
                        "swept": _swept_text(run.swept),
                        "seed": run.seed,
                        "alpha": alpha,
                        "id_top1": f"{in_distribution:.4f}",
                        "ood_top1": f"{out_of_distribution:.4f}",
                        "run_folder": str(run.folder),
                        "read_from": ";".join(run.read_from[alpha]),
                    }
                )
    return rows
