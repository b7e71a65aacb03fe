"""An adapted model as a plain one: every adapted layer swapped for the plain layer it wraps.

``merge_and_unload`` (updates merged in) and ``unload`` (updates dropped) do it for good, so
``save_pretrained`` / ``torch.save(model.state_dict())`` write a stock model; ``merged_state_dict`` takes
the weights of the merged model and puts the adapters back; ``disabled_adapters`` runs the base model for
the length of a ``with`` block. The plain layer of an adapted layer is its ``base_layer``; a layer that is
its own base layer (full fine-tuning, whose trained weights are the layer's own) becomes a plain
``nn.Linear`` holding them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kr_vlm.adapters.inject import CONFIG_ATTRIBUTE, adapted_layers, check_mergeable, truncated_list
from kr_vlm.adapters.layer import AdaptedLayer


def _plain_layer(layer: AdaptedLayer, module: nn.Module) -> nn.Module:
    """The plain layer that ``layer`` (the module ``module`` of the model) wraps, without its adapter."""
    if layer.base_layer is not module:
        return layer.base_layer
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight, plain.bias = module.weight, module.bias
    return plain.train(module.training)


def _separate_layers(model: nn.Module, what: str) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model``, by name, each with an update apart from its base layer that
    ``what`` (the caller) can drop; a layer that trains its own weights is an error naming it."""
    layers = dict(adapted_layers(model))
    own = [name for name, layer in layers.items() if layer.base_layer is model.get_submodule(name)]
    if own:
        raise ValueError(
            f"{what} needs adapters apart from the base weights, but {truncated_list(own)} train their own "
            "weights (method 'full'): there is no base layer to go back to. merge_and_unload gives the plain model."
        )
    return layers


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each of ``modules`` (by name) into ``model``; return the modules they replaced."""
    replaced = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        model.set_submodule(name, module)
    return replaced


def _merged_plain_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Merge every adapter (after ``check_mergeable``) and return the plain layers, by name."""
    layers = dict(adapted_layers(model))
    to_merge = {name: layer for name, layer in layers.items() if not layer.merged}
    check_mergeable(model, to_merge)
    for layer in to_merge.values():
        layer.merge()
    return {name: _plain_layer(layer, model.get_submodule(name)) for name, layer in layers.items()}


def _forget_config(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, CONFIG_ATTRIBUTE):
            delattr(module, CONFIG_ATTRIBUTE)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter (at its update scale α: ``W0 + α ΔW``) into its base weight and replace every
    adapted layer by its plain layer (``nn.Linear`` or ``Conv1D``), in place; returns ``model``, now a
    model without adapters.

    A layer whose base weight another module shares (tied embeddings) is refused before anything changes
    (``kr_vlm.adapters.inject.check_mergeable``).
    """
    _swap(model, _merged_plain_layers(model))
    _forget_config(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter: replace every adapted layer by its base layer (merged updates taken out
    first), in place; returns ``model``, the base model again."""
    layers = _separate_layers(model, "unload")
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    _swap(model, {name: layer.base_layer for name, layer in layers.items()})
    _forget_config(model)
    return model


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model for the length of a ``with`` block: every adapted layer is swapped for its
    base layer and put back on exit (also after an error). The adapters must be unmerged.

    ``with disabled_adapters(model): reference = model(x)`` gives the outputs of the model without adapters.
    """
    layers = _separate_layers(model, "disabled_adapters")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"disabled_adapters needs unmerged adapters, but {truncated_list(merged)} are merged into their base "
            "weights. Call kr_vlm.adapters.unmerge_adapters(model) first."
        )
    adapted = _swap(model, {name: layer.base_layer for name, layer in layers.items()})
    try:
        yield model
    finally:
        _swap(model, adapted)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy (on the CPU) of the state dict ``merge_and_unload(model)`` would leave (updates at their
    update scale α merged in), with ``model`` left exactly as it was.

    The adapter tensors and wrapper names (``base_layer``, ``kr_u``, ``lora_A``, ...) are dropped, so the
    result loads into the model as it was before ``inject_adapters``. Layers merged here are unmerged
    afterwards and their base weights restored from a copy, so no rounding drift is left.
    """
    layers = dict(adapted_layers(model))
    to_merge = [name for name, layer in layers.items() if not layer.merged]
    originals = {
        name: {key: tensor.detach().clone() for key, tensor in layers[name].base_layer.state_dict().items()}
        for name in to_merge
    }
    plain = _merged_plain_layers(model)
    adapted = _swap(model, plain)
    try:
        return {key: tensor.detach().to("cpu", copy=True) for key, tensor in model.state_dict().items()}
    finally:
        _swap(model, adapted)
        for name in to_merge:
            layers[name].unmerge()
            layers[name].base_layer.load_state_dict(originals[name])
