"""Full fine-tuning of chosen layers, behind the same interface as the adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kr_vlm.adapters.layer import Method, NoOptions, instances_of, replace_layers


class FullFineTuneLinear(nn.Linear):
    """An ``nn.Linear`` whose own weight and bias train, and that reports how far its weight has moved.

    It takes over the wrapped layer's parameters (no copy), so the state-dict names stay ``<name>.weight``
    and ``<name>.bias`` and a saved update loads into an unmodified model too. A frozen copy of the initial
    weight (non-persistent buffer ``initial_weight``) gives ``delta_weight() = weight - initial_weight``.
    The update is always in the weight, so ``merge`` / ``unmerge`` change no weight; they only flip ``merged``.
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
        self.merged = False

    @property
    def base_layer(self) -> FullFineTuneLinear:
        """The layer itself: its own weight is both the original and the trained one."""
        return self

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The layer's own ``weight`` and ``bias`` (the ``initial_weight`` buffer is not part of it)."""
        return dict(self.named_parameters())

    def delta_weight(self) -> torch.Tensor:
        """``weight - initial_weight``, shaped ``(out_features, in_features)``, differentiable."""
        return self.weight - self.initial_weight

    @property
    def rank_cap(self) -> int:
        """The highest rank the update can reach: ``min(d_out, d_in)``."""
        return min(self.out_features, self.in_features)

    def base_weight(self) -> torch.Tensor:
        """``W0``, the weight before training (``initial_weight``)."""
        return self.initial_weight

    def merge(self) -> None:
        """Nothing to add: the update already lives in the weight."""
        self.merged = True

    def unmerge(self) -> None:
        """Nothing to take out: full fine-tuning has no separate base weight to return to."""
        self.merged = False


def inject_full(model: nn.Module, names: Sequence[str], options: NoOptions) -> None:
    """Replace each named ``nn.Linear`` with a ``FullFineTuneLinear`` that takes over its parameters."""
    replace_layers(model, names, FullFineTuneLinear)


FULL = Method(NoOptions, inject_full, find=instances_of(FullFineTuneLinear))
