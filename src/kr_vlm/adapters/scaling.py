"""Update scaling: apply α times every adapter's trained update, ``W0 + α ΔW``.

This is WiSE-FT's weight-space interpolation (Wortsman et al., CVPR 2022) between the base model
(α = 0) and the trained one (α = 1), done in adapter space, where the update is already apart from the
base weights: nothing is copied and nothing is reloaded. α = 0 gives exactly the base model's outputs and
α = 1 exactly the trained model's; α above 1 extrapolates. Every method answers it through
``AdaptedLayer.set_update_scale`` (full fine-tuning interpolates its weights, ``W0 + α (W - W0)``).

α is evaluation state: ``delta_weight()``, merging (``merge_adapters``, ``merge_and_unload``,
``merged_state_dict``) and the merged export include it, but ``save_adapters`` always writes the trained
tensors, never scaled ones. A layer's α cannot change while it is merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from kr_vlm.adapters.inject import adapted_layers, truncated_list
from kr_vlm.adapters.layer import AdaptedLayer


def _scalable_layers(model: nn.Module, what: str) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` by name (every one can scale: ``register_method`` and
    ``inject_adapters`` check ``set_update_scale``); a model without any is an error that says so."""
    layers = dict(adapted_layers(model))
    if not layers:
        raise ValueError(
            f"{what}: the model holds no adapters to scale (inject_adapters or load_adapters first)."
        )
    return layers


def set_adapter_scale(model: nn.Module, alpha: float) -> None:
    """Make every adapted layer of ``model`` apply ``alpha`` times its trained update (``W0 + α ΔW``).

    ``alpha`` is a finite number: 0 is the base model, 1 the trained one (the default of every layer).
    Raises if the model holds no adapters, or if a layer is merged (unmerge first: a merged weight holds
    the update at the old scale); nothing is changed then.
    """
    layers = _scalable_layers(model, "set_adapter_scale")
    merged = [name for name, layer in layers.items() if layer.merged and layer.update_scale != alpha]
    if merged:
        raise RuntimeError(
            f"set_adapter_scale({alpha}) needs unmerged adapters, but {truncated_list(merged)} are merged at another "
            "scale. Call kr_vlm.adapters.unmerge_adapters(model) first."
        )
    for layer in layers.values():
        layer.set_update_scale(alpha)


@contextlib.contextmanager
def scaled_adapters(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """Apply ``alpha`` times every trained update for the length of a ``with`` block; each layer's scale
    is put back on exit (also after an error).

    ``with scaled_adapters(model, 0.5): halfway = model(x)`` gives the outputs of ``W0 + ΔW / 2``.
    """
    layers = _scalable_layers(model, "scaled_adapters")
    before = {name: layer.update_scale for name, layer in layers.items()}
    set_adapter_scale(model, alpha)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.set_update_scale(before[name])
