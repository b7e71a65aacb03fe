"""CLIPFineTuner's training objectives (``model.loss``, named by ``kr_vlm.optim.TrainingLoss``).

- ``class_ce``: cross-entropy of each image's logits over all the classes of the training task (CoOp,
  CLIP-LoRA: the class embeddings come from the task's templates).
- ``caption_contrastive``: the KRAdapter / RandLoRA authors' in-batch caption loss (``CLIPVL.forward`` in
  PaulAlbert31/RandLoRA ``vision_language/src/modeling.py``, their ``--full-clip`` runs): each image is
  scored against the captions of the batch's images, one caption an image ("An image of {class}", the
  class of that image), and the cross-entropy target is the first image of the batch whose class is the
  image's own (their ``argmax(y @ yᵀ)`` of the one-hot labels picks the first of equal maxima). Captions of
  a class that appears several times in the batch are identical columns, all in the softmax's denominator.

open_clip's ``ClipLoss`` does not fit the second: it is symmetric (images to texts and texts to images) and
takes caption ``i`` as image ``i``'s only positive, where here several images share a class and only the
image-to-caption direction is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def first_of_same_class(labels: Tensor) -> Tensor:
    """For each image of the batch, the index of the first image with the same label, ``(batch,)``."""
    same = labels[:, None] == labels[None, :]
    positions = torch.arange(len(labels), device=labels.device).expand_as(same)
    return torch.where(same, positions, len(labels)).min(dim=1).values


def caption_contrastive_loss(
    image_features: Tensor, caption_features: Tensor, labels: Tensor, logit_scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The authors' in-batch caption loss and its logits.

    Args:
        image_features: L2-normalised image features, ``(batch, dim)``.
        caption_features: L2-normalised features of each image's caption (the caption of its class),
            ``(batch, dim)``: row ``j`` is the caption of image ``j``.
        labels: the class of each image, ``(batch,)``.
        logit_scale: the multiplier of the cosine similarities.

    Returns:
        ``(loss, logits)``: the mean cross-entropy of ``logits = scale * images @ captionsᵀ``
        ``(batch, batch)`` against ``first_of_same_class(labels)``.
    """
    logits = logit_scale * image_features @ caption_features.T
    return F.cross_entropy(logits, first_of_same_class(labels)), logits
