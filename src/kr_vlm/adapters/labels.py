"""Labels of the adapted layers (tower, layer type, block), which the rank monitor and the parameter table
group by.

A target selection that knows its model gives them with the module names (``kr_vlm.models.targets`` for
CLIP: ``{"tower": "vision", "layer": "q", "block": 3}``); ``AdapterConfig`` keeps them and
``adapter_config.json`` stores them. Layers adapted without labels get them from their module path
(``path_labels``), which works on any module tree and knows no model family.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kr_vlm.adapters.inject import CONFIG_ATTRIBUTE, adapted_layers

# The group of everything outside the adapted layers (parameter_summary counts it too).
REST = {"tower": "other", "layer": "other"}


def path_labels(name: str) -> dict[str, Any]:
    """Labels read off a module path: the block is the first numeric part, the tower the module the path
    starts in, the layer the rest of the path after the block.

    ``model.layers.3.self_attn.q_proj`` -> ``{"tower": "model", "block": 3, "layer": "self_attn.q_proj"}``;
    ``vision_model.encoder.layers.0.mlp.fc1`` -> tower ``vision_model``, block 0, layer ``mlp.fc1``. A path
    without a block (``head``, or ``0`` in an ``nn.Sequential``) is its own layer, in the tower ``model``
    for a top-level module.
    """
    parts = name.split(".")
    block = next((index for index, part in enumerate(parts[:-1]) if part.isdigit()), None)
    tower = parts[0] if len(parts) > 1 and block != 0 else "model"
    if block is None:
        return {"tower": tower, "layer": ".".join(parts[1:]) if len(parts) > 1 else name}
    return {"tower": tower, "block": int(parts[block]), "layer": ".".join(parts[block + 1 :])}


def label_group(labels: dict[str, Any]) -> str:
    """The group a layer is reported in: ``"<tower>/<layer>"``, e.g. ``"vision/q"``."""
    return f"{labels['tower']}/{labels['layer']}"


def layer_labels(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The labels of every adapted layer of ``model``, by name (as ``adapted_layers(model)`` names them).

    Labels come from the adapter config recorded by ``inject_adapters`` (also on a submodule of
    ``model``, e.g. the CLIP inside a LightningModule), and from the module path relative to the adapted
    module for layers whose config has none.
    """
    given: dict[str, dict[str, Any]] = {}
    relative: dict[str, str] = {}
    for prefix, module in model.named_modules():
        config = getattr(module, CONFIG_ATTRIBUTE, None)
        if config is None:
            continue
        for name, _ in adapted_layers(module):
            full_name = f"{prefix}.{name}" if prefix else name
            relative[full_name] = name
            if name in config.labels:
                given[full_name] = config.labels[name]
    return {
        name: given.get(name) or path_labels(relative.get(name, name)) for name, _ in adapted_layers(model)
    }
