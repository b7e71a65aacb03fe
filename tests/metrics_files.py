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
    **extra,
) -> Path:
    """A metrics.json as train.py (or, with `evaluation_of`, eval.py) writes it: the keys kr_vlm.results reads."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "model": {"clip": {"name": "ViT-B-16", "cache_dir": str(folder)}, "optimizer": {"lr": lr}},
        "data": {"dataset": dataset, "shots": shots, "sampler": "coop", "eval_templates": "simple"},
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
