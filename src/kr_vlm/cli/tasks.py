"""The two Hydra tasks behind ``train.py`` / ``eval.py`` (and ``kr-vlm-train`` / ``kr-vlm-eval``).

Everything is instantiated from config (``kr_vlm.cli.build``); a task only wires the pieces together:
checks (``kr_vlm.cli.checks``) -> datamodule (set up) -> model (``CLIPFineTuner``) -> the model's transforms
to the datamodule -> callbacks, loggers, trainer -> fit / test (at every update scale of ``adapter_scales``)
-> adapters and ``metrics.json`` (``kr_vlm.cli.summary``) in the run folder. It holds no model or data code.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch

# Lightning's own rank_zero_only (Lightning sets the rank on this object) without importing Lightning.
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig

from kr_vlm import metric_names
from kr_vlm.adapters import adapted_layers, scaled_adapters
from kr_vlm.cli.build import build_datamodule, build_model, build_trainer, use_model_transforms
from kr_vlm.cli.checks import (
    adapter_scales,
    adapters_source,
    check_adapters_dir,
    check_ckpt_path,
    check_test_ckpt,
    check_values,
    configured_method,
    empty_schedule,
    set_cpu_threads,
    whole_number,
)
from kr_vlm.cli.resume import check_resume
from kr_vlm.cli.summary import (
    metrics_per_test_set,
    optimized_metric,
    print_results,
    run_summary,
    scale_key,
    scale_summary,
    write_metrics,
)
from kr_vlm.errors import ConfigError, command_boundary
from kr_vlm.files import write_json_atomic
from kr_vlm.run_folder import FAILED_FILE

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).parents[1] / "configs")


def _prepare(cfg: DictConfig, resume: bool = False) -> None:
    """What every run does before it builds anything: check ``ckpt_path`` (with ``resume``, also that it
    was written with this run's data, optimiser and schedule settings), set the CPU threads, seed."""
    if cfg.get("ckpt_path"):
        checkpoint = check_ckpt_path(cfg.ckpt_path)
        if resume:
            check_resume(cfg, checkpoint)
    set_cpu_threads(cfg)
    if cfg.get("seed") is not None:
        from lightning.pytorch import seed_everything

        seed_everything(whole_number(cfg, "seed"), workers=True)


@rank_zero_only
def _save_adapters(module: LightningModule, directory: Path) -> None:
    from kr_vlm.adapters import save_adapters

    save_adapters(module.clip_model, directory)
    log.info("Saved the adapters to %s", directory)


def _zero_shot_baseline(
    module: LightningModule, trainer: Trainer, datamodule: LightningDataModule
) -> dict[str, dict[str, float]]:
    """The test metrics of the model before training, i.e. zero-shot: every adapter update starts at
    zero, so the untrained model is the pretrained one. Its random generators are left as they were, so
    the fit that follows draws what it would have drawn without this evaluation."""
    with torch.no_grad():
        moved = [name for name, layer in adapted_layers(module.clip_model) if layer.delta_weight().any()]
    if moved:
        raise ConfigError(
            f"zero_shot_baseline=true tests the model before training as its zero-shot baseline, but the "
            f"adapters of {moved[0]} (and {len(moved) - 1} more) do not start at a zero update; set "
            "zero_shot_baseline=false and evaluate zero-shot with adapter=none instead."
        )
    log.info("Testing the model before training: its zero-shot baseline")
    with torch.random.fork_rng(devices=[]):
        trainer.test(module, datamodule=datamodule, verbose=False)
    return metrics_per_test_set(trainer, datamodule)


def _test_results(
    module: LightningModule,
    trainer: Trainer,
    datamodule: LightningDataModule,
    scales: list[float],
    timings: dict[str, float],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]] | None]:
    """The test results just logged (α = 1), and metrics.json's ``test_by_scale`` when ``scales`` holds
    others: every test set at every update scale α (ascending), the same model tested again at each with
    its adapters scaled (the time it takes goes to ``timings``)."""
    tested = metrics_per_test_set(trainer, datamodule)  # read first: each test replaces the logged metrics
    if scales == [1.0]:
        return tested, None
    start = time.perf_counter()
    by_scale = {}
    for alpha in scales:
        if alpha != 1:
            log.info("Testing at update scale %s (W0 + %s ΔW)", alpha, alpha)
            with scaled_adapters(module.clip_model, alpha):
                trainer.test(module, datamodule=datamodule, verbose=False, weights_only=True)
        test = tested if alpha == 1 else metrics_per_test_set(trainer, datamodule)
        by_scale[scale_key(alpha)] = scale_summary(test, datamodule.test_roles)
    timings["scales_test_time_s"] = time.perf_counter() - start
    return tested, by_scale


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the adapters, test them on every test set, save them and ``metrics.json`` in the run folder.

    Nothing is fitted with the adapter method ``none``, ``data.shots=0`` or a schedule of no step
    (``trainer.max_steps=0``, ``empty_schedule``): the model is then only tested (zero-shot), and no
    adapters are saved. ``ckpt_path`` resumes an interrupted fit. With ``optimized_metric`` set, the
    metrics hold its value at the end of the fit under ``optimized_metric``. With ``adapter_scales``, the
    tested adapters are also tested at each update scale α (``test_by_scale``).
    """
    start = time.perf_counter()
    check_values(cfg)
    method, shots = configured_method(cfg), whole_number(cfg, "data.shots")
    scales = adapter_scales(cfg)
    if scales != [1.0] and not cfg.get("test"):
        raise ConfigError("adapter_scales tests the adapters at each update scale, but test=false tests nothing.")
    no_steps = empty_schedule(cfg)
    fits = bool(cfg.get("train")) and method != "none" and shots > 0 and no_steps is None
    if cfg.get("train") and not fits:
        reason = no_steps if method != "none" and shots > 0 else f"adapter method {method!r}, {shots} shots"
        log.warning("Nothing to train (%s): zero-shot evaluation only, no adapters saved.", reason)
    if cfg.get("ckpt_path") and not fits:
        raise ConfigError(
            "ckpt_path resumes training, but this run trains nothing; test a checkpoint with "
            "`python eval.py ckpt_path=...` instead."
        )
    check_test_ckpt(cfg)
    _prepare(cfg, resume=fits)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg, "fit" if fits else "test")
    module = build_model(cfg)
    use_model_transforms(datamodule, module)
    trainer = build_trainer(cfg)

    timings, optimized, zero_shot = {}, None, None
    if fits and cfg.get("zero_shot_baseline") and not cfg.get("ckpt_path"):
        zero_shot = _zero_shot_baseline(module, trainer, datamodule)
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
    test, by_scale = _test_results(module, trainer, datamodule, scales, timings)
    timings["wall_time_s"] = time.perf_counter() - start
    metrics = run_summary(cfg, module, trainer, datamodule, timings, tested, test)
    if by_scale is not None:
        metrics["test_by_scale"] = by_scale
    if zero_shot is not None:
        metrics["zero_shot"] = zero_shot
    if optimized is not None:
        metrics["optimized_metric"] = optimized
    write_metrics(output_dir / metric_names.METRICS_FILE, metrics)
    print_results(metrics, output_dir)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test saved adapters (``adapters_dir``), a Lightning checkpoint (``ckpt_path``), or zero-shot CLIP
    (adapter method ``none``); ``metrics.json`` records which under ``adapters_from``. With
    ``adapter_scales``, also at each update scale α of the adapters (``test_by_scale``)."""
    from kr_vlm.adapters import load_adapters
    from kr_vlm.models import CLIPFineTuner

    start = time.perf_counter()
    check_values(cfg)
    adapters_from = adapters_source(cfg)
    scales = adapter_scales(cfg)
    if cfg.get("adapters_dir"):
        check_adapters_dir(cfg)
    _prepare(cfg)
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
    timings = {"test_time_s": time.perf_counter() - test_start}
    test, by_scale = _test_results(module, trainer, datamodule, scales, timings)
    timings["wall_time_s"] = time.perf_counter() - start
    metrics = {
        **run_summary(cfg, module, trainer, datamodule, timings, adapters_from, test),
        "adapters_from": adapters_from,
    }
    if by_scale is not None:
        metrics["test_by_scale"] = by_scale
    write_metrics(output_dir / metric_names.METRICS_FILE, metrics)
    print_results(metrics, output_dir)
    return metrics


