"""Put adapters on the linear layers of any ``nn.Module``, find them again, merge and count them.

Works on any module tree (open_clip, Hugging Face transformers, your own): layers are chosen by name, or
all of them (``"all-linear"``). Linear layers are ``nn.Linear`` and transformers' ``Conv1D``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from kr_vlm.adapters.calls import ForwardCheck, refuse_bypassed, refuse_uncalled
from kr_vlm.adapters.config import ALL_LINEAR, AdapterConfig
from kr_vlm.adapters.layer import AdaptedLayer, describe_shared, is_conv1d, is_linear, shared_parameters
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.adapters.registry import check_adapted_layers
from kr_vlm.errors import ConfigError, KrVlmError

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
    return [name for name, module in model.named_modules() if is_linear(module)]


def truncated_list(names: list[str]) -> str:
    """``"a, b, c ... and 7 more"``: names for an error message, at most ``MAX_NAMES_IN_ERROR`` of them."""
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    hidden = len(names) - MAX_NAMES_IN_ERROR
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def _no_match_message(model: nn.Module, target_modules: list[str] | str) -> str:
    names = _linear_names(model)
    if not names:
        return (
            f"No module matches target_modules={target_modules!r}, and the model has no nn.Linear (or Conv1D) "
            "layer at all."
        )
    endings = sorted({name.rsplit(".", 1)[-1] for name in names})
    return (
        f"No module matches target_modules={target_modules!r}. The model's {len(names)} nn.Linear layers "
        f"(Conv1D included) end in: {truncated_list(endings)}. Their names: {truncated_list(names)}."
    )


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output head of a Hugging Face model (``get_output_embeddings()``: ``lm_head``), or None."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    return get_output_embeddings() if callable(get_output_embeddings) else None


def _all_linear_names(model: nn.Module) -> list[str]:
    """peft's ``"all-linear"``: every linear layer but the output head (a Hugging Face model's
    ``get_output_embeddings()``), and but the linears inside ``nn.MultiheadAttention``, which it never calls."""
    head = _output_head(model)
    attention = [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module)
        and module is not head
        and not any(name.startswith(f"{parent}.") for parent in attention)
    ]


def find_target_linears(
    model: nn.Module, target_modules: list[str] | str | Mapping[str, object]
) -> list[str]:
    """Names (in module order) of the linear layers (``nn.Linear`` or transformers' ``Conv1D``) that
    ``target_modules`` selects; ``"all-linear"`` selects every linear but the output head.

    Raises if nothing matches (the message lists the model's linear layers), if a matching module is not a
    linear layer, or if a matching linear is the ``out_proj`` of ``nn.MultiheadAttention`` (which reads
    ``out_proj.weight`` directly and never calls the module, so an adapter there would be silently ignored).
    """
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        names = _all_linear_names(model)
        if not names:
            raise ConfigError(_no_match_message(model, target_modules))
        return names
    matched, not_linear, inside_attention = [], [], []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _matches(name, target_modules):
                continue
            if not is_linear(child):
                not_linear.append(f"{name} ({type(child).__name__})")
            elif isinstance(parent, nn.MultiheadAttention):
                inside_attention.append(name)
            else:
                matched.append(name)
    if not_linear:
        raise ConfigError(
            f"target_modules={target_modules!r} matches modules that are not nn.Linear: {', '.join(not_linear)}. "
            "Adapters go on nn.Linear layers (and transformers Conv1D) only; name the linear layers inside these "
            "modules instead."
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


def _check_conv1d(model: nn.Module, method: str, names: Sequence[str]) -> None:
    conv1d = [name for name in names if is_conv1d(model.get_submodule(name))]
    if conv1d and not REGISTRY[method].adapts_conv1d:
        able = ", ".join(name for name, spec in REGISTRY.items() if spec.adapts_conv1d)
        raise ConfigError(
            f"Method {method!r} adapts nn.Linear layers only, but these targets are transformers Conv1D layers "
            f"(GPT-2 style, weight stored (in, out)): {truncated_list(conv1d)}. Methods that adapt Conv1D: {able}."
        )


@contextlib.contextmanager
def _restored_on_error(model: nn.Module) -> Iterator[None]:
    """Put ``model`` back as it was (its submodules, requires_grad flags and attributes) if the block fails."""
    children = {module: dict(module.named_children()) for module in model.modules()}
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    attributes = set(vars(model))
    try:
        yield
    except BaseException:
        for module, kept in children.items():
            for name in [name for name, _ in module.named_children() if name not in kept]:
                delattr(module, name)
            for name, child in kept.items():
                setattr(module, name, child)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        for name in set(vars(model)) - attributes:  # e.g. the peft_config peft's injection sets
            delattr(model, name)
        raise


def _check_injected(model: nn.Module, method: str, names: Sequence[str]) -> None:
    """Refuse the layers ``method`` put at ``names`` that its ``find`` does not see as its own, or that do not
    answer ``AdaptedLayer`` (a ``ConfigError`` naming the method, the layer and what it lacks)."""
    find = REGISTRY[method].find
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        try:
            layer = find(module)
        except KrVlmError as error:
            raise ConfigError(f"Method {method!r} cannot adapt {name}: {error}") from error
        if layer is None:
            raise ConfigError(
                f"Method {method!r} left {name} as a {type(module).__name__}, which its find() does not see as "
                "one of its layers: its inject() must replace every named layer with one of its layers."
            )
        layers[name] = layer
    check_adapted_layers(method, layers)


def inject_adapters(
    model: nn.Module, cfg: AdapterConfig, forward_check: ForwardCheck | None = None
) -> nn.Module:
    """Freeze ``model``, then put ``cfg.method``'s adapter on every linear layer that ``cfg.target_modules``
    selects; only the adapter tensors train. Returns the same (modified) model.

    No silent adapters: a target whose parent module reads its weight in ``forward`` and never calls it
    (``F.linear(x, self.qkv.weight)``) is refused before anything changes; and when ``forward_check`` is
    given (a callable that runs one forward of ``model`` on an example input, e.g. one tiny batch), every
    injected adapter must be called by it, or the injection is refused, naming the layers and why.

    All or nothing: if anything fails (a bad option for one layer, a refused layer half-way through the
    list, an adapter the forward check does not call), the model is left exactly as it was, its layers
    and requires_grad flags included.

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
    with _restored_on_error(model):
        model.requires_grad_(False)
        if method.adapts_layers:
            names = find_target_linears(model, cfg.target_modules)
            _check_conv1d(model, cfg.method, names)
            refuse_bypassed(model, names, checked_by_forward=forward_check is not None)
            modes = {name: model.get_submodule(name).training for name in names}
            method.inject(model, names, cfg.method_options())
            _check_injected(model, cfg.method, names)
            for name, training in modes.items():  # new layers start in training mode; an eval model stays in eval
                model.get_submodule(name).train(training)
            if forward_check is not None:
                refuse_uncalled(model, names, forward_check)
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


def check_mergeable(model: nn.Module, layers: Mapping[str, AdaptedLayer]) -> None:
    """Refuse to merge ``layers`` (by name in ``model``) whose base weights another module shares (tied
    embeddings): merging would change that module too. A layer that is its own base layer (full
    fine-tuning) merges nothing and is never refused."""
    separate = [name for name, layer in layers.items() if layer.base_layer is not model.get_submodule(name)]
    shared = shared_parameters(model, separate)
    if shared:
        tied = describe_shared(shared)
        raise RuntimeError(
            f"Cannot merge adapters into weights that other modules share: {tied}. Merging would change those "
            "modules too, so these updates stay unmerged (keep the adapters for inference, or untie the weights "
            "before injecting)."
        )


def merge_adapters(model: nn.Module) -> None:
    """Add every adapter's update, at its update scale α (``delta_weight()``), into its base weight
    (layers already merged are left alone).

    Nothing is merged if a layer's base weight is shared with another module (``check_mergeable``).
    """
    to_merge = {name: layer for name, layer in adapted_layers(model) if not layer.merged}
    check_mergeable(model, to_merge)
    for layer in to_merge.values():
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


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable and total parameter counts as peft's ``print_trainable_parameters`` does."""
    trainable, total = count_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
