"""Watch the effective rank of every adapter's weight update while a model trains.

The Khatri-Rao updates of KRAdapter are meant to use (nearly) all directions of a layer, LoRA's at most
``r``. ``EffectiveRankMonitor`` makes that visible: it measures every adapter update at train start, every
``every_n_steps`` optimizer steps and at train end, logs effective rank, stable rank and Frobenius norm per
layer and per group (tower × layer type, from the labels stored with the adapter config) to the trainer's
loggers (with a TensorBoard custom-scalars layout of them), and keeps ``rank_history.json`` and a
self-contained ``rank_report.html`` current in the run folder.

An evaluation stays off the training path (``kr_vlm.callbacks.rank_evaluation``): the training thread only
copies each layer's update description to the CPU, a background thread computes the singular values and
renders the live report, and the results go to the loggers from the training thread at a later hook, under
the step they belong to. What is kept and written is ``kr_vlm.callbacks.rank_history``'s.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib.image
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from kr_vlm.adapters import adapted_layers, layer_labels
from kr_vlm.adapters.labels import label_group
from kr_vlm.callbacks import rank_history
from kr_vlm.callbacks.parameter_summary import parameter_summary
from kr_vlm.callbacks.rank_evaluation import (
    BackgroundWorker,
    Evaluation,
    spectrum_metrics,
    update_spectra,
)
from kr_vlm.callbacks.rank_history import METRICS, ReportFiles
from kr_vlm.errors import ConfigError
from kr_vlm.rank_report import HISTORY_FILE, REPORT_FILE

__all__ = ["HISTORY_FILE", "METRICS", "REPORT_FILE", "EffectiveRankMonitor", "spectrum_metrics", "update_spectra"]


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
    and likewise; ``rank_cap/<group>`` (the highest rank the group's method can build) and
    ``relative_update/<group>`` (mean ``‖ΔW‖_F / ‖W0‖_F``); a TensorBoard logger also gets the histograms
    ``singular_values/<group>``, and at train start a custom-scalars layout that groups these charts by tower
    and layer type (``rank_history.tensorboard_layout``). ``rank_history.json`` in the run folder is
    rewritten, and (``live_report``) the background thread renders ``rank_spectra.png``,
    ``rank_history.png`` and the self-contained ``rank_report.html`` of the run so far, which say the step
    and that training is still running: reload the page to follow a run. Every file is replaced atomically;
    a write that fails (full disk, read-only folder) is one warning naming the file, and training goes on.

    At train end (or on ``write_report()``) the files are written once more, saying that training finished,
    and TensorBoard gets the image ``rank_spectra``. When the fit fails or is interrupted, the live page is
    changed to say that training stopped at that step (without rendering it again).

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
        live_report: render the report at every evaluation, in the background thread (False: at train end only).
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
        live_report: bool = True,
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
        self.live_report = live_report

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
        self._worker: BackgroundWorker | None = None
        self._pending: Evaluation | None = None
        self._finished: list[dict[str, Any]] = []  # records not yet handed out by collect()
        self._latest_step: int | None = None
        self._unfinished_step: int | None = None  # restored from a checkpoint taken while that step ran
        self._report_files: ReportFiles | None = None
        self._report_renders: list[Future] = []  # live reports queued or being rendered

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
        if self._enabled and trainer.is_global_zero:
            self._write_tensorboard_layout(trainer, pl_module)
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
        # The final report follows: no live one.
        self._log(trainer, self.collect(wait=True), live=False)
        if self.evaluate_at_train_end and not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module, live=False)
            self._log(trainer, self.collect(wait=True), live=False)
        if not (self.evaluate_at_train_end or self.live_report):
            return
        if self._enabled and trainer.is_global_zero and self.final_spectra:
            self.write_report(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # The live report must not say that training goes on.
        self._drop_live_report()
        if self._report_files is not None:
            self._report_files.mark_stopped(self._latest_step)
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

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, live: bool = True) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        if self.background:
            self.evaluate_in_background(pl_module, trainer.global_step)
        else:
            self.evaluate(pl_module, trainer.global_step)
        self._log(trainer, self.collect(wait=False), live=live)

    def _snapshot(self, model: nn.Module, step: int) -> Evaluation | None:
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
        evaluation = Evaluation.of(layers, step)
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
            self._worker = BackgroundWorker(self.cpu_threads)
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
        worker, self._worker, self._pending, self._report_renders = self._worker, None, None, []
        if worker is not None:
            worker.close()

    def _record(self, evaluation: Evaluation) -> dict[str, Any]:
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
        """Means of each metric over the finite layers of every group (and ``all``); see ``rank_history``."""
        return rank_history.group_metrics(self.layer_info, record)

    def spectra_by_group(self) -> dict[str, list[torch.Tensor]]:
        """The latest singular values of every layer, gathered by group (groups in model order)."""
        by_group: dict[str, list[torch.Tensor]] = {}
        for name, info in self.layer_info.items():  # in module order
            if name in self.final_spectra:
                by_group.setdefault(info["group"], []).append(self.final_spectra[name])
        return by_group

    def _log(self, trainer: pl.Trainer, records: list[dict[str, Any]], live: bool = True) -> None:
        """Send finished records to the loggers (from the training thread), each under its own step, and
        rewrite the history and, in the background thread, the live report."""
        if not records:
            return
        for record in records:
            self._log_record(trainer, record)
        self.write_history()
        if self.live_report and live and trainer.is_global_zero:
            self._render_live_report()

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        scalars = rank_history.scalars(self.layer_info, record, per_layer=self.log_per_layer)
        step = record["step"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            logger.save()
            # The spectra kept are the latest evaluation's.
            if isinstance(logger, TensorBoardLogger) and record is self.records[-1]:
                for group, sigmas in self.spectra_by_group().items():
                    logger.experiment.add_histogram(f"singular_values/{group}", torch.cat(sigmas), step)

    def _write_tensorboard_layout(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Group the rank charts of every TensorBoard logger by tower and layer type (its custom scalars)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            return
        labels = layer_labels(model)
        layer_info = {
            name: {"group": label_group(labels[name])} for name, _ in adapted_layers(model) if name in labels
        }
        if not layer_info:
            return
        layout = rank_history.tensorboard_layout(layer_info, per_layer=self.log_per_layer)
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)

    # ----------------------------------------------------------------------------------------------- files
    def history(self) -> dict[str, Any]:
        """Everything recorded so far, as written to ``rank_history.json`` (``rank_history.build_history``)."""
        spectra = {name: sigma.tolist() for name, sigma in self.final_spectra.items()}
        return rank_history.build_history(self.records, self.layer_info, spectra, self.parameters)

    def _files(self) -> ReportFiles:
        if self.run_dir is None:
            self.run_dir = self.output_dir
        if self.run_dir is None:
            raise RuntimeError(
                "EffectiveRankMonitor has no output folder yet: the trainer sets it up in trainer.fit "
                "(or pass output_dir=...)."
            )
        if self._report_files is None or self._report_files.run_dir != self.run_dir:
            self._report_files = ReportFiles(self.run_dir)
        return self._report_files

    def write_history(self) -> None:
        """Write ``rank_history.json`` to the run folder (strict JSON: no NaN or Infinity). A failed write is
        a warning (once), never an error."""
        # Rewritten at every evaluation: an interrupted run keeps the previous complete file.
        self._files().write_history(self.history())

    def _spectra_lists(self) -> dict[str, list[list[float]]]:
        return {group: [sigma.tolist() for sigma in sigmas] for group, sigmas in self.spectra_by_group().items()}

    def _render_live_report(self) -> None:
        """Render the report of the run so far in the background thread, from a copy of the history taken
        now; a render still queued from an earlier evaluation is dropped (only the latest matters)."""
        files, history, spectra = self._files(), self.history(), self._spectra_lists()
        for render in self._report_renders:
            render.cancel()  # one queued renders an older step; one running finishes before the next starts
        if self._worker is None:
            self._worker = BackgroundWorker(self.cpu_threads)
        self._report_renders = [render for render in self._report_renders if not render.done()]
        self._report_renders.append(
            self._worker.run(lambda: files.write_report(history, spectra, finished=False))
        )

    def _drop_live_report(self) -> None:
        """Let the final report be the last written: drop the queued live renders, wait for a running one."""
        renders, self._report_renders = self._report_renders, []
        for render in renders:
            if not render.cancel():
                render.exception()  # waits; a failed write was a warning already

    def write_report(self, trainer: pl.Trainer | None = None) -> None:
        """Render the two plots and ``rank_report.html`` (saying that training finished) into the run folder,
        and the spectrum image into the trainer's TensorBoard loggers (if ``trainer`` is given)."""
        self._drop_live_report()
        history = self.history()
        spectra_png = self._files().write_report(history, self._spectra_lists(), finished=True)
        if trainer is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                image = matplotlib.image.imread(io.BytesIO(spectra_png), format="png")[..., :3]
                logger.experiment.add_image("rank_spectra", image, history["final_step"], dataformats="HWC")