def _mark_failed(output_dir: Path, error: BaseException) -> None:
    """Write ``FAILED_FILE`` into the run folder; a failure to write it never hides ``error``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    stopped = isinstance(error, (SIGTERMException, KeyboardInterrupt))
    line = (str(error).strip().splitlines() or [""])[0]
    record = {
        "status": "stopped" if stopped else "failed",
        "error": f"{type(error).__name__}: {line}" if line else type(error).__name__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        write_json_atomic(output_dir / FAILED_FILE, record)
    except OSError as unwritten:
        log.warning("Could not mark the run as failed in %s: %s", output_dir, unwritten)


def run_job(job: Any, cfg: DictConfig) -> dict[str, Any]:
    """Run ``job(cfg)`` for a command line: any error ends the command with one message, no traceback
    (``command_boundary``), and a run that does not finish is marked so in its folder (``FAILED_FILE``);
    a stale mark of an earlier try in the same folder (a resumed run) goes."""
    # Lightning 2.6 still uses torch's LeafSpec, which this torch flags as deprecated at every fit:
    # noise for users, nothing they can act on.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from kr_vlm.console import lightning_logs_through_the_run_log

    lightning_logs_through_the_run_log()

    def stop_on_sigterm(signum: int, frame: Any) -> None:
        # Outside a fit or test (building the model, between the zero-shot test and the fit) the run stops
        # as Lightning stops one. Inside, Lightning's handler is installed and calls this one after its own:
        # it then stops the run at its next step, so this one leaves it to Lightning.
        if signal.getsignal(signal.SIGTERM) is stop_on_sigterm:
            raise SIGTERMException

    output_dir = Path(cfg.paths.output_dir)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        # In the job, so that a failed job of a sweep stops the sweep, and the traceback of a bug goes to
        # its own run's log file.
        with command_boundary():
            try:
                (output_dir / FAILED_FILE).unlink(missing_ok=True)
                return job(cfg)
            except BaseException as error:
                finished = isinstance(error, SystemExit) and not error.code
                if isinstance(error, SIGTERMException) or not finished:
                    _mark_failed(output_dir, error)
                raise
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
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hydra_raises(func: Any) -> Any:
    """Hydra's ``run_and_report`` without its report: the error goes on to ``command_boundary``."""
    return func()


