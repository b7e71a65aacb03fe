"""CLIP as an image classifier: image features against text embeddings of class names x templates.

A class is embedded with CLIP's zero-shot recipe: every prompt ``template.format(classname)`` is
encoded and L2-normalised, the prompts of one class are averaged, and the mean is renormalised.
open_clip's ``build_zero_shot_classifier`` does the same under ``no_grad``; it cannot be used here
because adapters in the text tower must receive gradients through the class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kr_vlm.adapters import adapted_layers
from kr_vlm.errors import ConfigError
from kr_vlm.models.targets import text_tower_parameters


class Task(Protocol):
    """What the classifier reads from a task (`kr_vlm.data.ClassificationTask` fits)."""

    name: str
    classnames: Sequence[str]
    templates: Sequence[str]


TaskKey = tuple[str, tuple[str, ...], tuple[str, ...]]


def _task_key(task: Task) -> TaskKey:
    return (task.name, tuple(task.classnames), tuple(task.templates))


class CLIPClassifier(nn.Module):
    """Classify images with an open_clip model against the classes of a task.

    ``forward(images, task)`` returns logits ``scale * cos(image, class)`` of shape
    ``(batch, len(task.classnames))``.

    Class embeddings are recomputed with gradients on every call while the text tower has a
    trainable parameter and grad mode is on (training with text-tower adapters). Otherwise they
    are computed once under ``no_grad`` and cached per task. A cached entry is reused only while
    the text tower is unchanged: it records the device, dtype and version counter of every
    text-tower parameter, and in-place updates (optimizer steps, ``load_state_dict``) bump those
    counters. It also records the update scale α of every adapter outside the vision tower
    (``kr_vlm.adapters.set_adapter_scale``), which changes no parameter. Writes that bypass version
    counters (``param.data`` assignments, fused optimizers) are not seen; call ``clear_cache()`` after them.

    Args:
        model: an open_clip model (``encode_image``, ``encode_text``, ``logit_scale``), adapted or not.
        tokenizer: open_clip tokenizer; maps a list of strings to a ``(n, context_length)`` LongTensor.
        logit_scale: fixed logit scale (CLIP-LoRA uses 100), or None for the model's learned
            ``logit_scale.exp()``.
        text_batch_size: prompts per text-encoder call when embedding classes; bounds the memory
            of the no-grad path (1000 classes x 80 templates is 80,000 prompts).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        logit_scale: float | None = None,
        text_batch_size: int = 1024,
    ) -> None:
        super().__init__()
        if logit_scale is not None and logit_scale <= 0:
            raise ConfigError(f"logit_scale must be positive or None (the model's own), got {logit_scale}.")
        if text_batch_size < 1:
            raise ConfigError(f"text_batch_size must be at least 1, got {text_batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.fixed_logit_scale = logit_scale
        self.text_batch_size = text_batch_size
        self._tokens: dict[TaskKey, Tensor] = {}
        self._embeddings: dict[TaskKey, tuple[tuple, Tensor]] = {}

    def text_tower_parameters(self) -> list[nn.Parameter]:
        """Parameters of the text tower (``kr_vlm.models.targets.text_tower_parameters``)."""
        return text_tower_parameters(self.model)

    def text_tower_trainable(self) -> bool:
        """True when some text-tower parameter requires grad (e.g. adapters in the text tower)."""
        return any(param.requires_grad for param in self.text_tower_parameters())

    def logit_scale(self) -> Tensor | float:
        """The multiplier of the cosine similarities."""
        if self.fixed_logit_scale is not None:
            return self.fixed_logit_scale
        return self.model.logit_scale.exp()

    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised image features, ``(batch, embed_dim)``."""
        return F.normalize(self.model.encode_image(images), dim=-1)

    def class_embeddings(self, task: Task, classes: Tensor | None = None) -> Tensor:
        """L2-normalised class embeddings of `task`, ``(len(task.classnames), embed_dim)``; with `classes`
        (class indices), those classes' only, ``(len(classes), embed_dim)``: while the text tower trains,
        only their prompts go through it."""
        key = _task_key(task)
        if torch.is_grad_enabled() and self.text_tower_trainable():
            return self._embed_classes(key, classes)
        state = self._text_tower_state()
        cached = self._embeddings.get(key)
        if cached is None or cached[0] != state:
            with torch.no_grad():
                cached = (state, self._embed_classes(key))
            self._embeddings[key] = cached
        return cached[1] if classes is None else cached[1][classes]

    def clear_cache(self) -> None:
        """Forget cached class embeddings (the token ids stay cached; they never go stale)."""
        self._embeddings.clear()

    def forward(self, images: Tensor, task: Task) -> Tensor:
        """Logits ``scale * cos(image features, class embeddings)``, ``(batch, num_classes)``."""
        image_features = self.encode_images(images)
        class_embeddings = self.class_embeddings(task).to(image_features.dtype)
        return self.logit_scale() * image_features @ class_embeddings.T

    def _text_tower_state(self) -> tuple:
        parameters = tuple((id(p), p._version, p.device, p.dtype) for p in self.text_tower_parameters())
        # Outside `visual`, as text_tower_parameters counts the text tower.
        scales = tuple(
            layer.update_scale for name, layer in adapted_layers(self.model) if not name.startswith("visual.")
        )
        return parameters, scales

    def _task_tokens(self, key: TaskKey) -> Tensor:
        """Token ids of every prompt, class-major (all templates of class 0, then class 1, ...)."""
        tokens = self._tokens.get(key)
        if tokens is None:
            _, classnames, templates = key
            prompts = [template.format(classname) for classname in classnames for template in templates]
            tokens = self.tokenizer(prompts)
            self._tokens[key] = tokens
        return tokens

    def _embed_classes(self, key: TaskKey, classes: Tensor | None = None) -> Tensor:
        _, classnames, templates = key
        tokens = self._task_tokens(key)
        num_classes = len(classnames)
        if classes is not None:
            tokens = tokens.view(num_classes, len(templates), -1)[classes.cpu()].flatten(0, 1)
            num_classes = len(classes)
        device = self.model.logit_scale.device
        prompt_features = torch.cat(
            [
                F.normalize(
                    self.model.encode_text(tokens[start : start + self.text_batch_size].to(device)), dim=-1
                )
                for start in range(0, len(tokens), self.text_batch_size)
            ]
        )
        per_class = prompt_features.view(num_classes, len(templates), -1).mean(dim=1)
        return F.normalize(per_class, dim=-1)
