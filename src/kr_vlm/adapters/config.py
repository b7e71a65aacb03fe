"""``AdapterConfig``: which adapter method, on which ``nn.Linear`` layers, with which options.

Options are checked when the config is built: for peft methods against the fields of peft's config class
(``LoraConfig``, ``VeraConfig``, ...), for ``kradapter`` against ``KRAdapterLinear``'s arguments. A config
is plain data (``to_dict()`` / ``from_dict()`` are JSON-safe), so it can live in a Hydra YAML file and in
``adapter_config.json`` next to saved adapter weights.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kr_vlm.adapters.kradapter import KRAdapterLinear
from kr_vlm.errors import ConfigError

METHODS = ("kradapter", "lora", "dora", "vera", "lokr", "loha", "randlora", "full", "none")

# Methods that peft implements; peft_bridge maps each one to its peft config class.
PEFT_METHODS = ("lora", "dora", "vera", "lokr", "loha", "randlora")

# peft config fields that kr_vlm sets itself or that would change what is trained or saved behind its back.
RESERVED_PEFT_OPTIONS: dict[str, str] = {
    "target_modules": "pass the layers as AdapterConfig(method, target_modules, ...)",
    "exclude_modules": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "layers_to_transform": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "layers_pattern": "kr_vlm matches layers itself; list only the layers to adapt in target_modules",
    "target_parameters": "kr_vlm adapts nn.Linear modules only",
    "modules_to_save": "it trains whole modules outside the adapters, which save_adapters would not save",
    "trainable_token_indices": "it trains embedding rows outside the adapters, which save_adapters would not save",
    "bias": "it trains biases of the whole model outside the adapters, which save_adapters would not save",
    "use_dora": "choose method='dora' instead",
    "save_projection": "kr_vlm always saves the shared random projections, so that loading is exact",
    "fan_in_fan_out": "it only applies to transformers' Conv1D; nn.Linear weights are (out, in)",
    "layer_replication": "it changes the model's layer structure",
    # LoRA variants other than DoRA change the update in ways delta_weight() does not report.
    **dict.fromkeys(
        (
            "alora_invocation_tokens",
            "arrow_config",
            "kasa_config",
            "velora_config",
            "monteclora_config",
            "use_bdlora",
            "use_qalora",
            "qalora_group_size",
            "megatron_config",
            "megatron_core",
        ),
        "it selects a LoRA variant or backend that kr_vlm does not support (plain LoRA and DoRA are supported)",
    ),
    "peft_type": "it follows from the method",
    "task_type": "kr_vlm injects adapters without a PeftModel wrapper",
    "inference_mode": "freezing is decided by inject_adapters",
    "base_model_name_or_path": "it is PeftModel bookkeeping",
    "revision": "it is PeftModel bookkeeping",
    "auto_mapping": "it is PeftModel bookkeeping",
    "peft_version": "it is PeftModel bookkeeping",
}

# KRAdapterLinear arguments that are not options: the layer it wraps.
_KRADAPTER_NON_OPTIONS = ("self", "base")


def peft_config_class(method: str) -> type:
    """peft's config class for a peft method (``dora`` is ``LoraConfig`` with ``use_dora=True``)."""
    import peft

    classes = {
        "lora": peft.LoraConfig,
        "dora": peft.LoraConfig,
        "vera": peft.VeraConfig,
        "lokr": peft.LoKrConfig,
        "loha": peft.LoHaConfig,
        "randlora": peft.RandLoraConfig,
    }
    return classes[method]


def valid_options(method: str) -> tuple[str, ...]:
    """The option names a method accepts, sorted."""
    if method == "kradapter":
        parameters = inspect.signature(KRAdapterLinear.__init__).parameters
        return tuple(sorted(name for name in parameters if name not in _KRADAPTER_NON_OPTIONS))
    if method in PEFT_METHODS:
        fields = {field.name for field in dataclasses.fields(peft_config_class(method))}
        return tuple(sorted(fields - RESERVED_PEFT_OPTIONS.keys()))
    return ()


