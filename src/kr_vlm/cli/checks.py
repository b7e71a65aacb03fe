"""What a run checks before it builds anything: the values a user types that the config schemas cannot
check (``check_values``: numbers that must be whole or in a range, Lightning's precision, the dataset's
name), ``test_ckpt``, ``ckpt_path``, ``adapters_dir``, where eval.py takes its adapters from, and
``adapter_scales``. Each failure is a user error that names the key."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kr_vlm import metric_names
from kr_vlm.errors import ConfigError, CorruptFileError, MissingFileError

# Which adapters train.py tests after fitting (config key `test_ckpt`).
TEST_CHECKPOINTS = ("last", "best")


def whole_number(cfg: DictConfig, key: str) -> int | None:
    """The config value at ``key`` (dotted) as an int, None if unset; anything else is a ``ConfigError``."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {value!r}.") from None


def _at_least(cfg: DictConfig, key: str, lowest: int, meaning: str) -> None:
    value = whole_number(cfg, key)
    if value is not None and value < lowest:
        raise ConfigError(f"{key} must be a whole number >= {lowest} ({meaning}), got {value}.")


def lightning_precisions() -> list[str]:
    """Every value Lightning's ``Trainer(precision=...)`` accepts, as typed on a command line."""
    from typing import get_args

    from lightning.fabric.plugins.precision import precision as fabric_precision

    literals = (
        fabric_precision._PRECISION_INPUT_STR,
        fabric_precision._PRECISION_INPUT_STR_ALIAS,
        fabric_precision._PRECISION_INPUT_INT,
    )
    return list(dict.fromkeys(str(value) for literal in literals for value in get_args(literal)))


def check_values(cfg: DictConfig) -> None:
    """The values of a run's config that no schema types: ``seed`` and the trainer's lengths are whole
    numbers in range, ``trainer.precision`` is one of Lightning's, ``data.dataset`` a known dataset."""
    whole_number(cfg, "seed")
    _at_least(cfg, "trainer.max_steps", -1, "-1: no limit, trainer.max_epochs decides")
    _at_least(cfg, "trainer.max_epochs", -1, "-1: no limit, trainer.max_steps decides")
    _at_least(cfg, "trainer.accumulate_grad_batches", 1, "batches a step")
    precision = OmegaConf.select(cfg, "trainer.precision")
    if precision is not None and str(precision) not in lightning_precisions():
        raise ConfigError(
            f"trainer.precision must be one of {', '.join(lightning_precisions())} (Lightning's), got "
            f"{precision!r}: e.g. 32-true on the CPU, bf16-mixed on a GPU."
        )
    dataset = OmegaConf.select(cfg, "data.dataset")
    if isinstance(dataset, str):
        from kr_vlm.data.registry import dataset_info

        dataset_info(dataset)


