"""Baseline adapters from peft (LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA), injected without a PeftModel.

peft does the work: its config classes, its layers, its ``get_delta_weight`` / ``merge`` / ``unmerge``.
kr_vlm lists the options users set for each method (a dataclass each, peft's defaults), chooses the layers
(it hands peft a regex that fully matches exactly those names) and shows each peft layer through
``PeftLayerView``, which answers ``AdaptedLayer`` without changing peft's classes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from kr_vlm.adapters.layer import AdaptedLayer, Method
from kr_vlm.spectral import DenseUpdate, KroneckerFactors, LowRankFactors, UpdateFactors

# kr_vlm puts one adapter per model, under peft's default name.
ADAPTER_NAME = "default"


@dataclasses.dataclass
class LoraOptions:
    """``peft.LoraConfig``'s options for LoRA (and DoRA), with peft's defaults."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # True, False, or the name of one of peft's initialisations ("gaussian", "pissa", "olora", ...).
    init_lora_weights: Any = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    lora_bias: bool = False


@dataclasses.dataclass
class VeraOptions:
    """``peft.VeraConfig``'s options, with peft's defaults."""

    r: int = 256
    projection_prng_key: int = 0
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True


@dataclasses.dataclass
class LoHaOptions:
    """``peft.LoHaConfig``'s options, with peft's defaults."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoKrOptions(LoHaOptions):
    """``peft.LoKrConfig``'s options (LoHa's and three more), with peft's defaults."""

    # True, False or "lycoris".
    init_weights: Any = True
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


@dataclasses.dataclass
class RandLoraOptions:
    """``peft.RandLoraConfig``'s options, with peft's defaults."""

    r: int = 32
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    randlora_alpha: float = 640
    init_weights: bool = True


# peft config fields that kr_vlm sets itself or that would change what is trained or saved behind its back.
UNAVAILABLE_OPTIONS: dict[str, str] = {
    "target_modules": "pass the layers as AdapterConfig(method, target_modules, ...)",
    "exclude_modules": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "layers_to_transform": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "layers_pattern": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "target_parameters": "kr_vlm adapts nn.Linear modules only",
    "modules_to_save": "it trains whole modules outside the adapters, which save_adapters would not save",
    "trainable_token_indices": "it trains embedding rows outside the adapters, which save_adapters would not save",
    "bias": "it trains biases of the whole model outside the adapters, which save_adapters would not save",
    "use_dora": "choose method='dora' instead",
    "save_projection": "kr_vlm always saves the shared random projections, so that loading is exact",
    "fan_in_fan_out": "it only applies to transformers' Conv1D; nn.Linear weights are (out, in)",
    "layer_replication": "it changes the model's layer structure",
    # LoRA variants other than DoRA change the update in ways delta_weight() does not report.
    **dict.fromkeys(
        (
            "alora_invocation_tokens",
            "arrow_config",
            "kasa_config",
            "velora_config",
            "monteclora_config",
            "use_bdlora",
            "use_qalora",
            "qalora_group_size",
            "megatron_config",
            "megatron_core",
        ),
        "it selects a LoRA variant or backend that kr_vlm does not support (plain LoRA and DoRA are supported)",
    ),
    "peft_type": "it follows from the method",
    "task_type": "kr_vlm injects adapters without a PeftModel wrapper",
    "inference_mode": "freezing is decided by inject_adapters",
    "base_model_name_or_path": "it is PeftModel bookkeeping",
    "revision": "it is PeftModel bookkeeping",
    "auto_mapping": "it is PeftModel bookkeeping",
    "peft_version": "it is PeftModel bookkeeping",
}


def peft_config_class(method: str) -> type:
    """peft's config class for a peft method (``dora`` is ``LoraConfig`` with ``use_dora=True``)."""
    import peft

    classes = {
        "lora": peft.LoraConfig,
        "dora": peft.LoraConfig,
        "vera": peft.VeraConfig,
        "lokr": peft.LoKrConfig,
        "loha": peft.LoHaConfig,
        "randlora": peft.RandLoraConfig,
    }
    return classes[method]


def build_peft_config(method: str, module_names: Sequence[str], options: Any):
    """peft's config for ``method`` that targets exactly ``module_names`` (full module names)."""
    # peft full-matches a string target as a regex; escaped alternatives select these layers and no others.
    target_regex = "(?:" + "|".join(re.escape(name) for name in module_names) + ")"
    method_options = {"use_dora": True} if method == "dora" else {}
    return peft_config_class(method)(
        target_modules=target_regex, **method_options, **dataclasses.asdict(options)
    )


def inject_peft_adapters(model: nn.Module, method: str, module_names: Sequence[str], options: Any) -> None:
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


def find_peft_layer(module: nn.Module) -> AdaptedLayer | None:
    """A peft layer seen as an ``AdaptedLayer`` (a ``PeftLayerView``), or None for any other module."""
    return PeftLayerView(module) if is_peft_layer(module) else None


