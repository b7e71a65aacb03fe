"""How many parameters train, per tower and layer type: a table at fit/test start, and hyperparameters.

Adapted layers are grouped by their labels (``kr_vlm.adapters.layer_labels``: tower and layer type, as the
target selection gave them); everything else in the model is the group ``other/other``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from rich.table import Table
from torch import nn

from kr_vlm.adapters import adapted_layers, layer_labels
from kr_vlm.adapters.inject import CONFIG_ATTRIBUTE
from kr_vlm.adapters.labels import REST, label_group
from kr_vlm.console import print_table


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of one group ``"<tower>/<layer type>"`` (``label_group``)."""

    group: str
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters_by_group(model: nn.Module) -> list[ParameterCount]:
    """Trainable and total parameters per group: the adapted layers' groups in module order, then the rest
    of the model as ``other/other``.

    An adapted layer counts its adapter and its base layer. Shared parameters are counted once, so the
    counts add up to ``kr_vlm.adapters.count_parameters(model)``.
    """
    labels = layer_labels(model)
    group_of_parameter: dict[int, str] = {}
    for name, _ in adapted_layers(model):
        for parameter in model.get_submodule(name).parameters():
            group_of_parameter.setdefault(id(parameter), label_group(labels[name]))
    rest = label_group(REST)
    trainable: dict[str, int] = {}
    total: dict[str, int] = {}
    for group in [*dict.fromkeys(group_of_parameter.values()), rest]:
        trainable[group] = total[group] = 0
    for parameter in model.parameters():
        group = group_of_parameter.get(id(parameter), rest)
        total[group] += parameter.numel()
        trainable[group] += parameter.numel() if parameter.requires_grad else 0
    return [ParameterCount(group, trainable[group], total[group]) for group in total if total[group]]


def total_count(counts: list[ParameterCount]) -> ParameterCount:
    """The sum of all groups, as group ``all``."""
    return ParameterCount("all", sum(c.trainable for c in counts), sum(c.total for c in counts))


def adapter_methods(model: nn.Module) -> list[str]:
    """Names of the adapter methods recorded on the model or its submodules by ``inject_adapters``."""
    methods = [
        getattr(module, CONFIG_ATTRIBUTE).method
        for module in model.modules()
        if hasattr(module, CONFIG_ATTRIBUTE)
    ]
    return list(dict.fromkeys(methods))


def parameter_table(model: nn.Module, title: str | None = None) -> Table:
    """A rich table of trainable / total parameters per tower and layer type, with totals."""
    counts = count_parameters_by_group(model)
    if title is None:
        methods = adapter_methods(model)
        title = f"Parameters ({', '.join(methods)})" if methods else "Parameters"
    table = Table(title=title, show_footer=True)
    overall = total_count(counts)
    table.add_column("tower", footer="total")
    table.add_column("layer type")
    table.add_column("trainable", justify="right", footer=f"{overall.trainable:,}")
    table.add_column("total", justify="right", footer=f"{overall.total:,}")
    table.add_column("trainable %", justify="right", footer=f"{overall.trainable_percent:.3f}")
    for count in counts:
        tower, layer_type = count.group.split("/")
        table.add_row(
            tower, layer_type, f"{count.trainable:,}", f"{count.total:,}", f"{count.trainable_percent:.3f}"
        )
    return table


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """The counts as plain data: adapter methods, totals and ``by_group`` (for loggers, JSON and reports)."""
    counts = count_parameters_by_group(model)
    overall = total_count(counts)
    return {
        "methods": adapter_methods(model),
        "trainable": overall.trainable,
        "total": overall.total,
        "trainable_percent": overall.trainable_percent,
        "by_group": {count.group: {"trainable": count.trainable, "total": count.total} for count in counts},
    }


class ParameterSummary(pl.Callback):
    """Print the parameter table at fit and test start (rank zero) and log the counts as hyperparameters.

    The table is printed again at a later start only if the counts changed (train-then-test prints once).

    Args:
        log_hyperparams: also record the counts with every logger (``parameters/...``).
    """

    def __init__(self, log_hyperparams: bool = True) -> None:
        super().__init__()
        self.log_hyperparams = log_hyperparams
        self._last_counts: list[ParameterCount] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise(trainer, pl_module)

    def _summarise(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        counts = count_parameters_by_group(pl_module)
        if counts == self._last_counts:
            return
        self._last_counts = counts
        print_table(parameter_table(pl_module))
        if self.log_hyperparams:
            hyperparams = {"parameters": parameter_summary(pl_module)}
            for logger in trainer.loggers:
                logger.log_hyperparams(hyperparams)
