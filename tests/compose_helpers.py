"""Compose kr_vlm's Hydra configs in tests (importable: `from compose_helpers import ...`).

As lightning-hydra-template's tests do: Hydra's compose API with the hydra node, registered as the
current `HydraConfig` so that `${hydra:...}` interpolations resolve, and every path pointed at a
temporary folder. `TINY_MODEL` swaps any experiment's model for a CLIP small enough for CPU tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from kr_vlm.cli import CONFIG_DIR

# model/tiny.yaml made smaller still: 16 px images in four 8 px patches, one block of width 32 per tower.
TINY_MODEL: tuple[str, ...] = (
    "model=tiny",
    "model.clip.name=kr-vlm-test-tiny",
    "model.clip.model_cfg.embed_dim=16",
    "model.clip.model_cfg.vision_cfg.image_size=16",
    "model.clip.model_cfg.vision_cfg.patch_size=8",
    "model.clip.model_cfg.vision_cfg.width=32",
    "model.clip.model_cfg.vision_cfg.layers=1",
    "model.clip.model_cfg.vision_cfg.head_width=16",
    "model.clip.model_cfg.text_cfg.width=32",
    "model.clip.model_cfg.text_cfg.heads=2",
    "model.clip.model_cfg.text_cfg.layers=1",
)

# Quick runs: one CPU process, no loader workers, CSV logs only.
FAST: tuple[str, ...] = ("trainer=cpu", "data.num_workers=0", "logger=csv")
# The demo at its quickest: clean digits only (one test set), one shot per class (one batch per epoch),
# no plots or progress bars.
QUICK: tuple[str, ...] = (
    "experiment=demo",
    "data=digits",
    "data.shots=1",
    *TINY_MODEL,
    *FAST,
    "~callbacks.rank_monitor",
    "~callbacks.progress_bar",
)

# QUICK with the rank monitor on, every 2 steps (the CSV logger is the default): for runs whose
# rank_history.json, reports and dashboards are looked at.
QUICK_MONITORED: tuple[str, ...] = (
    *(override for override in QUICK if override not in ("~callbacks.rank_monitor", "logger=csv")),
    "callbacks.rank_monitor.every_n_steps=2",
)


def path_overrides(tmp_path: Path) -> list[str]:
    """Every path of `paths/default.yaml` under `tmp_path`: data, logs and the run folder."""
    return [
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.output_dir={tmp_path / 'run'}",
    ]


def compose_config(tmp_path: Path, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """`configs/<config_name>.yaml` with `overrides`, paths under `tmp_path`, as `train.py` would see it.

    The hydra node is registered as the current `HydraConfig` (for `${hydra:...}`) and then removed,
    like `@hydra.main` hands the config to the task function. Later overrides win, so a test may
    point `paths.output_dir` elsewhere.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[*path_overrides(tmp_path), *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@contextmanager
def run_state_restored() -> Iterator[None]:
    """Undo what a composed config or a run changes process-wide: forget the registered `HydraConfig`
    (later tests see no Hydra run) and restore torch's thread count (the demo sets `cpu_threads=1`)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None
        torch.set_num_threads(threads)
