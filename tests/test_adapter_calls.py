"""No silent adapters: injection refuses adapters the model's forward never calls (every method), leaving the
model as it was; on generic modules and on open_clip towers kr_vlm does not convert."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.errors import ConfigError
from kr_vlm.models.targets import clip_targets
from kr_vlm.models.towers import convert_towers, example_forward
from kr_vlm.models.zoo import build_model, shrunk_config

ADAPTING_METHODS = [name for name, method in REGISTRY.items() if method.adapts_layers]


class ReadsWeight(nn.Module):
    """Uses ``fc``'s weight without calling ``fc`` (as EVA's fused attention and ResNet's pool do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.fc.weight, self.fc.bias))


class DeadBranch(nn.Module):
    """Calls ``a`` only; ``b`` is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


class Sometimes(nn.Module):
    """Calls ``fc`` or reads its weight, depending on a flag."""

    def __init__(self, bypass: bool) -> None:
        super().__init__()
        self.fc, self.bypass = nn.Linear(8, 8), bypass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return F.linear(x, self.fc.weight)
        return self.fc(x)


def one_batch(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(2, 8))


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not list(adapted_layers(model))
    assert model.state_dict().keys() == before.keys()
    assert all(parameter.requires_grad for parameter in model.parameters())


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_a_layer_whose_weight_is_read_but_never_called_is_refused(method):
    model = nn.Sequential(ReadsWeight())
    before = model.state_dict()
    with pytest.raises(
        ConfigError,
        match=r"0\.fc \(ReadsWeight\.forward reads self\.fc\.weight directly and never calls it\)",
    ):
        inject_adapters(model, AdapterConfig(method, ["0.fc", "0.head"]))
    _unchanged(model, before)


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_the_forward_check_refuses_layers_it_does_not_call(method):
    model = DeadBranch()
    before = model.state_dict()
    with pytest.raises(ConfigError, match=r"1 adapter\(s\) would never run: .* does not call b\b"):
        inject_adapters(model, AdapterConfig(method, ["a", "b"]), forward_check=one_batch)
    _unchanged(model, before)
    inject_adapters(model, AdapterConfig(method, ["a"]), forward_check=one_batch)
    assert [name for name, _ in adapted_layers(model)] == ["a"]


def test_a_layer_bypassed_in_some_cases_is_decided_by_the_forward_check(caplog):
    with caplog.at_level(logging.WARNING):
        inject_adapters(Sometimes(bypass=False), AdapterConfig("kradapter", ["fc"]))
    assert "may never run" in caplog.text and "forward_check" in caplog.text
    inject_adapters(Sometimes(bypass=False), AdapterConfig("kradapter", ["fc"]), forward_check=one_batch)
    bypassed = Sometimes(bypass=True)
    with pytest.raises(
        ConfigError,
        match=r"does not call fc \(Sometimes\.forward reads self\.fc\.weight directly and calls it only in some cases\)",
    ):
        inject_adapters(bypassed, AdapterConfig("lora", ["fc"]), forward_check=one_batch)
    assert not list(adapted_layers(bypassed))


def test_resnet_attention_pool_unconverted_is_refused_and_converted_is_adapted():
    model = build_model("RN50", shrunk_config("RN50", small=True))
    names = [f"visual.attnpool.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "c_proj")]
    with pytest.raises(
        ConfigError, match=r"visual\.attnpool\.q_proj \(AttentionPool2d\.forward reads self\.q_proj\.weight"
    ):
        inject_adapters(model, AdapterConfig("kradapter", names), forward_check=example_forward(model))
    assert not list(adapted_layers(model))
    convert_towers(model)
    inject_adapters(model, AdapterConfig("kradapter", names), forward_check=example_forward(model))
    assert sorted(name for name, _ in adapted_layers(model)) == sorted(names)


def test_eva_fused_attention_unconverted_is_refused_and_converted_is_adapted():
    model = build_model("EVA01-g-14", shrunk_config("EVA01-g-14", small=True))
    with pytest.raises(
        ConfigError,
        match=r"visual\.trunk\.blocks\.0\.attn\.qkv \(EvaAttention\.forward reads self\.qkv\.weight directly and calls it only in some cases\)",
    ):
        inject_adapters(
            model,
            AdapterConfig("lora", "visual.trunk.blocks.0.attn.qkv"),
            forward_check=example_forward(model),
        )
    assert not list(adapted_layers(model))
    convert_towers(model)
    targets = clip_targets(model, layers=["q", "k", "v"], towers="vision", blocks=[0])
    assert list(targets) == [f"visual.trunk.blocks.0.attn.qkv.{p}_proj" for p in "qkv"]
    inject_adapters(model, AdapterConfig("lora", targets), forward_check=example_forward(model))
    assert len(list(adapted_layers(model))) == 3
