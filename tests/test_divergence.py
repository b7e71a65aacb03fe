"""StopOnDivergence: a non-finite loss or trainable tensor ends the fit at once, and no checkpoint keeps it.

A linear model whose loss (or weight) is made non-finite at a chosen step, trained with a checkpoint at
every step, so that the test sees which checkpoints the callback let through.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from kr_vlm.callbacks import StopOnDivergence, TrainingDivergedError


class Linear(LightningModule):
    """Least squares on random data; at optimizer step `bad_step` (1-based) the loss, or the weight after
    the update, becomes `bad_value`."""

    def __init__(self, bad_step: int, where: str, bad_value: float = math.nan) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_step, self.where, self.bad_value = bad_step, where, bad_value
        self.weights_seen: list[torch.Tensor] = []  # the weight at the start of every step

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.layer(inputs), targets)
        if self.where == "loss" and self.global_step + 1 == self.bad_step:
            loss = loss * self.bad_value
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.where == "weight" and self.global_step + 1 == self.bad_step:
            with torch.no_grad():
                self.layer.weight[0, 0] = self.bad_value

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(32, 4, generator=generator), torch.randn(32, 1)), batch_size=4
        )


def fit(module: Linear, tmp_path) -> tuple[Trainer, pytest.ExceptionInfo]:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # The checkpoint callback listed first: Lightning still runs it after every other callback.
        callbacks=[
            ModelCheckpoint(
                tmp_path,
                filename="step_{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=1,
                save_top_k=-1,
                save_last=True,
            ),
            StopOnDivergence(),
        ],
    )
    with pytest.raises(TrainingDivergedError) as raised:
        trainer.fit(module)
    return trainer, raised


def saved_steps(tmp_path) -> list[str]:
    return sorted(path.name for path in tmp_path.glob("*.ckpt"))


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_a_non_finite_loss_stops_the_fit_before_its_backward(bad_value, tmp_path):
    module = Linear(bad_step=3, where="loss", bad_value=bad_value)
    trainer, raised = fit(module, tmp_path)
    message = str(raised.value)
    assert f"Training diverged at step 3: the loss is {bad_value}." in message
    assert f"The last checkpoint, {tmp_path / 'last.ckpt'}, was saved before" in message
    assert "model.optimizer.lr, 0.1 in this run" in message
    assert trainer.global_step == 2
    # The weights are those after step 2: the non-finite loss never reached them.
    assert torch.equal(module.layer.weight, module.weights_seen[-1])
    assert saved_steps(tmp_path) == ["last.ckpt", "step_1.ckpt", "step_2.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(last["layer.weight"], module.weights_seen[-1])


def test_a_step_that_leaves_non_finite_tensors_stops_the_fit_before_its_checkpoint(tmp_path):
    module = Linear(bad_step=4, where="weight", bad_value=math.inf)
    _, raised = fit(module, tmp_path)
    assert re.search(
        r"diverged at step 4: the loss was \d.*, but the update left non-finite values in the trained tensors",
        str(raised.value),
    )
    assert saved_steps(tmp_path) == ["last.ckpt", "step_1.ckpt", "step_2.ckpt", "step_3.ckpt"]
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in state.values())


def test_a_divergence_before_any_checkpoint_says_so(tmp_path):
    module = Linear(bad_step=1, where="loss")
    _, raised = fit(module, tmp_path)
    assert "at step 1: the loss is nan. No checkpoint had been saved yet" in str(raised.value)
    assert saved_steps(tmp_path) == []
