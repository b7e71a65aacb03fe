"""Hydra entry logic behind ``train.py`` / ``eval.py`` (and ``kr-vlm-train`` / ``kr-vlm-eval``).

Everything is instantiated from config; this module only wires the pieces together:
datamodule (set up) -> model (``CLIPFineTuner``) -> the model's transforms to the datamodule ->
callbacks, loggers, trainer -> fit / test -> adapters and ``metrics.json`` in the run folder.
It holds no model or data code.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import secrets
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kr_vlm import metric_names
from kr_vlm.errors import ConfigError, CorruptFileError, MissingFileError, exit_on_user_error
from kr_vlm.files import write_json_atomic
from kr_vlm.schemas import register_schemas

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).parent / "configs")

# CLIP-LoRA trains for 500 x shots iterations.
ITERATIONS_PER_SHOT = 500
# Which adapters train.py tests after fitting (config key `test_ckpt`).
TEST_CHECKPOINTS = ("last", "best")


def _iterations(shots: int) -> int:
    return ITERATIONS_PER_SHOT * int(shots)


def whole_number(cfg: DictConfig, key: str) -> int | None:
    """The config value at ``key`` (dotted) as an int, None if unset; anything else is a ``ConfigError``."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {value!r}.") from None


def _auto_precision() -> str:
    """bf16 autocast where the GPU supports it, fp16 autocast on older GPUs, float32 on the CPU
    (CPU bf16 autocast is slower than float32 on most machines)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if torch.cuda.is_available():
        return "16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs (idempotent: importing this module registers them,
    which Hydra's compose API in tests relies on as much as ``train.py`` does).

    ``launch_dir`` (the working directory the command started in) and ``run_suffix`` (a random name
    part of the run folder) are drawn once a config (``use_cache``) and keep their value wherever Hydra
    resolves the folder again: in its copies of the config for every sweep job, for DDP's processes,
    after a ``hydra.job.chdir``.
    """
    OmegaConf.register_new_resolver("iterations", _iterations, replace=True)
    OmegaConf.register_new_resolver("auto_precision", _auto_precision, replace=True)
    OmegaConf.register_new_resolver("launch_dir", os.getcwd, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True, replace=True)


register_resolvers()
register_schemas()


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


def metrics_per_test_set(trainer: Trainer, datamodule: LightningDataModule) -> dict[str, dict[str, float]]:
    """{test set: {top1, top5, loss}} from what the module logged as ``test/<set>/<metric>``."""
    logged = trainer.callback_metrics
    return {
        task.name: {
            metric: float(logged[key])
            for metric in metric_names.EVAL_METRICS
            if (key := metric_names.metric_key(metric_names.TEST, metric, task.name)) in logged
        }
        for task in datamodule.test_tasks
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as valid JSON, whole or not at all (on global rank zero only); a NaN loss is
    written as null and listed under ``non_finite``."""
    write_json_atomic(path, metrics)


def run_summary(
    cfg: DictConfig,
    module: LightningModule,
    trainer: Trainer,
    datamodule: LightningDataModule,
    timings: dict[str, float],
    tested: str | None,
) -> dict[str, Any]:
    """The content of ``metrics.json``: accuracy per test set, parameters, steps, time, memory, config."""
    from kr_vlm.adapters import count_parameters

    trainable, total = count_parameters(module)
    return {
        "task_name": cfg.task_name,
        "method": module.adapter_method,
        "model": module.model_name,
        "pretrained": module.pretrained,
        "dataset": cfg.data.dataset,
        "shots": whole_number(cfg, "data.shots"),
        "seed": cfg.get("seed"),
        "tested": tested,
        "test": metrics_per_test_set(trainer, datamodule),
        "trainable_params": trainable,
        "total_params": total,
        "steps": int(trainer.global_step),
        **{key: round(value, 2) for key, value in timings.items()},
        # The trainer's device: Lightning moves the module back to the CPU when fit/test end.
        "peak_memory_mb": round(peak_memory_mb(trainer.strategy.root_device), 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


@rank_zero_only
def print_results(metrics: dict[str, Any], output_dir: Path) -> None:
    """A rich table of the test accuracies and the paths of what the run wrote."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{metrics['task_name']}: {metrics['method']} on {metrics['dataset']}, "
        f"{metrics['shots']} shots, seed {metrics['seed']}"
    )
    table.add_column("test set")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    for name, values in metrics["test"].items():
        table.add_row(
            name,
            f"{100 * values.get(metric_names.TOP1, float('nan')):.2f}",
            f"{100 * values.get(metric_names.TOP5, float('nan')):.2f}",
        )
    console = Console()
    console.print(table)
    if "adapters_from" in metrics:
        console.print(f"Adapters from: {metrics['adapters_from']}")
    console.print(f"Run folder: {output_dir}")
    for name in ("metrics.json", "rank_report.html", "adapters"):
        if (output_dir / name).exists():
            console.print(f"  {name}: {output_dir / name}")


