"""Hydra structured configs: the schemas that make a wrong key or type fail when a config is composed.

Each adapter method's schema is ``{method, targets, options}`` with ``options`` typed by the method's
options dataclass (``kr_vlm.adapters.methods.REGISTRY``), so ``adapter.options.rnak=4`` stops at
composition with Hydra's message naming ``adapter.options.rnak``. The model's schema types the optimizer
and scheduler options of ``CLIPFineTuner``. ``configs/adapter/<method>.yaml`` and ``configs/model/clip.yaml``
use them through their defaults lists (``/schema/adapter/<method>@_here_``, ``/schema/model/clip@_here_``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore

from kr_vlm.adapters.methods import REGISTRY, Method
from kr_vlm.optim import OptimizerOptions, SchedulerOptions, TrainingLoss

SCHEMA_GROUP = "schema"


def adapter_schema(name: str, method: Method) -> type:
    """The dataclass ``{method, targets, options}`` of one adapter method.

    ``targets`` is untyped: it is CLIP's friendly selection ``{layers, towers, blocks}``, a list of module
    names or a regex (``kr_vlm.models.targets.select_targets`` checks it).
    """
    return dataclasses.make_dataclass(
        f"{name}_adapter",
        [
            ("method", str, dataclasses.field(default=name)),
            ("targets", Any, dataclasses.field(default=None)),
            ("options", method.options, dataclasses.field(default_factory=method.options)),
        ],
    )


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
    """Store the schemas in Hydra's ConfigStore (idempotent); importing kr_vlm.cli does it."""
    store = ConfigStore.instance()
    for name, method in REGISTRY.items():
        store.store(group=f"{SCHEMA_GROUP}/adapter", name=name, node=adapter_schema(name, method))
    store.store(group=f"{SCHEMA_GROUP}/model", name="clip", node=CLIPFineTunerSchema)
