"""Write metrics.json files as train.py and eval.py do, for the results tests (importable:
`from metrics_files import write_run`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(
    folder: Path,
    top1: dict[str, float],
    roles: dict[str, str] | None = None,
    *,
    method: str = "kradapter",
    dataset: str = "dtd",
    shots: int = 16,
    seed: int = 1,
    lr: float = 2e-4,
    evaluation_of: Path | None = None,
    fraction: float | None = None,
    **extra,
) -> Path:
    """A metrics.json as train.py (or, with `evaluation_of`, eval.py) writes it: the keys kr_vlm.results reads."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "model": {"clip": {"name": "ViT-B-16", "cache_dir": str(folder)}, "optimizer": {"lr": lr}},
        "data": {
            "dataset": dataset,
            "shots": shots,
            "sampler": "coop",
            "eval_templates": "simple",
            "fraction": fraction,
        },
        "trainer": {"max_steps": 500 * shots},
    }
    metrics = {
        "method": method,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "test": {name: {"top1": value, "top5": 1.0, "loss": 0.5} for name, value in top1.items()},
        "config": config,
        **extra,
    }
    if roles is not None:
        metrics["test_roles"] = roles
    if evaluation_of is not None:
        metrics["adapters_from"] = str(evaluation_of)
        config["adapters_dir"] = str(evaluation_of)
        metrics["seed"] = config["seed"] = 1  # eval.py's own seed: not the training run's
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def write_zero_shot_eval(
    folder: Path,
    top1: dict[str, float],
    *,
    model: str = "ViT-B-32",
    pretrained: str = "openai",
    eval_templates: str = "atlas",
    classnames: str = "default",
) -> Path:
    """A metrics.json as `eval.py` writes it for a zero-shot evaluation (adapter none, shots 0) of `model` with
    `pretrained` weights on the dataset of `top1`'s first key, with each test set's top-1 (fractions of 1).
    test_published.py checks its keys against a real zero-shot evaluation's."""
    folder.mkdir(parents=True)
    dataset = next(iter(top1))
    clip = {
        "name": model,
        "pretrained": pretrained,
        "cache_dir": None,
        "allow_download": False,
        "precision": "fp32",
    }
    config = {
        "task_name": "atlas_zeroshot",
        "adapters_dir": None,
        "ckpt_path": None,
        "seed": 1,
        "data": {
            "dataset": dataset,
            "shots": 0,
            "sampler": "kr_vlm",
            "train_templates": eval_templates,
            "eval_templates": eval_templates,
            "classnames": classnames,
            "fraction": None,
        },  # fmt: skip
        "model": {"clip": clip, "logit_scale": 100},
        "adapter": {"method": "none"},
        "trainer": {"max_steps": -1},
    }
    metrics = {
        "task_name": "atlas_zeroshot",
        "method": "none",
        "model": model,
        "pretrained": pretrained,
        "dataset": dataset,
        "shots": 0,
        "seed": 1,
        "tested": "zero-shot",
        "test": {name: {"top1": value, "top5": 1.0, "loss": 0.5} for name, value in top1.items()},
        "test_roles": {name: "source" if name == dataset else "cross" for name in top1},
        "trainable_params": 0,
        "total_params": 151277313,
        "steps": 0,
        "test_time_s": 1.0,
        "wall_time_s": 2.0,
        "peak_memory_mb": 900.0,
        "adapters_from": "zero-shot",
        "config": config,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder
