"""Everything a run is made of, instantiated from its config: the DataModule, the LightningModule, the
Trainer with its callbacks and loggers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising the error of the object being built.

    Hydra wraps an exception raised inside the target in an ``InstantiationException`` whose message
    is the ``repr`` of the original (newlines escaped). The model and data layers write messages
    that say what is missing and where to put it, so the original error is raised instead. Errors
    of Hydra's own (a target that cannot be imported) keep Hydra's message.
    """
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if cause is None or isinstance(cause, (ImportError, InstantiationException)):
            raise
        raise cause from None


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``.

    Entries without one are skipped: an experiment may tune a callback (``callbacks.rank_monitor.
    every_n_steps``) that another top config (``eval.yaml``) does not include.
    """
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def build_model(cfg: DictConfig) -> LightningModule:
    """The LightningModule; missing weights fail here with the model layer's message."""
    log.info("Building the model <%s>", cfg.model.get("_target_"))
    return instantiate(cfg.model)


def build_datamodule(cfg: DictConfig, stage: str) -> LightningDataModule:
    """The DataModule, set up: missing data fails here, before any training starts, with the data
    layer's message. Built before the model, as listing files is quick and loading weights is not."""
    log.info("Building the data <%s>", cfg.data.get("_target_"))
    datamodule: LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def use_model_transforms(datamodule: LightningDataModule, module: LightningModule) -> None:
    """The data room knows nothing of models: the model hands over its own image transforms."""
    datamodule.set_transforms(module.preprocess_train, module.preprocess_val)


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The config as the loggers record it: resolved, once. ``model.adapter`` is ``${adapter}``, so the
    adapter is recorded under ``adapter`` only."""
    logged = OmegaConf.to_container(cfg, resolve=True)
    logged["model"].pop("adapter", None)
    return logged


def build_trainer(cfg: DictConfig) -> Trainer:
    """The Trainer with the configured callbacks and loggers; the loggers get the config (the module
    logs no hyperparameters of its own)."""
    callbacks: list[Callback] = instantiate_list(cfg.get("callbacks"))
    loggers: list[Logger] = instantiate_list(cfg.get("logger"))
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(hyperparameters(cfg))
    return trainer
