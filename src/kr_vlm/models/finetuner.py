"""``CLIPFineTuner``: the LightningModule that trains adapters on an open_clip model for classification.

The base model is rebuilt from the config at every load (``load_clip``), so checkpoints hold the
adapter tensors, the hyperparameters and the training state (AdamW's two moments per adapter tensor)
only, never the frozen model. ``export_merged`` writes the other kind of file: a plain open_clip state
dict with the adapters merged in, which stock open_clip loads without kr_vlm.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kr_vlm import metric_names
from kr_vlm.adapters import (
    AdapterConfig,
    adapted_layers,
    adapter_state_dict,
    inject_adapters,
    merged_state_dict,
)
from kr_vlm.adapters.config import checked_options
from kr_vlm.adapters.io import AdapterMismatchError, state_dict_mismatches
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError
from kr_vlm.files import write_file_atomic
from kr_vlm.models.classifier import CLIPClassifier
from kr_vlm.models.clip import load_clip
from kr_vlm.models.converted import fuse_qkv_state_dict
from kr_vlm.models.losses import caption_contrastive_loss
from kr_vlm.models.targets import select_targets
from kr_vlm.models.towers import example_forward
from kr_vlm.optim import OptimizerOptions, SchedulerOptions, TrainingLoss, warmup_cosine_factor

#: The keys of an adapter config: the method, the layers it adapts, the method's options.
ADAPTER_KEYS = ("method", "targets", "options")

# Where the open_clip model sits inside this LightningModule (prefix of its state-dict keys).
MODEL_PREFIX = "classifier.model."
# Checkpoint entry holding torch's random generator states, for exact resumption.
RNG_STATES_KEY = "kr_vlm_rng_states"
SCHEDULE_KEY, SCHEDULE_FIELDS = "kr_vlm_schedule", ("max_steps", "max_epochs", "accumulate_grad_batches")

# The three evaluation stages and the DataModule attribute that holds their tasks.
_TASK_ATTRIBUTES = {"train": "train_task", "val": "val_tasks", "test": "test_tasks"}


def _options(options_class: type, given: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``given`` with the defaults of ``options_class`` filled in; an unknown name is a ``ConfigError``."""
    given = dict(given or {})
    valid = [field.name for field in dataclasses.fields(options_class)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown {what} option(s) {unknown}; valid options: {sorted(valid)}.")
    return dataclasses.asdict(options_class(**given))


def adapter_parts(adapter: Mapping[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """``(method, targets, options)`` of an adapter config ``{method, targets, options}``, the method and
    its options checked (``kr_vlm.adapters.config.checked_options``)."""
    method = adapter.get("method")
    if method is None:
        raise ConfigError(f"adapter needs a 'method' (e.g. 'kradapter', 'lora', or 'none'); got {adapter}.")
    unknown = sorted(set(adapter) - set(ADAPTER_KEYS))
    if unknown:
        raise ConfigError(
            f"Unknown adapter key(s) {unknown}: an adapter config is {{method, targets, options}}; the layers "
            "to adapt go under targets (e.g. adapter.targets.layers=[q,v]), the method's options under "
            "options (e.g. adapter.options.rank=8). A checkpoint saved before adapter configs took this shape "
            "holds the flat one: evaluate its run's adapters instead (eval.py adapters_dir=<run folder>/adapters)."
        )
    return method, adapter.get("targets"), checked_options(method, adapter.get("options") or {})


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    # Micro averaging: accuracy over samples, as CLIP papers report it (torchmetrics defaults to macro).
    return MetricCollection(
        {
            metric_names.TOP1: MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            metric_names.TOP5: MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


def open_clip_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A copy (on the CPU) of ``model``'s weights as stock open_clip names them, adapters merged in
    (``kr_vlm.adapters.merged_state_dict``), every conversion undone (``fuse_qkv_state_dict``: q/k/v fused
    back into ``in_proj_weight`` / timm's ``qkv``, pointwise linears back into 1x1 convolutions). ``model``
    is left exactly as it was."""
    return fuse_qkv_state_dict(model, merged_state_dict(model))


class CLIPFineTuner(LightningModule):
    """Fine-tune adapters on an open_clip CLIP for image classification (or evaluate it zero-shot).

    Logits are ``scale * cos(image, class)`` with class embeddings from the task's class names and
    prompt templates (see ``CLIPClassifier``); the training loss is ``loss`` (``kr_vlm.models.losses``),
    evaluation always scores every class. Class names come from the
    DataModule: ``train_task`` for training, ``val_tasks`` / ``test_tasks`` aligned with the lists of
    ``val_dataloader()`` / ``test_dataloader()``. Every evaluation set logs
    ``{val,test}/<task name>/{top1,top5,loss}``, and ``{val,test}/top1`` is the mean top-1 over sets.

    Args:
        clip: keyword arguments of ``load_clip``: ``name`` (required), ``pretrained`` (None: random
            init, an open_clip tag, or a local file), ``cache_dir``, ``precision``, ``model_cfg``, ...
        adapter: ``{method, targets, options}`` (``ADAPTER_KEYS``): ``method`` is ``kradapter``, ``lora``,
            ..., ``full``, or ``none`` for zero-shot (the default None means ``none``); ``targets`` the
            layers to adapt: the friendly selection ``{layers, towers, blocks}`` (``clip_targets``'
            arguments; its defaults where left out, all six layers of both towers when ``targets`` is left
            out), a list of module names or a regex; ``options`` the method's options (e.g. ``rank``,
            ``scaling`` for kradapter; ``r``, ``lora_alpha``, ``lora_dropout`` for lora).
        optimizer: AdamW options (``OptimizerOptions``: ``lr``, ``weight_decay``, ``betas``, ``eps``).
        scheduler: warm-up and cosine (``SchedulerOptions``: ``warmup_steps`` or ``warmup_ratio``,
            ``min_lr``), stepped every optimiser step over ``trainer.estimated_stepping_batches``.
        logit_scale: fixed logit scale (CLIP-LoRA: 100), or None for the model's learned one.
        loss: the training objective (``TrainingLoss``): ``class_ce``, cross-entropy over all the classes
            of the training task, or ``caption_contrastive``, the KRAdapter / RandLoRA authors' in-batch
            loss against the captions of the batch's images (``kr_vlm.models.losses``).
        text_batch_size: prompts per text-encoder call when embedding class names.
        init_seed: seed of the random base weights when ``clip.pretrained`` is None, so a module rebuilt
            from a checkpoint gets the same frozen weights (they are not saved). Adapters are initialised
            from the global seed as usual.
        compile: compile both towers with ``torch.compile`` (in place, so checkpoints do not change): True
            for its defaults, or a mapping of its options (e.g. ``{mode: max-autotune}``).

    Hydra configs arrive as plain dicts (``model/clip.yaml`` instantiates with ``_convert_: all``), so the
    hyperparameters hold plain data. Only adapter tensors may train: ``configure_optimizers`` raises if
    any other parameter requires grad.
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
        compile: bool | Mapping[str, Any] = False,
        loss: str = TrainingLoss.class_ce.value,
    ) -> None:
        super().__init__()
        self._resumed_rng_states: dict[str, Any] | None = None
        adapter = {"method": "none"} if adapter is None else adapter
        if "name" not in clip:
            raise ConfigError(f"clip needs a model 'name' (e.g. 'ViT-B-16'); got {clip}.")
        if not isinstance(compile, (bool, Mapping)):
            raise ConfigError(
                f"model.compile must be true, false or a mapping of torch.compile's options (e.g. "
                f"{{mode: max-autotune}}); got {compile!r}."
            )
        # Check every config before loading the model, which can take a while.
        try:
            self.loss = TrainingLoss(loss)
        except ValueError:
            raise ConfigError(
                f"model.loss must be one of {', '.join(TrainingLoss.__members__)}, got {loss!r}."
            ) from None
        method, targets, options = adapter_parts(adapter)
        self.optimizer_config = _options(OptimizerOptions, optimizer, "optimizer")
        self.scheduler_config = _options(SchedulerOptions, scheduler, "scheduler")
        if self.scheduler_config["warmup_steps"] and self.scheduler_config["warmup_ratio"]:
            raise ConfigError("Give scheduler.warmup_steps or scheduler.warmup_ratio, not both.")
        if self.scheduler_config["min_lr"] > self.optimizer_config["lr"]:
            raise ConfigError(
                f"scheduler.min_lr ({self.scheduler_config['min_lr']}) is above optimizer.lr "
                f"({self.optimizer_config['lr']}); the cosine schedule decays from lr down to min_lr."
            )
        # The run's config is logged once, by the command line (kr_vlm.cli); these go into checkpoints.
        self.save_hyperparameters(
            {
                "clip": clip,
                "adapter": adapter,
                "optimizer": optimizer or {},
                "scheduler": scheduler or {},
                "logit_scale": logit_scale,
                "text_batch_size": text_batch_size,
                "init_seed": init_seed,
                "compile": compile,
                "loss": self.loss.value,
            },
            logger=False,
        )

        if clip.get("pretrained") is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model, self.preprocess_train, self.preprocess_val, self.tokenizer = load_clip(**clip)
        else:
            model, self.preprocess_train, self.preprocess_val, self.tokenizer = load_clip(**clip)
        if REGISTRY[method].adapts_layers:
            self.adapter_config = AdapterConfig(method, select_targets(model, targets), **options)
        else:
            self.adapter_config = AdapterConfig(method, targets, **options)  # targets must be left out
        # One forward on a blank image and a short caption checks that every adapter is called.
        inject_adapters(model, self.adapter_config, forward_check=example_forward(model, self.tokenizer))
        # load_clip returns eval mode and Lightning keeps submodules' modes: start in training mode like
        # any fresh nn.Module, or adapter dropout would stay off while training.
        model.train()
        if compile:
            compile_options = {} if compile is True else dict(compile)
            # The text tower is `text` in open_clip's CustomTextCLIP, its blocks `transformer` in CLIP.
            text_tower = model.text if hasattr(model, "text") else model.transformer
            for tower in (model.visual, text_tower):
                tower.compile(**compile_options)
        self.classifier = CLIPClassifier(model, self.tokenizer, logit_scale, text_batch_size)
        # One MetricCollection per evaluation set, rebuilt in `setup` from the DataModule's tasks.
        self.eval_metrics = nn.ModuleDict()

    @property
    def clip_model(self) -> nn.Module:
        """The open_clip model, adapters included (what ``save_adapters`` / ``load_adapters`` take)."""
        return self.classifier.model

    @property
    def adapter_method(self) -> str:
        """The adapter method this module was built with (``none`` for zero-shot)."""
        return self.adapter_config.method

    @property
    def model_name(self) -> str:
        """The open_clip architecture (``clip.name``)."""
        return self.hparams["clip"]["name"]

    @property
    def pretrained(self) -> str | None:
        """Where the base weights came from (``clip.pretrained``): a tag, a file, or None (random)."""
        return self.hparams["clip"].get("pretrained")

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
        task = self._tasks("train")
        if self.loss is TrainingLoss.caption_contrastive:
            # Only the batch's classes go through the text tower; an image's caption is its class's.
            classes, class_of_image = labels.unique(return_inverse=True)
            image_features = self.classifier.encode_images(images)
            captions = self.classifier.class_embeddings(task, classes)[class_of_image]
            loss, logits = caption_contrastive_loss(
                image_features, captions.to(image_features.dtype), labels, self.classifier.logit_scale()
            )
            predicted = labels[logits.argmax(dim=-1)]  # the class of the caption each image scores highest
        else:
            logits = self.classifier(images, task)
            loss = F.cross_entropy(logits, labels)
            predicted = logits.argmax(dim=-1)
        batch_size = labels.shape[0]
        train_top1 = (predicted == labels).float().mean()
        self.log(
            metric_names.metric_key(metric_names.TRAIN, metric_names.LOSS),
            loss,
            prog_bar=True,
            batch_size=batch_size,
        )
        self.log(
            metric_names.metric_key(metric_names.TRAIN, metric_names.TOP1), train_top1, batch_size=batch_size
        )
        return loss

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that requires grad, checked to be adapter tensors.

        Raises ValueError naming the offenders if anything outside the adapters trains (e.g. an unfrozen
        logit scale or base weight): checkpoints keep only adapter tensors, so it would be lost.
        """
        adapter_tensors = {
            id(tensor)
            for _, layer in adapted_layers(self.clip_model)
            for tensor in layer.adapter_state_dict().values()
        }
        trainable = [(name, param) for name, param in self.named_parameters() if param.requires_grad]
        offenders = [name for name, param in trainable if id(param) not in adapter_tensors]
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
            metric_names.metric_key(stage, metric_names.LOSS, task.name),
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
                    metric_names.metric_key(stage, metric_name, task.name),
                    value,
                    add_dataloader_idx=False,
                    sync_dist=True,
                )
            top1.append(values[metric_names.TOP1])
            metrics.reset()
        mean_top1 = torch.stack(top1).mean()
        self.log(
            metric_names.metric_key(stage, metric_names.TOP1),
            mean_top1,
            add_dataloader_idx=False,
            sync_dist=True,
        )

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start(metric_names.VAL, len(self.trainer.num_val_batches))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(metric_names.VAL, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(metric_names.VAL)

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start(metric_names.TEST, len(self.trainer.num_test_batches))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(metric_names.TEST, batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(metric_names.TEST)

    # ------------------------------------------------------------------------------ checkpoints & export

    def adapter_keys(self) -> list[str]:
        """The state-dict keys (of this module) that a checkpoint keeps: the adapter tensors."""
        return [MODEL_PREFIX + key for key in adapter_state_dict(self.clip_model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter tensors (the frozen base model is rebuilt from the hyperparameters),
        and torch's random states, which adapter dropout draws from: a fit resumed from the checkpoint
        then drops what the uninterrupted fit would have dropped; and the Trainer's schedule. (The training loader's position and
        augmentations come back with its own state, which Lightning saves: kr_vlm.data.loading.)"""
        keep = set(self.adapter_keys())
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key in keep
        }
        checkpoint[RNG_STATES_KEY] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }
        # The Trainer's schedule, which a resumed fit must keep (kr_vlm.cli.resume).
        checkpoint[SCHEDULE_KEY] = {field: getattr(self.trainer, field) for field in SCHEDULE_FIELDS}

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
        """Write the model as a plain open_clip state dict with the adapters merged in, at their update
        scale α (``kr_vlm.adapters.set_adapter_scale``; 1 unless set: the trained model).

        ``.safetensors`` files are written with safetensors, anything else with ``torch.save``. Stock
        open_clip loads the file without kr_vlm (``open_clip.create_model(name, pretrained=path)`` or
        ``model.load_state_dict(...)``). This module is left unchanged (adapters stay unmerged).
        """
        path = Path(path)
        state = open_clip_state_dict(self.clip_model)
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            data = save({key: tensor.contiguous() for key, tensor in state.items()})
            write_file_atomic(path, lambda handle: handle.write(data))
        else:
            write_file_atomic(path, lambda handle: torch.save(state, handle))
        return path
