"""``register_method``: add an adapter method to ``REGISTRY``, checked, with its Hydra schema at once.

As peft's ``register_peft_method``, registering checks what it registers: the name, the options dataclass
(every field with a default, so a config may leave any option out) and the layer class, which must define
every method of the ``AdaptedLayer`` protocol (``kr_vlm.adapters.AdapterLayer`` gives all of them but
``update()``). The data members (``merged``, ``base_layer``, ``in_features``, ...) may be set in
``__init__``; ``inject_adapters`` checks them on the layers it made. The method's Hydra schema
(``/schema/adapter/<name>``) and a config-group entry ``adapter/<name>`` are stored in Hydra's ConfigStore
at once, so ``adapter=<name>`` works on the command line of a process that registered the method.

``train.py`` and ``eval.py`` import the modules named by the ``kr_vlm.methods`` entry points of the
installed distributions before they compose their config (``load_method_plugins``), so a package that
registers its method at import and declares ``[project.entry-points."kr_vlm.methods"]`` is seen by the
command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from kr_vlm.adapters.base import AdapterLayer
from kr_vlm.adapters.layer import AdaptedLayer, Method, NoOptions, instances_of, replace_layers
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError, KrVlmError

#: The entry-point group whose modules the command line imports so that they register their methods.
ENTRY_POINT_GROUP = "kr_vlm.methods"

# A method name is also a config file name and a CLI value (adapter=<name>).
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# The protocol's members a layer class must define itself (methods); the rest may be instance attributes.
_CALLABLE_MEMBERS = (
    "delta_weight",
    "base_weight",
    "spectral_factors",
    "merge",
    "unmerge",
    "adapter_state_dict",
    "set_update_scale",
)


class MethodRegistrationError(KrVlmError, TypeError):
    """A method that cannot be registered: its name, options or layer class break the contract."""


def protocol_members() -> list[str]:
    """Every member ``AdaptedLayer`` requires, by name (its methods, properties and annotated attributes)."""
    declared = {name for name in vars(AdaptedLayer) if not name.startswith("_")}
    return sorted(declared | set(AdaptedLayer.__annotations__))


def missing_members(layer: object) -> list[str]:
    """The ``AdaptedLayer`` members that ``layer`` (an instance) lacks."""
    return [name for name in protocol_members() if not hasattr(layer, name)]


def _check_layer_class(name: str, layer: type) -> None:
    if not inspect.isclass(layer):
        raise MethodRegistrationError(
            f"register_method({name!r}): layer must be the class of the method's layers, got {layer!r}."
        )
    missing = [member for member in _CALLABLE_MEMBERS if not callable(getattr(layer, member, None))]
    if issubclass(layer, AdapterLayer) and layer.update is AdapterLayer.update:
        missing.append("update() (ΔW at update scale 1, which AdapterLayer's other members are built on)")
    if missing:
        raise MethodRegistrationError(
            f"register_method({name!r}): {layer.__name__} does not answer kr_vlm.adapters.AdaptedLayer: it lacks "
            f"{', '.join(missing)}. Subclass kr_vlm.adapters.AdapterLayer (which gives every member but update()) "
            "or define them (see AdaptedLayer's docstring)."
        )


def _check_options(name: str, options: type) -> None:
    if not (inspect.isclass(options) and dataclasses.is_dataclass(options)):
        raise MethodRegistrationError(
            f"register_method({name!r}): options must be a dataclass (its fields are the method's options), "
            f"got {options!r}."
        )
    required = [
        field.name
        for field in dataclasses.fields(options)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if required:
        raise MethodRegistrationError(
            f"register_method({name!r}): every option needs a default (configs may leave any option out); "
            f"{options.__name__} has none for {', '.join(required)}."
        )


def _default_inject(layer: type) -> Callable[[nn.Module, Sequence[str], Any], None]:
    """Replace each named linear with ``layer(base, **options)``."""

    def inject(model: nn.Module, names: Sequence[str], options: Any) -> None:
        fields = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
        replace_layers(model, names, lambda base: layer(base, **fields))

    return inject


def register_method(
    name: str,
    layer: type,
    options: type = NoOptions,
    *,
    inject: Callable[[nn.Module, Sequence[str], Any], None] | None = None,
    find: Callable[[nn.Module], AdaptedLayer | None] | None = None,
    unavailable_options: Mapping[str, str] | None = None,
    adapts_conv1d: bool = False,
    file_format: Any = None,
    replace: bool = False,
) -> Method:
    """Add the adapter method ``name`` to ``REGISTRY`` and its schema to Hydra's ConfigStore; return its record.

    Args:
        name: lower case letters, digits and ``_``, starting with a letter (a config file name too).
        layer: the class of the method's layers; it must define every method of ``AdaptedLayer``.
        options: a dataclass of the method's options, each with a default (``NoOptions`` when it has none).
        inject: ``inject(model, names, options)`` adapts the named linears in place; by default each one is
            replaced with ``layer(base, **options)`` (the options' fields as keyword arguments).
        find: ``find(module)`` returns ``module`` seen as one of this method's layers, or None; by default
            the modules that are instances of ``layer``.
        unavailable_options, adapts_conv1d, file_format: as in ``kr_vlm.adapters.layer.Method``.
        replace: allow replacing a method of the same name (else that is an error).

    Raises ``MethodRegistrationError`` (a ``KrVlmError``) naming what breaks the contract; nothing is
    registered then.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MethodRegistrationError(
            f"register_method: a method name is lower case letters, digits and '_' starting with a letter "
            f"(it is also a config file name), got {name!r}."
        )
    if name in REGISTRY and not replace:
        raise MethodRegistrationError(
            f"register_method({name!r}): a method of that name is registered already; choose another name "
            "or pass replace=True."
        )
    _check_layer_class(name, layer)
    _check_options(name, options)
    method = Method(
        options,
        inject if inject is not None else _default_inject(layer),
        find=find if find is not None else instances_of(layer),
        unavailable_options=dict(unavailable_options or {}),
        adapts_conv1d=adapts_conv1d,
        file_format=file_format,
        layer=layer,
    )
    from kr_vlm.adapters.schema import store_adapter_schema

    store_adapter_schema(name, method, with_group_entry=True)
    REGISTRY[name] = method
    return method


def check_adapted_layers(method: str, layers: Mapping[str, object]) -> None:
    """Refuse layers (by module name) that ``method`` made but that do not answer ``AdaptedLayer``."""
    for layer_name, layer in layers.items():
        missing = missing_members(layer)
        if missing:
            raise ConfigError(
                f"Method {method!r} made a layer at {layer_name} ({type(layer).__name__}) that does not answer "
                f"kr_vlm.adapters.AdaptedLayer: it lacks {', '.join(missing)}. Fix the method's layer class "
                "(kr_vlm.adapters.AdapterLayer gives sound defaults)."
            )


def load_method_plugins() -> list[str]:
    """Import the modules of the ``kr_vlm.methods`` entry points (they register their methods); returns
    their names. A module that fails to import is a ``KrVlmError`` naming the entry point."""
    loaded = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except KrVlmError:
            raise
        except Exception as error:
            raise ConfigError(
                f"The {ENTRY_POINT_GROUP} entry point {entry_point.name!r} ({entry_point.value}) failed to load: "
                f"{type(error).__name__}: {error}. Fix or uninstall the package that declares it."
            ) from error
        loaded.append(entry_point.name)
    return loaded
