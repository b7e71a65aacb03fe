"""Baseline adapters from peft (LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA), injected without a PeftModel.

peft does the work: its config classes, its layers, its ``get_delta_weight`` / ``merge`` / ``unmerge``.
kr_vlm only chooses the layers (it hands peft a regex that fully matches exactly those names) and shows each
peft layer through ``PeftLayerView``, which gives it kr_vlm's layer interface (``delta_weight()``,
``merge()``, ``unmerge()``, ``merged``, ``in_features``, ``out_features``) without changing peft's classes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from kr_vlm.adapters.config import peft_config_class

# kr_vlm puts one adapter per model, under peft's default name.
ADAPTER_NAME = "default"


def build_peft_config(method: str, module_names: Sequence[str], options: dict[str, Any]):
    """peft's config for ``method`` that targets exactly ``module_names`` (full module names)."""
    # peft full-matches a string target as a regex; escaped alternatives select these layers and no others.
    target_regex = "(?:" + "|".join(re.escape(name) for name in module_names) + ")"
    method_options = {"use_dora": True} if method == "dora" else {}
    return peft_config_class(method)(target_modules=target_regex, **method_options, **options)


def inject_peft_adapters(
    model: nn.Module, method: str, module_names: Sequence[str], options: dict[str, Any]
) -> None:
    """Replace the named ``nn.Linear`` layers of ``model`` in place with peft's layers for ``method``."""
    import peft

    config = build_peft_config(method, module_names, options)
    if method == "vera":
        # inject_adapter_in_model refuses VeRA because its shared projections live on the tuner object. Every
        # VeRA layer also holds a reference to them, so building the tuner directly (which is all
        # inject_adapter_in_model does) gives working layers; kr_vlm saves the projections itself (io.py).
        peft.VeraModel(model, config, adapter_name=ADAPTER_NAME)
    else:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def is_peft_layer(module: nn.Module) -> bool:
    """True for a peft adapter layer (any method)."""
    # peft (with transformers) takes seconds to import; until something imported it, no peft layer exists.
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    return tuners_utils is not None and isinstance(module, tuners_utils.BaseTunerLayer)


class PeftLayerView:
    """A peft adapter layer seen through kr_vlm's adapted-layer interface.

    ``adapted_layers`` yields one for every peft layer; the layer itself is ``view.module``. A view holds no
    state of its own, so making a new one each time is free.
    """

    def __init__(self, module: nn.Module) -> None:
        if not is_peft_layer(module):
            raise TypeError(f"PeftLayerView needs a peft adapter layer, got {type(module).__name__}.")
        self.module = module

    @property
    def base_layer(self) -> nn.Linear:
        return self.module.get_base_layer()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return bool(self.module.merged)

    def merge(self) -> None:
        """Add the update into the base weight (peft's ``merge``)."""
        self.module.merge()

    def unmerge(self) -> None:
        """Take the update out of the base weight again (peft's ``unmerge``)."""
        self.module.unmerge()

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The peft layer's parameters, so code that treats adapted layers as modules (device, counts) works."""
        return self.module.parameters(recurse)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` update this layer adds to its base weight, scaling included.

        For DoRA this is the true update ``m / ||W0 + s B A||_row * (W0 + s B A) - W0``, not peft's
        ``get_delta_weight`` (which is only the LoRA part ``s B A``).
        """
        if self._is_dora:
            return self._dora_delta_weight()
        return self.module.get_delta_weight(ADAPTER_NAME)

    @property
    def _is_dora(self) -> bool:
        return ADAPTER_NAME in getattr(self.module, "lora_magnitude_vector", {})

    def _dora_delta_weight(self) -> torch.Tensor:
        lora_delta = self.module.get_delta_weight(ADAPTER_NAME)  # s B A
        magnitude = self.module.lora_magnitude_vector[ADAPTER_NAME].weight
        weight = self.base_layer.weight.to(lora_delta.dtype)
        if self.merged:
            # The base weight holds (m / n) * (W0 + s B A); peft keeps the row norms n it merged with (to
            # unmerge later), which is the only way back to W0.
            weight_norm = self.module._caches[f"{ADAPTER_NAME}-weight_norm"]
            original = weight / (magnitude / weight_norm).unsqueeze(1) - lora_delta
            return weight - original
        adapted = weight + lora_delta
        # As in peft's forward (DoRA section 4.3), the norm is treated as a constant.
        weight_norm = torch.linalg.norm(adapted, dim=1).detach()
        return (magnitude / weight_norm).unsqueeze(1) * adapted - weight

    def __repr__(self) -> str:
        return f"PeftLayerView({self.module.__class__.__module__}.{type(self.module).__name__})"
