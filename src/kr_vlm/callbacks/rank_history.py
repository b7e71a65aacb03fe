"""What the rank monitor keeps and shows: ``rank_history.json`` built from its records, the report files
(``rank_report.html`` and its two plots) written from that history, the scalars it logs and TensorBoard's
custom-scalars layout of them.

Everything here works on plain data (records, the layers' labels, spectra as lists), so the live report can
be rendered in the monitor's background thread from a copy taken in the training thread.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kr_vlm.files import write_bytes_atomic, write_text_atomic
from kr_vlm.rank_report import (
    HISTORY_FILE,
    REPORT_FILE,
    history_figure,
    mean,
    png,
    spectra_figure,
    stopped_page,
    write_html_report,
)

METRICS = ("effective_rank", "stable_rank", "frobenius_norm")
SPECTRA_PLOT_FILE = "rank_spectra.png"
HISTORY_PLOT_FILE = "rank_history.png"


def layer_groups(layer_info: Mapping[str, Mapping[str, Any]], names=None) -> dict[str, list[str]]:
    """Layer names by group (``vision/q``), groups and layers in model order, and every layer as ``all``."""
    groups: dict[str, list[str]] = {}
    for name, info in layer_info.items():  # in module order
        if names is None or name in names:
            groups.setdefault(info["group"], []).append(name)
    groups["all"] = [name for name in layer_info if names is None or name in names]
    return groups


def group_metrics(
    layer_info: Mapping[str, Mapping[str, Any]], record: Mapping[str, Any]
) -> dict[str, dict[str, float | None]]:
    """Means of each metric over the finite layers of every group (and over all layers, as group ``all``),
    None for a group whose updates are all non-finite; groups in the order their first layers come in the
    model."""
    groups = layer_groups(layer_info, record["layers"])
    groups["all"] = list(record["layers"])
    return {
        group: {metric: mean(record["layers"][name][metric] for name in names) for metric in METRICS}
        for group, names in groups.items()
    }


def scalars(
    layer_info: Mapping[str, Mapping[str, Any]], record: Mapping[str, Any], per_layer: bool
) -> dict[str, float]:
    """What the loggers get for one record: per group ``<metric>/<group>`` (the group means), the group's
    ``rank_cap/<group>`` and ``relative_update/<group>`` (mean ``‖ΔW‖_F / ‖W0‖_F``); with ``per_layer``
    also ``<metric>_per_layer/<layer>``. None values (non-finite updates) are left out."""
    values: dict[str, float | None] = {}
    for group, metrics in group_metrics(layer_info, record).items():
        values.update({f"{metric}/{group}": value for metric, value in metrics.items()})
    for group, names in layer_groups(layer_info, record["layers"]).items():
        values[f"rank_cap/{group}"] = max((layer_info[name]["rank_cap"] for name in names), default=None)
        values[f"relative_update/{group}"] = mean(
            _relative(record["layers"][name]["frobenius_norm"], layer_info[name]["base_norm"]) for name in names
        )
    if per_layer:
        for name, metrics in record["layers"].items():
            values.update({f"{metric}_per_layer/{name}": value for metric, value in metrics.items()})
    return {key: value for key, value in values.items() if value is not None}


def _relative(norm: float | None, base_norm: float | None) -> float | None:
    return None if norm is None or not base_norm else norm / base_norm


def tensorboard_layout(layer_info: Mapping[str, Mapping[str, Any]], per_layer: bool) -> dict[str, Any]:
    """TensorBoard's custom-scalars layout (``SummaryWriter.add_custom_scalars``) of the monitor's scalars:
    a category per tower and layer type (``rank vision/q``, and ``rank all``), in model order, each with
    the effective rank beside its rank cap, the stable rank and ``‖ΔW‖/‖W0‖`` (and, with ``per_layer``,
    the effective rank of each of its layers)."""
    layout: dict[str, Any] = {}
    for group, names in layer_groups(layer_info).items():
        charts = {
            "effective rank and rank cap": ["Multiline", [f"effective_rank/{group}", f"rank_cap/{group}"]],
            "stable rank": ["Multiline", [f"stable_rank/{group}"]],
            "‖ΔW‖_F / ‖W0‖_F": ["Multiline", [f"relative_update/{group}"]],
        }
        if per_layer and group != "all":
            tags = [re.escape(f"effective_rank_per_layer/{name}") for name in names]
            charts["effective rank of each layer"] = ["Multiline", tags]
        layout[f"rank {group}"] = charts
    return layout


def build_history(
    records: list[dict[str, Any]],
    layer_info: Mapping[str, Mapping[str, Any]],
    final_spectra: Mapping[str, list[float]],
    parameters: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything recorded so far, as written to ``rank_history.json``.

    ``steps``/``seconds`` list the evaluations (``seconds``: the work of the evaluation, snapshot and
    decompositions, not the wall time it spent in the background); the series ``groups[group][metric]``
    and ``layers[name][metric]`` are aligned with ``steps`` (None where a layer did not exist or its update
    was not finite; those steps are also listed in ``layers[name]["non_finite_steps"]``); each layer
    also has its ``group``, ``shape``, ``max_rank`` (``min(d_out, d_in)``), ``rank_cap`` (the highest rank
    its method can build) and ``base_norm`` (``‖W0‖_F``, for the relative update size); ``final_spectra``
    holds the singular values of the latest evaluation (6 significant digits); ``parameters`` the
    trainable/total counts (``parameter_summary``).
    """
    steps = [record["step"] for record in records]
    group_series: dict[str, dict[str, list[float | None]]] = {}
    for record in records:
        for group, values in group_metrics(layer_info, record).items():
            series = group_series.setdefault(group, {metric: [] for metric in METRICS})
            for metric in METRICS:
                series[metric].append(values[metric])
    layers = {
        name: {
            **info,
            **{
                metric: [record["layers"].get(name, {}).get(metric) for record in records]
                for metric in METRICS
            },
            "non_finite_steps": [record["step"] for record in records if name in record.get("non_finite", ())],
        }
        for name, info in layer_info.items()
    }
    return {
        "steps": steps,
        "seconds": [record["seconds"] for record in records],
        "metrics": list(METRICS),
        "groups": group_series,
        "layers": layers,
        "final_step": steps[-1] if steps else None,
        "final_spectra": {
            name: [float(f"{value:.6g}") for value in sigma] for name, sigma in final_spectra.items()
        },
        "parameters": dict(parameters),
    }


