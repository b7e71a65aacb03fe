"""Adapter targets of a CLIP-style model with their labels, by tower, layer and block.

``clip_targets(model, layers=("q", "v"), towers="both", blocks="last_4")`` returns, for every selected
linear of a converted open_clip model, its full module name and its labels, e.g.
``{"visual.transformer.resblocks.8.attn.q_proj": {"tower": "vision", "layer": "q", "block": 8}, ...}``,
for ``kr_vlm.adapters.inject_adapters(model, AdapterConfig(method, targets))``: the adapters and the
monitors then know each layer's tower, layer type and block without reading its name. Which linears carry
which label is each tower kind's business (``kr_vlm.models.towers``); this module selects among them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kr_vlm.adapters import find_target_linears, path_labels
from kr_vlm.errors import ConfigError
from kr_vlm.models.towers import LAYERS, POOL, TOWER_ATTRIBUTES, Tower, clip_towers, tower_labels

__all__ = [
    "LAYERS",
    "TOWERS",
    "clip_layer_labels",
    "clip_target_modules",
    "clip_targets",
    "select_targets",
    "text_tower_parameters",
]

log = logging.getLogger(__name__)

#: The towers a model may have (CoCa's multimodal text decoder is ``decoder``).
TOWERS = tuple(TOWER_ATTRIBUTES)
#: ``towers`` values that name several towers: ``both`` is vision and text, ``all`` every tower.
TOWER_GROUPS = {"both": ("vision", "text"), "all": TOWERS}
TOWER_CHOICES = (*TOWERS, *TOWER_GROUPS)
#: The keys of the friendly selection (``clip_targets``' arguments).
SELECTION_KEYS = ("layers", "towers", "blocks")
# Parameters of an open_clip model that belong to neither tower.
_HEAD_PARAMETERS = ("logit_scale", "logit_bias")
_FIRST_LAST = re.compile(r"(first|last)_(\d+)")


def _block_indices(blocks: str | Sequence[int | str], depth: int, tower: str) -> list[int | str]:
    """The block labels (indices, sorted, and ``"pool"`` for the pooling heads) of a tower with ``depth``
    blocks selected by ``blocks``."""
    if isinstance(blocks, str):
        if blocks == "all":
            return [*range(depth), POOL]
        match = _FIRST_LAST.fullmatch(blocks)
        if match is None:
            raise ConfigError(
                f"blocks must be 'all', 'first_N', 'last_N' or a list of block indices (and 'pool'), got {blocks!r}"
            )
        count = int(match.group(2))
        if depth == 0:  # a tower without blocks (a ResNet) has only its pooling head
            return []
        if not 1 <= count <= depth:
            raise ConfigError(
                f"blocks={blocks!r}: the {tower} tower has {depth} blocks (N must be 1..{depth})"
            )
        return list(range(count)) if match.group(1) == "first" else list(range(depth - count, depth))
    if isinstance(blocks, int):
        raise ConfigError(
            f"blocks={blocks} is ambiguous: pass [{blocks}] for that one block or 'last_{blocks}' for the "
            f"last {blocks} blocks."
        )
    indices, pool = set(), False
    for index in blocks:
        if index == POOL:
            pool = True
        elif not isinstance(index, int) or not -depth <= index < depth:
            raise ConfigError(
                f"block index {index!r} is out of range for the {tower} tower, which has {depth} blocks "
                f"(valid: {-depth}..{depth - 1}; negative indices count from the end; '{POOL}' for its "
                "pooling head)"
            )
        else:
            indices.add(index % depth)
    if not indices and not pool:
        raise ConfigError("blocks is an empty list: select at least one block, or 'all'")
    return [*sorted(indices), *([POOL] if pool else [])]


def _selected_towers(model: nn.Module, towers: str | Sequence[str]) -> list[Tower]:
    names = [towers] if isinstance(towers, str) else list(towers)
    unknown = [name for name in names if name not in TOWER_CHOICES]
    if unknown or not names:
        raise ConfigError(f"towers must be one of {TOWER_CHOICES} (or a list of towers), got {towers!r}")
    wanted = {tower for name in names for tower in TOWER_GROUPS.get(name, (name,))}
    present = clip_towers(model)
    missing = sorted(wanted - {tower.label for tower in present} - ({"decoder"} if "all" in names else set()))
    if missing:
        raise ConfigError(
            f"{type(model).__name__} has no {' or '.join(missing)} tower (it has: "
            f"{', '.join(tower.label for tower in present) or 'none'})."
        )
    return [tower for tower in present if tower.label in wanted]


def clip_targets(
    model: nn.Module,
    layers: str | Sequence[str] = LAYERS,
    towers: str | Sequence[str] = "both",
    blocks: str | Sequence[int | str] = "all",
) -> dict[str, dict[str, Any]]:
    """The ``nn.Linear`` layers to adapt in a converted open_clip model, with their labels.

    Args:
        model: an open_clip model whose towers are converted (``load_clip`` does it, or
            ``kr_vlm.models.convert_towers``), so q/k/v are separate linears.
        layers: any of ``q k v o fc1 fc2`` (:data:`LAYERS`): attention query, key, value and output
            projections, the MLP's input (both linears of a gated MLP) and output linears, as each tower
            kind names them (``kr_vlm.models.towers``); one name or a sequence. A tower without some of
            them (ConvNeXt has no attention) contributes the others.
        towers: ``"vision"``, ``"text"``, ``"decoder"`` (CoCa's multimodal text decoder), ``"both"``
            (vision and text), ``"all"`` (every tower the model has), or a list of towers.
        blocks: which residual blocks of each tower: ``"all"`` (with the pooling heads: the attention pools
            of CoCa, SigLIP, PE and ResNet CLIPs, labelled ``block: "pool"``), ``"first_N"``, ``"last_N"``,
            or a list of indices (negative ones count from the end) and ``"pool"``. Indices apply to each
            selected tower; blocks are numbered through the stages of staged towers (Swin, FastViT,
            ConvNeXt), and CoCa's decoder alternates self- and cross-attention blocks.

    Returns:
        ``{module name: {"tower", "layer", "block"}}``, vision tower first, then by block (pooling heads
        last) and in ``LAYERS`` order, e.g. ``"visual.transformer.resblocks.0.attn.q_proj": {"tower":
        "vision", "layer": "q", "block": 0}`` or ``"visual.trunk.blocks.11.attn.qkv.v_proj": {"tower":
        "vision", "layer": "v", "block": 11}``.
    """
    selected_layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in selected_layers if layer not in LAYERS]
    if unknown or not selected_layers:
        raise ConfigError(f"layers must be a non-empty subset of {list(LAYERS)}, got {selected_layers}")
    targets = {}
    for tower in _selected_towers(model, towers):
        labels, depth = tower_labels(tower, selected_layers)
        chosen = set(_block_indices(blocks, depth, tower.label))
        found = {
            name: label
            for name, label in labels.items()
            if label["layer"] in selected_layers and label["block"] in chosen
        }
        if not found:
            has = sorted({label["layer"] for label in labels.values()}, key=LAYERS.index)
            log.warning(
                "%s has none of layers %s in blocks %r (its labelled layers: %s): it gets no adapter.",
                tower.describe(),
                selected_layers,
                blocks,
                ", ".join(has) or "none",
            )
        targets.update(found)
    if not targets:
        raise ConfigError(
            f"layers={selected_layers}, towers={towers!r}, blocks={blocks!r} selects no linear layer of "
            f"{type(model).__name__} (see the warnings above for what each tower has)."
        )
    return targets


def clip_target_modules(
    model: nn.Module,
    layers: str | Sequence[str] = ("q", "k", "v", "o", "fc1", "fc2"),
    towers: str = "both",
    blocks: str | Sequence[int] = "all",
) -> list[str]:
    """The module names of ``clip_targets(model, layers, towers, blocks)`` (same order, no labels)."""
    return list(clip_targets(model, layers, towers, blocks))


def clip_layer_labels(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The labels of every labelled linear of every tower of ``model`` that has them (towers of an unknown
    kind, or not converted, have none)."""
    labels = {}
    for tower in clip_towers(model):
        try:
            labels.update(tower_labels(tower)[0])
        except ConfigError:
            continue
    return labels


def select_targets(
    model: nn.Module, targets: Mapping[str, Any] | Sequence[str] | str | None
) -> dict[str, dict[str, Any]]:
    """The modules an adapter config's ``targets`` selects in a converted CLIP, with their labels.

    ``targets`` is the friendly selection (a mapping with any of ``layers``, ``towers``, ``blocks``;
    None or empty for all six layers of every block and pooling head of the vision and text towers), a
    list of module names (suffixes as in peft) or a regex. Names and regexes are matched by
    ``kr_vlm.adapters.find_target_linears``; their labels are the towers' where the layer carries one,
    else read off the module path.
    """
    if targets is None or isinstance(targets, Mapping):
        given = dict(targets or {})
        unknown = sorted(set(given) - set(SELECTION_KEYS))
        if unknown:
            raise ConfigError(
                f"Unknown adapter target key(s) {unknown}: the friendly selection takes {list(SELECTION_KEYS)}; "
                "or give a list of module names or a regex as adapter.targets."
            )
        return clip_targets(model, **given)
    known = clip_layer_labels(model)
    names = find_target_linears(model, targets if isinstance(targets, str) else list(targets))
    return {name: known.get(name) or path_labels(name) for name in names}


def text_tower_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of an open_clip model's text tower: everything outside ``visual`` and the logit
    scale and bias (CLIP keeps its text transformer at the top level, CustomTextCLIP under ``text``)."""
    return [
        param
        for name, param in model.named_parameters()
        if not name.startswith("visual.") and name not in _HEAD_PARAMETERS
    ]


def clip_input_modules(model: nn.Module) -> list[nn.Module]:
    """The first module of each tower of an open_clip CLIP: the image patch embedding and the token
    embedding (what a benchmark hooks to time a step from its inputs)."""
    return [model.visual.conv1, model.token_embedding]


def clip_image_size(model: nn.Module) -> tuple[int, int]:
    """The ``(height, width)`` of the images an open_clip CLIP's image tower takes."""
    height, width = model.visual.image_size
    return height, width
