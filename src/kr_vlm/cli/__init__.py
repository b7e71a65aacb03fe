"""The command line: the Hydra tasks behind ``train.py`` and ``eval.py``, split by concern.

- ``tasks``: ``train`` / ``evaluate`` and their ``@hydra.main`` entry points;
- ``build``: the DataModule, the LightningModule and the Trainer, instantiated from config;
- ``checks``: what a run checks before it builds anything;
- ``summary``: ``metrics.json`` and the printed table;
- ``resolvers`` and ``schemas``: the OmegaConf resolvers and the structured-config schemas the configs
  use, registered when this package is imported (Hydra's compose API in tests relies on it too).

Lightning (and torch, but for the adapter schemas) are imported when a task runs, not with this package:
``train.py --help`` answers without them.
"""

from kr_vlm.cli.build import (
    build_datamodule,
    build_model,
    build_trainer,
    instantiate,
    instantiate_list,
    use_model_transforms,
)
from kr_vlm.cli.resolvers import auto_precision, register_resolvers
from kr_vlm.cli.schemas import register_schemas
from kr_vlm.cli.tasks import CONFIG_DIR, eval_main, evaluate, run_job, train, train_main

register_resolvers()
register_schemas()

__all__ = [
    "CONFIG_DIR",
    "auto_precision",
    "build_datamodule",
    "build_model",
    "build_trainer",
    "eval_main",
    "evaluate",
    "instantiate",
    "instantiate_list",
    "run_job",
    "train",
    "train_main",
    "use_model_transforms",
]
