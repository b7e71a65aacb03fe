"""The adapter methods: one module a method family, one registry line a method.

Each module gives its options dataclass, its layers (answering ``kr_vlm.adapters.layer.AdaptedLayer``)
and a ``Method`` record; ``REGISTRY`` maps the method names to those records. The built-in methods are listed
here; a method of your own is added with ``kr_vlm.adapters.register_method``, which checks it against the
protocol and stores its Hydra schema (see the README's "Adding a method").
"""

from __future__ import annotations

from kr_vlm.adapters.layer import Method, NoOptions
from kr_vlm.adapters.methods import full, kradapter, peft

# Freezes the model and adapts nothing: zero-shot evaluation.
NO_ADAPTER = Method(
    NoOptions, inject=lambda model, names, options: None, find=lambda module: None, adapts_layers=False
)

REGISTRY: dict[str, Method] = {
    "kradapter": kradapter.KRADAPTER,
    "lora": peft.LORA,
    "dora": peft.DORA,
    "vera": peft.VERA,
    "lokr": peft.LOKR,
    "loha": peft.LOHA,
    "randlora": peft.RANDLORA,
    "full": full.FULL,
    "none": NO_ADAPTER,
}
