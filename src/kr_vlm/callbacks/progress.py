"""Lightning's rich progress bar, as one bar over the whole run for runs that count steps."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from rich import get_console


class RichStepProgressBar(RichProgressBar):
    """`RichProgressBar` with one training bar over the global steps when the run is bounded by steps.

    kr_vlm's runs stop at ``trainer.max_steps`` with ``max_epochs=-1``, and an epoch of a few-shot split
    is a handful of batches: Lightning's bar, which restarts every epoch, never shows where the run is.
    Here the bar counts optimizer steps from the first to ``max_steps`` (from the checkpoint's step when
    a run resumes), so its remaining time is the run's; when the fit ends, one line below it says how
    many steps took how long. Runs bounded by epochs keep Lightning's bar, an epoch at a time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fit_started: float | None = None
        self._first_step = 0

    def _counts_steps(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_started = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            return
        # One bar a fit, from the current step (a resumed run's checkpoint step) to max_steps.
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is not None:
            return
        self.train_progress_bar_id = self.progress.add_task(
            self.train_description, total=trainer.max_steps, completed=trainer.global_step
        )
        self.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counts_steps(trainer):
            # Lightning's hook sets the bar to ``batch_idx + 1`` and refreshes its metrics: given the batch
            # that ends step ``global_step``, it shows the step instead, without restarting at an epoch.
            batch_idx = trainer.global_step - 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # stops the live display; the bar stays as it ended
        # Lightning calls ``teardown`` after a fit that ended (``on_exception`` after one that failed).
        if stage != "fit" or self.is_disabled or self._fit_started is None or not trainer.is_global_zero:
            return
        steps, elapsed = trainer.global_step - self._first_step, time.monotonic() - self._fit_started
        self._fit_started = None
        which = f"steps {self._first_step} to {trainer.global_step}" if self._first_step else f"{steps} steps"
        rate = f" ({steps / elapsed:.2f} steps/s)" if elapsed > 0 else ""
        get_console().print(
            f"Trained {which} in {timedelta(seconds=round(elapsed))}{rate}.", highlight=False, soft_wrap=True
        )
