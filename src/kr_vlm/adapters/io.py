"""Save and load adapters: ``adapter_config.json`` plus ``adapter_model.safetensors`` (adapter tensors only).

peft's own methods (lora, dora, vera, lokr, loha, randlora) are saved in peft's format, so peft
(``PeftModel.from_pretrained(model, folder)``) and transformers (``model.load_adapter(folder)``) read them:
``adapter_config.json`` is peft's config (``peft_type``, ``r``, ...), the tensors are keyed as
``peft.get_peft_model_state_dict`` writes them for a ``PeftModel`` (``base_model.model.<layer>.lora_A.weight``,
``base_model.vera_A``; ``kr_vlm.adapters.methods.peft.PeftFileFormat``), and kr_vlm's own config (the
method, the targets with their labels, the options) goes to ``kr_vlm_adapter_config.json`` beside them.
``load_adapters`` also reads folders that peft wrote (no kr_vlm file: the config is rebuilt from peft's).

kr_vlm's methods (kradapter, full) keep kr_vlm's format: ``adapter_config.json`` holds the
``AdapterConfig`` (``to_dict()``: ``method``, ``target_modules`` with their labels, ``options``), a
``format_version`` and a ``peft_type`` that tells peft, which cannot load them, what they are. The tensors
are keyed by the model's own ``state_dict`` names:

- ``kradapter``: ``<layer>.kr_u``, ``<layer>.kr_v``;
- ``full``: ``<layer>.weight`` and ``<layer>.bias``.

That is each layer's ``adapter_state_dict()`` (``kr_vlm.adapters.layer.AdaptedLayer``) under the layer's
name. Folders of format version 1 (kr_vlm's format for every method, peft's included, e.g.
``<layer>.lora_A.default.weight``) still load. VeRA's and RandLoRA's frozen random projections are one
tensor shared by all layers and are saved once: peft can regenerate them from ``projection_prng_key``,
but the result depends on the platform (peft warns so; RandLoRA even draws them in bfloat16 or float16
depending on the hardware), so saving them makes loading exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

import kr_vlm
from kr_vlm.adapters.config import AdapterConfig
from kr_vlm.adapters.inject import (
    CONFIG_ATTRIBUTE,
    _restored_on_error,
    adapted_layers,
    inject_adapters,
    truncated_list,
)
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError, CorruptFileError, MissingFileError
from kr_vlm.files import write_file_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# kr_vlm's config of a folder in peft's format.
KR_VLM_CONFIG_FILE = "kr_vlm_adapter_config.json"
FORMAT_VERSION = 2
# 1: every method in kr_vlm's format, no peft_type; 2: peft's methods in peft's format.
READABLE_VERSIONS = (1, 2)
# What to do about a saved file that cannot be read.
RECOPY_HINT = "Copy it again from the run that saved it, or save the adapters again (save_adapters)."


def peft_type_marker(method: str) -> str:
    """The ``peft_type`` of a folder in kr_vlm's format: peft looks it up among its methods and fails with
    a KeyError that shows this text."""
    return (
        f"{method} adapter saved by kr_vlm, not a peft method: load it with "
        "kr_vlm.adapters.load_adapters(model, folder)"
    )


class AdapterMismatchError(ConfigError):
    """Saved adapters (files, a checkpoint) that do not fit the adapters of the model they are loaded into."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (detached, sharing memory with the model), keyed by state-dict name.

    See the module docstring for the names per method. A tensor shared by several layers (VeRA's and
    RandLoRA's random projections) appears once, under the first layer's name.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for layer_name, layer in adapted_layers(model):
        for name, tensor in layer.adapter_state_dict().items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            tensors[f"{layer_name}.{name}" if layer_name else name] = tensor.detach()
    return tensors


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps ``given`` from loading strictly into tensors shaped like ``expected``: the missing, the
    unexpected and the mis-shaped names, one phrase each (an empty list when it fits)."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    mismatched = [
        f"{name} (given {tuple(given[name].shape)}, model has {tuple(tensor.shape)})"
        for name, tensor in expected.items()
        if name in given and tuple(given[name].shape) != tuple(tensor.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {truncated_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {truncated_list(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with a different shape: {truncated_list(mismatched)}")
    return problems


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` into ``model``'s adapter tensors, strictly.

    Every adapter tensor of the model must be given, with the same shape, and nothing else: otherwise an
    ``AdapterMismatchError`` (a ``ValueError``) names the missing, unexpected and mis-shaped tensors and
    nothing is loaded. Values are cast to the model tensors' dtype and device.
    """
    merged = [name for name, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"Cannot load adapter weights into merged layers ({truncated_list(merged)}): their base weights hold the "
            "old update. Call kr_vlm.adapters.unmerge_adapters(model) first."
        )
    expected = adapter_state_dict(model)
    problems = state_dict_mismatches(expected, state_dict)
    if problems:
        raise AdapterMismatchError(
            "The adapter weights do not fit the model's adapters; " + "; ".join(problems) + ". "
            "Were they saved from a model with the same architecture and adapter config?"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state_dict[name])


def _injected_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the module inside ``model`` that ``inject_adapters`` recorded its config on."""
    found = [(name, module) for name, module in model.named_modules() if hasattr(module, CONFIG_ATTRIBUTE)]
    if len(found) > 1:
        names = ", ".join(name or "<model>" for name, _ in found)
        raise ValueError(f"Several modules hold adapter configs ({names}); pass the one to save or load.")
    return found[0] if found else None


def _safetensors_ready(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors on one storage (safetensors refuses shared memory)."""
    ready: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        ready[name] = tensor
    return ready


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapters in ``model`` to ``directory``: peft's format for peft's methods, kr_vlm's for
    kradapter and full (see the module docstring). Returns the directory.

    ``model`` is the module given to ``inject_adapters`` or any module that contains it (e.g. a classifier
    wrapping it); names are relative to the injected module, so ``load_adapters`` takes that module's kind
    (e.g. a freshly built base model). The tensors written are the trained ones whatever the update scale
    α (``set_adapter_scale``): α is evaluation state and is never saved, so loaded adapters start at α = 1.
    """
    found = _injected_module(model)
    if found is None:
        raise ValueError("The model holds no adapters from kr_vlm.adapters.inject_adapters; nothing to save.")
    _, injected = found
    config: AdapterConfig = getattr(injected, CONFIG_ATTRIBUTE)
    directory = Path(directory)
    kr_vlm_config = {
        "format_version": FORMAT_VERSION,
        "kr_vlm_version": kr_vlm.__version__,
        **config.to_dict(),
    }
    file_format = REGISTRY[config.method].file_format
    if file_format is None:
        weights = adapter_state_dict(injected)
        files = {CONFIG_FILE: _json_bytes({"peft_type": peft_type_marker(config.method), **kr_vlm_config})}
    else:
        layers = dict(adapted_layers(injected))
        weights = file_format.checkpoint(layers)
        peft_config = file_format.config(
            config.method, config.method_options(), layers, getattr(injected, "name_or_path", None)
        )
        files = {KR_VLM_CONFIG_FILE: _json_bytes(kr_vlm_config), CONFIG_FILE: _json_bytes(peft_config)}
    data = save(_safetensors_ready(weights), metadata={"format": "pt"})
    # Each file is written whole or not at all (a temporary file in the folder, then a rename), the weights
    # first and adapter_config.json last; a failed write raises kr_vlm.files.FileWriteError naming the file.
    write_file_atomic(directory / WEIGHTS_FILE, lambda handle: handle.write(data))
    if KR_VLM_CONFIG_FILE not in files:  # a peft-format folder saved here before: its kr_vlm file is stale
        (directory / KR_VLM_CONFIG_FILE).unlink(missing_ok=True)
    for name, text in files.items():
        write_file_atomic(directory / name, lambda handle, text=text: handle.write(text))
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}). {RECOPY_HINT}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(
            f"{path} holds a JSON {type(data).__name__}, not an adapter config. {RECOPY_HINT}"
        )
    return data


def _kr_vlm_config(data: dict[str, Any], path: Path) -> AdapterConfig:
    """The ``AdapterConfig`` of a kr_vlm config file's contents (``adapter_config.json`` of kr_vlm's format,
    or ``kr_vlm_adapter_config.json``)."""
    version = data.pop("format_version", None)
    if version not in READABLE_VERSIONS:
        raise CorruptFileError(
            f"{path} has adapter format version {version!r}; this kr_vlm ({kr_vlm.__version__}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}."
        )
    data.pop("kr_vlm_version", None)
    data.pop("peft_type", None)
    try:
        return AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CorruptFileError(f"{path} is not a valid adapter config: {error} {RECOPY_HINT}") from None


def _read_folder(directory: str | Path) -> tuple[AdapterConfig, Any]:
    """The adapter config of a folder and the file format of its tensors (None: kr_vlm's own names)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
            f"No adapter config at {path}. load_adapters needs a directory written by save_adapters (or by peft), "
            f"holding {CONFIG_FILE} and {WEIGHTS_FILE} (a training run writes them to <run folder>/adapters)."
        )
    data = _read_json(path)
    if "method" in data:
        return _kr_vlm_config(data, path), None
    file_format = next(
        (
            method.file_format
            for method in REGISTRY.values()
            if method.file_format and method.file_format.reads(data)
        ),
        None,
    )
    if file_format is None:
        if "peft_type" in data:
            raise ConfigError(
                f"{path} holds a peft {data['peft_type']!r} adapter, a method kr_vlm does not offer; load it with "
                "peft (peft.PeftModel.from_pretrained(model, folder))."
            )
        raise CorruptFileError(f"{path} has neither kr_vlm's 'method' nor peft's 'peft_type'. {RECOPY_HINT}")
    kr_vlm_path = Path(directory) / KR_VLM_CONFIG_FILE
    if not kr_vlm_path.is_file():  # written by peft
        method, target_modules, options = file_format.read_config(data, str(path))
        return AdapterConfig(method, target_modules, **options), file_format
    config = _kr_vlm_config(_read_json(kr_vlm_path), kr_vlm_path)
    if file_format.method_of(data) != config.method:
        raise CorruptFileError(
            f"{kr_vlm_path} says {config.method!r} but {path} holds a peft {file_format.method_of(data)!r} adapter: "
            f"the two files come from different saves. {RECOPY_HINT}"
        )
    return config, file_format


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """The ``AdapterConfig`` of a folder written by ``save_adapters`` (or by peft, for its methods)."""
    return _read_folder(directory)[0]


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by ``save_adapters`` (or by peft's ``save_pretrained``) into ``model`` and return it.

    A model without adapters gets them injected from the saved config first; a model that already holds
    adapters must hold them with an equal config. The tensors are then loaded strictly
    (see ``load_adapter_state_dict``). All or nothing: on any error the model is left as it was (no
    adapters injected, its layers, tensors and requires_grad flags unchanged).
    """
    config, file_format = _read_folder(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise MissingFileError(
            f"No adapter weights at {weights_path}; save_adapters writes them next to {CONFIG_FILE}."
        )
    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise CorruptFileError(
            f"{weights_path} is not a complete safetensors file ({error}): it was cut short or is another "
            f"kind of file. {RECOPY_HINT}"
        ) from None
    found = _injected_module(model)
    if found is not None:
        _, injected = found
        existing = getattr(injected, CONFIG_ATTRIBUTE)
        if existing != config:
            raise AdapterMismatchError(
                f"The model already holds adapters with {existing}, but {directory} holds {config}. "
                "Load into a freshly built base model instead."
            )
    # All or nothing, as injection is: the adapters' shapes are known only once they are injected, so
    # a load that fails after the injection (tensors that do not fit) takes the injection back.
    with _restored_on_error(model):
        if found is None:
            inject_adapters(model, config)
            injected = model
        if file_format is not None:
            tensors = file_format.to_model_names(tensors, list(adapter_state_dict(injected)))
        load_adapter_state_dict(injected, tensors)
    return model
