"""The run summary: ``metrics.json`` (its schema is ``run_summary``, its ``test_by_scale`` entries
``scale_summary``) and the tables printed at the end."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Lightning's own rank_zero_only (Lightning sets the rank on this object) without importing Lightning.
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kr_vlm import metric_names
from kr_vlm.cli.checks import whole_number
from kr_vlm.errors import ConfigError
from kr_vlm.files import write_json_atomic
from kr_vlm.rank_report import REPORT_FILE

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer


def metrics_per_test_set(trainer: Trainer, datamodule: LightningDataModule) -> dict[str, dict[str, float]]:
    """{test set: {top1, top5, loss}} from what the module logged as ``test/<set>/<metric>``."""
    logged = trainer.callback_metrics
    return {
        task.name: {
            metric: float(logged[key])
            for metric in metric_names.EVAL_METRICS
            if (key := metric_names.metric_key(metric_names.TEST, metric, task.name)) in logged
        }
        for task in datamodule.test_tasks
    }


def scale_key(alpha: float) -> str:
    """How metrics.json names the update scale ``alpha`` in ``test_by_scale``: ``"0"``, ``"0.25"``, ``"1"``."""
    return str(int(alpha)) if alpha.is_integer() else repr(alpha)


def scale_summary(test: dict[str, dict[str, float]], roles: dict[str, str]) -> dict[str, Any]:
    """One entry of metrics.json's ``test_by_scale``: the metrics per test set at one update scale α
    (``test``) and the protocols' summaries from them (``kr_vlm.results.protocol_summary``, whose
    ``test_roles`` is left to the top level of metrics.json)."""
    from kr_vlm.results import protocol_summary

    summary = protocol_summary(test, roles)
    del summary["test_roles"]
    return {"test": test, **summary}


def optimized_metric(cfg: DictConfig, trainer: Trainer) -> dict[str, Any] | None:
    """``{"name", "value"}`` of the metric named by ``optimized_metric`` (e.g. ``val/top1``) as the fit
    ended, for hyperparameter searches; None when the config names none."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in trainer.callback_metrics:
        logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
        raise ConfigError(
            f"optimized_metric={name} was not logged by the fit (logged: {logged}). The module validates at "
            f"the end of the fit and logs {metric_names.VAL_TOP1}; keep validation on (trainer.limit_val_batches)."
        )
    return {"name": name, "value": float(trainer.callback_metrics[name])}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as valid JSON, whole or not at all (on global rank zero only); a NaN loss is
    written as null and listed under ``non_finite``."""
    write_json_atomic(path, metrics)


def run_summary(
    cfg: DictConfig,
    module: LightningModule,
    trainer: Trainer,
    datamodule: LightningDataModule,
    timings: dict[str, float],
    tested: str | None,
    test: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """The content of ``metrics.json``: accuracy per test set (``test``, the trained adapters at the update
    scale α = 1), what each set measures and the protocols' summaries (``kr_vlm.results.protocol_summary``:
    base/new/hm, source and target averages), parameters, steps, time, memory, config. A run tested at
    other update scales (``adapter_scales``) adds ``test_by_scale`` (``scale_summary``) itself."""
    from kr_vlm.adapters import count_parameters
    from kr_vlm.results import protocol_summary

    trainable, total = count_parameters(module)
    return {
        "task_name": cfg.task_name,
        "method": module.adapter_method,
        "model": module.model_name,
        "pretrained": module.pretrained,
        "dataset": cfg.data.dataset,
        "shots": whole_number(cfg, "data.shots"),
        "seed": cfg.get("seed"),
        "tested": tested,
        "test": test,
        **protocol_summary(test, datamodule.test_roles),
        "trainable_params": trainable,
        "total_params": total,
        "steps": int(trainer.global_step),
        **{key: round(value, 2) for key, value in timings.items()},
        # The trainer's device: Lightning moves the module back to the CPU when fit/test end.
        "peak_memory_mb": round(peak_memory_mb(trainer.strategy.root_device), 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _percent_cell(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _scale_table(by_scale: dict[str, dict[str, Any]]) -> Any:
    """Top-1 of every test set, and each protocol's target average, at every update scale α."""
    from rich.table import Table

    from kr_vlm.results import TARGET_PROTOCOLS

    table = Table(title="top-1 % at each update scale α (0: the base model, 1: the trained adapters)")
    table.add_column("test set")
    for key in by_scale:
        table.add_column(f"α = {key}", justify="right")
    entries = list(by_scale.values())
    for name in entries[0]["test"]:
        table.add_row(name, *(_percent_cell(entry["test"][name].get(metric_names.TOP1)) for entry in entries))
    for protocol in TARGET_PROTOCOLS.values():
        if protocol in entries[0]:
            label = f"{protocol.replace('_', ' ')}: target average"
            table.add_row(label, *(_percent_cell(entry[protocol]["target_average"]) for entry in entries))
    if "base_to_new" in entries[0]:
        table.add_row("base-to-new: HM", *(_percent_cell(entry["base_to_new"]["hm"]) for entry in entries))
    return table


@rank_zero_only
def print_results(metrics: dict[str, Any], output_dir: Path) -> None:
    """A table of the test accuracies and the paths of what the run wrote (``kr_vlm.console``: drawn by rich
    in a terminal, Markdown and unbroken lines in a file or a pipe)."""
    from rich.table import Table

    from kr_vlm.console import print_table, stdout_console
    from kr_vlm.results import summary_lines

    table = Table(
        title=f"{metrics['task_name']}: {metrics['method']} on {metrics['dataset']}, "
        f"{metrics['shots']} shots, seed {metrics['seed']}"
    )
    zero_shot = metrics.get("zero_shot")
    table.add_column("test set")
    if zero_shot is not None:
        table.add_column("zero-shot top-1 %", justify="right")
    table.add_column("top-1 %", justify="right")
    if zero_shot is not None:
        table.add_column("change", justify="right")
    table.add_column("top-5 %", justify="right")
    for name, values in metrics["test"].items():
        top1 = values.get(metric_names.TOP1)
        cells = [name]
        if zero_shot is not None:
            before = zero_shot.get(name, {}).get(metric_names.TOP1)
            cells.append(_percent_cell(before))
        cells.append(_percent_cell(top1))
        if zero_shot is not None:
            change = None if before is None or top1 is None else top1 - before
            cells.append("–" if change is None else f"{100 * change:+.2f}")
        cells.append(_percent_cell(values.get(metric_names.TOP5)))
        table.add_row(*cells)
    console = stdout_console()
    print_table(table, console)
    if "test_by_scale" in metrics:
        console.print()
        print_table(_scale_table(metrics["test_by_scale"]), console)
    for line in summary_lines(metrics):
        console.print(line)
    if "adapters_from" in metrics:
        console.print(f"Adapters from: {metrics['adapters_from']}")
    console.print(f"Run folder: {output_dir}")
    for name in (metric_names.METRICS_FILE, REPORT_FILE, "adapters"):
        if (output_dir / name).exists():
            console.print(f"  {name}: {output_dir / name}")
