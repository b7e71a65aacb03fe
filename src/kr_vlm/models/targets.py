"""Friendly adapter targets for a converted open_clip CLIP: layer kinds x towers x blocks -> module names.

``clip_target_modules(model, layers=("q", "v"), towers="both", blocks="last_4")`` returns full module
names such as ``visual.transformer.resblocks.8.attn.q_proj`` for
``kr_vlm.adapters.inject_adapters(model, AdapterConfig(method, target_modules=names))``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from kr_vlm.errors import ConfigError

__all__ = ["LAYER_MODULES", "TOWERS", "clip_target_modules"]

#: Short layer names and the module they name inside each residual block.
LAYER_MODULES = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.out_proj",
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
}
TOWERS = ("vision", "text", "both")
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
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):
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


def clip_target_modules(
    model: nn.Module,
    layers: str | Sequence[str] = ("q", "k", "v", "o", "fc1", "fc2"),
    towers: str = "both",
    blocks: str | Sequence[int] = "all",
) -> list[str]:
    """Full names of the ``nn.Linear`` layers to adapt in a converted open_clip CLIP.

    Args:
        model: an open_clip CLIP whose attention was converted (``load_clip`` does it, or
            ``convert_attention``), so q/k/v are separate linears.
        layers: any of ``q k v o fc1 fc2`` (:data:`LAYER_MODULES`: ``attn.q_proj``, ``attn.k_proj``,
            ``attn.v_proj``, ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``); one name or a sequence.
        towers: ``"vision"``, ``"text"`` or ``"both"``.
        blocks: which residual blocks of each tower: ``"all"``, ``"first_N"``, ``"last_N"``, or a list
            of indices (negative ones count from the end). Indices apply to each selected tower.

    Returns:
        Module names, vision tower first, then by block and in ``LAYER_MODULES`` order, e.g.
        ``"visual.transformer.resblocks.0.attn.q_proj"`` or ``"transformer.resblocks.11.mlp.c_proj"``.
    """
    selected_layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in selected_layers if layer not in LAYER_MODULES]
    if unknown or not selected_layers:
        raise ConfigError(
            f"layers must be a non-empty subset of {list(LAYER_MODULES)}, got {selected_layers}"
        )
    if towers not in TOWERS:
        raise ConfigError(f"towers must be one of {TOWERS}, got {towers!r}")

    names = []
    for tower in ("vision", "text"):
        if towers not in (tower, "both"):
            continue
        prefix, resblocks = _tower_blocks(model, tower)
        for index in _block_indices(blocks, len(resblocks), tower):
            block = resblocks[index]
            for layer in LAYER_MODULES:
                if layer not in selected_layers:
                    continue
                relative = LAYER_MODULES[layer]
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
                names.append(f"{prefix}.{index}.{relative}")
    return names
