"""``AdapterLayer``: a base class that gives a new method's layer every ``AdaptedLayer`` member it can.

A subclass says what its update is (``update()``: ``ΔW`` at the update scale 1, shaped
``(out_features, in_features)``) and registers its trainable tensors; the base class gives the rest:
the frozen ``base_layer`` (its ``weight`` and ``bias`` readable on the layer), ``in_features`` /
``out_features``, ``merged``, the update scale α
(``update_scale``, ``set_update_scale``), ``delta_weight() = α ΔW``, ``base_weight()`` (``W0``, merged or
not), ``rank_cap = min(d_out, d_in)``, ``spectral_factors()`` (the dense update: a method whose update has
a cheaper structure, such as a low-rank product, overrides it with ``kr_vlm.spectral``'s factors),
``merge()`` / ``unmerge()`` (add and take out ``α ΔW`` in float32), ``adapter_state_dict()`` (the layer's
parameters outside its base layer) and ``forward`` (``x W0ᵀ + b + x (α ΔW)ᵀ``, one extra matmul; override
it with something faster when the structure allows). ``nn.Linear`` and transformers' ``Conv1D`` both work
as base layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.adapters.layer import check_scale_settable, dense_weight, is_linear
from kr_vlm.spectral import DenseUpdate, UpdateFactors


class AdapterLayer(nn.Module):
    """A linear layer (``base``, frozen) plus a trainable update; subclasses define ``update()``.

    Args:
        base: the ``nn.Linear`` (or transformers ``Conv1D``) to adapt; kept as the submodule ``base_layer``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_linear(base):
            raise TypeError(
                f"{type(self).__name__} adapts torch.nn.Linear and transformers Conv1D layers only, got "
                f"{type(base).__name__}. Target the Linear submodules by name instead."
            )
        self.base_layer = base.requires_grad_(False)
        self.merged = False
        self.update_scale = 1.0

    def update(self) -> torch.Tensor:
        """``ΔW`` at the update scale α = 1, shaped ``(out_features, in_features)``, differentiable."""
        raise NotImplementedError(f"{type(self).__name__} must define update(), its ΔW at update scale 1.")

    @property
    def in_features(self) -> int:
        return dense_weight(self.base_layer).shape[1]

    @property
    def out_features(self) -> int:
        return dense_weight(self.base_layer).shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (without the update unless merged), for code that reads ``.weight``
        (open_clip reads a linear's weight dtype); stored as the base layer stores it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def rank_cap(self) -> int:
        """The highest rank the update can reach; ``min(d_out, d_in)`` unless the method says less."""
        return min(self.out_features, self.in_features)

    def set_update_scale(self, alpha: float) -> None:
        """Apply ``alpha`` times the trained update (``kr_vlm.adapters.AdaptedLayer``)."""
        self.update_scale = check_scale_settable(self, alpha)

    def delta_weight(self) -> torch.Tensor:
        """``α ΔW``: the update the layer adds to its base weight now."""
        update = self.update()
        return update if self.update_scale == 1 else self.update_scale * update

    def base_weight(self) -> torch.Tensor:
        """``W0`` shaped ``(out_features, in_features)``: the base layer's weight, less the update while merged."""
        weight = dense_weight(self.base_layer)
        return weight - self.delta_weight().to(weight.dtype) if self.merged else weight

    def spectral_factors(self) -> UpdateFactors:
        """The update for its singular values: here the dense ``α ΔW`` (``kr_vlm.spectral.DenseUpdate``)."""
        return DenseUpdate(self.delta_weight().detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.update_scale == 0:
            return out
        delta = self.delta_weight()
        return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``α ΔW`` into the base weight (summed in float32, then cast); nothing when already merged."""
        if not self.merged:
            self._add_to_base(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ``α ΔW`` out of the base weight again; nothing when not merged."""
        if self.merged:
            self._add_to_base(-1.0)
            self.merged = False

    def _add_to_base(self, sign: float) -> None:
        weight = dense_weight(self.base_layer)  # a Conv1D's transposed view writes into its (in, out) weight
        delta = self.delta_weight().to(torch.float32)
        weight.copy_(torch.add(weight.to(torch.float32), delta, alpha=sign).to(weight.dtype))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The layer's parameters and persistent buffers outside ``base_layer``: what trains and is saved."""
        return {
            name: tensor
            for name, tensor in self.state_dict(keep_vars=True).items()
            if not name.startswith("base_layer.")
        }
