"""Watch the effective rank of every adapter's weight update while a model trains.

The Khatri-Rao updates of KRAdapter are meant to use (nearly) all directions of a layer, LoRA's at most
``r``. ``EffectiveRankMonitor`` makes that visible: it measures every adapter update at train start, every
``every_n_steps`` optimizer steps and at train end, logs effective rank, stable rank and Frobenius norm per
layer and per group (tower × layer type, from the labels stored with the adapter config) to the trainer's
loggers, keeps ``rank_history.json`` current in the run folder, and at train end draws two plots and a
self-contained ``rank_report.html``.

An evaluation stays off the training path. In the training thread it only copies each layer's update
description (``spectral_factors()``: the factors, small for every factorised method) to the CPU; a background
thread then computes the singular values through each method's exact shortcut (``kr_vlm.spectral``), and the
results go to the loggers from the training thread at a later hook, under the step they belong to.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
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

# Linux niceness of the background thread (19: the lowest priority). It then runs on the cycles training leaves
# idle and yields wherever training wants a core, rather than preempting a training thread while that
# thread's OpenMP peers wait for it at the next barrier.
WORKER_NICENESS = 19


@functools.cache
def _thread_counts_are_per_thread() -> bool:
    """True when torch's intra-op thread count is a per-thread setting (the OpenMP backend of torch's wheels)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads in the calling thread (None: leave it alone), then restore.

    Safe in a background thread: with the OpenMP backend torch keeps the count per thread
    (``omp_set_num_threads``, ``mkl_set_num_threads_local``), so the training thread keeps its own. What is
    process-wide is torch's default for threads that run their first torch op while the block runs (and the
    size of the pool its mobile/quantized kernels share); the restore puts them back. With another backend
    the count itself is process-wide, so it is left alone.
    """
    if count is None or not _thread_counts_are_per_thread():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lower_this_threads_priority() -> None:
    """Give the calling thread the lowest scheduling priority (Linux; elsewhere nothing happens)."""
    if sys.platform.startswith("linux"):
        with suppress(OSError):  # e.g. a sandbox that forbids it: the thread then runs at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def update_spectrum(update: spectral.UpdateFactors) -> torch.Tensor | None:
    """Singular values (descending, float32) of an update, or None when it is not finite (NaN or inf)."""
    if not update.is_finite():
        return None
    sigma = update.singular_values()
    return sigma.float() if bool(torch.isfinite(sigma).all()) else None


def update_spectra(
    layers: Iterable[tuple[str, nn.Module]], cpu_threads: int | None = 1
) -> dict[str, torch.Tensor | None]:
    """Singular values (descending, float32, on the CPU) of every layer's update, by name, computed in the
    calling thread with ``cpu_threads`` torch threads (None: the current setting); None for a non-finite one."""
    evaluation = _Evaluation.of(layers, step=0)
    evaluation.compute_all(cpu_threads)
    return evaluation.spectra()


def spectrum_metrics(sigma: torch.Tensor) -> dict[str, float]:
    """Effective rank, stable rank and Frobenius norm of a matrix, from its singular values."""
    return {
        "effective_rank": float(spectral.effective_rank_from_singular_values(sigma)),
        "stable_rank": float(spectral.stable_rank_from_singular_values(sigma)),
        "frobenius_norm": float(sigma.square().sum().sqrt()),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [value for value in values if value is not None]
    return sum(finite) / len(finite) if finite else None


class _Evaluation:
    """One evaluation: the snapshot of every layer's update taken at ``step``, and the spectra computed from it.

    Layers are computed one at a time by whichever thread takes them (``compute``), so the background thread
    and a waiting training thread can share the work.
    """

    def __init__(self, step: int, updates: dict[str, spectral.UpdateFactors]) -> None:
        self.step = step
        self.updates = updates
        self.layer_info: dict[str, Any] = {}  # filled by the monitor, which knows the layers' labels
        self.parameters: dict[str, Any] = {}
        self.seconds = 0.0  # the work: snapshot plus decompositions, whichever thread did them
        self._spectra: dict[str, torch.Tensor | None] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        if not updates:
            self._done.set()

    @classmethod
    def of(cls, layers: Iterable[tuple[str, nn.Module]], step: int) -> _Evaluation:
        """Snapshot (copy to the CPU) the update factors of ``layers`` now."""
        started = time.perf_counter()
        with torch.no_grad():
            updates = {name: layer.spectral_factors().snapshot() for name, layer in layers}
        evaluation = cls(step, updates)
        evaluation.seconds = time.perf_counter() - started
        return evaluation

    def compute(self, name: str, cpu_threads: int | None) -> None:
        started = time.perf_counter()
        sigma, error = None, None
        try:
            with _intra_op_threads(cpu_threads), torch.no_grad():
                sigma = update_spectrum(self.updates[name])
        except Exception as exception:  # handed to the training thread, which raises it (see spectra)
            error = exception
        with self._lock:
            self._spectra[name] = sigma
            self._error = self._error or error
            self.seconds += time.perf_counter() - started
            if len(self._spectra) == len(self.updates):
                self._done.set()

    def compute_all(self, cpu_threads: int | None) -> None:
        for name in self.updates:
            self.compute(name, cpu_threads)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()

    def spectra(self) -> dict[str, torch.Tensor | None]:
        """The finished spectra in layer order; re-raises an error a decomposition hit."""
        if self._error is not None:
            raise RuntimeError(
                f"EffectiveRankMonitor failed to decompose the updates of step {self.step}."
            ) from self._error
        return {name: self._spectra[name] for name in self.updates}


class _BackgroundWorker:
    """One daemon thread at the lowest priority that computes the layers of submitted evaluations in order."""

    def __init__(self, cpu_threads: int | None) -> None:
        self.cpu_threads = cpu_threads
        self._tasks: queue.SimpleQueue[tuple[_Evaluation, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kr_vlm-rank-monitor", daemon=True)
        self._thread.start()
        # A thread still alive when the interpreter shuts down can abort the process inside torch's C++ code.
        atexit.register(self.close)

    def submit(self, evaluation: _Evaluation) -> None:
        for name in evaluation.updates:
            self._tasks.put((evaluation, name))

    def finish(self, evaluation: _Evaluation) -> None:
        """Return once ``evaluation`` is done, computing its remaining layers in the calling thread as well."""
        while not evaluation.done():
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:  # the last layers are being computed by the background thread
                evaluation.wait()
            else:
                if task is None:  # close() was called: leave its stop signal to the thread
                    self._tasks.put(None)
                    evaluation.wait()
                else:
                    task[0].compute(task[1], self.cpu_threads)

    def close(self) -> None:
        """Drop the queued work and stop the thread (it finishes the layer it is computing)."""
        atexit.unregister(self.close)
        with suppress(queue.Empty):
            while True:
                self._tasks.get_nowait()
        self._tasks.put(None)
        self._thread.join()

    def _run(self) -> None:
        _lower_this_threads_priority()
        while (task := self._tasks.get()) is not None:
            evaluation, name = task
            evaluation.compute(name, self.cpu_threads)


class EffectiveRankMonitor(pl.Callback):
    """Log and plot the spectra of all adapter weight updates during ``trainer.fit``.

    Evaluations run on global rank zero only, under ``torch.no_grad()``; they read the adapters and change
    nothing in training. The other ranks hold the same weights under DDP and skip the work, and nothing here
    is a collective operation, so no rank waits on another. Sharded strategies (FSDP, DeepSpeed, model
    parallel) are not supported: the monitor warns and stays off.

    At an evaluation step the training thread copies every layer's update factors to the CPU (a dense update,
    as of full fine-tuning or DoRA, is copied whole); a background thread at the lowest priority decomposes
    them (``background=True``), at most one evaluation at a time: when the next one is due before the previous
    has finished, or at train end, the training thread helps finish it. Finished results are logged at the next
    training batch, under the step they were taken at. An update that is not finite (NaN or inf, e.g. after
    training diverged) is skipped with one warning naming the layer and the step; ``rank_history.json`` holds
    null for its metrics and lists the step under the layer's ``non_finite_steps``.

    At every evaluation the loggers get, for every group ``<tower>/<layer type>`` such as ``vision/q`` or
    ``text/fc2``, plus ``all``: ``effective_rank/<group>``, ``stable_rank/<group>``, ``frobenius_norm/<group>``
    (means over the group's finite layers); per layer (``log_per_layer``) ``effective_rank_per_layer/<name>``
    and likewise; a TensorBoard logger also gets the histograms ``singular_values/<group>``.
    ``rank_history.json`` in the run folder is rewritten.

    At train end (or on ``write_report()``) it renders ``rank_spectra.png`` (normalised singular values
    per group), ``rank_history.png`` (effective rank over steps per group), the self-contained
    ``rank_report.html``, and the TensorBoard image ``rank_spectra``. Plots are kept out of the periodic
    evaluations: rendering takes about a second a figure on a CPU core, and only the last ones are kept.

    Outside Lightning (a plain PyTorch loop): ``evaluate(model, step)`` measures now, in the calling thread;
    ``evaluate_in_background(model, step)`` takes the snapshot and returns, ``collect()`` hands back the
    finished records, and ``close()`` stops the background thread.

    Args:
        every_n_steps: evaluate every this many optimizer steps (0: only at train start and end).
        on_train_start: evaluate before the first step (adapter updates usually start at zero: rank 0).
        on_train_end: evaluate after the last step (unless that step was just evaluated) and write the plots
            and the report.
        output_dir: folder for the files; default ``trainer.log_dir`` (the first logger's folder), else
            ``trainer.default_root_dir``.
        log_per_layer: also send per-layer metrics to the loggers (the JSON file always holds them).
        cpu_threads: torch threads for the decompositions (in whichever thread runs them, restored
            afterwards; see ``_intra_op_threads``); None keeps that thread's current setting. One thread by
            default: multi-threaded CPU decompositions collapse when the cores are busy with training.
        background: decompose in the background thread (False: in the training thread, at the step itself).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        on_train_start: bool = True,
        on_train_end: bool = True,
        output_dir: str | Path | None = None,
        log_per_layer: bool = True,
        cpu_threads: int | None = 1,
        background: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ConfigError(
                f"every_n_steps must be a non-negative integer (0 evaluates only at train start/end), "
                f"got {every_n_steps!r}."
            )
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
        self.cpu_threads = cpu_threads
        self.background = background

        self.run_dir: Path | None = None
        # One record per evaluation: {"step", "seconds", "layers": {name: {metric: value}}, "non_finite": [name]}.
        self.records: list[dict[str, Any]] = []
        self.layer_info: dict[str, dict[str, Any]] = {}
        self.final_spectra: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, Any] = {}
        self._base_norms: dict[str, float] = {}
        self._enabled = True
        self._warned_no_layers = False
        self._warned_non_finite = False
        self._worker: _BackgroundWorker | None = None
        self._pending: _Evaluation | None = None
        self._finished: list[dict[str, Any]] = []  # records not yet handed out by collect()
        self._latest_step: int | None = None
        self._unfinished_step: int | None = None  # restored from a checkpoint taken while that step ran

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
        step = trainer.global_step
        # A run resumed from a checkpoint may have evaluated this step already (its history is restored), or
        # have been evaluating it when the checkpoint was taken.
        wanted = self.evaluate_at_train_start or step == self._unfinished_step
        if wanted and not self._evaluated(step):
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._latest_step = trainer.global_step
        self._log(trainer, self.collect(wait=False))
        # With gradient accumulation several batches end on the same global step (the first ones on step 0,
        # before any update): evaluate each step once, and step 0 only through on_train_start.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not self._evaluated(step):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, self.collect(wait=True))
        if not self.evaluate_at_train_end:
            return
        if not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module)
            self._log(trainer, self.collect(wait=True))
        if self._enabled and trainer.is_global_zero and self.final_spectra:
            self.write_report(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.close()

    def state_dict(self) -> dict[str, Any]:
        # The history travels in checkpoints, so a resumed run keeps its whole curve.
        state: dict[str, Any] = {}
        pending = self._pending
        if pending is not None and pending.step == self._latest_step:
            # Taken at the step being checkpointed: a run resumed from here starts at this step and evaluates it.
            state["unfinished_step"] = pending.step
        elif pending is not None:
            self._finish_pending()
        state["records"] = list(self.records)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self._unfinished_step = state_dict.get("unfinished_step")

    # ----------------------------------------------------------------------------------------- evaluation
    def _evaluated(self, step: int) -> bool:
        if self._pending is not None and self._pending.step == step:
            return True
        return bool(self.records) and self.records[-1]["step"] == step

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        if self.background:
            self.evaluate_in_background(pl_module, trainer.global_step)
        else:
            self.evaluate(pl_module, trainer.global_step)
        self._log(trainer, self.collect(wait=False))

    def _snapshot(self, model: nn.Module, step: int) -> _Evaluation | None:
        layers = list(adapted_layers(model))
        if not layers:
            if not self._warned_no_layers:
                self._warned_no_layers = True
                warnings.warn(
                    "EffectiveRankMonitor found no adapted layers in the model (kr_vlm.adapters.adapted_layers); "
                    "inject adapters with kr_vlm.adapters.inject_adapters to monitor their ranks.",
                    stacklevel=3,
                )
            return None
        evaluation = _Evaluation.of(layers, step)
        labels = layer_labels(model)
        evaluation.layer_info = {
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
        evaluation.parameters = parameter_summary(model)
        return evaluation

    def evaluate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        """Measure every adapter update of ``model`` now, in the calling thread, and record it as ``step``.

        Returns the record ``{"step", "seconds", "layers": {name: {metric: value}}, "non_finite": [name]}``
        (also appended to ``records``), or None (with a warning, once) when the model has no adapted layers.
        A background evaluation still running is finished first. Usable without a trainer, e.g. in a plain
        PyTorch loop; ``write_history`` / ``write_report`` then need ``output_dir``.
        """
        self._finish_pending()
        evaluation = self._snapshot(model, step)
        if evaluation is None:
            return None
        evaluation.compute_all(self.cpu_threads)
        return self._record(evaluation)

    def evaluate_in_background(self, model: nn.Module, step: int) -> None:
        """Snapshot every adapter update of ``model`` now and decompose it in the background thread; the record
        comes out of ``collect()``. A previous background evaluation still running is finished first."""
        self._finish_pending()
        evaluation = self._snapshot(model, step)
        if evaluation is None:
            return
        if self._worker is None:
            self._worker = _BackgroundWorker(self.cpu_threads)
        self._worker.submit(evaluation)
        self._pending = evaluation

    def collect(self, wait: bool = False) -> list[dict[str, Any]]:
        """The records finished since the last call (oldest first); ``wait``: finish a running evaluation first,
        helping in the calling thread."""
        if self._pending is not None and (wait or self._pending.done()):
            self._finish_pending()
        finished, self._finished = self._finished, []
        return finished

    def _finish_pending(self) -> None:
        evaluation, self._pending = self._pending, None
        if evaluation is None:
            return
        self._worker.finish(evaluation)
        self._record(evaluation)

    def close(self) -> None:
        """Stop the background thread, dropping an evaluation still running (``collect(wait=True)`` first to
        keep it). The Lightning hooks call it when a fit ends; a plain loop calls it when done."""
        worker, self._worker, self._pending = self._worker, None, None
        if worker is not None:
            worker.close()

    def _record(self, evaluation: _Evaluation) -> dict[str, Any]:
        spectra = evaluation.spectra()
        non_finite = [name for name, sigma in spectra.items() if sigma is None]
        layer_metrics = {
            name: dict.fromkeys(METRICS) if sigma is None else spectrum_metrics(sigma)
            for name, sigma in spectra.items()
        }
        self.layer_info = evaluation.layer_info
        self.final_spectra = {name: sigma for name, sigma in spectra.items() if sigma is not None}
        self.parameters = evaluation.parameters
        # The cost of the decompositions, the monitor's main cost, so users can see what it takes.
        record = {
            "step": evaluation.step,
            "seconds": evaluation.seconds,
            "layers": layer_metrics,
            "non_finite": non_finite,
        }
        if non_finite and not self._warned_non_finite:
            self._warned_non_finite = True
            others = f" (and {len(non_finite) - 1} more layers)" if len(non_finite) > 1 else ""
            warnings.warn(
                f"EffectiveRankMonitor: the weight update of {non_finite[0]}{others} is not finite (NaN or inf) "
                f"at step {evaluation.step}, so it has no spectrum; skipped, with null metrics in "
                f"{HISTORY_FILE}. Later non-finite updates are skipped without another warning.",
                stacklevel=2,
            )
        self.records.append(record)
        self._finished.append(record)
        return record

    def _base_norm(self, name: str, layer: nn.Module) -> float:
        """``‖W0‖_F`` of a layer, measured the first time the layer is seen (``W0`` is frozen)."""
        if name not in self._base_norms:
            self._base_norms[name] = float(torch.linalg.matrix_norm(layer.base_weight().detach().float()))
        return self._base_norms[name]

    def group_metrics(self, record: dict[str, Any]) -> dict[str, dict[str, float | None]]:
        """Means of each metric over the finite layers of every group (and over all layers, as group ``all``),
        None for a group whose updates are all non-finite; groups in the order their first layers come in the
        model."""
        groups: dict[str, list[str]] = {}
        for name, info in self.layer_info.items():  # in module order
            if name in record["layers"]:
                groups.setdefault(info["group"], []).append(name)
        groups["all"] = list(record["layers"])
        return {
            group: {metric: _mean(record["layers"][name][metric] for name in names) for metric in METRICS}
            for group, names in groups.items()
        }

    def spectra_by_group(self) -> dict[str, list[torch.Tensor]]:
        """The latest singular values of every layer, gathered by group (groups in model order)."""
        by_group: dict[str, list[torch.Tensor]] = {}
        for name, info in self.layer_info.items():  # in module order
            if name in self.final_spectra:
                by_group.setdefault(info["group"], []).append(self.final_spectra[name])
        return by_group

    def _log(self, trainer: pl.Trainer, records: list[dict[str, Any]]) -> None:
        """Send finished records to the loggers (from the training thread), each under its own step."""
        if not records:
            return
        for record in records:
            self._log_record(trainer, record)
        self.write_history()

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        scalars = {
            f"{metric}/{group}": value
            for group, values in self.group_metrics(record).items()
            for metric, value in values.items()
            if value is not None
        }
        if self.log_per_layer:
            for name, values in record["layers"].items():
                scalars.update(
                    {
                        f"{metric}_per_layer/{name}": value
                        for metric, value in values.items()
                        if value is not None
                    }
                )
        step = record["step"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()
            # The spectra kept are the latest evaluation's.
            if isinstance(logger, TensorBoardLogger) and record is self.records[-1]:
                for group, sigmas in self.spectra_by_group().items():
                    logger.experiment.add_histogram(f"singular_values/{group}", torch.cat(sigmas), step)

    # ----------------------------------------------------------------------------------------------- files
    def history(self) -> dict[str, Any]:
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
        steps = [record["step"] for record in self.records]
        group_series: dict[str, dict[str, list[float | None]]] = {}
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
                "non_finite_steps": [
                    record["step"] for record in self.records if name in record.get("non_finite", ())
                ],
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
        """Write ``rank_history.json`` to the run folder (strict JSON: no NaN or Infinity)."""
        # Rewritten at every evaluation: an interrupted run keeps the previous complete file.
        write_text_atomic(self._checked_run_dir() / HISTORY_FILE, json.dumps(self.history(), allow_nan=False))

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
