"""Hydra structured configs: the schemas that make a wrong key or type fail when a config is composed.

Each adapter method's schema is ``{method, targets, options}`` with ``options`` typed by the method's
options dataclass (``kr_vlm.adapters.schema``, one for every method of ``kr_vlm.adapters.methods.REGISTRY``),
so ``adapter.options.rnak=4`` stops at composition with Hydra's message naming ``adapter.options.rnak``. The model's schema types the optimizer
and scheduler options of ``CLIPFineTuner``. ``configs/adapter/<method>.yaml`` and ``configs/model/clip.yaml``
use them through their defaults lists (``/schema/adapter/<method>@_here_``, ``/schema/model/clip@_here_``).
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


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); importing kr_vlm.cli does it.

    First the modules of the ``kr_vlm.methods`` entry points are imported (``load_method_plugins``): the
    methods they register (``kr_vlm.adapters.register_method``, which stores their schemas itself) are then
    available to ``train.py`` and ``eval.py``.
    """
    load_method_plugins()
    for name, method in REGISTRY.items():
        store_adapter_schema(name, method)
    ConfigStore.instance().store(group=f"{SCHEMA_GROUP}/model", name="clip", node=CLIPFineTunerSchema)
