"""The progress bar's label for step-bounded runs (kr_vlm's default) and epoch-bounded ones."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from kr_vlm.callbacks import RichStepProgressBar


@pytest.mark.parametrize(
    ("limits", "label"), [({"max_steps": 2, "max_epochs": -1}, "Epoch 0"), ({"max_epochs": 3}, "Epoch 0/2")]
)
def test_train_description(tmp_path, limits, label):
    bar = RichStepProgressBar()
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=1,
        limit_val_batches=0,
        enable_model_summary=False,
        **limits,
    )
    trainer.fit(BoringModel())
    assert bar._get_train_description(0).strip() == label
