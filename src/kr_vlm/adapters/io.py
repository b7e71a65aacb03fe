"""Save and load adapters: ``adapter_config.json`` plus ``adapter_model.safetensors`` (adapter tensors only).

Which tensors are saved, keyed by the model's own ``state_dict`` names:

- ``kradapter``: ``<layer>.kr_u``, ``<layer>.kr_v``;
- ``lora``: ``<layer>.lora_A.default.weight``, ``<layer>.lora_B.default.weight`` (``dora`` adds
  ``<layer>.lora_magnitude_vector.default.weight``); ``lokr``: ``<layer>.lokr_w1.default``, ... ;
  ``loha``: ``<layer>.hada_w1_a.default``, ...;
- ``vera``: ``<layer>.vera_lambda_b.default``, ``<layer>.vera_lambda_d.default``; ``randlora``:
  ``<layer>.randlora_lambda.default``, ``<layer>.randlora_gamma.default``. Their frozen random projections
  (``vera_A`` / ``vera_B``, ``randlora_A`` / ``randlora_B``) are one tensor shared by all layers; they are
  saved once, under the first adapted layer's name (``<first layer>.vera_A.default``). peft can regenerate
  them from ``projection_prng_key``, but the result depends on the platform (peft warns so; RandLoRA even
  draws them in bfloat16 or float16 depending on the hardware), so saving them makes loading exact;
- ``full``: ``<layer>.weight`` and ``<layer>.bias``.

That is each layer's ``adapter_state_dict()`` (``kr_vlm.adapters.layer.AdaptedLayer``) under the layer's name.
``adapter_config.json`` holds the ``AdapterConfig`` (``to_dict()``), the targets' labels included when the
target selection gave them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

import kr_vlm
from kr_vlm.adapters.config import AdapterConfig
from kr_vlm.adapters.inject import CONFIG_ATTRIBUTE, adapted_layers, inject_adapters, truncated_list
from kr_vlm.errors import ConfigError, CorruptFileError, MissingFileError
from kr_vlm.files import write_file_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
# What to do about a saved file that cannot be read.
RECOPY_HINT = "Copy it again from the run that saved it, or save the adapters again (save_adapters)."


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


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for the adapters in ``model``.

    ``model`` is the module given to ``inject_adapters`` or any module that contains it (e.g. a classifier
    wrapping it); names are relative to the injected module, so ``load_adapters`` takes that module's kind
    (e.g. a freshly built base model). Returns the directory.
    """
    found = _injected_module(model)
    if found is None:
        raise ValueError("The model holds no adapters from kr_vlm.adapters.inject_adapters; nothing to save.")
    _, injected = found
    config: AdapterConfig = getattr(injected, CONFIG_ATTRIBUTE)
    directory = Path(directory)
    weights = save(_safetensors_ready(adapter_state_dict(injected)), metadata={"format": "pt"})
    header = {"format_version": FORMAT_VERSION, "kr_vlm_version": kr_vlm.__version__}
    text = json.dumps({**header, **config.to_dict()}, indent=2, allow_nan=False) + "\n"
    # Each file is written whole or not at all (a temporary file in the folder, then a rename); a
    # failed write raises kr_vlm.files.FileWriteError naming the file.
    write_file_atomic(directory / WEIGHTS_FILE, lambda handle: handle.write(weights))
    write_file_atomic(directory / CONFIG_FILE, lambda handle: handle.write(text.encode("utf-8")))
    return directory


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """The ``AdapterConfig`` stored in ``directory/adapter_config.json`` by ``save_adapters``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
            f"No adapter config at {path}. load_adapters needs a directory written by save_adapters, holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (a training run writes them to <run folder>/adapters)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}). {RECOPY_HINT}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(
            f"{path} holds a JSON {type(data).__name__}, not an adapter config. {RECOPY_HINT}"
        )
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            f"{path} has adapter format version {version!r}; this kr_vlm ({kr_vlm.__version__}) reads version "
            f"{FORMAT_VERSION}."
        )
    data.pop("kr_vlm_version", None)
    try:
        return AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise CorruptFileError(f"{path} is not a valid adapter config: {error} {RECOPY_HINT}") from None


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model`` and return it.

    A model without adapters gets them injected from the saved config first; a model that already holds
    adapters must hold them with an equal config. The tensors are then loaded strictly
    (see ``load_adapter_state_dict``).
    """
    config = read_adapter_config(directory)
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
    if found is None:
        inject_adapters(model, config)
        injected = model
    else:
        _, injected = found
        existing = getattr(injected, CONFIG_ATTRIBUTE)
        if existing != config:
            raise AdapterMismatchError(
                f"The model already holds adapters with {existing}, but {directory} holds {config}. "
                "Load into a freshly built base model instead."
            )
    load_adapter_state_dict(injected, tensors)
    return model
