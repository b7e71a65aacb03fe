"""Everything a run is made of, instantiated from its config: the DataModule, the LightningModule, the
Trainer with its callbacks and loggers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from kr_vlm.errors import ConfigError, KrVlmError

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


# The libraries each part of a run is built by: an error they raise while building it comes from that part's
# settings (an unknown name, an option of the wrong kind, a file they cannot read).
MODEL_LIBRARIES = ("open_clip", "timm", "transformers", "huggingface_hub", "safetensors", "peft")
DATA_LIBRARIES = ("torchvision", "PIL", "clip_benchmark", "datasets", "webdataset")
TRAINER_LIBRARIES = ("lightning",)


def raised_in(error: BaseException, packages: tuple[str, ...]) -> str | None:
    """The package among ``packages`` whose code raised ``error`` (its innermost frame), or None."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    module = traceback.tb_frame.f_globals.get("__name__", "") if traceback is not None else ""
    return next((package for package in packages if module.split(".")[0] == package), None)


@contextmanager
def settings_of(keys: str, packages: tuple[str, ...]) -> Iterator[None]:
    """Turn an error that one of ``packages`` raises (while it builds what ``keys`` configure) into a
    ``ConfigError`` that names the keys; errors of kr_vlm's own code go on as they are."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError, TypeError, NotImplementedError, OSError) as error:
        package = raised_in(error, packages)
        if isinstance(error, KrVlmError) or package is None:
            raise
        raise ConfigError(
            f"{package} cannot build what {keys} configure: {type(error).__name__}: {error} "
            "(python train.py ... --cfg job prints the settings; HYDRA_FULL_ERROR=1 the traceback)."
        ) from error


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
    with settings_of("model.* and adapter.*", MODEL_LIBRARIES):
        return instantiate(cfg.model)


def build_datamodule(cfg: DictConfig, stage: str) -> LightningDataModule:
    """The DataModule, set up: missing data fails here, before any training starts, with the data
    layer's message. Built before the model, as listing files is quick and loading weights is not."""
    log.info("Building the data <%s>", cfg.data.get("_target_"))
    with settings_of("data.* and paths.data_dir", DATA_LIBRARIES):
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
    with settings_of("trainer.*", TRAINER_LIBRARIES):
        trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(hyperparameters(cfg))
    return trainer
