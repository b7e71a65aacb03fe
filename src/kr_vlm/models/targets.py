"""CLIP's module names, in one place: adapter targets with their labels, and which parameters form a tower.

``clip_targets(model, layers=("q", "v"), towers="both", blocks="last_4")`` returns, for every selected
linear of a converted open_clip CLIP, its full module name and its labels, e.g.
``{"visual.transformer.resblocks.8.attn.q_proj": {"tower": "vision", "layer": "q", "block": 8}, ...}``,
for ``kr_vlm.adapters.inject_adapters(model, AdapterConfig(method, targets))``: the adapters and the
monitors then know each layer's tower, layer type and block without reading its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kr_vlm.adapters import find_target_linears, path_labels
from kr_vlm.errors import ConfigError

__all__ = [
    "LAYER_MODULES",
    "TOWERS",
    "clip_layer_labels",
    "clip_target_modules",
    "clip_targets",
    "select_targets",
    "text_tower_parameters",
]

#: Short layer names and the module they name inside each residual block.
LAYER_MODULES = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.out_proj",
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
}
#: The two towers of a CLIP; a selection may also name ``both``.
TOWERS = ("vision", "text")
TOWER_CHOICES = (*TOWERS, "both")
#: The keys of the friendly selection (``clip_targets``' arguments).
SELECTION_KEYS = ("layers", "towers", "blocks")
# Parameters of an open_clip model that belong to neither tower.
_HEAD_PARAMETERS = ("logit_scale", "logit_bias")
_FIRST_LAST = re.compile(r"(first|last)_(\d+)")


def _tower_blocks(model: nn.Module, tower: str) -> tuple[str, nn.ModuleList]:
    """``(module name, ModuleList)`` of the residual blocks of one tower of an open_clip CLIP."""
    if tower == "vision":
        visual = getattr(model, "visual", None)
        if visual is None:
            raise ConfigError(f"{type(model).__name__} has no vision tower (model.visual)")
        if not hasattr(visual, "transformer"):
            raise ConfigError(
                f"the vision tower is a {type(visual).__name__}, not an open_clip VisionTransformer, so it has "
                "no q/k/v/o/fc1/fc2 blocks to target (ResNet CLIPs such as RN50 included): use towers='text' "
                "or a ViT model."
            )
        return "visual.transformer.resblocks", visual.transformer.resblocks
    # CLIP keeps the text transformer at the top level; CustomTextCLIP (and CoCa) under `text`.
    if hasattr(getattr(model, "transformer", None), "resblocks"):
        return "transformer.resblocks", model.transformer.resblocks
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
        return "text.transformer.resblocks", text.transformer.resblocks
    found = type(text).__name__ if text is not None else "none"
    raise ConfigError(
        f"the text tower ({found}) is not an open_clip TextTransformer, so it has no q/k/v/o/fc1/fc2 blocks "
        "to target (Hugging Face text towers included): use towers='vision'."
    )


def _block_indices(blocks: str | Sequence[int], depth: int, tower: str) -> list[int]:
    """Sorted block indices of a tower with ``depth`` blocks selected by ``blocks``."""
    if isinstance(blocks, str):
        if blocks == "all":
            return list(range(depth))
        match = _FIRST_LAST.fullmatch(blocks)
        if match is None:
            raise ConfigError(
                f"blocks must be 'all', 'first_N', 'last_N' or a list of block indices, got {blocks!r}"
            )
        count = int(match.group(2))
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
    indices = set()
    for index in blocks:
        if not isinstance(index, int) or not -depth <= index < depth:
            raise ConfigError(
                f"block index {index!r} is out of range for the {tower} tower, which has {depth} blocks "
                f"(valid: {-depth}..{depth - 1}; negative indices count from the end)"
            )
        indices.add(index % depth)
    if not indices:
        raise ConfigError("blocks is an empty list: select at least one block, or 'all'")
    return sorted(indices)


def clip_targets(
    model: nn.Module,
    layers: str | Sequence[str] = ("q", "k", "v", "o", "fc1", "fc2"),
    towers: str = "both",
    blocks: str | Sequence[int] = "all",
) -> dict[str, dict[str, Any]]:
    """The ``nn.Linear`` layers to adapt in a converted open_clip CLIP, with their labels.

    Args:
        model: an open_clip CLIP whose attention was converted (``load_clip`` does it, or
            ``convert_attention``), so q/k/v are separate linears.
        layers: any of ``q k v o fc1 fc2`` (:data:`LAYER_MODULES`: ``attn.q_proj``, ``attn.k_proj``,
            ``attn.v_proj``, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``); one name or a sequence.
        towers: ``"vision"``, ``"text"`` or ``"both"``.
        blocks: which residual blocks of each tower: ``"all"``, ``"first_N"``, ``"last_N"``, or a list
            of indices (negative ones count from the end). Indices apply to each selected tower.

    Returns:
        ``{module name: {"tower", "layer", "block"}}``, vision tower first, then by block and in
        ``LAYER_MODULES`` order, e.g. ``"visual.transformer.resblocks.0.attn.q_proj": {"tower": "vision",
        "layer": "q", "block": 0}`` or ``"transformer.resblocks.11.mlp.c_proj": {"tower": "text", "layer":
        "fc2", "block": 11}``.
    """
    selected_layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in selected_layers if layer not in LAYER_MODULES]
    if unknown or not selected_layers:
        raise ConfigError(
            f"layers must be a non-empty subset of {list(LAYER_MODULES)}, got {selected_layers}"
        )
    if towers not in TOWER_CHOICES:
        raise ConfigError(f"towers must be one of {TOWER_CHOICES}, got {towers!r}")

    targets = {}
    for tower in TOWERS:
        if towers not in (tower, "both"):
            continue
        prefix, resblocks = _tower_blocks(model, tower)
        for index in _block_indices(blocks, len(resblocks), tower):
            block = resblocks[index]
            for layer, relative in LAYER_MODULES.items():
                if layer not in selected_layers:
                    continue
                try:
                    module = block.get_submodule(relative)
                except AttributeError:
                    module = None
                if not isinstance(module, nn.Linear):
                    hint = (
                        " Its attention is not converted: call kr_vlm.models.convert_attention(model) first "
                        "(load_clip does)."
                        if isinstance(block.get_submodule("attn"), nn.MultiheadAttention)
                        else ""
                    )
                    raise ConfigError(f"{prefix}.{index}.{relative} is not an nn.Linear in this model.{hint}")
                targets[f"{prefix}.{index}.{relative}"] = {"tower": tower, "layer": layer, "block": index}
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
    """The labels of every q/k/v/o/fc1/fc2 linear of the towers of ``model`` that have them."""
    labels = {}
    for tower in TOWERS:
        try:
            labels.update(clip_targets(model, towers=tower))
        except ConfigError:  # a tower without such blocks (a ResNet or Hugging Face tower) has no labels
            continue
    return labels


def select_targets(
    model: nn.Module, targets: Mapping[str, Any] | Sequence[str] | str | None
) -> dict[str, dict[str, Any]]:
    """The modules an adapter config's ``targets`` selects in a converted CLIP, with their labels.

    ``targets`` is the friendly selection (a mapping with any of ``layers``, ``towers``, ``blocks``;
    None or empty for all six layers of every block of both towers), a list of module names (suffixes
    as in peft) or a regex. Names and regexes are matched by ``kr_vlm.adapters.find_target_linears``;
    their labels are CLIP's where the layer is one of the six of a block, else read off the module path.
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
