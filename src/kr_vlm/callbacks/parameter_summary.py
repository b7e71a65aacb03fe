"""How many parameters train, per tower and layer type: a table at fit/test start, and hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from rich.table import Table
from torch import nn

from kr_vlm.callbacks.grouping import group_of, group_sort_key
from kr_vlm.console import print_table


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of one group ``"<tower>/<layer type>"`` (see ``grouping``)."""

    group: str
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters_by_group(model: nn.Module) -> list[ParameterCount]:
    """Trainable and total parameters per group, in display order (vision/q first, other/other last).

    Shared parameters are counted once (``named_parameters`` skips repeats), so the counts add up to
    ``kr_vlm.adapters.count_parameters(model)``.
    """
    trainable: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        group = group_of(name)
        total[group] = total.get(group, 0) + parameter.numel()
        trainable[group] = trainable.get(group, 0) + (parameter.numel() if parameter.requires_grad else 0)
    return [
        ParameterCount(group, trainable[group], total[group]) for group in sorted(total, key=group_sort_key)
    ]


def total_count(counts: list[ParameterCount]) -> ParameterCount:
    """The sum of all groups, as group ``all``."""
    return ParameterCount("all", sum(c.trainable for c in counts), sum(c.total for c in counts))


def adapter_methods(model: nn.Module) -> list[str]:
    """Names of the adapter methods recorded on the model or its submodules by ``inject_adapters``."""
    methods: list[str] = []
    for module in model.modules():
        config = getattr(module, "kr_vlm_adapter_config", None)
        configs = config if isinstance(config, (list, tuple)) else [config]
        for item in configs:
            method = getattr(item, "method", None)
            if method is not None and method not in methods:
                methods.append(method)
    return methods


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
