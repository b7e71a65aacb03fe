"""What every adapter method provides: layers that answer ``AdaptedLayer``, and a ``Method`` record.

A ``Method`` is the whole of one adapter method as the library sees it: the dataclass of its options,
the function that adapts the named ``nn.Linear`` layers of a model, and the function that recognises its
layers in a model again (returning them as ``AdaptedLayer``). ``kr_vlm.adapters.methods.REGISTRY`` maps
method names to them (``kr_vlm.adapters.register_method`` adds one, checked); everything else in the library (injection, merging, saving, counting) loops over
that registry and the protocol, and knows no method by name.

Adapters go on linear layers: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's linears, whose weight
is stored ``(in_features, out_features)``); ``is_conv1d`` and ``dense_weight`` tell them apart without
importing transformers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kr_vlm.spectral import UpdateFactors


@runtime_checkable
class AdaptedLayer(Protocol):
    """An adapted linear layer (``nn.Linear`` or ``Conv1D``), whichever method adapted it.

    ``base_layer`` is the original layer (frozen; for full fine-tuning the layer itself), ``merged`` says
    whether the update is folded into its weight. ``delta_weight()`` is the dense
    ``(out_features, in_features)`` update the layer adds to the base weight, scaling included, and
    ``base_weight()`` that weight, ``W0``, without the update (merged or not). ``rank_cap`` is the highest
    rank the method's update can reach on this layer (LoRA's ``r``, KRAdapter's ``min(d_out, d_in)``), which
    the rank monitor and its reports compare the effective rank with. ``spectral_factors()`` describes the
    update by the factors it is built from (a ``kr_vlm.spectral.UpdateFactors``: ``LowRankFactors``,
    ``KhatriRaoFactors``, ``KroneckerFactors``), so its singular values come through the method's exact
    shortcut without the dense matrix; an update without such a structure is its own single factor,
    ``DenseUpdate(delta_weight())`` (full fine-tuning, DoRA, ``kr_vlm.adapters.AdapterLayer``'s default). ``adapter_state_dict()`` is exactly
    the adapter: the tensors that are trained, saved and counted,
    named relative to the layer (``kr_u``, ``lora_A.default.weight``, ...).

    ``update_scale`` is α, the share of the trained update the layer applies: it computes ``W0 + α·ΔW``
    (WiSE-FT's interpolation between the base and the trained weights, in adapter space), with α = 0 exactly
    the base layer and α = 1 (the default) exactly the trained one. ``set_update_scale(alpha)`` sets it;
    ``delta_weight()``, ``spectral_factors()`` and ``merge()`` include it, ``adapter_state_dict()`` never
    (α is evaluation state: saved adapters hold the trained tensors). Setting it while merged is refused
    (``check_scale_settable``).
    """

    merged: bool

    @property
    def update_scale(self) -> float: ...

    def set_update_scale(self, alpha: float) -> None: ...

    @property
    def base_layer(self) -> nn.Module: ...

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    @property
    def rank_cap(self) -> int: ...

    def delta_weight(self) -> torch.Tensor: ...

    def base_weight(self) -> torch.Tensor: ...

    def spectral_factors(self) -> UpdateFactors: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...

    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...


def check_scale_settable(layer: AdaptedLayer, alpha: float) -> float:
    """``alpha`` as a float, for ``layer.set_update_scale``: a finite number, set while the update is not
    merged (a merged weight holds the update at the old scale, which unmerging must take out again)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"An update scale must be a finite number, got {alpha!r}.")
    alpha = float(alpha)
    if layer.merged and alpha != layer.update_scale:
        raise RuntimeError(
            f"Cannot change the update scale of a merged {type(layer).__name__} (from {layer.update_scale} to "
            f"{alpha}): its base weight holds the update at the old scale. Call "
            "kr_vlm.adapters.unmerge_adapters(model) first, set the scale, then merge again."
        )
    return alpha


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        options: a dataclass whose fields are the method's options (their types and defaults);
            ``AdapterConfig`` checks option names against it and the Hydra configs use it as their schema.
        inject: ``inject(model, names, options)`` adapts the linear layers of ``model`` named ``names``
            (full module names, already checked to be linears: ``nn.Linear``, and ``Conv1D`` where
            ``adapts_conv1d``) in place, with an instance of ``options``. Freezing the rest of the model is
            not its job; an error half-way is (``inject_adapters`` puts the model back as it was).
        find: ``find(module)`` returns ``module`` seen as one of this method's layers (an
            ``AdaptedLayer``), or None when it is not one.
        unavailable_options: option names that users of the underlying library might expect, each with
            the reason this method does not take it (said when they are given).
        adapts_layers: False for a method that only freezes (``none``): it needs no targets.
        adapts_conv1d: whether its layers also adapt transformers' ``Conv1D``.
        file_format: how ``save_adapters`` writes and ``load_adapters`` reads this method's folders when
            it is not kr_vlm's own format (peft's methods are saved in peft's, ``PeftFileFormat``).
        layer: the class of the method's layers (``register_method`` checks it against ``AdaptedLayer``);
            None for a method that adapts nothing.

    Register a method with ``kr_vlm.adapters.register_method``, which builds this record after checking it.
    """

    options: type
    inject: Callable[[nn.Module, Sequence[str], Any], None]
    find: Callable[[nn.Module], AdaptedLayer | None]
    unavailable_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    adapts_layers: bool = True
    adapts_conv1d: bool = False
    file_format: Any = None
    layer: type | None = None


def replace_layers(model: nn.Module, names: Sequence[str], build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each named submodule of ``model`` with ``build(submodule)``."""
    for name in names:
        model.set_submodule(name, build(model.get_submodule(name)))


def instances_of(layer_class: type) -> Callable[[nn.Module], AdaptedLayer | None]:
    """A ``Method.find`` for a method whose layers are modules of ``layer_class`` answering ``AdaptedLayer``."""

    def find(module: nn.Module) -> AdaptedLayer | None:
        return module if isinstance(module, layer_class) else None

    return find


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear layers: ``y = x W + b`` with ``W`` of shape
    ``(in_features, out_features)``)."""
    # A model holding a Conv1D has imported transformers.pytorch_utils; until then none exists, and
    # transformers (seconds to import) stays unimported.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for the layers adapters go on: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a linear layer shaped ``(out_features, in_features)``: ``nn.Linear``'s own weight, the
    transposed view of a ``Conv1D``'s (no copy; writing into it writes into the layer)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def shared_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """For each module named in ``names`` whose parameters are also registered elsewhere in ``model``
    (tied weights, e.g. an ``lm_head`` that is the input embedding), the names of those other places
    (``"model.embed_tokens.weight"``). Modules that share nothing are left out."""
    places: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        places.setdefault(id(parameter), []).append(name)
    shared: dict[str, list[str]] = {}
    for name in names:
        prefix = f"{name}." if name else ""
        others = {
            place
            for parameter in model.get_submodule(name).parameters()
            for place in places[id(parameter)]
            if not place.startswith(prefix)
        }
        if others:
            shared[name] = sorted(others)
    return shared


def describe_shared(shared: Mapping[str, Sequence[str]]) -> str:
    """``shared_parameters``' answer in words: ``"lm_head shares its weight with model.embed_tokens.weight"``."""
    return "; ".join(f"{name} shares its weight with {', '.join(others)}" for name, others in shared.items())
