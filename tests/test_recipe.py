"""The KRAdapter authors' recipe (experiments clip_kr_randlora, mini_kr_randlora): the in-batch caption loss,
gradient-norm clipping, and the miniature's run from a fresh copy of the repository."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from compose_helpers import FAST, TINY_MODEL, compose_config, run_state_restored
from kr_vlm import cli
from kr_vlm.adapters import adapted_layers
from kr_vlm.errors import ConfigError
from kr_vlm.models.finetuner import MODEL_PREFIX
from kr_vlm.models.losses import caption_contrastive_loss, first_of_same_class
from kr_vlm.optim import warmup_cosine_factor
from test_cli import ADAPTER_WEIGHTS, read_metrics, repository_copy, run_in
from test_finetuner import LossAndGradients, TinyDataModule, count_text_calls, make_module, make_trainer


def test_the_target_is_the_first_image_of_the_same_class():
    assert first_of_same_class(torch.tensor([2, 0, 2, 1, 0, 2])).tolist() == [0, 1, 0, 3, 1, 0]


def test_caption_loss_matches_a_hand_computed_reference():
    # Images 0 and 2 are of class A, image 1 of class B; image 2 looks like B. Each image's caption is its
    # class's: A = (1, 0), B = (0, 1). With scale ln 4, a cosine of 1 scores e^s = 4 and of 0 scores 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # A, B, A: the A caption twice
    loss, logits = caption_contrastive_loss(images, captions, torch.tensor([0, 1, 0]), math.log(4))
    s = math.log(4)
    assert torch.allclose(logits, torch.tensor([[s, 0, s], [0, s, 0], [0, s, 0]]))
    # Image 0: its caption scores 4 of 4 + 1 + 4. Image 1: 4 of 1 + 4 + 1. Image 2: column 0 (the first A)
    # scores 1 of 6. The repeated A caption counts twice in each denominator.
    expected = (math.log(9 / 4) + math.log(6 / 4) + math.log(6)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(2 * math.log(4.5) / 3)


def test_caption_loss_trains_both_towers_on_the_batch_s_classes_only(tiny_clip_cfg, monkeypatch):
    seed_everything(0)
    module = make_module(tiny_clip_cfg, loss="caption_contrastive")
    calls = count_text_calls(module, monkeypatch)
    recorder = LossAndGradients()
    datamodule = TinyDataModule()
    make_trainer(max_steps=6, callbacks=[recorder]).fit(module, datamodule)

    assert recorder.losses[-1] < recorder.losses[0]
    assert recorder.with_grad == set(module.adapter_keys())
    for tower in ("visual.", "transformer."):
        assert any(
            key.startswith(MODEL_PREFIX + tower) and key.endswith("kr_u") for key in recorder.nonzero_grad
        )
    # One text-tower call a step, with the prompts of the classes in that batch (one template a class).
    labels = datamodule.train_set.tensors[1]
    per_batch = [len(labels[start : start + 4].unique()) for start in (0, 4)]
    assert calls == per_batch * 3 and min(per_batch) < 3  # not every class: the batch's


def test_class_embeddings_of_some_classes_are_those_rows_of_all(tiny_clip_cfg):
    """With the text tower training (embedded with gradients) and without (the cached embeddings)."""
    task = TinyDataModule()
    task.setup()
    classes = torch.tensor([2, 0])
    for targets in ({"towers": "both"}, {"towers": "vision"}):
        module = make_module(tiny_clip_cfg, adapter={"method": "kradapter", "targets": targets})
        with torch.no_grad():
            for _, layer in adapted_layers(module.clip_model):
                layer.kr_u.normal_()  # as if trained
        classifier = module.classifier
        some = classifier.class_embeddings(task.train_task, classes)
        assert some.requires_grad == (targets["towers"] == "both")
        with torch.no_grad():
            every = classifier.class_embeddings(task.train_task)
        torch.testing.assert_close(some.detach(), every[classes], rtol=0, atol=1e-6)


def test_a_bad_loss_is_a_clear_error(tiny_clip_cfg):
    with pytest.raises(
        ConfigError, match="model.loss must be one of class_ce, caption_contrastive, got 'ce'"
    ):
        make_module(tiny_clip_cfg, loss="ce")


def gradient_norm(module) -> float:
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


class GradientNorms(Callback):
    """The norm of the adapters' gradients before Lightning clips them and when the step is done (the
    gradients stay until the next step's zero_grad)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.before.append(gradient_norm(module))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.after.append(gradient_norm(module))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clip_val_clips_the_adapters_gradient_norm(tiny_clip_cfg, precision):
    clip = 1e-3
    norms = GradientNorms()
    module = make_module(tiny_clip_cfg, loss="caption_contrastive")
    trainer = make_trainer(max_steps=3, callbacks=[norms], gradient_clip_val=clip, precision=precision)
    trainer.fit(module, TinyDataModule())
    assert len(norms.after) == 3 and all(before > 10 * clip for before in norms.before)
    assert all(after == pytest.approx(clip, rel=1e-3) for after in norms.after)


def test_the_schedule_counts_epochs_and_decays_per_step(tmp_path):
    overrides = ["experiment=mini_kr_randlora", *TINY_MODEL, *FAST, "~callbacks.rank_monitor"]
    overrides += ["~callbacks.progress_bar", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]
    with run_state_restored():
        metrics = cli.train(compose_config(tmp_path, overrides))
    # 160 digits in 9 copies an epoch: 11 batches of 128 and one of 32, 12 steps an epoch.
    assert metrics["steps"] == 24
    with (tmp_path / "run" / "csv" / "metrics.csv").open(newline="") as handle:
        rates = [float(row["lr-AdamW"]) for row in csv.DictReader(handle) if row["lr-AdamW"]]
    assert rates == pytest.approx([1e-3 * warmup_cosine_factor(step, 0, 24, 0.01) for step in range(24)])


@pytest.mark.slow
def test_mini_kr_randlora_from_a_fresh_copy_of_the_repository(tmp_path):
    """The README's command with fewer steps, nothing else changed: the recipe's data, loss and model."""
    repo = repository_copy(tmp_path)
    done = run_in(repo, repo, "train.py", "experiment=mini_kr_randlora", "trainer.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (repo / "logs" / "mini_kr_randlora" / "runs").iterdir()
    metrics = read_metrics(run_dir)
    assert metrics["steps"] == 3 and list(metrics["test"]) == ["digits"]
    config = metrics["config"]
    assert config["model"]["loss"] == "caption_contrastive" and config["data"]["batch_size"] == 128
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["data"]["min_iterations_per_epoch"] == 10
    assert (run_dir / ADAPTER_WEIGHTS).is_file()
    assert (
        "An epoch goes 9 times through the training images" in (run_dir / "mini_kr_randlora.log").read_text()
    )

