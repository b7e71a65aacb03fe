"""Adapter library: KRAdapter and peft baselines for any ``torch.nn.Module``.

Nothing here knows about CLIP, Lightning or data. The methods live in ``kr_vlm.adapters.methods`` (one
module a method family, one entry a method in ``REGISTRY``); their layers answer ``AdaptedLayer``, and
``register_method`` adds a method of your own (``AdapterLayer`` gives its layer sound defaults).
``METHODS`` is the names of the methods registered now.
"""

from typing import Any

from kr_vlm.adapters.base import AdapterLayer
from kr_vlm.adapters.config import AdapterConfig
from kr_vlm.adapters.inject import (
    adapted_layers,
    count_parameters,
    find_target_linears,
    inject_adapters,
    merge_adapters,
    print_trainable_parameters,
    unmerge_adapters,
)
from kr_vlm.adapters.io import adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters
from kr_vlm.adapters.labels import layer_labels, path_labels
from kr_vlm.adapters.layer import AdaptedLayer, Method
from kr_vlm.adapters.merged import disabled_adapters, merge_and_unload, merged_state_dict, unload
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.adapters.methods.kradapter import KRAdapterLinear, KRAdapterOptions, kradapter_shapes
from kr_vlm.adapters.registry import MethodRegistrationError, register_method
from kr_vlm.adapters.scaling import scaled_adapters, set_adapter_scale

__all__ = [
    "METHODS",
    "REGISTRY",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterLayer",
    "KRAdapterLinear",
    "KRAdapterOptions",
    "Method",
    "MethodRegistrationError",
    "adapted_layers",
    "adapter_state_dict",
    "count_parameters",
    "disabled_adapters",
    "find_target_linears",
    "inject_adapters",
    "kradapter_shapes",
    "layer_labels",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "merge_and_unload",
    "merged_state_dict",
    "path_labels",
    "print_trainable_parameters",
    "register_method",
    "save_adapters",
    "scaled_adapters",
    "set_adapter_scale",
    "unload",
    "unmerge_adapters",
]


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the live registry's names (kr_vlm.adapters.config.METHODS), never a snapshot
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
