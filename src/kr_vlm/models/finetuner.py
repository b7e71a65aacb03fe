"""``CLIPFineTuner``: the LightningModule that trains adapters on an open_clip model for classification.

The base model is rebuilt from the config at every load (``load_clip``), so checkpoints hold the
adapter tensors, the hyperparameters and the training state only: KRAdapter on every linear of both
ViT-B-16 towers (7.2M trainable entries) gives an 83 MB checkpoint, two thirds of it AdamW's state,
against 600 MB for the model. ``export_merged`` writes the other kind of file: a plain open_clip state dict with the
adapters merged in, which stock open_clip loads without kr_vlm.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kr_vlm.adapters import AdapterConfig, adapted_layers, adapter_state_dict, inject_adapters
from kr_vlm.adapters.io import AdapterMismatchError, state_dict_mismatches
from kr_vlm.errors import ConfigError
from kr_vlm.files import write_file_atomic
from kr_vlm.models.attention import fuse_qkv_state_dict
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.clip import load_clip
from kr_vlm.models.targets import clip_target_modules

# CLIP-LoRA's optimiser (AdamW, lr 2e-4, weight decay 1e-2) and its cosine schedule down to 1e-6.
OPTIMIZER_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
SCHEDULER_DEFAULTS: dict[str, Any] = {"warmup_steps": 0, "warmup_ratio": 0.0, "min_lr": 1e-6}

# Adapter config keys that choose the layers (through clip_target_modules); the rest are method options.
TARGET_KEYS = ("layers", "towers", "blocks")

# Where the open_clip model sits inside this LightningModule (prefix of its state-dict keys).
MODEL_PREFIX = "classifier.model."
# Checkpoint entry holding torch's random generator states, for exact resumption.
RNG_STATES_KEY = "kr_vlm_rng_states"

# The three evaluation stages and the DataModule attribute that holds their tasks.
_TASK_ATTRIBUTES = {"train": "train_task", "val": "val_tasks", "test": "test_tasks"}


def _plain(value: Any) -> Any:
    """``value`` as plain dicts and lists (Hydra hands over DictConfig / ListConfig), so that
    hyperparameters pickle and compare without OmegaConf."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def _split_adapter_config(adapter: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(method, layer selection for clip_target_modules, method options)`` of an adapter config."""
    options = dict(adapter)
    method = options.pop("method", None)
    if method is None:
        raise ConfigError(f"adapter needs a 'method' (e.g. 'kradapter', 'lora', or 'none'); got {adapter}.")
    targets = {key: options.pop(key) for key in TARGET_KEYS if key in options}
    if method == "none" and (targets or options):
        raise ConfigError(
            f"adapter method 'none' (zero-shot) adapts nothing; remove {sorted({**targets, **options})}."
        )
    return method, targets, options


def _with_defaults(given: Mapping[str, Any] | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"Unknown {what} option(s) {unknown}; valid options: {sorted(defaults)}.")
    return {**defaults, **given}


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up over ``warmup_steps``, then a
    cosine from 1 down to ``min_factor`` (= min_lr / lr), reached at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    # Micro averaging: accuracy over samples, as CLIP papers report it (torchmetrics defaults to macro).
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


