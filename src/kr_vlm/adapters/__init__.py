"""Adapter library: KRAdapter and peft baselines for any ``torch.nn.Module``.

Nothing here knows about CLIP, Lightning or data.
"""

from kr_vlm.adapters.config import METHODS, AdapterConfig
from kr_vlm.adapters.inject import (
    adapted_layers,
    count_parameters,
    find_target_linears,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)
from kr_vlm.adapters.io import adapter_state_dict, load_adapter_state_dict, load_adapters, save_adapters
from kr_vlm.adapters.kradapter import KRAdapterLinear, kradapter_shapes

__all__ = [
    "METHODS",
    "AdapterConfig",
    "KRAdapterLinear",
    "adapted_layers",
    "adapter_state_dict",
    "count_parameters",
    "find_target_linears",
    "inject_adapters",
    "kradapter_shapes",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
    "unmerge_adapters",
]
