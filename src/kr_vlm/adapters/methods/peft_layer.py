"""peft's adapter layers seen as ``AdaptedLayer``: ``PeftLayerView``, without changing peft's classes.

The view reads and drives one peft layer: its dense update (DoRA's true one), its factors for the rank
monitor, its rank cap, merging, and the update scale α (``set_update_scale``: peft's own ``set_scale``
where it has one, else the layer's scaling or its output).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from kr_vlm.adapters.layer import AdaptedLayer, check_scale_settable, dense_weight
from kr_vlm.errors import ConfigError
from kr_vlm.spectral import DenseUpdate, KroneckerFactors, LowRankFactors, UpdateFactors

# kr_vlm puts one adapter per model, under peft's default name.
ADAPTER_NAME = "default"
# What kr_vlm keeps on a peft layer (plain attributes, never in its state dict): the update scale α, the
# trained scaling of a layer peft has no scale setter for, the update added by a merge that peft's own
# merge could not do (at an α other than 1, for the methods whose scale kr_vlm applies to the output).
SCALE_ATTRIBUTE = "kr_vlm_update_scale"
UNIT_SCALING_ATTRIBUTE = "kr_vlm_unit_scaling"
MERGED_UPDATE_ATTRIBUTE = "kr_vlm_merged_update"


def is_peft_layer(module: nn.Module) -> bool:
    """True for a peft adapter layer (any method)."""
    # peft (with transformers) takes seconds to import; until something imported it, no peft layer exists.
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    return tuners_utils is not None and isinstance(module, tuners_utils.BaseTunerLayer)


def find_peft_layer(module: nn.Module) -> AdaptedLayer | None:
    """A peft layer seen as an ``AdaptedLayer`` (a ``PeftLayerView``), or None for any other module; a peft
    layer whose update is not additive is an ``UnsupportedPeftLayerError`` (``check_additive``)."""
    return PeftLayerView(module) if is_peft_layer(module) else None


class UnsupportedPeftLayerError(ConfigError):
    """A peft layer whose method kr_vlm cannot show as an additive update ``W0 + ΔW``."""


def additive_peft_layers() -> tuple[type, ...]:
    """peft's layer classes whose update is added to the base weight, ``W0 + ΔW``, with ``get_delta_weight``
    that ``ΔW`` (DoRA's true update is computed here): LoRA (and DoRA), VeRA, LoHa, LoKr, RandLoRA."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.randlora.layer import RandLoraLayer
    from peft.tuners.vera.layer import VeraLayer

    return LoraLayer, VeraLayer, LoHaLayer, LoKrLayer, RandLoraLayer


def check_additive(module: nn.Module) -> None:
    """Refuse a peft layer whose update is not additive. Multiplicative methods (peft's OFT and BOFT
    rotate ``W0``, IA3 scales it, ...) give no ``ΔW`` through ``get_delta_weight``, so ``delta_weight()``,
    ``base_weight()``, the spectra, the rank monitor and update scaling would all be wrong."""
    if isinstance(module, additive_peft_layers()):
        return
    kind = type(module).__module__.removeprefix("peft.tuners.").split(".")[0]
    raise UnsupportedPeftLayerError(
        f"peft's {kind} layer ({type(module).__module__}.{type(module).__name__}) is not supported: its update "
        "is not added to the base weight (W0 + ΔW) but multiplies or rotates it, so its delta weight, spectra, "
        "rank monitor and update scaling cannot be read from peft's get_delta_weight. kr_vlm supports peft's "
        "lora, dora, vera, lokr, loha and randlora; train this method with peft itself."
    )


class PeftLayerView:
    """A peft adapter layer seen as an ``AdaptedLayer``.

    ``adapted_layers`` yields one for every peft layer; the layer itself is ``view.module``. A view holds no
    state of its own, so making a new one each time is free.
    """

    def __init__(self, module: nn.Module) -> None:
        if not is_peft_layer(module):
            raise TypeError(f"PeftLayerView needs a peft adapter layer, got {type(module).__name__}.")
        check_additive(module)
        self.module = module

    @property
    def base_layer(self) -> nn.Module:
        return self.module.get_base_layer()

    @property
    def in_features(self) -> int:
        return dense_weight(self.base_layer).shape[1]

    @property
    def out_features(self) -> int:
        return dense_weight(self.base_layer).shape[0]

    @property
    def merged(self) -> bool:
        return bool(self.module.merged)

    @property
    def update_scale(self) -> float:
        """α, the share of the trained update the layer applies (1 unless ``set_update_scale`` changed it)."""
        return getattr(self.module, SCALE_ATTRIBUTE, 1.0)

    def set_update_scale(self, alpha: float) -> None:
        """Apply ``alpha`` times the trained update: ``W0 + α ΔW`` (``kr_vlm.adapters.layer.AdaptedLayer``).

        LoRA, LoKr and LoHa through peft's own ``set_scale`` (α times the trained ``alpha / r``); RandLoRA,
        which has a ``scaling`` but no setter in peft, by setting it to α times the trained value. VeRA
        has no scaling, and DoRA's update is not linear in its LoRA scaling (the magnitude renormalises
        the rows): for them the layer's output is interpolated, ``y0 + α (y - y0)`` with ``y0`` the base
        layer's output (a forward hook; exactly ``y0`` at α = 0 and ``y`` at α = 1).
        """
        alpha = check_scale_settable(self, alpha)
        module = self.module
        if self._scales_output:
            if not hasattr(module, SCALE_ATTRIBUTE):
                module.register_forward_hook(_interpolate_output, with_kwargs=True)
        elif hasattr(module, "set_scale"):
            module.set_scale(ADAPTER_NAME, alpha)
        else:
            if not hasattr(module, UNIT_SCALING_ATTRIBUTE):
                setattr(module, UNIT_SCALING_ATTRIBUTE, module.scaling[ADAPTER_NAME])
            module.scaling[ADAPTER_NAME] = alpha * getattr(module, UNIT_SCALING_ATTRIBUTE)
        setattr(module, SCALE_ATTRIBUTE, alpha)

    @property
    def _scales_output(self) -> bool:
        """Whether α is applied to the layer's output (VeRA, DoRA) rather than to its scaling."""
        from peft.tuners.vera.layer import VeraLayer

        return self._is_dora or isinstance(self.module, VeraLayer)

    def merge(self) -> None:
        """Add the update (at the update scale α) into the base weight: peft's ``merge``, except for the
        methods whose α applies to the output (VeRA, DoRA) at an α other than 1, whose ``α ΔW`` is added
        here and kept for ``unmerge``."""
        if not (self._scales_output and self.update_scale != 1):
            self.module.merge()
            return
        if self.merged:
            warnings.warn("Already merged. Nothing to do.", stacklevel=2)
            return
        with torch.no_grad():
            update = self.delta_weight().detach()
            weight = dense_weight(self.base_layer)
            weight.copy_(weight + update.to(weight.dtype))
        setattr(self.module, MERGED_UPDATE_ATTRIBUTE, update)
        self.module.merged_adapters.append(ADAPTER_NAME)

    def unmerge(self) -> None:
        """Take the update out of the base weight again (peft's ``unmerge``, or the update ``merge`` added)."""
        update = getattr(self.module, MERGED_UPDATE_ATTRIBUTE, None)
        if update is None:
            self.module.unmerge()
            return
        with torch.no_grad():
            weight = dense_weight(self.base_layer)
            weight.copy_(weight - update.to(weight.dtype))
        delattr(self.module, MERGED_UPDATE_ATTRIBUTE)
        self.module.merged_adapters.remove(ADAPTER_NAME)

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
        """The dense ``(out_features, in_features)`` update this layer adds to its base weight, scaling and
        update scale α included.

        For DoRA this is the true update ``α (m / ||W0 + s B A||_row * (W0 + s B A) - W0)``, not peft's
        ``get_delta_weight`` (which is only the LoRA part ``s B A``).
        """
        merged_update = getattr(self.module, MERGED_UPDATE_ATTRIBUTE, None)
        if merged_update is not None:
            return merged_update
        delta = self._dora_delta_weight() if self._is_dora else self._lora_delta_weight()
        # The other methods' α is in their scaling already.
        return self.update_scale * delta if self._scales_output and self.update_scale != 1 else delta

    def _lora_delta_weight(self) -> torch.Tensor:
        delta = self.module.get_delta_weight(ADAPTER_NAME)
        # peft gives a Conv1D layer's update in the layer's own (in, out) layout.
        return delta.t() if getattr(self.module, "fan_in_fan_out", False) else delta

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
        if isinstance(module, VeraLinear) and not self.merged:
            b = module.vera_lambda_b[name][:, None] * module.vera_B[name][: module.out_features]
            a = module.vera_lambda_d[name][:, None] * module.vera_A[name][:, : module.in_features]
            return LowRankFactors(b, a, self.update_scale)
        if isinstance(module, LoKrLinear) and name not in module.lokr_t2:
            factors = KroneckerFactors(self._lokr_factor("w1"), self._lokr_factor("w2"), module.scaling[name])
            if factors.shape == (self.out_features, self.in_features):
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
        """``W0``, the weight the update is added to (the base layer's, less the update while merged), shaped
        ``(out_features, in_features)`` (a ``Conv1D``'s transposed view)."""
        weight = dense_weight(self.base_layer)
        return weight - self.delta_weight().to(weight.dtype) if self.merged else weight

    @property
    def _is_dora(self) -> bool:
        return ADAPTER_NAME in getattr(self.module, "lora_magnitude_vector", {})

    def _dora_delta_weight(self) -> torch.Tensor:
        lora_delta = self._lora_delta_weight()  # s B A
        magnitude = self.module.lora_magnitude_vector[ADAPTER_NAME].weight
        weight = dense_weight(self.base_layer).to(lora_delta.dtype)
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


def _interpolate_output(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of a peft layer whose update scale α applies to its output (VeRA, DoRA):
    ``y0 + α (y - y0)``, with ``y0`` the base layer's output; ``y`` itself at α = 1 or while merged (the
    merged weight holds ``α ΔW`` already), ``y0`` itself at α = 0."""
    alpha = getattr(module, SCALE_ATTRIBUTE, 1.0)
    if alpha == 1 or module.merged or module.disable_adapters:
        return output
    base_output = module.get_base_layer()(*args, **kwargs).to(output.dtype)
    return base_output if alpha == 0 else base_output + alpha * (output - base_output)