class ReportFiles:
    """Writes a run's ``rank_history.json`` and report into ``run_dir``, each file atomically (a reader finds
    the previous version or the new one). A write that fails (full disk, read-only folder) is one warning
    naming the file, once a file, and never stops training."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._warned: set[str] = set()
        self._live_page: str | None = None  # the last page written while training ran

    def write_history(self, history: Mapping[str, Any]) -> None:
        """``rank_history.json`` (strict JSON: no NaN or Infinity)."""
        self._write(HISTORY_FILE, lambda path: write_text_atomic(path, json.dumps(history, allow_nan=False)))

    def write_report(
        self, history: Mapping[str, Any], spectra_by_group: Mapping[str, list[list[float]]], finished: bool
    ) -> bytes:
        """The two plots and ``rank_report.html``, which says whether training is still running; returns the
        spectra plot (PNG)."""
        spectra_png = png(spectra_figure(spectra_by_group, history["final_step"]))
        history_png = png(history_figure(history))
        self._write(SPECTRA_PLOT_FILE, lambda path: write_bytes_atomic(path, spectra_png))
        self._write(HISTORY_PLOT_FILE, lambda path: write_bytes_atomic(path, history_png))

        def write_page(path: Path) -> None:
            page = write_html_report(path, history, spectra_png, history_png, finished=finished)
            self._live_page = None if finished else page

        self._write(REPORT_FILE, write_page)
        return spectra_png

    def mark_stopped(self, step: int | None) -> None:
        """Say on the live report (if one was written) that training stopped at ``step`` unfinished; the
        page is not rendered again."""
        if self._live_page is not None:
            page = stopped_page(self._live_page, step)
            self._write(REPORT_FILE, lambda path: write_text_atomic(path, page))

    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        path = self.run_dir / name
        try:
            write(path)
        except OSError as error:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"EffectiveRankMonitor could not write {path}: {error.strerror or error}. Training goes on "
                    "without it (later failures of this file are not reported again); free disk space or make "
                    "the folder writable (callbacks.rank_monitor.output_dir).",
                    stacklevel=2,
                )
