"""A method's Hydra schema: the dataclass ``{method, targets, options}`` with ``options`` typed by the method's
options dataclass, stored in Hydra's ConfigStore as ``/schema/adapter/<name>``.

``configs/adapter/<name>.yaml`` names it in its defaults list (``/schema/adapter/<name>@_here_``), so a wrong
option key or type fails when the config is composed, with Hydra's message naming the key. Hydra is
imported only when a schema is stored (by ``kr_vlm.cli``, or by ``register_method``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kr_vlm.adapters.layer import Method

SCHEMA_GROUP = "schema"


def adapter_schema(name: str, method: Method) -> type:
    """The dataclass ``{method, targets, options}`` of one adapter method.

    ``targets`` is untyped: the model decides what it accepts (for CLIP, the friendly selection
    ``{layers, towers, blocks}``, a list of module names or a regex: ``kr_vlm.models.targets.select_targets``).
    """
    return dataclasses.make_dataclass(
        f"{name}_adapter",
        [
            ("method", str, dataclasses.field(default=name)),
            ("targets", Any, dataclasses.field(default=None)),
            ("options", method.options, dataclasses.field(default_factory=method.options)),
        ],
    )


def store_adapter_schema(name: str, method: Method, with_group_entry: bool = False) -> None:
    """Store ``method``'s schema as ``/schema/adapter/<name>`` (idempotent). ``with_group_entry`` also stores
    it as the config-group option ``adapter/<name>`` (the method with its default options and targets), for
    a method that has no ``configs/adapter/<name>.yaml``: ``adapter=<name>`` then works at once; a YAML file
    of that name in a config directory comes first in Hydra's search path."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    schema = adapter_schema(name, method)
    store.store(group=f"{SCHEMA_GROUP}/adapter", name=name, node=schema)
    if with_group_entry:
        store.store(group="adapter", name=name, node=schema)
