"""Watch the effective rank of every adapter's weight update while a model trains.

The Khatri-Rao updates of KRAdapter are meant to use (nearly) all directions of a layer, LoRA's at most
``r``. ``EffectiveRankMonitor`` makes that visible: it decomposes every ``delta_weight()`` at train start,
every ``every_n_steps`` optimizer steps and at train end, logs effective rank, stable rank and Frobenius
norm per layer and per group (tower × layer type, from the labels stored with the adapter config) to the
trainer's loggers, keeps ``rank_history.json`` current in the run folder, and at train end draws two plots
and a self-contained ``rank_report.html``.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib.image
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from kr_vlm import spectral
from kr_vlm.adapters import adapted_layers, layer_labels
from kr_vlm.adapters.labels import label_group
from kr_vlm.callbacks.parameter_summary import parameter_summary
from kr_vlm.errors import ConfigError
from kr_vlm.files import write_text_atomic
from kr_vlm.rank_report import history_figure, png, spectra_figure, write_html_report

METRICS = ("effective_rank", "stable_rank", "frobenius_norm")
HISTORY_FILE = "rank_history.json"
SPECTRA_PLOT_FILE = "rank_spectra.png"
HISTORY_PLOT_FILE = "rank_history.png"
REPORT_FILE = "rank_report.html"

# 2**27 float32 entries = 512 MiB per stack: a whole ViT-B stack of 768x3072 updates (12 x 2.4M entries)
# fits, while an LLM's 4096x11008 updates are decomposed a dozen at a time.
DEFAULT_MAX_STACK_ELEMENTS = 2**27


def _layer_device(layer: nn.Module) -> torch.device:
    parameter = next(layer.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads (None: leave the setting alone), then restore it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def delta_weight_spectra(
    layers: Iterable[tuple[str, nn.Module]],
    max_stack_elements: int = DEFAULT_MAX_STACK_ELEMENTS,
    cpu_threads: int | None = 1,
) -> dict[str, torch.Tensor]:
    """Singular values (descending, float32, on the CPU) of every layer's ``delta_weight()``, by name.

    Updates of the same shape on the same device are stacked and decomposed by one batched call on that
    device; a tall update is transposed first (same singular values) so that, e.g., ``c_fc`` (3072x768)
    shares a stack with ``c_proj`` (768x3072). A stack holds at most ``max_stack_elements`` matrix entries,
    which bounds the memory the monitor takes next to training. Stacks on the CPU are decomposed with
    ``cpu_threads`` torch threads (None: the current setting).
    """
    stacks: dict[tuple[torch.device, int, int], list[tuple[str, nn.Module]]] = {}
    for name, layer in layers:
        short, long = sorted((layer.out_features, layer.in_features))
        stacks.setdefault((_layer_device(layer), short, long), []).append((name, layer))

    spectra: dict[str, torch.Tensor] = {}
    for (device, short, long), members in stacks.items():
        per_call = max(1, max_stack_elements // (short * long))
        for start in range(0, len(members), per_call):
            chunk = members[start : start + per_call]
            # Filled in place (not torch.stack of a list): one float32 copy of the updates, not two.
            stack = torch.empty((len(chunk), short, long), dtype=torch.float32, device=device)
            for index, (_, layer) in enumerate(chunk):
                delta = layer.delta_weight()
                stack[index] = delta.mT if delta.shape[0] > delta.shape[1] else delta
            # Multi-threaded CPU SVD (MKL / OpenMP) slows down 8x to 100x as soon as the cores are shared with
            # other work (measured with 2 threads on a busy 2-core machine); one thread stays steady.
            with _intra_op_threads(cpu_threads if device.type == "cpu" else None):
                sigma = spectral.singular_values(stack, dtype=torch.float32).cpu()
            spectra.update(zip((name for name, _ in chunk), sigma, strict=True))
    return spectra


def spectrum_metrics(sigma: torch.Tensor) -> dict[str, float]:
    """Effective rank, stable rank and Frobenius norm of a matrix, from its singular values."""
    return {
        "effective_rank": float(spectral.effective_rank_from_singular_values(sigma)),
        "stable_rank": float(spectral.stable_rank_from_singular_values(sigma)),
        "frobenius_norm": float(sigma.square().sum().sqrt()),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class EffectiveRankMonitor(pl.Callback):
    """Log and plot the spectra of all adapter weight updates during ``trainer.fit``.

    Evaluations run on global rank zero only, on each layer's device, under ``torch.no_grad()`` in float32;
    they read the adapters and change nothing in training. The other ranks hold the same weights under DDP
    and skip the work, and nothing here is a collective operation, so no rank waits on another.
    Sharded strategies (FSDP, DeepSpeed, model parallel) are not supported: the monitor warns and stays off.

    At every evaluation (``step`` = ``trainer.global_step``) the loggers get, for every group
    ``<tower>/<layer type>`` such as ``vision/q`` or ``text/fc2``, plus ``all``: ``effective_rank/<group>``,
    ``stable_rank/<group>``, ``frobenius_norm/<group>`` (means over the group's layers); per layer
    (``log_per_layer``) ``effective_rank_per_layer/<name>`` and likewise; a TensorBoard logger also gets the
    histograms ``singular_values/<group>``. ``rank_history.json`` in the run folder is rewritten.

    At train end (or on ``write_report()``) it renders ``rank_spectra.png`` (normalised singular values
    per group), ``rank_history.png`` (effective rank over steps per group), the self-contained
    ``rank_report.html``, and the TensorBoard image ``rank_spectra``. Plots are kept out of the periodic
    evaluations: rendering takes about a second a figure on a CPU core, and only the last ones are kept.

    Args:
        every_n_steps: evaluate every this many optimizer steps (0: only at train start and end). The
            default keeps the cost well under 2% of training time for ViT-B/16 (scripts/bench_rank_monitor.py).
        on_train_start: evaluate before the first step (adapter updates usually start at zero: rank 0).
        on_train_end: evaluate after the last step (unless that step was just evaluated) and write the plots
            and the report.
        output_dir: folder for the files; default ``trainer.log_dir`` (the first logger's folder), else
            ``trainer.default_root_dir``.
        log_per_layer: also send per-layer metrics to the loggers (the JSON file always holds them).
        max_stack_elements: most matrix entries decomposed in one batched call (bounds the extra memory).
        cpu_threads: torch threads for decompositions on the CPU (restored afterwards); None keeps the
            current setting. One thread is the default because multi-threaded CPU SVD collapses when the
            cores are busy with anything else (see ``delta_weight_spectra``).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        on_train_start: bool = True,
        on_train_end: bool = True,
        output_dir: str | Path | None = None,
        log_per_layer: bool = True,
        max_stack_elements: int = DEFAULT_MAX_STACK_ELEMENTS,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(
                f"every_n_steps must be a non-negative integer (0 evaluates only at train start/end), "
                f"got {every_n_steps!r}."
            )
        if (
            isinstance(max_stack_elements, bool)
            or not isinstance(max_stack_elements, int)
            or max_stack_elements < 1
        ):
            raise ConfigError(f"max_stack_elements must be a positive integer, got {max_stack_elements!r}.")
        if cpu_threads is not None and (
            isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1
        ):
            raise ConfigError(f"cpu_threads must be a positive integer or None, got {cpu_threads!r}.")
        self.every_n_steps = every_n_steps
        # Stored under other names: ``on_train_start``/``on_train_end`` are the hooks of this class.
        self.evaluate_at_train_start = on_train_start
        self.evaluate_at_train_end = on_train_end
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.log_per_layer = log_per_layer
        self.max_stack_elements = max_stack_elements
        self.cpu_threads = cpu_threads

        self.run_dir: Path | None = None
        # One record per evaluation: {"step", "seconds", "layers": {name: {metric: value}}}.
        self.records: list[dict[str, Any]] = []
        self.layer_info: dict[str, dict[str, Any]] = {}
        self.final_spectra: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, Any] = {}
        self._base_norms: dict[str, float] = {}
        self._enabled = True
        self._warned_no_layers = False

    # ----------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            self._enabled = False
            warnings.warn(
                f"EffectiveRankMonitor is off under {type(trainer.strategy).__name__}: the parameters are "
                "sharded across processes, so no rank holds whole weight updates. Use a DDP strategy to "
                "monitor ranks.",
                stacklevel=2,
            )
            return
        # Resolved here, on every rank: trainer.log_dir broadcasts, so it must not be read on rank zero alone.
        if self.output_dir is not None:
            self.run_dir = self.output_dir
        else:
            self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed from a checkpoint may have evaluated this step already (its history is restored).
        if self.evaluate_at_train_start and not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same global step (the first ones on step 0,
        # before any update): evaluate each step once, and step 0 only through on_train_start.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not self._evaluated(step):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.evaluate_at_train_end:
            return
        if not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module)
        if self._enabled and trainer.is_global_zero and self.final_spectra:
            self.write_report(trainer)

    def state_dict(self) -> dict[str, Any]:
        # The history travels in checkpoints, so a resumed run keeps its whole curve.
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])

    # ----------------------------------------------------------------------------------------- evaluation
    def _evaluated(self, step: int) -> bool:
        return bool(self.records) and self.records[-1]["step"] == step

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        if self.evaluate(pl_module, trainer.global_step) is None:
            return
        self._log_to_loggers(trainer, trainer.global_step)
        self.write_history()

    def evaluate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        """Decompose every adapter update of ``model`` now and record the result as ``step``.

        Returns the record ``{"step", "seconds", "layers": {name: {metric: value}}}`` (also appended to
        ``records``), or None (with a warning, once) when the model has no adapted layers. Usable without
        a trainer, e.g. in a plain PyTorch loop; ``write_history`` / ``write_report`` then need ``output_dir``.
        """
        started = time.perf_counter()
        layers = list(adapted_layers(model))
        if not layers:
            if not self._warned_no_layers:
                self._warned_no_layers = True
                warnings.warn(
                    "EffectiveRankMonitor found no adapted layers in the model (kr_vlm.adapters.adapted_layers); "
                    "inject adapters with kr_vlm.adapters.inject_adapters to monitor their ranks.",
                    stacklevel=2,
                )
            return None
        spectra = delta_weight_spectra(layers, self.max_stack_elements, self.cpu_threads)
        layer_metrics = {name: spectrum_metrics(sigma) for name, sigma in spectra.items()}
        labels = layer_labels(model)
        self.layer_info = {
            name: {
                "group": label_group(labels[name]),
                "labels": labels[name],
                "shape": [layer.out_features, layer.in_features],
                "max_rank": min(layer.out_features, layer.in_features),
                "rank_cap": layer.rank_cap,
                "base_norm": self._base_norm(name, layer),
            }
            for name, layer in layers
        }
        self.final_spectra = spectra
        self.parameters = parameter_summary(model)
        # The cost of the decomposition, the monitor's main cost, so users can see what it takes.
        record = {"step": step, "seconds": time.perf_counter() - started, "layers": layer_metrics}
        self.records.append(record)
        return record

    def _base_norm(self, name: str, layer: nn.Module) -> float:
        """``‖W0‖_F`` of a layer, measured the first time the layer is seen (``W0`` is frozen)."""
        if name not in self._base_norms:
            self._base_norms[name] = float(torch.linalg.matrix_norm(layer.base_weight().detach().float()))
        return self._base_norms[name]

    def group_metrics(self, record: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Means of each metric over the layers of every group (and over all layers, as group ``all``);
        groups in the order their first layers come in the model."""
        groups: dict[str, list[str]] = {}
        for name, info in self.layer_info.items():  # in module order
            if name in record["layers"]:
                groups.setdefault(info["group"], []).append(name)
        groups["all"] = list(record["layers"])
        return {
            group: {metric: _mean([record["layers"][name][metric] for name in names]) for metric in METRICS}
            for group, names in groups.items()
        }

    def spectra_by_group(self) -> dict[str, list[torch.Tensor]]:
        """The latest singular values of every layer, gathered by group (groups in model order)."""
        by_group: dict[str, list[torch.Tensor]] = {}
        for name, info in self.layer_info.items():  # in module order
            if name in self.final_spectra:
                by_group.setdefault(info["group"], []).append(self.final_spectra[name])
        return by_group

    def _log_to_loggers(self, trainer: pl.Trainer, step: int) -> None:
        record = self.records[-1]
        scalars = {
            f"{metric}/{group}": value
            for group, values in self.group_metrics(record).items()
            for metric, value in values.items()
        }
        if self.log_per_layer:
            for name, values in record["layers"].items():
                scalars.update({f"{metric}_per_layer/{name}": value for metric, value in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()
            if isinstance(logger, TensorBoardLogger):
                for group, sigmas in self.spectra_by_group().items():
                    logger.experiment.add_histogram(f"singular_values/{group}", torch.cat(sigmas), step)

    # ----------------------------------------------------------------------------------------------- files
    def history(self) -> dict[str, Any]:
        """Everything recorded so far, as written to ``rank_history.json``.

        ``steps``/``seconds`` list the evaluations (``seconds``: time to decompose and measure); the series
        ``groups[group][metric]`` and ``layers[name][metric]`` are aligned with ``steps`` (None where a layer
        did not exist); each layer also has its ``group``, ``shape``, ``max_rank`` (``min(d_out, d_in)``),
        ``rank_cap`` (the highest rank its method can build) and ``base_norm`` (``‖W0‖_F``, for the relative
        update size); ``final_spectra`` holds the singular values of the latest evaluation (6 significant
        digits); ``parameters`` the trainable/total counts (``parameter_summary``).
        """
        steps = [record["step"] for record in self.records]
        group_series: dict[str, dict[str, list[float]]] = {}
        for record in self.records:
            for group, values in self.group_metrics(record).items():
                series = group_series.setdefault(group, {metric: [] for metric in METRICS})
                for metric in METRICS:
                    series[metric].append(values[metric])
        layers = {
            name: {
                **info,
                **{
                    metric: [record["layers"].get(name, {}).get(metric) for record in self.records]
                    for metric in METRICS
                },
            }
            for name, info in self.layer_info.items()
        }
        return {
            "steps": steps,
            "seconds": [record["seconds"] for record in self.records],
            "metrics": list(METRICS),
            "groups": group_series,
            "layers": layers,
            "final_step": steps[-1] if steps else None,
            "final_spectra": {
                name: [float(f"{value:.6g}") for value in sigma.tolist()]
                for name, sigma in self.final_spectra.items()
            },
            "parameters": self.parameters,
        }

    def _checked_run_dir(self) -> Path:
        if self.run_dir is None:
            self.run_dir = self.output_dir
        if self.run_dir is None:
            raise RuntimeError(
                "EffectiveRankMonitor has no output folder yet: the trainer sets it up in trainer.fit "
                "(or pass output_dir=...)."
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def write_history(self) -> None:
        """Write ``rank_history.json`` to the run folder."""
        # Rewritten at every evaluation: an interrupted run keeps the previous complete file.
        write_text_atomic(self._checked_run_dir() / HISTORY_FILE, json.dumps(self.history()))

    def write_report(self, trainer: pl.Trainer | None = None) -> None:
        """Render the two plots and ``rank_report.html`` into the run folder, and the spectrum image into the
        trainer's TensorBoard loggers (if ``trainer`` is given)."""
        run_dir = self._checked_run_dir()
        history = self.history()
        spectra = {
            group: [sigma.tolist() for sigma in sigmas] for group, sigmas in self.spectra_by_group().items()
        }
        spectra_png = png(spectra_figure(spectra, history["final_step"]))
        history_png = png(history_figure(history))
        (run_dir / SPECTRA_PLOT_FILE).write_bytes(spectra_png)
        (run_dir / HISTORY_PLOT_FILE).write_bytes(history_png)
        write_html_report(run_dir / REPORT_FILE, history, spectra_png=spectra_png, history_png=history_png)
        if trainer is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                image = matplotlib.image.imread(io.BytesIO(spectra_png), format="png")[..., :3]
                logger.experiment.add_image("rank_spectra", image, history["final_step"], dataformats="HWC")
