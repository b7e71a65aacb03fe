"""``StopOnDivergence``: end a fit at the first non-finite loss or trainable tensor, before anything keeps it.

A diverged fit goes on to the end otherwise, with NaN adapters in every later checkpoint and a test at
chance level. Two checks, each a single number a step:

- the loss, in ``on_before_backward``: a NaN or infinite loss stops the fit before its gradients reach
  the trainable tensors, which keep the values of the step before;
- the trainable tensors after the optimizer step, in ``on_train_batch_end`` (an update can overflow
  with a finite loss). Lightning runs checkpoint callbacks after every other callback, so
  ``ModelCheckpoint`` never saves the non-finite tensors of that step.

The error is raised on every DDP process at once (the decision is reduced over them), names the step,
the loss, the last checkpoint (all of whose tensors are finite) and what to try.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from kr_vlm.errors import KrVlmError


class TrainingDivergedError(KrVlmError, FloatingPointError):
    """The loss or the trained tensors became NaN or infinite during a fit."""


class StopOnDivergence(Callback):
    """Raise ``TrainingDivergedError`` at the first non-finite loss or trainable tensor (see the module)."""

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = float(loss.detach())
        if not trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
            raise self._diverged(trainer, f"at step {trainer.global_step + 1}: the loss is {value}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainable = [parameter for parameter in pl_module.parameters() if parameter.requires_grad]
        # The largest magnitude is NaN or infinite exactly when some entry is (a 2-norm could overflow).
        largest = float(torch.nn.utils.get_total_norm(trainable, norm_type=math.inf)) if trainable else 0.0
        if not trainer.strategy.reduce_boolean_decision(math.isfinite(largest), all=True):
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            raise self._diverged(
                trainer,
                f"at step {trainer.global_step}: the loss was {float(loss):.4g}, but the update left "
                "non-finite values in the trained tensors",
            )

    @staticmethod
    def _diverged(trainer: pl.Trainer, what: str) -> TrainingDivergedError:
        checkpoint = trainer.checkpoint_callback
        saved = checkpoint and (getattr(checkpoint, "last_model_path", "") or checkpoint.best_model_path)
        kept = (
            f"The last checkpoint, {saved}, was saved before and holds finite values; nothing later was saved."
            if saved
            else "No checkpoint had been saved yet, and nothing was saved after."
        )
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))
        precision = (
            f" or full precision (trainer.precision=32-true instead of {trainer.precision})"
            if trainer.precision != "32-true"
            else ""
        )
        return TrainingDivergedError(
            f"Training diverged {what}. {kept} Try a lower learning rate (model.optimizer.lr, {lr:g} in "
            f"this run){precision}."
        )
