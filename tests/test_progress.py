"""The progress bar: one bar over the global steps for step-bounded runs (kr_vlm's default), Lightning's
bar an epoch at a time for epoch-bounded ones, and one line when a fit ends."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from kr_vlm.callbacks import RichStepProgressBar


def fit(tmp_path, bar: RichStepProgressBar, ckpt_path=None, **limits) -> Trainer:
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=3,  # epochs of three batches
        limit_val_batches=0,
        enable_model_summary=False,
        **limits,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path, weights_only=False)  # the test's own checkpoints
    return trainer


def test_a_step_bounded_fit_has_one_bar_over_all_steps(tmp_path, capsys):
    bar = RichStepProgressBar()
    trainer = fit(tmp_path, bar, max_steps=7, max_epochs=-1)
    assert trainer.current_epoch >= 2  # the bar went on over three epochs
    (task,) = bar.progress.tasks  # never restarted: one task, and it counted the steps
    assert (task.description, task.completed, task.total) == ("Training", 7, 7)
    output = capsys.readouterr().out
    assert "Trained 7 steps in 0:00:0" in output and "steps/s)." in output


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_bar_counts_optimizer_steps(tmp_path, accumulate):
    bar = RichStepProgressBar()
    fit(tmp_path, bar, max_steps=4, max_epochs=-1, accumulate_grad_batches=accumulate)
    (task,) = bar.progress.tasks
    assert (task.completed, task.total) == (4, 4)


def test_a_resumed_fit_goes_on_from_the_checkpoints_step(tmp_path, capsys):
    first = fit(tmp_path, RichStepProgressBar(), max_steps=4, max_epochs=-1)  # ends in the middle of epoch 1
    first.save_checkpoint(tmp_path / "step_4.ckpt")
    capsys.readouterr()
    bar = RichStepProgressBar()
    fit(tmp_path, bar, ckpt_path=tmp_path / "step_4.ckpt", max_steps=7, max_epochs=-1)
    (task,) = bar.progress.tasks
    assert (task.completed, task.total) == (7, 7)
    assert "Trained steps 4 to 7 in " in capsys.readouterr().out


def test_an_epoch_bounded_fit_keeps_lightnings_bar(tmp_path):
    bar = RichStepProgressBar()
    fit(tmp_path, bar, max_epochs=2)
    (task,) = bar.progress.tasks
    assert (task.description.strip(), task.completed, task.total) == ("Epoch 1/1", 3, 3)