class PeftLayerView:
    """A peft adapter layer seen as an ``AdaptedLayer``.

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

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything of the peft layer but its ``base_layer``: its parameters and buffers (VeRA's and
        RandLoRA's shared random projections included)."""
        return {
            name: tensor
            for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]
            if not name.startswith("base_layer.")
        }

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` update this layer adds to its base weight, scaling included.

        For DoRA this is the true update ``m / ||W0 + s B A||_row * (W0 + s B A) - W0``, not peft's
        ``get_delta_weight`` (which is only the LoRA part ``s B A``).
        """
        if self._is_dora:
            return self._dora_delta_weight()
        return self.module.get_delta_weight(ADAPTER_NAME)

    def spectral_factors(self) -> UpdateFactors:
        """The update in the form its singular values come cheapest from (``kr_vlm.spectral``).

        LoRA (without a variant such as DoRA) is ``s B A``, VeRA ``(λ_b ⊙ B)(λ_d ⊙ A)`` with its shared random
        projections sliced to the layer: both low-rank products. LoKr is ``s kron(w1, w2)``. DoRA (a
        row-normalised weight), LoHa (an entrywise product of two low-rank products) and RandLoRA (a sum of
        random bases) have no such simple structure and give their dense update.
        """
        from peft.tuners.lokr.layer import Linear as LoKrLinear
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.vera.layer import Linear as VeraLinear

        module, name = self.module, ADAPTER_NAME
        if isinstance(module, LoraLinear) and name not in module.lora_variant:
            return LowRankFactors(
                module.lora_B[name].weight, module.lora_A[name].weight, module.scaling[name]
            )
        if isinstance(module, VeraLinear):
            b = module.vera_lambda_b[name][:, None] * module.vera_B[name][: module.out_features]
            a = module.vera_lambda_d[name][:, None] * module.vera_A[name][:, : module.in_features]
            return LowRankFactors(b, a)
        if isinstance(module, LoKrLinear) and name not in module.lokr_t2:
            factors = KroneckerFactors(self._lokr_factor("w1"), self._lokr_factor("w2"), module.scaling[name])
            if factors.shape == tuple(self.base_layer.weight.shape):
                return factors
        return DenseUpdate(self.delta_weight().detach())

    def _lokr_factor(self, which: str) -> torch.Tensor:
        """LoKr's ``w1`` or ``w2``: a parameter of its own, or the product of two (peft's ``get_delta_weight``)."""
        full = getattr(self.module, f"lokr_{which}")
        if ADAPTER_NAME in full:
            return full[ADAPTER_NAME]
        return (
            getattr(self.module, f"lokr_{which}_a")[ADAPTER_NAME]
            @ getattr(self.module, f"lokr_{which}_b")[ADAPTER_NAME]
        )

    @property
    def rank_cap(self) -> int:
        """The highest rank the update can reach, from the method's structure (never above ``min(d_out, d_in)``).

        LoRA's ``B A`` and VeRA's ``Λ_b B Λ_d A`` have rank at most ``r``; LoHa's entrywise product of two
        rank-``r`` products at most ``r²``; LoKr's ``kron(w1, w2)`` the product of its factors' ranks. DoRA
        rescales the rows of ``W0 + B A``, which changes ``W0`` itself, and RandLoRA's bases are chosen to
        span every direction: their updates can have any rank.
        """
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lokr.layer import LoKrLayer
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.vera.layer import VeraLayer

        module, full = self.module, min(self.out_features, self.in_features)
        if isinstance(module, (LoraLayer, VeraLayer)) and not self._is_dora:
            return min(full, module.r[ADAPTER_NAME])
        if isinstance(module, LoHaLayer):
            return min(full, module.r[ADAPTER_NAME] ** 2)
        if isinstance(module, LoKrLayer):
            return min(full, self._lokr_factor_rank("w1") * self._lokr_factor_rank("w2"))
        return full

    def _lokr_factor_rank(self, which: str) -> int:
        """The highest rank of LoKr's ``w1`` or ``w2``: a matrix of its own, or a product of two."""
        whole = getattr(self.module, f"lokr_{which}")
        if ADAPTER_NAME in whole:
            return min(whole[ADAPTER_NAME].shape)
        left = getattr(self.module, f"lokr_{which}_a")[ADAPTER_NAME]
        right = getattr(self.module, f"lokr_{which}_b")[ADAPTER_NAME]
        return min(*left.shape, *right.shape)

    def base_weight(self) -> torch.Tensor:
        """``W0``, the weight the update is added to (the base layer's, less the update while merged)."""
        weight = self.base_layer.weight
        return weight - self.delta_weight().to(weight.dtype) if self.merged else weight

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


def _peft_method(method: str, options: type) -> Method:
    def inject(model: nn.Module, names: Sequence[str], method_options: Any) -> None:
        inject_peft_adapters(model, method, names, method_options)

    return Method(options, inject, find=find_peft_layer, unavailable_options=UNAVAILABLE_OPTIONS)


LORA = _peft_method("lora", LoraOptions)
DORA = _peft_method("dora", LoraOptions)
VERA = _peft_method("vera", VeraOptions)
LOKR = _peft_method("lokr", LoKrOptions)
LOHA = _peft_method("loha", LoHaOptions)
RANDLORA = _peft_method("randlora", RandLoraOptions)
