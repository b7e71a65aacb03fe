"""Put adapters on the ``nn.Linear`` layers of any ``nn.Module``, find them again, merge and count them.

Works on any module tree (open_clip, Hugging Face transformers, your own): layers are chosen by name only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from torch import nn

from kr_vlm.adapters.config import AdapterConfig
from kr_vlm.adapters.layer import AdaptedLayer
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError

# The attribute inject_adapters sets on the model it injected into; save_adapters writes this config.
CONFIG_ATTRIBUTE = "kr_vlm_adapter_config"

# How many names an error message lists before it cuts the list short.
MAX_NAMES_IN_ERROR = 25


def _matches(name: str, target_modules: list[str] | str | Mapping[str, object]) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list entry matches the name
    itself or a dotted suffix of it (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``). The keys
    of a mapping (full names with their labels) match exactly: ``transformer.resblocks.0.attn.q_proj`` is
    not also ``visual.transformer.resblocks.0.attn.q_proj``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if isinstance(target_modules, Mapping):
        return name in target_modules
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def truncated_list(names: list[str]) -> str:
    """``"a, b, c ... and 7 more"``: names for an error message, at most ``MAX_NAMES_IN_ERROR`` of them."""
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    hidden = len(names) - MAX_NAMES_IN_ERROR
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def _no_match_message(model: nn.Module, target_modules: list[str] | str) -> str:
    names = _linear_names(model)
    if not names:
        return f"No module matches target_modules={target_modules!r}, and the model has no nn.Linear layer at all."
    endings = sorted({name.rsplit(".", 1)[-1] for name in names})
    return (
        f"No module matches target_modules={target_modules!r}. The model's {len(names)} nn.Linear layers end in: "
        f"{truncated_list(endings)}. Their names: {truncated_list(names)}."
    )


def find_target_linears(
    model: nn.Module, target_modules: list[str] | str | Mapping[str, object]
) -> list[str]:
    """Names (in module order) of the ``nn.Linear`` layers that ``target_modules`` selects.

    Raises if nothing matches (the message lists the model's linear layers), if a matching module is not an
    ``nn.Linear``, or if a matching linear is the ``out_proj`` of ``nn.MultiheadAttention`` (which reads
    ``out_proj.weight`` directly and never calls the module, so an adapter there would be silently ignored).
    """
    matched, not_linear, inside_attention = [], [], []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _matches(name, target_modules):
                continue
            if not isinstance(child, nn.Linear):
                not_linear.append(f"{name} ({type(child).__name__})")
            elif isinstance(parent, nn.MultiheadAttention):
                inside_attention.append(name)
            else:
                matched.append(name)
    if not_linear:
        raise ConfigError(
            f"target_modules={target_modules!r} matches modules that are not nn.Linear: {', '.join(not_linear)}. "
            "Adapters go on nn.Linear layers only; name the Linear layers inside these modules instead."
        )
    if inside_attention:
        raise ConfigError(
            f"target_modules={target_modules!r} matches the out_proj of torch.nn.MultiheadAttention: "
            f"{', '.join(inside_attention)}. MultiheadAttention uses out_proj.weight directly, so an adapter "
            "there would be ignored. Replace the attention with one that calls separate q/k/v/out nn.Linear "
            "layers first (for open_clip models: kr_vlm.models.convert_attention)."
        )
    if not matched:
        raise ConfigError(_no_match_message(model, target_modules))
    return matched


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze ``model``, then put ``cfg.method``'s adapter on every ``nn.Linear`` that ``cfg.target_modules``
    selects; only the adapter tensors train. Returns the same (modified) model.

    ``kradapter`` replaces each layer with ``KRAdapterLinear``, ``full`` with ``FullFineTuneLinear`` (the
    layer's own weight and bias train), the peft methods with peft's layers; ``none`` only freezes (see
    ``kr_vlm.adapters.methods.REGISTRY``). The config is recorded as ``model.kr_vlm_adapter_config`` for
    ``save_adapters``. Injecting into a model that already holds adapters is an error.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"inject_adapters needs an AdapterConfig, got {type(cfg).__name__}.")
    existing = [
        name or "<model>" for name, module in model.named_modules() if hasattr(module, CONFIG_ATTRIBUTE)
    ]
    existing += [name for name, _ in adapted_layers(model)]
    if existing:
        raise RuntimeError(
            f"The model already holds adapters ({', '.join(existing[:5])}{' ...' if len(existing) > 5 else ''}); "
            "injecting twice is not supported. Start again from a model without adapters."
        )
    method = REGISTRY[cfg.method]
    model.requires_grad_(False)
    if method.adapts_layers:
        method.inject(model, find_target_linears(model, cfg.target_modules), cfg.method_options())
    setattr(model, CONFIG_ATTRIBUTE, cfg)
    return model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Yield ``(name, layer)`` for every adapted layer, in module order.

    Every layer answers ``kr_vlm.adapters.layer.AdaptedLayer``: ``delta_weight()`` (the dense
    ``(out_features, in_features)`` update it adds to its base weight, scaling included), ``merge()``,
    ``unmerge()``, ``merged``, ``base_layer``, ``base_weight()`` (``W0``), ``rank_cap`` (the highest rank
    its update can reach), ``in_features``, ``out_features`` and ``adapter_state_dict()``. KRAdapter and
    full fine-tuning layers are yielded as they are; a peft layer is yielded as a ``PeftLayerView`` whose
    ``.module`` is the peft layer.
    """
    # Methods that share their kind of layer (peft's six) share one finder.
    finders = list(dict.fromkeys(method.find for method in REGISTRY.values()))
    for name, module in model.named_modules():
        for find in finders:
            layer = find(module)
            if layer is not None:
                yield name, layer
                break


def merge_adapters(model: nn.Module) -> None:
    """Add every adapter's update into its base weight (layers already merged are left alone)."""
    for _, layer in adapted_layers(model):
        if not layer.merged:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter's update out of its base weight again."""
    for _, layer in adapted_layers(model):
        if layer.merged:
            layer.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter entries; shared parameters count once.

    Buffers (e.g. the frozen random projections of VeRA and RandLoRA) are not parameters and are not counted.
    """
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total