def set_cpu_threads(cfg: DictConfig) -> None:
    """Apply ``cpu_threads`` (torch's intra-op threads; null keeps torch's default, one per core)."""
    threads = whole_number(cfg, "cpu_threads")
    if threads:
        torch.set_num_threads(threads)


def _check_test_ckpt(cfg: DictConfig) -> None:
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


def _check_ckpt_path(path: str) -> None:
    """Fail before building anything when the checkpoint ``ckpt_path`` cannot be loaded.

    Loaded as Lightning loads it later, with ``weights_only=True`` (plain data and tensors only, never
    arbitrary pickled objects), and memory-mapped, so its tensors are not read here. A missing, empty,
    truncated or foreign file is a user error that names it.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(
            f"ckpt_path={path}: no such file. A run's checkpoints are <run folder>/checkpoints/*.ckpt "
            "(last.ckpt is the latest)."
        )
    where = "Use another checkpoint of the run (<run folder>/checkpoints/*.ckpt)."
    try:
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


@rank_zero_only
def _save_adapters(module: LightningModule, directory: Path) -> None:
    from kr_vlm.adapters import save_adapters

    save_adapters(module.clip_model, directory)
    log.info("Saved the adapters to %s", directory)


def configured_method(cfg: DictConfig) -> str:
    """The adapter method the model config asks for (``none`` for zero-shot)."""
    return (cfg.model.get("adapter") or {}).get("method") or "none"


def optimized_metric(cfg: DictConfig, trainer: Trainer) -> dict[str, Any] | None:
    """``{"name", "value"}`` of the metric named by ``optimized_metric`` (e.g. ``val/top1``) as the fit
    ended, for hyperparameter searches; None when the config names none."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in trainer.callback_metrics:
        logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
        raise ConfigError(
            f"optimized_metric={name} was not logged by the fit (logged: {logged}). The module validates at "
            f"the end of the fit and logs {metric_names.VAL_TOP1}; keep validation on (trainer.limit_val_batches)."
        )
    return {"name": name, "value": float(trainer.callback_metrics[name])}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the adapters, test them on every test set, save them and ``metrics.json`` in the run folder.

    Nothing is fitted with the adapter method ``none`` or ``data.shots=0``: the model is then only
    tested (zero-shot). ``ckpt_path`` resumes an interrupted fit. With ``optimized_metric`` set, the
    metrics hold its value at the end of the fit under ``optimized_metric``.
    """
    start = time.perf_counter()
    method, shots = configured_method(cfg), whole_number(cfg, "data.shots")
    fits = bool(cfg.get("train")) and method != "none" and shots > 0
    if cfg.get("train") and not fits:
        log.warning(
            "Nothing to train (adapter method %r, %d shots): zero-shot evaluation only.", method, shots
        )
    if cfg.get("ckpt_path") and not fits:
        raise ConfigError(
            "ckpt_path resumes training, but this run trains nothing; test a checkpoint with "
            "`python eval.py ckpt_path=...` instead."
        )
    _check_test_ckpt(cfg)
    if cfg.get("ckpt_path"):
        _check_ckpt_path(cfg.ckpt_path)
    set_cpu_threads(cfg)
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg, "fit" if fits else "test")
    module = build_model(cfg)
    use_model_transforms(datamodule, module)
    trainer = build_trainer(cfg)

    timings, optimized = {}, None
    if fits:
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        timings["fit_time_s"] = time.perf_counter() - fit_start
        # Read now: testing replaces the trainer's logged metrics.
        optimized = optimized_metric(cfg, trainer)
        _save_adapters(module, output_dir / "adapters")
    tested = None
    if cfg.get("test"):
        # The last iterate, as CLIP-LoRA tests it, or Lightning's best checkpoint by the monitored metric.
        best = fits and cfg.get("test_ckpt") == "best"
        test_start = time.perf_counter()
        trainer.test(
            module,
            datamodule=datamodule,
            ckpt_path="best" if best else None,
            verbose=False,
            weights_only=True,
        )
        timings["test_time_s"] = time.perf_counter() - test_start
        tested = "last" if fits else "zero-shot"
        if best:
            tested = trainer.checkpoint_callback.best_model_path
            # trainer.test loaded the best checkpoint into the module: save the adapters that were tested.
            _save_adapters(module, output_dir / "adapters")
    timings["wall_time_s"] = time.perf_counter() - start
    metrics = run_summary(cfg, module, trainer, datamodule, timings, tested)
    if optimized is not None:
        metrics["optimized_metric"] = optimized
    write_metrics(output_dir / "metrics.json", metrics)
    print_results(metrics, output_dir)
    return metrics


def _check_adapters_dir(cfg: DictConfig) -> None:
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test saved adapters (``adapters_dir``), a Lightning checkpoint (``ckpt_path``), or zero-shot CLIP
    (adapter method ``none``); ``metrics.json`` records which under ``adapters_from``."""
    from kr_vlm.adapters import load_adapters
    from kr_vlm.models import CLIPFineTuner

    start = time.perf_counter()
    adapters_from = adapters_source(cfg)
    if cfg.get("adapters_dir"):
        _check_adapters_dir(cfg)
    if cfg.get("ckpt_path"):
        _check_ckpt_path(cfg.ckpt_path)
    set_cpu_threads(cfg)
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg, "test")
    if cfg.get("ckpt_path"):
        # The checkpoint carries the model and adapter config (its hyperparameters) and the adapter tensors;
        # the base weights are rebuilt from them, so `model` and `adapter` of this config are not used.
        log.info("Building the model and its adapters from %s", cfg.ckpt_path)
        module = CLIPFineTuner.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    else:
        module = build_model(cfg)
        if cfg.get("adapters_dir"):
            load_adapters(module.clip_model, cfg.adapters_dir)
    use_model_transforms(datamodule, module)
    trainer = build_trainer(cfg)
    test_start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    timings = {"test_time_s": time.perf_counter() - test_start, "wall_time_s": time.perf_counter() - start}
    metrics = {
        **run_summary(cfg, module, trainer, datamodule, timings, adapters_from),
        "adapters_from": adapters_from,
    }
    write_metrics(output_dir / "metrics.json", metrics)
    print_results(metrics, output_dir)
    return metrics