def open_clip_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A copy (on the CPU) of ``model``'s weights as stock open_clip names them, adapters merged in.

    Every adapted layer contributes its merged ``weight`` / ``bias`` under its own name; the adapter
    tensors are dropped. Converted attention modules get their q/k/v projections fused back into
    ``in_proj_weight`` / ``in_proj_bias``. ``model`` is left exactly as it was: layers merged here
    are unmerged afterwards and their base weights restored from a copy, so no rounding drift is left.
    """
    layers = dict(adapted_layers(model))
    # FullFineTuneLinear is its own base layer; KRAdapter and peft layers keep theirs as `base_layer`.
    bases = {name: getattr(layer, "base_layer", layer) for name, layer in layers.items()}
    to_merge = [name for name, layer in layers.items() if not layer.merged]
    originals = {
        name: {key: t.detach().clone() for key, t in bases[name].state_dict().items()} for name in to_merge
    }
    for name in to_merge:
        layers[name].merge()
    try:
        state = {
            key: tensor.detach().to("cpu", copy=True)
            for key, tensor in model.state_dict().items()
            if not any(key.startswith(name + ".") for name in layers)
        }
        for name, base in bases.items():
            state[f"{name}.weight"] = base.weight.detach().to("cpu", copy=True)
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach().to("cpu", copy=True)
    finally:
        for name in to_merge:
            layers[name].unmerge()
            bases[name].load_state_dict(originals[name])
    fuse_qkv_state_dict(model, state)
    return state


class CLIPFineTuner(LightningModule):
    """Fine-tune adapters on an open_clip CLIP for image classification (or evaluate it zero-shot).

    Logits are ``scale * cos(image, class)`` with class embeddings from the task's class names and
    prompt templates (see ``CLIPClassifier``); the loss is cross-entropy. Class names come from the
    DataModule: ``train_task`` for training, ``val_tasks`` / ``test_tasks`` aligned with the lists of
    ``val_dataloader()`` / ``test_dataloader()``. Every evaluation set logs
    ``{val,test}/<task name>/{top1,top5,loss}``, and ``{val,test}/top1`` is the mean top-1 over sets.

    Args:
        clip: keyword arguments of ``load_clip``: ``name`` (required), ``pretrained`` (None: random
            init, an open_clip tag, or a local file), ``cache_dir``, ``precision``, ``model_cfg``, ...
        adapter: ``method`` (``kradapter``, ``lora``, ..., ``full``, or ``none`` for zero-shot; the
            default None means ``none``), the layers to adapt as ``layers`` / ``towers`` / ``blocks``
            (``clip_target_modules``' arguments; its defaults when left out), and the method's options
            (e.g. ``rank``, ``scaling`` for kradapter; ``r``, ``lora_alpha``, ``lora_dropout`` for lora).
        optimizer: AdamW options ``lr``, ``weight_decay``, ``betas``, ``eps`` (``OPTIMIZER_DEFAULTS``).
            Weight decay skips 1-D tensors (biases, norms).
        scheduler: ``warmup_steps`` or ``warmup_ratio`` (of the total steps) of linear warm-up, then a
            cosine to ``min_lr``; stepped every optimiser step, over ``trainer.estimated_stepping_batches``
            (``SCHEDULER_DEFAULTS``).
        logit_scale: fixed logit scale (CLIP-LoRA: 100), or None for the model's learned one.
        text_batch_size: prompts per text-encoder call when embedding class names.
        init_seed: seed of the random base weights when ``clip.pretrained`` is None, so a module rebuilt
            from a checkpoint gets the same frozen weights (they are not saved). Adapters are initialised
            from the global seed as usual.

    Only adapter tensors may train: ``configure_optimizers`` raises if any other parameter requires grad.
    """

    def __init__(
        self,
        clip: Mapping[str, Any],
        adapter: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        logit_scale: float | None = None,
        text_batch_size: int = 1024,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self._resumed_rng_states: dict[str, Any] | None = None
        clip, adapter = _plain(clip), _plain(adapter) if adapter is not None else {"method": "none"}
        optimizer, scheduler = _plain(optimizer) or {}, _plain(scheduler) or {}
        if "name" not in clip:
            raise ConfigError(f"clip needs a model 'name' (e.g. 'ViT-B-16'); got {clip}.")
        # Check every config before loading the model, which can take a while.
        method, targets, options = _split_adapter_config(adapter)
        self.optimizer_config = _with_defaults(optimizer, OPTIMIZER_DEFAULTS, "optimizer")
        self.scheduler_config = _with_defaults(scheduler, SCHEDULER_DEFAULTS, "scheduler")
        if self.scheduler_config["warmup_steps"] and self.scheduler_config["warmup_ratio"]:
            raise ConfigError("Give scheduler.warmup_steps or scheduler.warmup_ratio, not both.")
        if self.scheduler_config["min_lr"] > self.optimizer_config["lr"]:
            raise ConfigError(
                f"scheduler.min_lr ({self.scheduler_config['min_lr']}) is above optimizer.lr "
                f"({self.optimizer_config['lr']}); the cosine schedule decays from lr down to min_lr."
            )
        self.save_hyperparameters(
            {
                "clip": clip,
                "adapter": adapter,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "logit_scale": logit_scale,
                "text_batch_size": text_batch_size,
                "init_seed": init_seed,
            }
        )

        if clip.get("pretrained") is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model, self.preprocess_train, self.preprocess_val, self.tokenizer = load_clip(**clip)
        else:
            model, self.preprocess_train, self.preprocess_val, self.tokenizer = load_clip(**clip)
        if method == "none":
            self.adapter_config = AdapterConfig("none")
        else:
            self.adapter_config = AdapterConfig(method, clip_target_modules(model, **targets), **options)
        inject_adapters(model, self.adapter_config)
        # load_clip returns eval mode and Lightning keeps submodules' modes: start in training mode like
        # any fresh nn.Module, or adapter dropout would stay off while training.
        model.train()
        self.classifier = CLIPClassifier(model, self.tokenizer, logit_scale, text_batch_size)
        # One MetricCollection per evaluation set, rebuilt in `setup` from the DataModule's tasks.
        self.eval_metrics = nn.ModuleDict()

    # ----------------------------------------------------------------------------------- tasks & metrics

    def _tasks(self, stage: str) -> Any:
        datamodule = self.trainer.datamodule
        attribute = _TASK_ATTRIBUTES[stage]
        if datamodule is None or not hasattr(datamodule, attribute):
            raise RuntimeError(
                f"CLIPFineTuner reads the class names of the {stage} data from `datamodule.{attribute}`: "
                "pass a kr_vlm DataModule (trainer.fit/validate/test(model, datamodule=dm)), not bare dataloaders."
            )
        return getattr(datamodule, attribute)

    def setup(self, stage: str) -> None:
        """Build top-1/top-5 metrics for each evaluation set of the DataModule (already set up)."""
        stages = {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for eval_stage in stages:
            tasks = self._tasks(eval_stage)
            names = [task.name for task in tasks]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(
                    f"{eval_stage} tasks need distinct names to log under; repeated: {duplicates}."
                )
            self.eval_metrics[eval_stage] = nn.ModuleList(
                _accuracy_metrics(len(task.classnames)) for task in tasks
            )

    def _check_loaders(self, stage: str, num_loaders: int) -> None:
        num_tasks = len(self._tasks(stage))
        if num_loaders != num_tasks:
            raise RuntimeError(
                f"The DataModule has {num_tasks} {stage} task(s) but {num_loaders} {stage} dataloader(s); "
                f"`{_TASK_ATTRIBUTES[stage]}` must align one to one with the dataloaders."
            )

    # ---------------------------------------------------------------------------------------- training

    def forward(self, images: Tensor, task: Any) -> Tensor:
        """Logits of ``images`` against the classes of ``task``, ``(batch, num_classes)``."""
        return self.classifier(images, task)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.classifier(images, self._tasks("train"))
        loss = F.cross_entropy(logits, labels)
        batch_size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/top1", (logits.argmax(dim=-1) == labels).float().mean(), batch_size=batch_size)
        return loss

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that requires grad, checked to be adapter tensors.

        Raises ValueError naming the offenders if anything outside the adapters trains (e.g. an unfrozen
        logit scale or base weight): checkpoints keep only adapter tensors, so it would be lost.
        """
        adapted = [MODEL_PREFIX + name for name, _ in adapted_layers(self.classifier.model)]

        def is_adapter_tensor(name: str) -> bool:
            return any(
                name.startswith(layer + ".") and not name.startswith(layer + ".base_layer.")
                for layer in adapted
            )

        trainable = [(name, param) for name, param in self.named_parameters() if param.requires_grad]
        offenders = [name for name, _ in trainable if not is_adapter_tensor(name)]
        if offenders:
            shown = ", ".join(offenders[:10]) + (
                f" ... ({len(offenders)} in all)" if len(offenders) > 10 else ""
            )
            raise ValueError(
                f"Only adapter tensors may train, but these parameters require grad: {shown}. Checkpoints keep "
                "adapter tensors only, so they would be lost; freeze them (requires_grad_(False)), or adapt "
                "those layers with an adapter method ('full' trains the chosen layers' own weights)."
            )
        return trainable

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the adapter tensors (no weight decay on 1-D tensors), warm-up + cosine per step."""
        trainable = self.trainable_parameters()
        if not trainable:
            raise ValueError(
                f"Nothing to train: adapter method {self.adapter_config.method!r} adds no trainable tensor. "
                "For zero-shot evaluation call trainer.validate / trainer.test instead of trainer.fit."
            )
        options = self.optimizer_config
        groups = [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": options["weight_decay"]},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [group for group in groups if group["params"]],
            lr=options["lr"],
            betas=tuple(options["betas"]),
            eps=options["eps"],
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ConfigError(
                "The cosine schedule needs a finite length: set trainer.max_steps or trainer.max_epochs."
            )
        schedule = self.scheduler_config
        warmup_steps = schedule["warmup_steps"] or round(schedule["warmup_ratio"] * total_steps)
        factor = functools.partial(
            warmup_cosine_factor,
            warmup_steps=int(warmup_steps),
            total_steps=int(total_steps),
            min_factor=schedule["min_lr"] / options["lr"],
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -------------------------------------------------------------------------------------- evaluation

    def _eval_epoch_start(self, stage: str, num_loaders: int) -> None:
        self._check_loaders(stage, num_loaders)
        if self.classifier.text_tower_trainable():
            # Text adapters changed since the last evaluation; version counters notice optimiser steps,
            # but not every kind of write (fused optimisers), so start every evaluation afresh.
            self.classifier.clear_cache()

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> None:
        images, labels = batch
        task = self._tasks(stage)[dataloader_idx]
        logits = self.classifier(images, task)
        self.eval_metrics[stage][dataloader_idx].update(logits, labels)
        self.log(
            f"{stage}/{task.name}/loss",
            F.cross_entropy(logits, labels),
            batch_size=labels.shape[0],
            sync_dist=True,
            add_dataloader_idx=False,
        )

    def _eval_epoch_end(self, stage: str) -> None:
        top1 = []
        for task, metrics in zip(self._tasks(stage), self.eval_metrics[stage], strict=True):
            values = metrics.compute()  # gathers the counts of all processes under DDP
            for metric_name, value in values.items():
                self.log(
                    f"{stage}/{task.name}/{metric_name}", value, add_dataloader_idx=False, sync_dist=True
                )
            top1.append(values["top1"])
            metrics.reset()
        self.log(f"{stage}/top1", torch.stack(top1).mean(), add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val", len(self.trainer.num_val_batches))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test", len(self.trainer.num_test_batches))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------------------ checkpoints & export

    def adapter_keys(self) -> list[str]:
        """The state-dict keys (of this module) that a checkpoint keeps: the adapter tensors."""
        return [MODEL_PREFIX + key for key in adapter_state_dict(self.classifier.model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter tensors (the frozen base model is rebuilt from the hyperparameters),
        and torch's random states, which adapter dropout draws from: a fit resumed from the checkpoint
        then drops what the uninterrupted fit would have dropped. (The training loader's position and
        augmentations come back with its own state, which Lightning saves: kr_vlm.data.loading.)"""
        keep = set(self.adapter_keys())
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key in keep
        }
        checkpoint[RNG_STATES_KEY] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's adapter tensors against this module's, then complete the state dict
        with the base weights this module was built with, so that Lightning loads it strictly."""
        saved = checkpoint["state_dict"]
        own = self.state_dict()
        problems = state_dict_mismatches({key: own[key] for key in self.adapter_keys()}, saved)
        if problems:
            raise AdapterMismatchError(
                "The checkpoint's adapter tensors do not match this module's adapters (method "
                f"{self.adapter_config.method!r}): {'; '.join(problems)}. Resume with the model and adapter "
                "settings of the run that saved it (the same experiment and overrides); to evaluate it, "
                "CLIPFineTuner.load_from_checkpoint (eval.py ckpt_path=...) builds the module it was saved from."
            )
        checkpoint["state_dict"] = {**self.state_dict(), **saved}
        # Applied when training starts, after Lightning's sanity check, so only a resumed fit uses them
        # (loading a checkpoint to evaluate leaves the global generators alone).
        self._resumed_rng_states = checkpoint.get(RNG_STATES_KEY)

    def on_train_start(self) -> None:
        states, self._resumed_rng_states = self._resumed_rng_states, None
        if states is None:
            return
        torch.set_rng_state(states["cpu"])
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    def export_merged(self, path: str | Path) -> Path:
        """Write the model as a plain open_clip state dict with the adapters merged in.

        ``.safetensors`` files are written with safetensors, anything else with ``torch.save``. Stock
        open_clip loads the file without kr_vlm (``open_clip.create_model(name, pretrained=path)`` or
        ``model.load_state_dict(...)``). This module is left unchanged (adapters stay unmerged).
        """
        path = Path(path)
        state = open_clip_state_dict(self.classifier.model)
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            data = save({key: tensor.contiguous() for key, tensor in state.items()})
            write_file_atomic(path, lambda handle: handle.write(data))
        else:
            write_file_atomic(path, lambda handle: torch.save(state, handle))
        return path
