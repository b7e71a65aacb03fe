"""Map module and parameter names to a group: tower (vision/text/other) × layer type (q/k/v/o/fc1/fc2/...).

Works on the module names of a converted open_clip CLIP with any prefix (``clip.``, ``model.clip.``), on
Hugging Face CLIP names (``vision_model``, ``text_model``, ``fc1``/``fc2``) and on the names peft gives its
inner modules (``...q_proj.lora_A.default.weight``). Anything else falls back to ``other``, so every model
gets a grouping.
"""

from __future__ import annotations

TOWERS = ("vision", "text", "other")
LAYER_TYPES = ("q", "k", "v", "qkv", "o", "fc1", "fc2", "other")

# Module names that say which projection a Linear is. ``in_proj`` is the fused q/k/v projection of an
# unconverted ``nn.MultiheadAttention``.
_LAYER_TYPE_BY_NAME = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "in_proj": "qkv",
    "out_proj": "o",
    "c_fc": "fc1",
    "fc1": "fc1",
    "c_proj": "fc2",
    "fc2": "fc2",
}
# Top-level names of open_clip's text tower (its blocks live under ``transformer.``, beside ``visual.``).
_TEXT_TOWER_NAMES = {"transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection"}


def tower_of(name: str) -> str:
    """``vision``, ``text`` or ``other`` for a dotted module or parameter name."""
    parts = name.split(".")
    # Vision first: open_clip's image tower also has a ``transformer`` inside ``visual``.
    if any(part == "visual" or part.startswith("vision") for part in parts):
        return "vision"
    if any(part in _TEXT_TOWER_NAMES or part.startswith("text") for part in parts):
        return "text"
    return "other"


def layer_type_of(name: str) -> str:
    """``q``, ``k``, ``v``, ``qkv``, ``o``, ``fc1``, ``fc2`` or ``other`` for a dotted module or parameter name.

    The innermost recognised part wins, so names that peft or KRAdapter nest below the adapted layer
    (``base_layer``, ``lora_A.default``, ``kr_u``) keep the layer's type.
    """
    for part in reversed(name.split(".")):
        if part in _LAYER_TYPE_BY_NAME:
            return _LAYER_TYPE_BY_NAME[part]
    return "other"


def group_of(name: str) -> str:
    """The group key ``"<tower>/<layer type>"``, e.g. ``"vision/q"`` or ``"text/fc2"``."""
    return f"{tower_of(name)}/{layer_type_of(name)}"


def group_sort_key(group: str) -> tuple[int, int]:
    """Sort groups as towers then layer types are listed above (vision/q first, other/other last)."""
    tower, layer_type = group.split("/")
    return TOWERS.index(tower), LAYER_TYPES.index(layer_type)
