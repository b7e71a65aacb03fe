"""CLIPFineTuner on a tiny CLIP and an in-memory DataModule: training, metrics, checkpoints, export."""

from __future__ import annotations

import math
import pickle

import hydra
import open_clip
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from kr_vlm.adapters import adapted_layers, adapter_state_dict, disabled_adapters, scaled_adapters
from kr_vlm.adapters.io import AdapterMismatchError
from kr_vlm.data.base import ClassificationTask
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.finetuner import MODEL_PREFIX, CLIPFineTuner, warmup_cosine_factor


class TinyDataModule(LightningDataModule):
    """The DataModule contract on random 32x32 tensors: one train task, two eval tasks (3 and 7 classes)."""

    def __init__(self, num_train: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.num_train, self.batch_size = num_train, batch_size
        self.transforms = None

    def set_transforms(self, train_transform, eval_transform) -> None:
        self.transforms = (train_transform, eval_transform)  # tensors need none; kept to honour the contract

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.train_task = ClassificationTask("pets", ["cat", "dog", "hamster"], ["a photo of a {}."])
        self.val_tasks = [
            ClassificationTask("pets", ["cat", "dog", "hamster"], ["a photo of a {}.", "a {}"]),
            ClassificationTask("letters", list("abcdefg"), ["the letter {}"]),
        ]
        self.test_tasks = self.val_tasks
        self.train_set = TensorDataset(
            torch.randn(self.num_train, 3, 32, 32, generator=generator),
            torch.randint(0, 3, (self.num_train,), generator=generator),
        )
        self.eval_sets = [
            TensorDataset(
                torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, n, (6,), generator=generator)
            )
            for n in (3, 7)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(dataset, batch_size=4) for dataset in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


def make_module(tiny_clip_cfg, adapter=None, **kwargs) -> CLIPFineTuner:
    adapter = {"method": "kradapter"} if adapter is None else adapter
    kwargs.setdefault("optimizer", {"lr": 1e-2})
    return CLIPFineTuner(
        clip={"name": "tiny-test-clip", "model_cfg": tiny_clip_cfg}, adapter=adapter, **kwargs
    )


def make_trainer(max_steps: int = 4, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        **kwargs,
    )


def adapter_tensors(module: CLIPFineTuner) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in adapter_state_dict(module.classifier.model).items()}


