"""CLIPFineTuner's optimisation: the training objective's name, AdamW's options and the warm-up + cosine
learning-rate schedule.

Apart from the LightningModule so that the Hydra schemas (``kr_vlm.cli.schemas``) can type these options
without importing the model code.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class TrainingLoss(str, enum.Enum):
    """``model.loss``: the objectives of ``kr_vlm.models.losses`` (``class_ce``, cross-entropy over the
    training task's classes; ``caption_contrastive``, the KRAdapter / RandLoRA authors' in-batch caption loss)."""

    class_ce = "class_ce"
    caption_contrastive = "caption_contrastive"


@dataclasses.dataclass
class OptimizerOptions:
    """AdamW's options, CLIP-LoRA's values by default. Weight decay skips 1-D tensors (biases, norms)."""

    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclasses.dataclass
class SchedulerOptions:
    """Linear warm-up over ``warmup_steps`` or ``warmup_ratio`` of the steps, then a cosine down to ``min_lr``
    (CLIP-LoRA: no warm-up, down to 1e-6)."""

    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr: float = 1e-6


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up over ``warmup_steps``, then a
    cosine from 1 down to ``min_factor`` (= min_lr / lr), reached at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
