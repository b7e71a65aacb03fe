"""The LightningModule that pretrains an open_clip CLIP contrastively (the miniature CLIP's pretraining,
`kr_vlm.pretrain`, which brings the data)."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from kr_vlm.models.finetuner import warmup_cosine_factor

if TYPE_CHECKING:
    from kr_vlm.pretrain import PretrainConfig

# CLIP clamps its learnt logit scale (the log of the inverse temperature) at log(100).
MAX_LOGIT_SCALE = math.log(100.0)


class ContrastivePretraining(LightningModule):
    """CLIP's contrastive objective (open_clip's `ClipLoss`) on image-caption batches."""

    def __init__(self, model: nn.Module, config: PretrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.loss = ClipLoss()
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, tokens = batch
        image_features, text_features, logit_scale = self.model(images.float(), tokens)
        loss = self.loss(image_features, text_features, logit_scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", logit_scale)
        self.losses.append(loss.item())
        return loss

    def temperature(self) -> float:
        """The learnt inverse temperature: the factor the image-text similarities are multiplied by."""
        return self.model.logit_scale.exp().item()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.config
        decayed = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
        others = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
        optimizer = torch.optim.AdamW(
            [
                {"params": decayed, "weight_decay": config.weight_decay},
                {"params": others, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        factor = functools.partial(
            warmup_cosine_factor,
            warmup_steps=config.warmup_steps,
            total_steps=config.steps,
            min_factor=config.min_lr / config.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
