"""What a tower kind tells the rest of kr_vlm: how to convert it exactly and where its labelled linears are.

A ``TowerKind`` describes one family of tower (open_clip's transformers, timm's ViTs, a Hugging Face text
encoder, ...): which modules it recognises, the exact conversions that turn layers hiding their linears
into modules calling plain ``nn.Linear`` children (``kr_vlm.models.converted``), its residual blocks in
forward order, and, for each friendly layer name (``q k v o fc1 fc2``), the linears of a block (and of a
pooling head) that carry it. One module of ``kr_vlm.models.towers`` a family registers its kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import nn

#: The friendly layer names, in the order targets are listed.
LAYERS = ("q", "k", "v", "o", "fc1", "fc2")
#: The block label of the linears of a tower's pooling head (an attention pool after the blocks).
POOL = "pool"

#: ``{layer name: relative module names}``: every existing linear among the names carries the label
#: (a gated MLP has two fc1 linears).
LayerMap = Mapping[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One exact conversion: ``applies(module)`` says whether ``module`` needs it, ``convert(module)``
    returns its replacement (or the same module, changed in place); ``hides`` are the layer labels that
    cannot be targeted until it is done."""

    applies: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]
    hides: tuple[str, ...] = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class TowerKind:
    """One family of tower.

    Attributes:
        name: what the docs and messages call it (``"timm ViT"``).
        matches: ``matches(tower)``: whether a tower module is of this kind.
        blocks: ``blocks(tower)``: the residual blocks in forward order, as ``(name relative to the tower,
            module)``; their position in this list is their ``block`` label.
        block_layers: the linears of a block that carry each layer label.
        poolers: ``poolers(tower)``: pooling heads after the blocks (labelled ``block: "pool"``).
        pooler_layers: the linears of a pooling head that carry each layer label.
        conversions: exact conversions applied to every module of the tower that needs one.
        random_init: ``random_init(tower)`` initialises what the tower's own constructor leaves
            uninitialised, for models built with random weights.
        unlabelled: what of the tower carries no label, and why (said in the docs and the zoo table).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    block_layers: LayerMap
    poolers: Callable[[nn.Module], list[tuple[str, nn.Module]]] = lambda tower: []
    pooler_layers: LayerMap = dataclasses.field(default_factory=dict)
    conversions: tuple[Conversion, ...] = ()
    random_init: Callable[[nn.Module], None] = lambda tower: None
    unlabelled: str = ""


def numbered(prefix: str, modules: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """``[(f"{prefix}.{index}", module), ...]`` of a ``ModuleList``."""
    return [(f"{prefix}.{index}", module) for index, module in enumerate(modules)]


def staged(
    prefix: str, stages: Sequence[nn.Module], blocks_attribute: str = "blocks"
) -> list[tuple[str, nn.Module]]:
    """The blocks of every stage of a staged network, flattened in forward order."""
    return [
        item
        for index, stage in enumerate(stages)
        for item in numbered(f"{prefix}.{index}.{blocks_attribute}", getattr(stage, blocks_attribute))
    ]


def present(tower: nn.Module, *names: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of those of ``names`` that are submodules of ``tower`` (not None)."""
    found = []
    for name in names:
        try:
            found.append((name, tower.get_submodule(name)))
        except AttributeError:
            continue
    return found


def labelled_linears(module: nn.Module, layer_map: LayerMap) -> Iterator[tuple[str, str]]:
    """``(layer label, relative name)`` of every ``nn.Linear`` of ``module`` that ``layer_map`` names, in
    ``LAYERS`` order."""
    for layer in LAYERS:
        for relative in layer_map.get(layer, ()):
            try:
                child = module.get_submodule(relative)
            except AttributeError:
                continue
            if isinstance(child, nn.Linear):
                yield layer, relative
