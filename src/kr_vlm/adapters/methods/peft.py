"""Baseline adapters from peft (LoRA, DoRA, VeRA, LoKr, LoHa, RandLoRA), injected without a PeftModel.

peft does the work: its config classes, its layers, its ``get_delta_weight`` / ``merge`` / ``unmerge``.
kr_vlm lists the options users set for each method (a dataclass each, peft's defaults), chooses the layers
(it hands peft a regex that fully matches exactly those names; ``fan_in_fan_out`` set for transformers'
``Conv1D``) and shows each peft layer through ``PeftLayerView``, which answers ``AdaptedLayer`` without
changing peft's classes. ``PEFT_FILES`` is peft's folder format, which ``save_adapters`` writes for these
methods (``PeftModel.from_pretrained`` and transformers' ``load_adapter`` read it) and ``load_adapters`` reads.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kr_vlm.adapters.layer import AdaptedLayer, Method, is_conv1d
from kr_vlm.adapters.methods.peft_layer import ADAPTER_NAME, PeftLayerView, find_peft_layer
from kr_vlm.errors import ConfigError


@dataclasses.dataclass
class LoraOptions:
    """``peft.LoraConfig``'s options for LoRA (and DoRA), with peft's defaults."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    # True, False, or the name of one of peft's initialisations ("gaussian", "pissa", "olora", ...).
    init_lora_weights: Any = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    lora_bias: bool = False


@dataclasses.dataclass
class VeraOptions:
    """``peft.VeraConfig``'s options, with peft's defaults."""

    r: int = 256
    projection_prng_key: int = 0
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True


@dataclasses.dataclass
class LoHaOptions:
    """``peft.LoHaConfig``'s options, with peft's defaults."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoKrOptions(LoHaOptions):
    """``peft.LoKrConfig``'s options (LoHa's and three more), with peft's defaults."""

    # True, False or "lycoris".
    init_weights: Any = True
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


@dataclasses.dataclass
class RandLoraOptions:
    """``peft.RandLoraConfig``'s options, with peft's defaults."""

    r: int = 32
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    randlora_alpha: float = 640
    init_weights: bool = True


# peft config fields that kr_vlm sets itself or that would change what is trained or saved behind its back.
UNAVAILABLE_OPTIONS: dict[str, str] = {
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
    "fan_in_fan_out": "kr_vlm sets it itself: True for transformers' Conv1D layers, whose weight is (in, out)",
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


# The peft_type of each peft method kr_vlm offers (DoRA is peft's LoRA with use_dora=True).
PEFT_TYPES = {
    "lora": "LORA",
    "dora": "LORA",
    "vera": "VERA",
    "lokr": "LOKR",
    "loha": "LOHA",
    "randlora": "RANDLORA",
}
# peft's LoKr and LoHa (its LyCORIS layers) adapt nn.Linear, not transformers' Conv1D.
CONV1D_METHODS = ("lora", "dora", "vera", "randlora")


def peft_config_class(method: str) -> type:
    """peft's config class for a peft method (``dora`` is ``LoraConfig`` with ``use_dora=True``)."""
    import peft

    return peft.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPES[method]]


def build_peft_config(method: str, module_names: Sequence[str], options: Any, fan_in_fan_out: bool = False):
    """peft's config for ``method`` that targets exactly ``module_names`` (full module names).

    ``fan_in_fan_out`` says the layers are transformers' ``Conv1D`` (weights stored ``(in, out)``).
    """
    # peft full-matches a string target as a regex; escaped alternatives select these layers and no others.
    target_regex = "(?:" + "|".join(re.escape(name) for name in module_names) + ")"
    method_options = {"use_dora": True} if method == "dora" else {}
    if method in CONV1D_METHODS:
        method_options["fan_in_fan_out"] = fan_in_fan_out
    return peft_config_class(method)(
        target_modules=target_regex, **method_options, **dataclasses.asdict(options)
    )


