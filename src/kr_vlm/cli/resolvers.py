"""The OmegaConf resolvers the configs use: ``iterations``, ``atlas_epochs``, ``auto_precision``, ``launch_dir``,
``run_suffix``."""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

# CLIP-LoRA trains for 500 x shots iterations.
ITERATIONS_PER_SHOT = 500


def iterations(shots: int) -> int:
    return ITERATIONS_PER_SHOT * int(shots)


def atlas_epochs(dataset: str) -> int:
    """The epochs of the KRAdapter / RandLoRA authors' runs on a fraction of ``dataset``'s training data
    (their per-dataset table, ``kr_vlm.data.atlas.FRACTION_EPOCHS``); only aTLAS's 22 datasets have one."""
    from kr_vlm.data.atlas import FRACTION_EPOCHS
    from kr_vlm.errors import ConfigError

    if dataset not in FRACTION_EPOCHS:
        raise ConfigError(
            f"The authors' data-ratio runs have epochs for aTLAS's 22 datasets only, not {dataset!r} "
            f"(data.dataset); choose one of {', '.join(FRACTION_EPOCHS)}, or set trainer.max_epochs yourself."
        )
    return FRACTION_EPOCHS[dataset]


def auto_precision() -> str:
    """bf16 autocast where the GPU supports it, fp16 autocast on older GPUs, float32 on the CPU
    (CPU bf16 autocast is slower than float32 on most machines)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if torch.cuda.is_available():
        return "16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs (idempotent: importing ``kr_vlm.cli`` registers them,
    which Hydra's compose API in tests relies on as much as ``train.py`` does).

    ``launch_dir`` (the working directory the command started in) and ``run_suffix`` (a random name
    part of the run folder) are drawn once a config (``use_cache``) and keep their value wherever Hydra
    resolves the folder again: in its copies of the config for every sweep job, for DDP's processes,
    after a ``hydra.job.chdir``.
    """
    OmegaConf.register_new_resolver("iterations", iterations, replace=True)
    OmegaConf.register_new_resolver("atlas_epochs", atlas_epochs, replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("launch_dir", os.getcwd, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_suffix", lambda: secrets.token_hex(3), use_cache=True, replace=True)