def set_cpu_threads(cfg: DictConfig) -> None:
    """Apply ``cpu_threads`` (torch's intra-op threads; null keeps torch's default, one per core)."""
    threads = whole_number(cfg, "cpu_threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def configured_method(cfg: DictConfig) -> str:
    """The adapter method the model config asks for (``none`` for zero-shot)."""
    return (cfg.model.get("adapter") or {}).get("method") or "none"


def empty_schedule(cfg: DictConfig) -> str | None:
    """The trainer setting that lets a fit take no step (``trainer.max_steps=0``, ``trainer.max_epochs=0``,
    ``trainer.limit_train_batches=0``), as ``key=value``; None when the schedule trains."""
    for key in ("trainer.max_steps", "trainer.max_epochs"):
        if whole_number(cfg, key) == 0:
            return f"{key}=0"
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and isinstance(limit, int | float) and limit == 0:
        return f"trainer.limit_train_batches={limit}"
    return None


def check_test_ckpt(cfg: DictConfig) -> None:
    """``test_ckpt`` is ``last`` or ``best``; ``best`` needs a checkpoint callback that monitors a metric."""
    choice = cfg.get("test_ckpt", "last")
    if choice not in TEST_CHECKPOINTS:
        raise ConfigError(f"test_ckpt must be one of {', '.join(TEST_CHECKPOINTS)}, got {choice!r}.")
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if choice == "best" and (not checkpoint or not checkpoint.get("monitor")):
        raise ConfigError(
            "test_ckpt=best tests the best checkpoint by a validation metric: it needs "
            f"callbacks.model_checkpoint.monitor={metric_names.VAL_TOP1} callbacks.model_checkpoint.every_n_train_steps=null "
            "(save after every validation) and validation during training (trainer.val_check_interval=100)."
        )


def check_ckpt_path(path: str) -> dict:
    """Fail before building anything when the checkpoint ``ckpt_path`` cannot be loaded.

    Loaded as Lightning loads it later, with ``weights_only=True`` (plain data and tensors only, never
    arbitrary pickled objects), and memory-mapped, so its tensors are not read here. A missing, empty,
    truncated or foreign file is a user error that names it. Returns the checkpoint (its tensors mapped).
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(
            f"ckpt_path={path}: no such file. A run's checkpoints are <run folder>/checkpoints/*.ckpt "
            "(last.ckpt is the latest)."
        )
    where = "Use another checkpoint of the run (<run folder>/checkpoints/*.ckpt)."
    try:
        import torch

        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run any code the file holds.
        raise CorruptFileError(
            f"ckpt_path={path} holds objects other than tensors and plain data, which kr_vlm does not load "
            f"(a checkpoint that train.py wrote holds none). {where}"
        ) from None
    except (EOFError, RuntimeError):
        state = "is empty" if file.stat().st_size == 0 else "is truncated, corrupt, or not a checkpoint"
        raise CorruptFileError(f"ckpt_path={path} {state}. {where}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CorruptFileError(
            f"ckpt_path={path} is not a Lightning checkpoint (it has no state_dict). {where}"
        )
    return checkpoint


def check_adapters_dir(cfg: DictConfig) -> None:
    """Fail before building anything when ``adapters_dir`` cannot be loaded into the configured model."""
    from kr_vlm.adapters.io import AdapterMismatchError, read_adapter_config

    saved = read_adapter_config(cfg.adapters_dir)  # a missing folder fails here, naming the files
    configured = configured_method(cfg)
    if saved.method != configured:
        raise AdapterMismatchError(
            f"{cfg.adapters_dir} holds {saved.method!r} adapters, but the model is configured with adapter "
            f"{configured!r}. Give eval.py the training run's settings: the same experiment (e.g. "
            f"experiment=demo), or adapter={saved.method} with the options it was trained with."
        )


def adapters_source(cfg: DictConfig) -> str:
    """Where eval.py takes its adapters from: ``adapters_dir`` or ``ckpt_path`` (as an absolute path), or
    ``zero-shot`` for the adapter method ``none``; an adapter method with neither is an error."""
    adapters_dir, ckpt_path = cfg.get("adapters_dir"), cfg.get("ckpt_path")
    if adapters_dir and ckpt_path:
        raise ConfigError("Give adapters_dir or ckpt_path, not both.")
    if adapters_dir or ckpt_path:
        return str(Path(adapters_dir or ckpt_path).absolute())
    method = configured_method(cfg)
    if method != "none":
        raise ConfigError(
            f"The model is configured with {method!r} adapters but eval.py was given none, so it would test "
            "untrained adapters. Give the training run's adapters or one of its checkpoints, with the run's "
            "experiment and overrides:\n"
            "  python eval.py experiment=<experiment> adapters_dir=<run folder>/adapters\n"
            "  python eval.py ckpt_path=<run folder>/checkpoints/last.ckpt\n"
            "For zero-shot evaluation use adapter=none (or experiment=clip_zeroshot)."
        )
    return "zero-shot"


def adapter_scales(cfg: DictConfig) -> list[float]:
    """The update scales α (``adapter_scales``) to test at, ascending, 1 always among them (it is the
    ``test`` entry of metrics.json); ``[1.0]`` when the key is unset.

    A scale is a finite number >= 0 (0: the base model, 1: the trained one, above 1: extrapolated); the
    list must name at least one, and a model without adapters (``adapter=none``) has nothing to scale.
    """
    given = cfg.get("adapter_scales")
    if given is None:
        return [1.0]
    example = "e.g. adapter_scales=[0,0.25,0.5,0.75,1] (0: the base model, 1: the trained adapters)"
    if isinstance(given, str) or not isinstance(given, Sequence) or not len(given):
        raise ConfigError(f"adapter_scales must be a non-empty list of update scales, {example}; got {given!r}.")
    scales = set()
    for value in given:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"adapter_scales must hold finite numbers >= 0, {example}; got {value!r} in {list(given)!r}."
            )
        scales.add(float(value))
    scales.add(1.0)
    if scales != {1.0} and configured_method(cfg) == "none":
        raise ConfigError(
            f"adapter_scales={list(given)!r} scales the adapters' updates, but the model has none (adapter=none): "
            "drop adapter_scales, or give the adapters to scale (eval.py adapters_dir=<run folder>/adapters)."
        )
    return sorted(scales)