def inject_peft_adapters(model: nn.Module, method: str, module_names: Sequence[str], options: Any) -> None:
    """Replace the named linear layers of ``model`` in place with peft's layers for ``method``."""
    import peft

    conv1d = [is_conv1d(model.get_submodule(name)) for name in module_names]
    config = build_peft_config(method, module_names, options, fan_in_fan_out=all(conv1d))
    with warnings.catch_warnings():
        # With both kinds of layer, peft flips fan_in_fan_out for each layer (and warns); that is the intent.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        if method == "vera":
            # inject_adapter_in_model refuses VeRA because its shared projections live on the tuner object.
            # Every VeRA layer also holds a reference to them, so building the tuner directly (which is all
            # inject_adapter_in_model does) gives working layers; kr_vlm saves the projections itself (io.py).
            peft.VeraModel(model, config, adapter_name=ADAPTER_NAME)
        else:
            peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


class PeftFileFormat:
    """peft's adapter folder: ``adapter_config.json`` (peft's config, with its ``peft_type``) and
    ``adapter_model.safetensors`` keyed as ``get_peft_model_state_dict`` writes them for a ``PeftModel``.

    Keys: a layer's ``lora_A.default.weight`` is ``base_model.model.<layer>.lora_A.weight``; DoRA's
    magnitude is ``...lora_magnitude_vector`` (peft's name from before it became a module); VeRA's and
    RandLoRA's shared projections are ``base_model.vera_A`` etc., and peft also writes RandLoRA's under
    every layer (``base_model.model.<layer>.randlora_A``).
    """

    # The shared random projections of VeRA and RandLoRA: one tensor for all layers.
    PROJECTIONS = ("vera_A", "vera_B", "randlora_A", "randlora_B")
    # The projections peft also writes under each layer.
    PROJECTIONS_PER_LAYER = ("randlora_A", "randlora_B")
    # Where a PeftModel keeps the model (the prefix of its state-dict keys).
    MODEL_PREFIX = "base_model.model."
    # peft config fields that are bookkeeping or that kr_vlm sets itself; any other field must be at its
    # default (or be one of the method's options) for kr_vlm to rebuild the adapter from peft's folder.
    IGNORED_FIELDS = frozenset(
        {
            "peft_type",
            "task_type",
            "inference_mode",
            "base_model_name_or_path",
            "revision",
            "auto_mapping",
            "peft_version",
            "target_modules",
            "fan_in_fan_out",
            "use_dora",
            "runtime_config",
        }
    )

    def reads(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` (an ``adapter_config.json``) is a peft method kr_vlm offers."""
        return config.get("peft_type") in PEFT_TYPES.values()

    def method_of(self, config: Mapping[str, Any]) -> str:
        """The kr_vlm method of a peft config: its ``peft_type``, ``dora`` for LoRA with ``use_dora``."""
        if config.get("peft_type") == "LORA":
            return "dora" if config.get("use_dora") else "lora"
        return next(
            method for method, peft_type in PEFT_TYPES.items() if peft_type == config.get("peft_type")
        )

    def config(
        self, method: str, options: Any, layers: Mapping[str, AdaptedLayer], base_model_name: str | None
    ) -> dict:
        """peft's ``adapter_config.json`` for ``method`` with ``options`` on ``layers`` (by module name)."""
        conv1d = [is_conv1d(layer.base_layer) for layer in layers.values()]
        config = build_peft_config(method, list(layers), options, fan_in_fan_out=all(conv1d))
        # As PeftModel.save_pretrained writes it.
        config.inference_mode = True
        config.base_model_name_or_path = base_model_name or None
        return {
            key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()
        }

    def key(self, name: str) -> str:
        """The checkpoint key of the adapter tensor ``name`` (as ``adapter_state_dict`` names it)."""
        if name.endswith(f".{ADAPTER_NAME}"):  # a parameter of a ParameterDict: vera_lambda_b.default
            stem, suffix = name.removesuffix(f".{ADAPTER_NAME}"), ""
        else:  # a module of a ModuleDict: lora_A.default.weight
            head, _, last = name.rpartition(".")
            if not head.endswith(f".{ADAPTER_NAME}"):
                raise ValueError(f"{name} is not a peft adapter tensor (adapter {ADAPTER_NAME!r}).")
            stem, suffix = head.removesuffix(f".{ADAPTER_NAME}"), f".{last}"
        tensor = stem.rpartition(".")[2]
        if tensor in self.PROJECTIONS:
            return f"base_model.{tensor}"
        if tensor == "lora_magnitude_vector":
            suffix = ""
        return self.MODEL_PREFIX + stem + suffix

    def checkpoint(self, layers: Mapping[str, AdaptedLayer]) -> dict[str, torch.Tensor]:
        """The tensors of ``layers`` (by module name) under their checkpoint keys, as peft saves them."""
        tensors: dict[str, torch.Tensor] = {}
        for layer_name, layer in layers.items():
            for name, tensor in layer.adapter_state_dict().items():
                full_name = f"{layer_name}.{name}" if layer_name else name
                tensors.setdefault(self.key(full_name), tensor.detach())
                stem = full_name.removesuffix(f".{ADAPTER_NAME}")
                if stem.rpartition(".")[2] in self.PROJECTIONS_PER_LAYER:
                    tensors[self.MODEL_PREFIX + stem] = tensor.detach()
        return tensors

    def to_model_names(
        self, tensors: Mapping[str, torch.Tensor], expected: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """``tensors`` read from a checkpoint, renamed to the model's ``expected`` adapter tensor names.

        Names that are no adapter tensor of the model stay as they are (so a strict load reports them), except
        the per-layer copies of a shared projection that peft also writes for RandLoRA.
        """
        names = {self.key(name): name for name in expected}
        return {
            names.get(key, key): tensor
            for key, tensor in tensors.items()
            if key in names or not self._projection_copy(key)
        }

    def _projection_copy(self, key: str) -> bool:
        return key.startswith(self.MODEL_PREFIX) and key.rpartition(".")[2] in self.PROJECTIONS

    def read_config(self, config: Mapping[str, Any], where: str) -> tuple[str, Any, dict[str, Any]]:
        """``(method, target_modules, options)`` of the peft config ``config`` read from ``where``, or a
        ``ConfigError`` naming the peft settings kr_vlm cannot rebuild (load such a folder with peft)."""
        import peft

        method = self.method_of(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about fields of newer peft versions; compared below
            parsed = peft.PeftConfig.from_peft_type(**config)
        defaults = type(parsed)()
        option_names = [field.name for field in dataclasses.fields(PEFT_OPTIONS[method])]
        unsupported = [
            f"{field.name}={getattr(parsed, field.name)!r}"
            for field in dataclasses.fields(parsed)
            if field.name not in self.IGNORED_FIELDS
            and field.name not in option_names
            and getattr(parsed, field.name) != getattr(defaults, field.name)
        ]
        if unsupported:
            raise ConfigError(
                f"{where} is a peft {config['peft_type']} adapter with settings kr_vlm cannot rebuild: "
                f"{', '.join(unsupported)}. Load it with peft (peft.PeftModel.from_pretrained(model, folder))."
            )
        targets = parsed.target_modules
        if targets is None:
            raise ConfigError(f"{where} names no target_modules; kr_vlm needs the layers the adapter is on.")
        targets = targets if isinstance(targets, str) else sorted(targets)
        return method, targets, {name: getattr(parsed, name) for name in option_names}


PEFT_FILES = PeftFileFormat()
PEFT_OPTIONS: dict[str, type] = {
    "lora": LoraOptions,
    "dora": LoraOptions,
    "vera": VeraOptions,
    "lokr": LoKrOptions,
    "loha": LoHaOptions,
    "randlora": RandLoraOptions,
}


def _peft_method(method: str) -> Method:
    def inject(model: nn.Module, names: Sequence[str], method_options: Any) -> None:
        inject_peft_adapters(model, method, names, method_options)

    return Method(
        PEFT_OPTIONS[method],
        inject,
        find=find_peft_layer,
        unavailable_options=UNAVAILABLE_OPTIONS,
        adapts_conv1d=method in CONV1D_METHODS,
        file_format=PEFT_FILES,
        layer=PeftLayerView,
    )


LORA = _peft_method("lora")
DORA = _peft_method("dora")
VERA = _peft_method("vera")
LOKR = _peft_method("lokr")
LOHA = _peft_method("loha")
RANDLORA = _peft_method("randlora")
