"""Hydra structured configs: the schemas that make a wrong key or type fail when a config is composed.

Each adapter method's schema is ``{method, targets, options}`` with ``options`` typed by the method's
options dataclass (``kr_vlm.adapters.schema``, one for every method of ``kr_vlm.adapters.methods.REGISTRY``),
so ``adapter.options.rnak=4`` stops at composition with Hydra's message naming ``adapter.options.rnak``. The
model's schema types the optimizer and scheduler options of ``CLIPFineTuner``; the trainer's types Lightning's
``Trainer`` arguments (``trainer.max_steps=abc`` stops at composition naming ``trainer.max_steps``).
``configs/adapter/<method>.yaml`` and ``configs/model/clip.yaml`` use them through their defaults lists
(``/schema/adapter/<method>@_here_``, ``/schema/model/clip@_here_``), ``configs/trainer/default.yaml`` through
``/schema/trainer@_here_``. Value ranges (``trainer.max_steps >= -1``, Lightning's precisions) are checked
before a run builds anything (``kr_vlm.cli.checks.check_values``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore

from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.adapters.registry import load_method_plugins
from kr_vlm.adapters.schema import SCHEMA_GROUP, store_adapter_schema
from kr_vlm.optim import OptimizerOptions, SchedulerOptions, TrainingLoss


@dataclasses.dataclass
class CLIPFineTunerSchema:
    """``kr_vlm.models.CLIPFineTuner``'s arguments; ``clip`` is ``load_clip``'s keyword arguments."""

    _target_: str = "kr_vlm.models.CLIPFineTuner"
    # Plain dicts and lists for the module, so its hyperparameters (and checkpoints) hold no OmegaConf objects.
    _convert_: str = "all"
    clip: Any = None
    adapter: Any = None
    optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)
    scheduler: SchedulerOptions = dataclasses.field(default_factory=SchedulerOptions)
    logit_scale: float | None = None
    loss: TrainingLoss = TrainingLoss.class_ce
    text_batch_size: int = 1024
    init_seed: int = 0
    # true, false or a mapping of torch.compile's options: a union OmegaConf cannot type.
    compile: Any = False


@dataclasses.dataclass
class TrainerSchema:
    """``lightning.pytorch.Trainer``'s arguments, with Lightning's defaults (a test compares them with its
    signature). Arguments that take several kinds of value (an int or a float, a string or an object) are
    untyped: Lightning checks them, and ``check_values`` what a user types most."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    logger: Any = None
    callbacks: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    plugins: Any = None
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    default_root_dir: str | None = None
    enable_autolog_hparams: bool = True
    model_registry: str | None = None


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); importing kr_vlm.cli does it.

    First the modules of the ``kr_vlm.methods`` entry points are imported (``load_method_plugins``): the
    methods they register (``kr_vlm.adapters.register_method``, which stores their schemas itself) are then
    available to ``train.py`` and ``eval.py``.
    """
    load_method_plugins()
    for name, method in REGISTRY.items():
        store_adapter_schema(name, method)
    store = ConfigStore.instance()
    store.store(group=f"{SCHEMA_GROUP}/model", name="clip", node=CLIPFineTunerSchema)
    store.store(group=SCHEMA_GROUP, name="trainer", node=TrainerSchema)