def factor_dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` (or ``"torch.float32"``) -> ``torch.float32``; only floating point dtypes."""
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"factor_dtype must name a floating point torch dtype such as 'float32' or 'bfloat16', got {name!r}."
        )
    return dtype


def _plain_json(value: Any, where: str) -> Any:
    """A copy of ``value`` made of dict / list / str / int / float / bool / None, or a clear error.

    Mappings and sequences of any kind (e.g. OmegaConf's DictConfig / ListConfig from Hydra) are converted,
    so the config compares equal and serialises the same whichever way it was built.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain_json(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_plain_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(
        f"{where} must be JSON-like data (numbers, strings, lists, dicts), got {type(value).__name__}: {value!r}. "
        "Pass dtypes as their names, e.g. 'bfloat16'."
    )


@dataclasses.dataclass(init=False)
class AdapterConfig:
    """Which adapter ``method`` to put on which ``nn.Linear`` layers (``target_modules``), with ``options``.

    Args:
        method: one of ``METHODS``. ``full`` trains the targeted layers' own weights; ``none`` trains nothing.
        target_modules: as in peft: a list of module names, each matching a module whose name equals it or
            ends with ``"." + entry`` (``["q_proj", "v_proj"]``), or one string that must fully match a
            module name as a regular expression. Not needed for ``none``.
        **options: the method's options: peft config fields for peft methods (e.g. ``r=2, lora_alpha=1``),
            ``rank``, ``scaling`` and ``factor_dtype`` (a dtype or its name, kept as the name such as
            ``"float32"``) for kradapter.

    Example: ``AdapterConfig("lora", ["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.1)``.
    """

    method: str
    target_modules: list[str] | str | None
    options: dict[str, Any]

    def __init__(
        self, method: str, target_modules: Sequence[str] | str | None = None, **options: Any
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"Unknown adapter method {method!r}. Valid methods: {', '.join(METHODS)}.")
        self.method = method
        self.target_modules = self._checked_targets(method, target_modules)
        self.options = self._checked_options(method, options)

    @staticmethod
    def _checked_targets(method: str, target_modules: Sequence[str] | str | None) -> list[str] | str | None:
        if method == "none":
            if target_modules:
                raise ConfigError(f"Method 'none' adapts nothing; got target_modules={target_modules!r}.")
            return None
        if isinstance(target_modules, str):
            if not target_modules:
                raise ConfigError(
                    "target_modules is an empty string; give a regex or a list of module names."
                )
            try:
                re.compile(target_modules)
            except re.error as error:
                raise ConfigError(
                    f"target_modules={target_modules!r} is not a valid regex: {error}."
                ) from error
            return target_modules
        if target_modules is None or not isinstance(target_modules, Sequence) or len(target_modules) == 0:
            raise ConfigError(
                f"Method {method!r} needs target_modules: a list of module names (e.g. ['q_proj', 'v_proj']) "
                f"or a regex string; got {target_modules!r}."
            )
        names = list(target_modules)
        bad = [name for name in names if not isinstance(name, str) or not name]
        if bad:
            raise TypeError(f"target_modules entries must be non-empty strings, got {bad!r}.")
        return names

    @staticmethod
    def _checked_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
        allowed = valid_options(method)
        for name in options:
            if name in allowed:
                continue
            if method in PEFT_METHODS and name in RESERVED_PEFT_OPTIONS:
                raise ConfigError(
                    f"Option {name!r} is not available for method {method!r}: {RESERVED_PEFT_OPTIONS[name]}."
                )
            valid = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"Unknown option {name!r} for method {method!r}. Valid options: {valid}.")
        options = dict(options)
        if method == "kradapter" and isinstance(options.get("factor_dtype"), torch.dtype):
            options["factor_dtype"] = str(options["factor_dtype"]).removeprefix("torch.")
        checked = _plain_json(options, "options")
        if method == "kradapter" and checked.get("factor_dtype") is not None:
            factor_dtype_from_name(checked["factor_dtype"])
        return checked

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "target_modules", "options"}``, JSON-safe; ``from_dict`` reverses it."""
        targets = list(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        return {
            "method": self.method,
            "target_modules": targets,
            "options": json.loads(json.dumps(self.options)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Rebuild a config from ``to_dict()`` output (unknown keys are an error)."""
        unknown = set(data) - {"method", "target_modules", "options"}
        if unknown:
            raise ConfigError(
                f"Unknown adapter config keys {sorted(unknown)}; expected 'method', 'target_modules', 'options'."
            )
        if "method" not in data:
            raise ConfigError("An adapter config needs a 'method'.")
        return cls(data["method"], data.get("target_modules"), **dict(data.get("options") or {}))