def _run_job(job: Any, cfg: DictConfig) -> dict[str, Any]:
    """Run ``job(cfg)`` for a command line: a user error (a ``KrVlmError``: bad config values, missing or
    broken files, a diverged fit) ends the command with its message, which says what is wrong and what to
    do, and exit status 1, not with a traceback (``HYDRA_FULL_ERROR=1`` shows it, as for any other error)."""
    # Lightning 2.6 still uses torch's LeafSpec, which this torch flags as deprecated at every fit:
    # noise for users, nothing they can act on.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        with exit_on_user_error():
            return job(cfg)
    except SIGTERMException:
        # Lightning stops a fit on SIGTERM (cluster preemption, `kill`) with a SystemExit that carries
        # no code, which would end the command with status 0 as if the run had finished.
        log.error(
            "Stopped by SIGTERM before the run finished: no adapters or metrics.json were written. Resume "
            "with ckpt_path=%s/checkpoints/last.ckpt (add hydra.run.dir=%s to continue in the same folder).",
            cfg.paths.output_dir,
            cfg.paths.output_dir,
        )
        sys.exit(128 + signal.SIGTERM)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """``python train.py experiment=...`` / ``kr-vlm-train experiment=...``. Returns the value of
    ``optimized_metric`` (what Hydra's sweepers, Optuna's included, optimise), or None."""
    optimized = _run_job(train, cfg).get("optimized_metric")
    return None if optimized is None else optimized["value"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """``python eval.py experiment=... adapters_dir=...`` / ``kr-vlm-eval ...``."""
    _run_job(evaluate, cfg)
