"""Lightning's rich progress bar, labelled for runs that count steps instead of epochs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class RichStepProgressBar(RichProgressBar):
    """`RichProgressBar` that shows `Epoch N` when the run has no epoch limit.

    kr_vlm's runs are bounded by `trainer.max_steps` with `max_epochs=-1`, for which Lightning's bar
    reads `Epoch 79/-2`.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (
            f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else ""
        )
        if len(self.validation_description) > len(description):
            # Lightning pads the same way, so the bar does not flicker between training and validation.
            description = f"{description:{len(self.validation_description)}}"
        return description
