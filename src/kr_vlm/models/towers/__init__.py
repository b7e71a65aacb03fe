"""The towers of a CLIP-style model, each of a known kind: found, converted exactly, and labelled.

An open_clip model has a vision tower (``visual``), a text tower (``text``, or the text transformer at
the top level of a ``CLIP``) and, for CoCa, a multimodal text decoder (``text_decoder``). Each is matched
against :data:`KINDS` (one module of this package a family: ``open_clip``, ``timm``, ``hf_text``), whose
entry says how to convert it (:func:`convert_towers`) and which linears carry which labels
(:func:`tower_labels`). Everything kr_vlm knows about module names of CLIP-style models lives in this
package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kr_vlm.errors import ConfigError
from kr_vlm.models.towers import hf_text, open_clip, timm
from kr_vlm.models.towers.base import LAYERS, POOL, Conversion, TowerKind, labelled_linears

__all__ = [
    "KINDS",
    "LAYERS",
    "POOL",
    "TOWER_ATTRIBUTES",
    "Tower",
    "TowerKind",
    "clip_towers",
    "convert_towers",
    "example_forward",
    "example_inputs",
    "initialize_random_towers",
    "tower_labels",
]

#: Every known tower kind; the first that matches a tower is its kind.
KINDS: tuple[TowerKind, ...] = (*open_clip.KINDS, *timm.KINDS, *hf_text.KINDS)

#: Tower label and the attributes of the model where that tower may sit, first present wins (``CLIP``
#: keeps its text transformer at the top level as ``transformer``; ``CustomTextCLIP`` and ``CoCa`` under
#: ``text``).
TOWER_ATTRIBUTES = {"vision": ("visual",), "text": ("text", "transformer"), "decoder": ("text_decoder",)}


@dataclasses.dataclass(frozen=True)
class Tower:
    """One tower of a model: its label, module name, module and kind (None when kr_vlm knows none)."""

    label: str
    path: str
    module: nn.Module
    kind: TowerKind | None

    def describe(self) -> str:
        kind = self.kind.name if self.kind is not None else "of a kind kr_vlm has no labels for"
        return f"the {self.label} tower ({self.path}: {type(self.module).__name__}, {kind})"


def _kind_of(module: nn.Module) -> TowerKind | None:
    return next((kind for kind in KINDS if kind.matches(module)), None)


def clip_towers(model: nn.Module) -> list[Tower]:
    """The towers of ``model`` in the order vision, text, decoder (those it has)."""
    towers = []
    for label, attributes in TOWER_ATTRIBUTES.items():
        for attribute in attributes:
            module = getattr(model, attribute, None)
            if isinstance(module, nn.Module):
                towers.append(Tower(label, attribute, module, _kind_of(module)))
                break
    return towers


def _pending_conversions(tower: Tower) -> list[tuple[str, Conversion]]:
    if tower.kind is None:
        return []
    return [
        (name, conversion)
        for name, module in tower.module.named_modules()
        for conversion in tower.kind.conversions
        if conversion.applies(module)
    ]


def convert_towers(model: nn.Module) -> nn.Module:
    """Convert, in place and exactly, every layer of ``model``'s towers that hides its linears (fused
    q/k/v, ``nn.MultiheadAttention``, EVA's fused attention, 1x1-convolution MLPs, ResNet's attention
    pool), as each tower's kind says; returns ``model``. Converting a converted model changes nothing."""
    for tower in clip_towers(model):
        # Collected first: replacing modules while iterating named_modules() would skip or revisit some.
        for name, conversion in _pending_conversions(tower):
            module = tower.module.get_submodule(name)
            replacement = conversion.convert(module)
            if replacement is not module:
                tower.module.set_submodule(name, replacement)
    return model


def initialize_random_towers(model: nn.Module) -> nn.Module:
    """Initialise what the towers' constructors leave uninitialised (``TowerKind.random_init``: CoCa's
    decoder projection), for a model built with random weights; returns ``model``."""
    with torch.no_grad():
        for tower in clip_towers(model):
            if tower.kind is not None:
                tower.kind.random_init(tower.module)
    return model


