"""No silent adapters: find adapted layers that the model's forward never calls.

An adapter changes a model only where the model calls the adapted module. Some modules bypass a child
linear and read its parameters instead (``F.linear(x, self.qkv.weight, bias)``,
``F.multi_head_attention_forward(..., q_proj_weight=self.q_proj.weight)``): an adapter put on that child
would train nothing, without an error. Two checks find them, knowing no model family:

- statically, :func:`weight_uses` reads the source of the parent's ``forward`` for ``self.<child>.weight``
  (or ``.bias``) used as a value, and for calls ``self.<child>(...)``;
- dynamically, :func:`uncalled` runs one forward (a callable the caller gives, e.g. one tiny input) with
  hooks on the adapted layers and returns those never called.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from kr_vlm.errors import ConfigError

log = logging.getLogger(__name__)

#: ``forward_check(model)`` runs one forward of ``model`` on an example input.
ForwardCheck = Callable[[nn.Module], Any]

# Reading a layer's parameter as a value (not only its dtype, device or shape).
_PARAMETER_USE = (
    r"self\.{child}\.(?:weight|bias)\b(?!\s*\.\s*(?:dtype|device|shape|ndim|size|is_cuda|requires_grad))"
)


@functools.cache
def _forward_source(module_class: type) -> str:
    """The source of ``module_class.forward`` ("" when it cannot be read, e.g. a compiled module)."""
    try:
        return textwrap.dedent(inspect.getsource(module_class.forward))
    except (OSError, TypeError):
        return ""


def weight_uses(parent: nn.Module, child: str) -> tuple[bool, bool]:
    """``(reads, calls)``: whether ``parent``'s forward source reads ``self.<child>.weight`` / ``.bias`` as
    a value, and whether it calls ``self.<child>(...)``."""
    source = _forward_source(type(parent))
    name = re.escape(child)
    reads = re.search(_PARAMETER_USE.format(child=name), source) is not None
    calls = re.search(rf"self\.{name}\s*\(", source) is not None
    return reads, calls


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def bypass_reason(model: nn.Module, name: str) -> str | None:
    """Why the module ``name`` of ``model`` may never be called, read off its parent's forward, or None."""
    parent, child = _parent(model, name)
    reads, calls = weight_uses(parent, child)
    if not reads:
        return None
    how = "and calls it only in some cases" if calls else "and never calls it"
    return f"{type(parent).__name__}.forward reads self.{child}.weight directly {how}"


def refuse_bypassed(model: nn.Module, names: Sequence[str], checked_by_forward: bool) -> None:
    """Refuse the targets whose parent's forward reads their weight and never calls them (no adapter there
    could run); of those it also calls in some cases, warn when no forward check will tell."""
    never, sometimes = [], []
    for name in names:
        parent, child = _parent(model, name)
        reads, calls = weight_uses(parent, child)
        if reads:
            (sometimes if calls else never).append(f"{name} ({bypass_reason(model, name)})")
    if never:
        raise ConfigError(
            f"Adapters on {'; '.join(never)} would never run: the model uses these layers' weights without "
            "calling them, so an adapter there would train nothing. Target the layers the forward calls, or "
            "first replace the parent with a module that calls its linears."
        )
    if sometimes and not checked_by_forward:
        log.warning(
            "Adapters on %s may never run. Pass forward_check to inject_adapters to make sure they are called.",
            "; ".join(sometimes),
        )


def uncalled(model: nn.Module, names: Sequence[str], forward_check: ForwardCheck) -> list[str]:
    """The modules among ``names`` (in ``model``) that ``forward_check(model)`` never calls."""
    called: set[str] = set()
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: called.add(name))
        for name in names
    ]
    try:
        forward_check(model)
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name in names if name not in called]


def refuse_uncalled(model: nn.Module, names: Sequence[str], forward_check: ForwardCheck) -> None:
    """Raise ``ConfigError`` naming the adapted layers ``forward_check(model)`` never calls, and why."""
    missing = uncalled(model, names, forward_check)
    if not missing:
        return
    described = [f"{name} ({reason})" if (reason := bypass_reason(model, name)) else name for name in missing]
    raise ConfigError(
        f"{len(missing)} adapter(s) would never run: one forward of the model on an example input does not "
        f"call {'; '.join(described)}. An adapter the forward does not call trains nothing. Target the layers "
        "the forward calls, or first replace the module that bypasses them with one that calls its linears."
    )