def hydra_command(config_name: str) -> Any:
    """``hydra.main`` (configs/<config_name>.yaml) inside ``command_boundary``, for every error of the
    command: a bad override or config name (Hydra's composition), a run folder that cannot be made, the
    run itself. Hydra reports errors itself (a traceback for anything but composition errors) and exits:
    its reporter is bypassed while the command runs, so they reach the boundary instead."""

    def decorate(task: Any) -> Any:
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> Any:
            import hydra._internal.hydra as hydra_app
            import hydra._internal.utils as hydra_utils

            reporter = hydra_utils.run_and_report
            hydra_utils.run_and_report = hydra_app.run_and_report = _hydra_raises
            try:
                with command_boundary():
                    return hydra_main(*args, **kwargs)
            finally:
                hydra_utils.run_and_report = hydra_app.run_and_report = reporter

        return main

    return decorate


@hydra_command("train")
def train_main(cfg: DictConfig) -> float | None:
    """``python train.py experiment=...`` / ``kr-vlm-train experiment=...``. Returns the value of
    ``optimized_metric`` (what Hydra's sweepers, Optuna's included, optimise), or None."""
    optimized = run_job(train, cfg).get("optimized_metric")
    return None if optimized is None else optimized["value"]


@hydra_command("eval")
def eval_main(cfg: DictConfig) -> None:
    """``python eval.py experiment=... adapters_dir=...`` / ``kr-vlm-eval ...``."""
    run_job(evaluate, cfg)
