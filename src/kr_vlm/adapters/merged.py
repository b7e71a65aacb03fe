"""The weights of an adapted model as the model without adapters names them, updates merged in."""

from __future__ import annotations

import torch
from torch import nn

from kr_vlm.adapters.inject import adapted_layers


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of ``model``'s state dict with every adapter merged into its base layer.

    Each adapted layer contributes its base layer's merged tensors (``weight``, ``bias``) under its own
    name; the adapter tensors and wrapper names (``base_layer``, ``kr_u``, ``lora_A``, ...) are dropped, so
    the result loads into the model as it was before ``inject_adapters``. ``model`` is left exactly as it
    was: layers merged here are unmerged afterwards and their base weights restored from a copy, so no
    rounding drift is left.
    """
    layers = dict(adapted_layers(model))
    to_merge = [name for name, layer in layers.items() if not layer.merged]
    originals = {
        name: {key: tensor.detach().clone() for key, tensor in layers[name].base_layer.state_dict().items()}
        for name in to_merge
    }
    for name in to_merge:
        layers[name].merge()
    try:
        state = {
            key: tensor.detach().to("cpu", copy=True)
            for key, tensor in model.state_dict().items()
            if not any(key.startswith(name + ".") for name in layers)
        }
        for name, layer in layers.items():
            for key, tensor in layer.base_layer.state_dict().items():
                state[f"{name}.{key}"] = tensor.detach().to("cpu", copy=True)
    finally:
        for name in to_merge:
            layers[name].unmerge()
            layers[name].base_layer.load_state_dict(originals[name])
    return state