def tower_labels(tower: Tower, layers: Sequence[str] = LAYERS) -> tuple[dict[str, dict[str, Any]], int]:
    """``({module name: labels}, number of blocks)`` of the labelled linears of a tower, blocks in forward
    order then the pooling heads, each in :data:`LAYERS` order; labels are ``{"tower", "layer", "block"}``
    with ``block`` the block's index or ``"pool"``. The tower must be converted as far as ``layers`` need
    (attention for q/k/v/o, 1x1-convolution MLPs for fc1/fc2)."""
    if tower.kind is None:
        raise ConfigError(
            f"{tower.describe()}: no q/k/v/o/fc1/fc2 labels are known for it. Adapt it by module name "
            "(adapter.targets: a list of names or a regex), or use towers that kr_vlm labels."
        )
    hidden = [name for name, conversion in _pending_conversions(tower) if set(conversion.hides) & set(layers)]
    if hidden:
        raise ConfigError(
            f"{tower.describe()} is not converted ({tower.path}.{hidden[0] or '<tower>'} still hides its "
            "linears): call kr_vlm.models.convert_towers(model) first (load_clip does)."
        )
    labels: dict[str, dict[str, Any]] = {}
    blocks = tower.kind.blocks(tower.module)
    parts = [(name, block, tower.kind.block_layers, index) for index, (name, block) in enumerate(blocks)]
    parts += [
        (name, pooler, tower.kind.pooler_layers, POOL) for name, pooler in tower.kind.poolers(tower.module)
    ]
    for name, part, layer_map, block in parts:
        for layer, relative in labelled_linears(part, layer_map):
            labels[f"{tower.path}.{name}.{relative}"] = {"tower": tower.label, "layer": layer, "block": block}
    return labels, len(blocks)


# The caption length of example inputs where the model's own is longer (a Hugging Face tower's context
# length is its position table, 514 for RoBERTa; open_clip's tokenizers pad to 77).
EXAMPLE_TEXT_LENGTH = 77


def example_inputs(
    model: nn.Module, batch: int = 1, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, token ids)`` for ``model(images, text)``: ``batch`` random images at the model's size and
    dtype (blank ones without a ``generator``) and captions of token ids 3..99 (no padding or special
    token of any of the zoo's tokenizers) at the model's context length."""
    # The dtype of the vision tower's first convolution or linear: what casting to fp16 or bf16 changed.
    parameter = next(m.weight for m in model.visual.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch, 3, *size)
    images = torch.randn(shape, generator=generator) if generator is not None else torch.zeros(shape)
    # A Hugging Face T5 has no position table: its context length reads 0.
    length = min(getattr(model, "context_length", 0) or EXAMPLE_TEXT_LENGTH, EXAMPLE_TEXT_LENGTH)
    if generator is not None:
        text = torch.randint(3, 100, (batch, length), generator=generator)
    else:
        text = (torch.arange(length) % 97 + 3).expand(batch, length)
    return images.to(parameter.device, parameter.dtype), text.to(parameter.device)


def example_forward(
    model: nn.Module, tokenizer: Callable[..., torch.Tensor] | None = None
) -> Callable[[nn.Module], Any]:
    """A callable that runs ``model`` once on a tiny input: one blank image at the model's size and one
    caption (``tokenizer(["a photo"])``, or :func:`example_inputs`' token ids when no tokenizer is given),
    as ``model(image, text)`` does in training (CoCa's decoder included). For
    ``kr_vlm.adapters.inject_adapters(..., forward_check=...)``, which checks that every adapter is called.
    The model runs in eval mode (no batch-norm statistics change) and its modes are restored after."""

    def run(module: nn.Module) -> Any:
        image, text = example_inputs(module)
        if tokenizer is not None:
            text = tokenizer(["a photo"]).to(text.device)
        modes = {submodule: submodule.training for submodule in module.modules()}
        module.eval()
        try:
            with torch.no_grad():
                return module(image, text)
        finally:
            for submodule, training in modes.items():
                submodule.training = training

    return run
