"""What a resumed fit must share with the checkpoint it resumes: the data (the loader's position and the
few-shot draw are only meaningful for the data that wrote them), the optimiser and its schedule (the
checkpoint's optimizer and scheduler states win over a changed config, so metrics.json would record a
learning rate that was never used). Another value of any of them is refused before anything is built,
with every difference listed: to train otherwise, start a new run.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kr_vlm.errors import ConfigError

# The DataModule arguments that decide which batches a fit sees (not where the files are, nor the test sets).
RESUMED_DATA_KEYS = (
    "dataset",
    "shots",
    "seed",
    "batch_size",
    "sampler",
    "val_shots",
    "fraction",
    "subsample",
    "min_iterations_per_epoch",
    "train_templates",
    "classnames",
    "num_workers",
)
# CLIPFineTuner's training settings (its adapters are checked against the checkpoint's tensors on load).
RESUMED_MODEL_KEYS = ("optimizer", "scheduler", "loss")


def _flat(value: Any, key: str) -> dict[str, Any]:
    """``{"model.optimizer.lr": 0.005, ...}``: nested mappings flattened to dotted keys."""
    if isinstance(value, dict):
        return {
            name: leaf for part, item in value.items() for name, leaf in _flat(item, f"{key}.{part}").items()
        }
    return {key: value}


def _configured(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def resume_differences(cfg: DictConfig, checkpoint: dict[str, Any]) -> list[str]:
    """``key=saved (this run: configured)`` for every setting of ``RESUMED_*`` that differs between the
    checkpoint and ``cfg``. A setting the checkpoint does not record is not compared, nor a trainer setting
    that ``cfg`` leaves unset (Lightning's default then, e.g. ``max_epochs`` with ``max_steps``)."""
    saved: dict[str, Any] = {}
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    saved.update({f"data.{key}": data[key] for key in RESUMED_DATA_KEYS if key in data})
    model = checkpoint.get("hyper_parameters") or {}
    for key in RESUMED_MODEL_KEYS:
        if key in model:
            saved.update(_flat(model[key], f"model.{key}"))
    # The Trainer's schedule, which CLIPFineTuner records in every checkpoint it writes.
    from kr_vlm.models.finetuner import SCHEDULE_KEY

    schedule = checkpoint.get(SCHEDULE_KEY) or {}
    saved.update({f"trainer.{key}": value for key, value in schedule.items()})
    differences = []
    for key, value in saved.items():
        configured = _configured(cfg, key)
        if configured is None and key.startswith("trainer."):
            continue  # unset: Lightning's default, which the checkpoint's run may have had too
        if isinstance(configured, list):
            value = list(value) if isinstance(value, (list, tuple)) else value
        if configured != value:
            differences.append(f"{key}={value} (this run: {configured})")
    return differences


def check_resume(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` (``ckpt_path``) with other data, optimiser or schedule settings."""
    differences = resume_differences(cfg, checkpoint)
    if differences:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} was written by a run with other settings than this one: "
            f"{'; '.join(differences)}. A resumed run trains on as the interrupted one did: resume with the "
            "checkpoint's settings (the same experiment and overrides), or leave ckpt_path out to start a new run."
        )
