"""Full fine-tuning of chosen layers, behind the same interface as the adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.adapters.layer import Method, NoOptions, check_scale_settable, instances_of, replace_layers
from kr_vlm.spectral import DenseUpdate


class FullFineTuneLinear(nn.Linear):
    """An ``nn.Linear`` whose own weight and bias train, and that reports how far its weight has moved.

    It takes over the wrapped layer's parameters (no copy), so the state-dict names stay ``<name>.weight``
    and ``<name>.bias`` and a saved update loads into an unmodified model too. Frozen copies of the initial
    weight and bias (non-persistent buffers ``initial_weight``, ``initial_bias``) give
    ``delta_weight() = weight - initial_weight``. The update lives in the weight, so at the update scale
    α = 1 ``merge`` / ``unmerge`` change no weight; they only flip ``merged``.

    ``update_scale`` α (``set_update_scale``) interpolates the layer between its initial and its trained
    parameters: ``W0 + α (W - W0)`` and ``b0 + α (b - b0)``, exactly the initial layer at α = 0 and the
    trained one at α = 1. Merging at another α writes the interpolated parameters into the layer (so
    ``merge_and_unload`` keeps them) and keeps the trained ones aside for ``unmerge`` and
    ``adapter_state_dict``, which always gives the trained tensors.
    """

    def __init__(self, base: nn.Linear) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"FullFineTuneLinear wraps torch.nn.Linear layers only, got {type(base).__name__}."
            )
        # Built on the meta device (no allocation), then given the base layer's own parameters.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.requires_grad_(True)
        self.register_buffer("initial_weight", base.weight.detach().clone(), persistent=False)
        initial_bias = None if base.bias is None else base.bias.detach().clone()
        self.register_buffer("initial_bias", initial_bias, persistent=False)
        self.merged = False
        self.update_scale = 1.0
        # The trained (weight, bias) while merged at an update scale other than 1.
        self._trained: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def base_layer(self) -> FullFineTuneLinear:
        """The layer itself: its own weight is both the original and the trained one."""
        return self

    def set_update_scale(self, alpha: float) -> None:
        """Interpolate between the initial (α = 0) and the trained (α = 1) parameters."""
        self.update_scale = check_scale_settable(self, alpha)

    def _interpolated(self, initial: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
        """``initial + α (trained - initial)``: exactly ``initial`` at α = 0 and ``trained`` at α = 1."""
        if self.update_scale == 1:
            return trained
        if self.update_scale == 0:
            return initial
        return initial + self.update_scale * (trained - initial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self._interpolated(self.initial_bias, self.bias)
        return F.linear(x, self._interpolated(self.initial_weight, self.weight), bias)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The layer's trained ``weight`` and ``bias`` (the ``initial_*`` buffers are not part of it)."""
        if self._trained is not None:
            weight, bias = self._trained
            return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return dict(self.named_parameters())

    def delta_weight(self) -> torch.Tensor:
        """``α (weight - initial_weight)``, shaped ``(out_features, in_features)``, differentiable."""
        if self._trained is not None:
            return self.weight - self.initial_weight
        delta = self.weight - self.initial_weight
        return delta if self.update_scale == 1 else self.update_scale * delta

    @property
    def rank_cap(self) -> int:
        """The highest rank the update can reach: ``min(d_out, d_in)``."""
        return min(self.out_features, self.in_features)

    def base_weight(self) -> torch.Tensor:
        """``W0``, the weight before training (``initial_weight``)."""
        return self.initial_weight

    def spectral_factors(self) -> DenseUpdate:
        """The update for its singular values: a dense matrix, it has no factors."""
        return DenseUpdate(self.delta_weight().detach())

    @torch.no_grad()
    def merge(self) -> None:
        """At α = 1 nothing to add: the update already lives in the weight. At another α, write the
        interpolated parameters into the layer and keep the trained ones aside."""
        if self.update_scale != 1 and not self.merged:
            trained = (
                self.weight.detach().clone(),
                None if self.bias is None else self.bias.detach().clone(),
            )
            self.weight.copy_(self._interpolated(self.initial_weight, self.weight))
            if self.bias is not None:
                self.bias.copy_(self._interpolated(self.initial_bias, self.bias))
            self._trained = trained
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the trained parameters back (after a merge at an update scale other than 1)."""
        if self._trained is not None:
            weight, bias = self._trained
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
            self._trained = None
        self.merged = False


def inject_full(model: nn.Module, names: Sequence[str], options: NoOptions) -> None:
    """Replace each named ``nn.Linear`` with a ``FullFineTuneLinear`` that takes over its parameters."""
    replace_layers(model, names, FullFineTuneLinear)


FULL = Method(NoOptions, inject_full, find=instances_of(FullFineTuneLinear), layer=FullFineTuneLinear)
