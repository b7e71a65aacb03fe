"""``AdapterConfig``: which adapter method, on which ``nn.Linear`` layers, with which options.

Options are checked when the config is built, against the method's options dataclass
(``kr_vlm.adapters.methods.REGISTRY[method].options``). A config is plain data (``to_dict()`` /
``from_dict()`` are JSON-safe), so it can live in a Hydra YAML file and in ``adapter_config.json`` next to
saved adapter weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError


def __getattr__(name: str) -> Any:
    # ``METHODS``: the names of the registered methods now (``REGISTRY``, built-ins first, then those added
    # by ``register_method``), never a copy taken at import.
    if name == "METHODS":
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``target_modules`` value that selects every linear layer but the output head, as in peft.
ALL_LINEAR = "all-linear"

#: What a target selection that knows the model gives for each module name, e.g.
#: ``{"tower": "vision", "layer": "q", "block": 3}``.
Labels = dict[str, Any]


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


def checked_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of ``method`` as plain JSON data (a dtype as its name), checked against the method's
    options dataclass: an unknown method or option is a ``ConfigError`` that lists the valid ones."""
    if method not in REGISTRY:
        raise ConfigError(
            f"Unknown adapter method {method!r}. Valid methods: {', '.join(REGISTRY)}. A method of your own is "
            "registered with kr_vlm.adapters.register_method (import its module first; train.py and eval.py "
            "import the modules of the kr_vlm.methods entry points)."
        )
    spec = REGISTRY[method]
    allowed = sorted(field.name for field in dataclasses.fields(spec.options))
    for name in options:
        if name in allowed:
            continue
        if name in spec.unavailable_options:
            raise ConfigError(
                f"Option {name!r} is not available for method {method!r}: {spec.unavailable_options[name]}."
            )
        valid = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"Unknown option {name!r} for method {method!r}. Valid options: {valid}.")
    plain = _plain_json(
        {
            name: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            for name, value in options.items()
        },
        "options",
    )
    spec.options(**plain)  # the options dataclass checks the values it can check
    return plain


@dataclasses.dataclass(init=False, eq=False)
class AdapterConfig:
    """Which adapter ``method`` to put on which linear layers (``target_modules``), with ``options``.

    Args:
        method: a name in ``kr_vlm.adapters.methods.REGISTRY`` (``kr_vlm.adapters.METHODS``). ``full``
            trains the targeted layers' own weights; ``none`` trains nothing.
        target_modules: as in peft, a list of module names, each matching a module whose name equals it or
            ends with ``"." + entry`` (``["q_proj", "v_proj"]``), or one string that must fully match a
            module name as a regular expression, or ``"all-linear"``: every ``nn.Linear`` and transformers
            ``Conv1D`` but the output head (a Hugging Face model's ``get_output_embeddings()``); or a mapping from full module names to their labels
            (``{"visual.transformer.resblocks.0.attn.q_proj": {"tower": "vision", "layer": "q", "block": 0}}``),
            as a target selection that knows the model returns it: exactly those modules, and the labels
            that the rank monitor and the parameter table group them by. Not needed for ``none``.
        **options: the method's options, the fields of its options dataclass: e.g. ``r=2, lora_alpha=1``
            for lora, ``rank``, ``scaling``, ``dropout``, ``allow_shared_weights`` and ``factor_dtype`` (a
            dtype or its name, kept as the name such as ``"float32"``) for kradapter.

    Two configs are equal when they adapt the same modules the same way: the labels are not compared, and
    options left out equal their defaults.

    Example: ``AdapterConfig("lora", ["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.1)``.
    """

    method: str
    target_modules: list[str] | str | dict[str, Labels] | None
    options: dict[str, Any]

    def __init__(
        self,
        method: str,
        target_modules: Sequence[str] | str | Mapping[str, Labels] | None = None,
        **options: Any,
    ) -> None:
        self.options = checked_options(method, options)
        self.method = method
        self.target_modules = self._checked_targets(method, target_modules)

    @staticmethod
    def _checked_targets(
        method: str, target_modules: Sequence[str] | str | Mapping[str, Labels] | None
    ) -> list[str] | str | dict[str, Labels] | None:
        if not REGISTRY[method].adapts_layers:
            if target_modules:
                raise ConfigError(f"Method {method!r} adapts nothing; got target_modules={target_modules!r}.")
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
        if (
            target_modules is None
            or not isinstance(target_modules, (Sequence, Mapping))
            or not target_modules
        ):
            raise ConfigError(
                f"Method {method!r} needs target_modules: a list of module names (e.g. ['q_proj', 'v_proj']) "
                f"or a regex string; got {target_modules!r}."
            )
        bad = [name for name in target_modules if not isinstance(name, str) or not name]
        if bad:
            raise TypeError(f"target_modules entries must be non-empty strings, got {bad!r}.")
        if isinstance(target_modules, Mapping):
            return _plain_json(target_modules, "target_modules")
        return list(target_modules)

    @property
    def module_names(self) -> list[str] | str | None:
        """The targets without their labels: a list of names (exact or suffixes), a regex, or None."""
        if isinstance(self.target_modules, dict):
            return list(self.target_modules)
        return self.target_modules

    @property
    def labels(self) -> dict[str, Labels]:
        """The labels of the targets, by full module name (empty when the targets came without labels)."""
        return dict(self.target_modules) if isinstance(self.target_modules, dict) else {}

    def method_options(self) -> Any:
        """The options as an instance of the method's options dataclass (defaults filled in)."""
        return REGISTRY[self.method].options(**self.options)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AdapterConfig):
            return NotImplemented
        return (self.method, self.module_names, self.method_options()) == (
            other.method,
            other.module_names,
            other.method_options(),
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "target_modules", "options"}``, JSON-safe; ``from_dict`` reverses it."""
        return json.loads(
            json.dumps(
                {"method": self.method, "target_modules": self.target_modules, "options": self.options}
            )
        )

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