class LossAndGradients(Callback):
    """Records the training loss of every step and the names of parameters that received a gradient."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.with_grad: set[str] = set()
        self.nonzero_grad: set[str] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_after_backward(self, trainer, module) -> None:
        for name, param in module.named_parameters():
            if param.grad is not None:
                self.with_grad.add(name)
                if param.grad.abs().sum() > 0:
                    self.nonzero_grad.add(name)


def test_training_lowers_the_loss_and_changes_only_adapter_tensors(tiny_clip_cfg):
    seed_everything(0)
    module = make_module(tiny_clip_cfg)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    adapter_keys = set(module.adapter_keys())
    recorder = LossAndGradients()
    make_trainer(max_steps=12, callbacks=[recorder]).fit(module, TinyDataModule())

    assert recorder.losses[-1] < recorder.losses[0]
    changed = {key for key, value in module.state_dict().items() if not torch.equal(value, before[key])}
    assert changed and changed <= adapter_keys
    # Gradients reach the adapters of both towers (kr_u moves first: it starts at zero) and nothing else.
    assert recorder.with_grad == adapter_keys
    assert any(
        key.startswith(MODEL_PREFIX + "transformer.") and key.endswith("kr_u")
        for key in recorder.nonzero_grad
    )
    assert any(
        key.startswith(MODEL_PREFIX + "visual.") and key.endswith("kr_u") for key in recorder.nonzero_grad
    )


def test_the_model_is_in_training_mode_inside_training_step(tiny_clip_cfg):
    """load_clip returns the model in eval mode and Lightning keeps each submodule's mode: without the
    module's own model.train(), dropout (peft's lora_dropout included) would stay off while training."""
    seed_everything(0)
    module = make_module(tiny_clip_cfg, adapter={"method": "lora", "options": {"r": 2, "lora_dropout": 0.5}})
    modes: list[set[bool]] = []
    training_step = module.training_step

    def recording(batch, batch_idx):
        modes.append({submodule.training for submodule in module.classifier.model.modules()})
        return training_step(batch, batch_idx)

    module.training_step = recording
    make_trainer(max_steps=2).fit(module, TinyDataModule())
    assert modes == [{True}, {True}]


def count_text_calls(module: CLIPFineTuner, monkeypatch) -> list[int]:
    calls: list[int] = []
    model = module.classifier.model
    original = model.encode_text

    def counting(tokens, *args, **kwargs):
        calls.append(len(tokens))
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "encode_text", counting)
    return calls


def test_frozen_text_tower_embeds_every_task_once(tiny_clip_cfg, monkeypatch):
    module = make_module(tiny_clip_cfg, adapter={"method": "kradapter", "targets": {"towers": "vision"}})
    calls = count_text_calls(module, monkeypatch)
    trainer = make_trainer(max_steps=4, limit_val_batches=None)
    trainer.fit(module, TinyDataModule())
    trainer.test(module, TinyDataModule(), verbose=False)
    # train task (3 prompts) + two eval tasks (6 and 7 prompts); the test tasks are the val tasks.
    assert sorted(calls) == [3, 6, 7]


def test_text_tower_adapters_reembed_classes_every_step(tiny_clip_cfg, monkeypatch):
    module = make_module(
        tiny_clip_cfg, adapter={"method": "kradapter", "targets": {"towers": "text", "layers": ["q", "v"]}}
    )
    calls = count_text_calls(module, monkeypatch)
    trainer = make_trainer(max_steps=4, limit_val_batches=None)
    trainer.fit(module, TinyDataModule())
    # Every training step re-embeds the train task; each validation (after each 2-step epoch) starts afresh.
    assert calls == [3, 3, 6, 7, 3, 3, 6, 7]
    trainer.test(module, TinyDataModule(), verbose=False)
    assert calls[8:] == [6, 7]


def test_one_tower_s_targets_leave_the_other_tower_alone(tiny_clip_cfg):
    # transformer.resblocks.0.attn.q_proj (text) is also a dotted suffix of visual.transformer.resblocks.0...:
    # the selected names must be matched exactly.
    module = make_module(
        tiny_clip_cfg, adapter={"method": "lora", "targets": {"towers": "text", "layers": ["q"]}}
    )
    assert [name for name, _ in adapted_layers(module.clip_model)] == [
        "transformer.resblocks.0.attn.q_proj",
        "transformer.resblocks.1.attn.q_proj",
    ]
    assert module.adapter_config.labels["transformer.resblocks.1.attn.q_proj"] == {
        "tower": "text",
        "layer": "q",
        "block": 1,
    }


def test_targets_may_be_module_names_or_a_regex(tiny_clip_cfg):
    names = make_module(tiny_clip_cfg, adapter={"method": "kradapter", "targets": ["mlp.c_fc"]})
    assert len(names.adapter_config.labels) == 2 * 2  # towers x blocks
    assert names.adapter_config.labels["visual.transformer.resblocks.0.mlp.c_fc"]["layer"] == "fc1"
    regex = make_module(
        tiny_clip_cfg, adapter={"method": "kradapter", "targets": r"visual\..*\.attn\.v_proj"}
    )
    assert list(regex.adapter_config.labels) == [
        f"visual.transformer.resblocks.{i}.attn.v_proj" for i in (0, 1)
    ]


def test_every_eval_set_logs_top1_and_top5_under_its_name(tiny_clip_cfg):
    module = make_module(tiny_clip_cfg)
    trainer = make_trainer(max_steps=2, limit_val_batches=None, num_sanity_val_steps=1)
    trainer.fit(module, TinyDataModule())
    assert "train/loss" in trainer.callback_metrics and "train/top1" in trainer.callback_metrics
    for stage in ("val", "test"):
        if stage == "test":
            trainer.test(module, TinyDataModule(), verbose=False)
        metrics = trainer.callback_metrics
        for task in ("pets", "letters"):
            for name in ("top1", "top5", "loss"):
                assert f"{stage}/{task}/{name}" in metrics
        assert metrics[f"{stage}/top1"] == pytest.approx(
            (metrics[f"{stage}/pets/top1"] + metrics[f"{stage}/letters/top1"]) / 2
        )
        assert metrics[f"{stage}/pets/top5"] == 1.0  # 3 classes: top-5 is top-3, always right


def test_zero_shot_tests_without_fit_and_refuses_to_train(tiny_clip_cfg):
    module = make_module(tiny_clip_cfg, adapter={"method": "none"})
    assert module.adapter_keys() == []
    results = make_trainer().test(module, TinyDataModule(), verbose=False)
    assert 0.0 <= results[0]["test/top1"] <= 1.0
    results = make_trainer(limit_val_batches=None).validate(module, TinyDataModule(), verbose=False)
    assert 0.0 <= results[0]["val/letters/top5"] <= 1.0
    with pytest.raises(ValueError, match="Nothing to train"):
        make_trainer().fit(module, TinyDataModule())


def test_training_anything_but_adapters_is_an_error(tiny_clip_cfg):
    module = make_module(tiny_clip_cfg)
    module.classifier.model.logit_scale.requires_grad_(True)
    with pytest.raises(ValueError, match=r"Only adapter tensors may train.*logit_scale"):
        make_trainer().fit(module, TinyDataModule())


def test_checkpoint_holds_adapter_tensors_and_config_only(tiny_clip_cfg, tmp_path):
    module = make_module(tiny_clip_cfg)
    trainer = make_trainer(max_steps=2)
    trainer.fit(module, TinyDataModule())
    path = tmp_path / "adapters.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(module.adapter_keys())
    assert not any(key.endswith(("weight", "bias", "logit_scale")) for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["adapter"] == {"method": "kradapter"}
    full_model_bytes = sum(
        t.numel() * t.element_size() for t in module.classifier.model.state_dict().values()
    )
    assert path.stat().st_size < full_model_bytes / 10

    restored = CLIPFineTuner.load_from_checkpoint(path)
    expected = module.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in restored.state_dict().items())


def test_checkpoint_of_other_adapters_is_refused(tiny_clip_cfg, tmp_path):
    trainer = make_trainer(max_steps=1)
    trainer.fit(make_module(tiny_clip_cfg), TinyDataModule())
    trainer.save_checkpoint(tmp_path / "kr.ckpt")
    other = make_module(tiny_clip_cfg, adapter={"method": "kradapter", "targets": {"towers": "vision"}})
    with pytest.raises(AdapterMismatchError, match="do not match this module's adapters"):
        make_trainer(max_steps=2).fit(other, TinyDataModule(), ckpt_path=tmp_path / "kr.ckpt")


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resuming_from_a_checkpoint_is_exact(tiny_clip_cfg, tmp_path):
    scheduler = {"warmup_steps": 2, "min_lr": 1e-4}
    seed_everything(0)
    straight = make_module(tiny_clip_cfg, scheduler=scheduler)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    make_trainer(max_steps=6, enable_checkpointing=True, callbacks=[saver]).fit(straight, TinyDataModule())

    seed_everything(1)  # a different adapter init: everything must come from the checkpoint
    resumed = make_module(tiny_clip_cfg, scheduler=scheduler)
    trainer = make_trainer(max_steps=6)
    trainer.fit(resumed, TinyDataModule(), ckpt_path=tmp_path / "epoch=1-step=4.ckpt")

    assert trainer.global_step == 6
    expected = adapter_tensors(straight)
    for key, value in adapter_tensors(resumed).items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(
    "adapter",
    [
        {"method": "kradapter"},
        {
            "method": "lora",
            "targets": {"layers": ["q", "v", "o", "fc2"]},
            "options": {"r": 2, "lora_alpha": 4},
        },
    ],
    ids=["kradapter", "lora"],
)
def test_export_merged_loads_into_stock_open_clip(tiny_clip_cfg, tmp_path, adapter):
    module = make_module(tiny_clip_cfg, adapter=adapter)
    make_trainer(max_steps=3).fit(module, TinyDataModule())
    module.eval()
    state_before = {key: value.clone() for key, value in module.state_dict().items()}

    path = module.export_merged(tmp_path / "merged.safetensors")
    torch_path = module.export_merged(tmp_path / "merged.pt")

    # Export leaves the module exactly as it was: unmerged, base weights bit-identical.
    assert all(torch.equal(value, state_before[key]) for key, value in module.state_dict().items())
    plain = open_clip.CLIP(**tiny_clip_cfg)
    plain.load_state_dict(load_file(path), strict=True)
    assert torch.equal(
        plain.visual.conv1.weight, torch.load(torch_path, weights_only=True)["visual.conv1.weight"]
    )
    plain.eval()

    task = ClassificationTask("pets", ["cat", "dog", "hamster"], ["a photo of a {}.", "a {}"])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        adapted_logits = module(images, task)
        plain_logits = CLIPClassifier(plain, module.tokenizer)(images, task)
        zero_shot_logits = CLIPClassifier(open_clip.CLIP(**tiny_clip_cfg).eval(), module.tokenizer)(
            images, task
        )
    torch.testing.assert_close(plain_logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain_logits, zero_shot_logits, atol=1e-3)  # the adapters did change the model

    # At an update scale α the export holds W0 + α ΔW: halfway, the model's own outputs at α = 0.5.
    with scaled_adapters(module.clip_model, 0.5), torch.no_grad():
        halfway_logits = module(images, task)
        plain.load_state_dict(load_file(module.export_merged(tmp_path / "halfway.safetensors")), strict=True)
        torch.testing.assert_close(CLIPClassifier(plain, module.tokenizer)(images, task), halfway_logits)
    assert not torch.allclose(halfway_logits, adapted_logits, atol=1e-3)


def test_export_merged_with_an_attentional_pooler(tiny_clip_cfg, tmp_path):
    # The pooler's keys and values are narrower than its queries (kdim / vdim): open_clip keeps three
    # separate projection weights there instead of a fused in_proj_weight.
    tiny_clip_cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    targets = [f"visual.attn_pool.attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
    module = make_module(tiny_clip_cfg, adapter={"method": "kradapter", "targets": targets}).eval()
    with torch.no_grad():
        for _, layer in adapted_layers(module):
            layer.kr_u.normal_(std=0.1)
    plain = open_clip.CLIP(**tiny_clip_cfg).eval()
    plain.load_state_dict(load_file(module.export_merged(tmp_path / "merged.safetensors")), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted_features, plain_features = module.clip_model.encode_image(images), plain.encode_image(images)
        with disabled_adapters(module.clip_model):
            base_features = module.clip_model.encode_image(images)
    torch.testing.assert_close(plain_features, adapted_features, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain_features, base_features, atol=1e-3)  # the adapters did change the pooler


def test_hydra_configs_become_plain_hyperparameters(tiny_clip_cfg):
    # As model/clip.yaml instantiates it: Hydra hands over plain containers (_convert_: all).
    module = hydra.utils.instantiate(
        OmegaConf.create(
            {
                "_target_": "kr_vlm.models.CLIPFineTuner",
                "_convert_": "all",
                "clip": {"name": "tiny-test-clip", "model_cfg": tiny_clip_cfg},
                "adapter": {
                    "method": "kradapter",
                    "targets": {"layers": ["q", "v"], "blocks": "last_1"},
                    "options": {"rank": 4},
                },
                "optimizer": {"lr": 1e-3, "betas": [0.9, 0.98]},
                "logit_scale": 100.0,
            }
        )
    )
    hparams = pickle.loads(pickle.dumps(dict(module.hparams)))  # no OmegaConf objects inside
    assert type(hparams["adapter"]["targets"]["layers"]) is list
    assert module.adapter_config.options == {"rank": 4}
    assert len(module.adapter_config.target_modules) == 4  # q and v of the last block of each tower
    assert module.optimizer_config["betas"] == [0.9, 0.98]
    assert module.preprocess_train is not None and module.preprocess_val is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter": {"targets": {"layers": ["q"]}}}, "needs a 'method'"),
        ({"adapter": {"method": "none", "targets": {"layers": ["q"]}}}, "adapts nothing"),
        ({"adapter": {"method": "kradapter", "options": {"alpha": 3}}}, "Unknown option 'alpha'"),
        (
            {"adapter": {"method": "kradapter", "rank": 3}},
            r"Unknown adapter key\(s\) \['rank'\].*adapter.options",
        ),
        (
            {"adapter": {"method": "kradapter", "targets": {"tower": "text"}}},
            r"Unknown adapter target key\(s\) \['tower'\]",
        ),
        ({"optimizer": {"learning_rate": 1e-3}}, r"Unknown optimizer option\(s\) \['learning_rate'\]"),
        ({"scheduler": {"warmup_steps": 5, "warmup_ratio": 0.1}}, "not both"),
        ({"scheduler": {"min_lr": 1.0}}, "above optimizer.lr"),
    ],
)
def test_bad_configs_are_clear_errors(tiny_clip_cfg, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_clip_cfg, **kwargs)


def test_warmup_then_cosine_schedule():
    factors = [
        warmup_cosine_factor(step, warmup_steps=4, total_steps=14, min_factor=0.1) for step in range(15)
    ]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[14] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[4:] == sorted(factors[4:], reverse=True)


def test_learning_rate_is_stepped_per_iteration_down_to_min_lr(tiny_clip_cfg):
    module = make_module(
        tiny_clip_cfg, optimizer={"lr": 1e-2, "weight_decay": 0.1}, scheduler={"min_lr": 1e-4}
    )
    trainer = make_trainer(max_steps=5)
    trainer.fit(module, TinyDataModule())
    optimizer = trainer.optimizers[0]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4])
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # all kradapter factors are 2-D
