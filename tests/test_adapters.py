"""Adapter library: config, injection, delta weights, merging, saving and loading, for every method.

The models are tiny and built here (no CLIP, no downloads), which also shows that kr_vlm.adapters works on
any module tree: a custom transformer, a Hugging Face-style tree, and a tiny transformers Llama.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_models import tiny_llama
from kr_vlm.adapters import (
    METHODS,
    AdaptedLayer,
    AdapterConfig,
    KRAdapterLinear,
    adapted_layers,
    adapter_state_dict,
    disabled_adapters,
    find_target_linears,
    inject_adapters,
    layer_labels,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    merge_and_unload,
    merged_state_dict,
    path_labels,
    print_trainable_parameters,
    save_adapters,
    unload,
    unmerge_adapters,
)
from kr_vlm.adapters.inject import count_parameters
from kr_vlm.adapters.layer import Method, instances_of, replace_layers
from kr_vlm.adapters.methods import REGISTRY
from kr_vlm.adapters.methods.full import FullFineTuneLinear
from kr_vlm.adapters.methods.peft import PEFT_TYPES
from kr_vlm.adapters.methods.peft_layer import PeftLayerView

WIDTH, HIDDEN = 16, 24

# Small options for every method that adapts layers (peft defaults where they are small enough).
METHOD_OPTIONS: dict[str, dict] = {
    "kradapter": {"rank": 3, "scaling": 2.0},
    "lora": {"r": 2, "lora_alpha": 4},
    "dora": {"r": 2, "lora_alpha": 4},
    "vera": {"r": 4},
    "lokr": {"r": 2},
    "loha": {"r": 2},
    "randlora": {"r": 4},
    "full": {},
}
ADAPTING_METHODS = list(METHOD_OPTIONS)
TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]  # square and both rectangular orientations


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / WIDTH**0.5
        return self.o_proj(scores.softmax(-1) @ self.v_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.self_attn = Attention()
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyTransformer(nn.Module):
    """Hugging Face-style names: ``model.layers.0.self_attn.q_proj``, ``model.layers.0.fc1``, ..."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block(x)
        return self.head(x)


def build_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(123))


def adapted(method: str, seed: int = 0, adapter_seed: int = 1) -> TinyTransformer:
    """A model with ``method`` injected and its adapters moved away from their (often zero-update) init."""
    model = build_model(seed)
    torch.manual_seed(adapter_seed)
    inject_adapters(model, AdapterConfig(method, TARGETS, **METHOD_OPTIONS.get(method, {})))
    # RandLoRA's default scaling (alpha / r = 160) makes its update large per unit of its parameters.
    scale = 1e-4 if method == "randlora" else 0.05
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()


def module_of(layer) -> nn.Module:
    return layer.module if isinstance(layer, PeftLayerView) else layer


def base_weight(layer) -> torch.Tensor:
    module = module_of(layer)
    return module.initial_weight if isinstance(module, FullFineTuneLinear) else module.base_layer.weight


# ---------------------------------------------------------------- config


def test_methods_are_the_documented_ones():
    assert METHODS == ("kradapter", "lora", "dora", "vera", "lokr", "loha", "randlora", "full", "none")


def test_unknown_method_lists_valid_methods():
    with pytest.raises(ValueError, match="Unknown adapter method 'lorra'.*kradapter, lora, dora"):
        AdapterConfig("lorra", ["q_proj"])


@pytest.mark.parametrize(
    ("method", "option", "valid"),
    [
        ("lora", "rank", "lora_alpha"),
        ("vera", "lora_alpha", "d_initial"),
        ("kradapter", "r", "factor_dtype, rank"),
    ],
)
def test_unknown_option_names_valid_options(method, option, valid):
    with pytest.raises(ValueError, match=f"Unknown option '{option}' for method '{method}'.*{valid}"):
        AdapterConfig(method, ["q_proj"], **{option: 2})


def test_reserved_peft_options_say_why():
    with pytest.raises(ValueError, match="'use_dora'.*method='dora'"):
        AdapterConfig("lora", ["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="'modules_to_save'.*would not save"):
        AdapterConfig("lora", ["q_proj"], modules_to_save=["head"])
    with pytest.raises(ValueError, match="Unknown option 'r' for method 'full'. Valid options: none"):
        AdapterConfig("full", ["q_proj"], r=2)


def test_kradapter_factor_dtype_is_a_name():
    assert AdapterConfig("kradapter", ["q_proj"], factor_dtype=torch.bfloat16).options == {
        "factor_dtype": "bfloat16"
    }
    assert (
        AdapterConfig("kradapter", ["q_proj"], factor_dtype="torch.float64").options["factor_dtype"]
        == "torch.float64"
    )
    with pytest.raises(ValueError, match="floating point torch dtype"):
        AdapterConfig("kradapter", ["q_proj"], factor_dtype="int8")
    model = inject_adapters(build_model(), AdapterConfig("kradapter", ["fc1"], factor_dtype="float64"))
    assert model.model.layers[0].fc1.kr_u.dtype == torch.float64


def test_config_dict_round_trip_is_json_safe():
    config = AdapterConfig("lora", ("q_proj", "v_proj"), r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {
        "method": "lora",
        "target_modules": ["q_proj", "v_proj"],
        "options": {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}},
    }
    assert AdapterConfig.from_dict(data) == config
    regex = AdapterConfig("kradapter", r".*\.(q|v)_proj", scaling=1.0)
    assert AdapterConfig.from_dict(regex.to_dict()) == regex
    assert AdapterConfig.from_dict({"method": "none"}) == AdapterConfig("none")
    with pytest.raises(ValueError, match="Unknown adapter config keys"):
        AdapterConfig.from_dict({"method": "lora", "target_modules": ["q"], "r": 2})


def test_config_accepts_hydra_containers():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"targets": ["q_proj"], "pattern": {"q_proj": 2}})
    config = AdapterConfig("lora", node.targets, rank_pattern=node.pattern)
    assert config == AdapterConfig("lora", ["q_proj"], rank_pattern={"q_proj": 2})
    json.dumps(config.to_dict())


def test_config_target_validation():
    with pytest.raises(ValueError, match="needs target_modules"):
        AdapterConfig("lora", [])
    with pytest.raises(ValueError, match="needs target_modules"):
        AdapterConfig("full")
    with pytest.raises(ValueError, match="not a valid regex"):
        AdapterConfig("lora", "q_proj(")
    with pytest.raises(ValueError, match="adapts nothing"):
        AdapterConfig("none", ["q_proj"])
    with pytest.raises(TypeError, match="non-empty strings"):
        AdapterConfig("lora", ["q_proj", 3])


# ---------------------------------------------------------------- injection and the layer interface


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_injection_replaces_exactly_the_targets(method):
    model = adapted(method)
    names = [name for name, _ in adapted_layers(model)]
    expected = [
        f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "self_attn.v_proj")
    ]
    expected += [f"model.layers.{i}.{part}" for i in range(2) for part in ("fc1", "fc2")]
    assert sorted(names) == sorted(expected)
    assert names == [name for name, _ in model.named_modules() if name in set(expected)]  # module order
    assert model.kr_vlm_adapter_config == AdapterConfig(method, TARGETS, **METHOD_OPTIONS[method])
    for _, layer in adapted_layers(model):
        assert hasattr(layer, "delta_weight") and hasattr(layer, "merge") and hasattr(layer, "unmerge")
        assert layer.merged is False
    first = dict(adapted_layers(model))["model.layers.0.fc1"]
    assert (first.out_features, first.in_features) == (HIDDEN, WIDTH)
    if method == "kradapter":
        assert isinstance(first, KRAdapterLinear)
    elif method == "full":
        assert isinstance(first, FullFineTuneLinear)
    else:
        assert isinstance(first, PeftLayerView) and first.module is model.get_submodule("model.layers.0.fc1")
        assert list(first.parameters())


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_only_adapter_tensors_train(method):
    model = adapted(method)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    adapter_tensors = adapter_state_dict(model)
    parameter_names = {name for name, _ in model.named_parameters()}
    # Everything that trains is saved; what is saved and is not a parameter is a frozen shared projection.
    assert trainable == {name for name in adapter_tensors if name in parameter_names}
    assert all(
        ("vera_" in name or "randlora_" in name) for name in adapter_tensors if name not in parameter_names
    )
    assert trainable  # something trains
    if method != "full":
        assert not any(name.endswith(("base_layer.weight", "base_layer.bias")) for name in trainable)
        assert not any(name.startswith("head.") or ".norm." in name for name in trainable)
    counted_trainable, total = count_parameters(model)
    assert counted_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_delta_weight_matches_forward(method):
    model = adapted(method)
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(5))
    for name, layer in adapted_layers(model):
        delta = layer.delta_weight()
        assert delta.shape == (layer.out_features, layer.in_features), name
        assert delta.abs().max() > 0, name
        module = module_of(layer)
        x_in = x[:, : layer.in_features]
        bias = module.bias if isinstance(module, FullFineTuneLinear) else module.base_layer.bias
        expected = nn.functional.linear(x_in, base_weight(layer), bias) + x_in @ delta.T
        torch.testing.assert_close(module(x_in), expected, rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_delta_weight_is_differentiable(method):
    model = adapted(method)
    _, layer = next(iter(adapted_layers(model)))
    layer.delta_weight().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_merge_and_unmerge(method):
    model = adapted(method)
    x = inputs()
    expected = model(x)
    originals = {name: base_weight(layer).detach().clone() for name, layer in adapted_layers(model)}
    deltas = {name: layer.delta_weight().detach().clone() for name, layer in adapted_layers(model)}

    merge_adapters(model)
    assert all(layer.merged for _, layer in adapted_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    for name, layer in adapted_layers(model):
        module = module_of(layer)
        merged_weight = module.weight if isinstance(module, FullFineTuneLinear) else module.base_layer.weight
        # what merging added to the base weight is exactly delta_weight (DoRA included)
        torch.testing.assert_close(merged_weight - originals[name], deltas[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight(), deltas[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base_weight(), originals[name], rtol=1e-4, atol=1e-5)  # W0 still
    merge_adapters(model)  # merging twice changes nothing
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)

    unmerge_adapters(model)
    assert not any(layer.merged for _, layer in adapted_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    for name, layer in adapted_layers(model):
        torch.testing.assert_close(base_weight(layer), originals[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_weight(), originals[name], rtol=1e-5, atol=1e-6)
    unmerge_adapters(model)  # unmerging an unmerged model changes nothing


# The rank caps of the TARGETS' updates (16x16, 24x16 and 16x24: min(d_out, d_in) = 16) with METHOD_OPTIONS.
RANK_CAPS = {
    "kradapter": 16,  # generically full rank
    "lora": 2,  # r
    "dora": 16,  # the row scaling changes W0 itself
    "vera": 4,  # r
    # rank(w1) * rank(w2) of kron(w1, w2): whole 4x4 factors for 16x16, w2 = w2_a @ w2_b of rank 2 for 24x16
    "lokr": {"q_proj": 16, "v_proj": 16, "fc1": 8, "fc2": 8},
    "loha": 4,  # r ** 2
    "randlora": 16,  # bases chosen to span every direction
    "full": 16,
}


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_rank_cap_is_the_rank_a_generic_update_reaches(method):
    for name, layer in adapted_layers(adapted(method)):
        # Singular values below 1e-4 of the largest are float32 round-off of a lower-rank product.
        rank = int(torch.linalg.matrix_rank(layer.delta_weight().detach(), rtol=1e-4))
        cap = RANK_CAPS[method]
        cap = cap[name.rsplit(".", 1)[-1]] if isinstance(cap, dict) else cap
        assert layer.rank_cap == cap and rank <= cap, name
        # RandLoRA's random bases are so badly conditioned at this size that float32 cannot tell its
        # smallest directions from round-off.
        assert rank == layer.rank_cap or method == "randlora", name


def test_full_finetuning_reports_weight_change():
    model = build_model()
    before = model.model.layers[0].fc1.weight
    inject_adapters(model, AdapterConfig("full", ["fc1"]))
    layer = model.model.layers[0].fc1
    assert isinstance(layer, FullFineTuneLinear) and layer.weight is before  # same parameter, no copy
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert set(adapter_state_dict(model)) == {
        f"model.layers.{i}.fc1.{p}" for i in range(2) for p in ("weight", "bias")
    }
    assert "model.layers.0.fc1.initial_weight" not in model.state_dict()  # not persistent
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(inputs()).square().mean().backward()
    optimizer.step()
    torch.testing.assert_close(layer.delta_weight(), layer.weight.detach() - layer.initial_weight)
    assert layer.delta_weight().abs().max() > 0


def test_method_none_freezes_everything_and_replaces_nothing(tmp_path):
    model = build_model()
    reference = [type(module) for module in model.modules()]
    inject_adapters(model, AdapterConfig("none"))
    assert [type(module) for module in model.modules()] == reference
    assert count_parameters(model)[0] == 0
    assert list(adapted_layers(model)) == [] and adapter_state_dict(model) == {}
    save_adapters(model, tmp_path / "none")
    fresh = load_adapters(build_model(), tmp_path / "none")
    assert fresh.kr_vlm_adapter_config == AdapterConfig("none") and count_parameters(fresh)[0] == 0


def test_regex_targets_full_names():
    model = build_model()
    inject_adapters(model, AdapterConfig("kradapter", r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert [name for name, _ in adapted_layers(model)] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    # a full-match regex: the same pattern without the prefix matches nothing
    with pytest.raises(ValueError, match="No module matches"):
        inject_adapters(build_model(), AdapterConfig("lora", r"self_attn\.q_proj", r=2))


def test_dotted_suffix_targets():
    model = build_model()
    inject_adapters(model, AdapterConfig("lora", ["layers.0.self_attn.q_proj", "head"], r=2))
    assert [name for name, _ in adapted_layers(model)] == ["model.layers.0.self_attn.q_proj", "head"]
    # a suffix matches whole name parts only ("proj" is not a suffix of "q_proj" after a dot)
    with pytest.raises(ValueError, match="No module matches"):
        inject_adapters(build_model(), AdapterConfig("lora", ["proj"], r=2))


def test_vera_and_randlora_share_one_projection_saved_once():
    for method, projection in (("vera", "vera_A"), ("randlora", "randlora_B")):
        model = adapted(method)
        names = [name for name in adapter_state_dict(model) if f".{projection}." in name]
        assert names == [f"model.layers.0.self_attn.q_proj.{projection}.default"], method


def test_transformers_llama():
    model = tiny_llama()
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    base_logits = model(tokens).logits
    for method in ("kradapter", "dora"):
        model = tiny_llama()
        inject_adapters(
            model, AdapterConfig(method, ["q_proj", "v_proj", "down_proj"], **METHOD_OPTIONS[method])
        )
        assert len(list(adapted_layers(model))) == 6
        torch.testing.assert_close(model(tokens).logits, base_logits)  # both start as the identity update
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn_like(parameter))
        adapted_logits = model(tokens).logits
        assert not torch.allclose(adapted_logits, base_logits)
        merge_adapters(model)
        torch.testing.assert_close(model(tokens).logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_open_clip_mlp_layers_and_unconverted_attention(tiny_clip):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = tiny_clip.encode_image(images)
    with pytest.raises(ValueError, match="out_proj of torch.nn.MultiheadAttention"):
        inject_adapters(tiny_clip, AdapterConfig("lora", ["out_proj"], r=2))
    inject_adapters(tiny_clip, AdapterConfig("kradapter", ["mlp.c_fc", "mlp.c_proj"]))
    assert len(list(adapted_layers(tiny_clip))) == 8  # 2 blocks x 2 towers x 2 layers
    torch.testing.assert_close(tiny_clip.encode_image(images), expected)  # U starts at zero


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_save_load_round_trip(method, tmp_path):
    model = adapted(method)
    x = inputs()
    expected = model(x)
    save_adapters(model, tmp_path / method)
    file_format = REGISTRY[method].file_format
    kr_vlm_file = "adapter_config.json" if file_format is None else "kr_vlm_adapter_config.json"
    written = json.loads((tmp_path / method / kr_vlm_file).read_text())
    assert written["method"] == method and written["format_version"] == 2 and "kr_vlm_version" in written
    saved = load_file(tmp_path / method / "adapter_model.safetensors")
    if file_format is None:  # kr_vlm's format: the model's own names
        assert saved.keys() == adapter_state_dict(model).keys()
    else:  # peft's format: peft's names (tests/test_hf.py checks them against peft's own files)
        assert saved.keys() == file_format.checkpoint(dict(adapted_layers(model))).keys()
        peft_config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert peft_config["peft_type"] == PEFT_TYPES[method]

    # A fresh base model whose adapters would be initialised differently; loading must overwrite them all.
    fresh = build_model()
    torch.manual_seed(99)
    load_adapters(fresh, tmp_path / method)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    for name, tensor in adapter_state_dict(fresh).items():
        torch.testing.assert_close(tensor, adapter_state_dict(model)[name], rtol=0, atol=0)

    # Loading into a model that already holds an equal config works too.
    again = adapted(method, adapter_seed=7)
    load_adapters(again, tmp_path / method)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_saved_projections_make_loading_exact(tmp_path):
    model = adapted("vera")
    save_adapters(model, tmp_path)
    fresh = build_model()
    inject_adapters(fresh, model.kr_vlm_adapter_config)
    projection = adapter_state_dict(fresh)["model.layers.0.self_attn.q_proj.vera_A.default"]
    projection.zero_()  # as if this platform had generated different random projections
    load_adapters(fresh, tmp_path)
    # every layer shares the projection, so the one saved tensor restores it everywhere
    shared = fresh.model.layers[1].fc2.vera_A["default"]
    torch.testing.assert_close(shared, model.model.layers[1].fc2.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(fresh(inputs()), model(inputs()), rtol=0, atol=0)


def test_save_handles_shared_storage(tmp_path):
    """safetensors refuses tensors that share memory; layers whose weights view one buffer still save."""
    model = build_model()
    storage = torch.randn(2 * WIDTH, WIDTH)
    model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(storage[:WIDTH])
    model.model.layers[0].self_attn.k_proj.weight = nn.Parameter(storage[WIDTH:])
    inject_adapters(model, AdapterConfig("full", ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"]))
    save_adapters(model, tmp_path)
    fresh = load_adapters(build_model(), tmp_path)
    torch.testing.assert_close(fresh(inputs()), model(inputs()), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_folders_of_format_version_1_still_load(method, tmp_path):
    # Version 1 saved peft's methods in kr_vlm's format too: the model's own tensor names, one config file.
    model = adapted(method)
    config = {"format_version": 1, "kr_vlm_version": "0.1.0", **model.kr_vlm_adapter_config.to_dict()}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {name: tensor.contiguous() for name, tensor in adapter_state_dict(model).items()},
        tmp_path / "adapter_model.safetensors",
    )
    loaded = load_adapters(build_model(), tmp_path)
    torch.testing.assert_close(loaded(inputs()), model(inputs()), rtol=0, atol=0)


def test_save_from_a_wrapping_module(tmp_path):
    inner = adapted("lora")
    wrapper = nn.Sequential(inner)
    save_adapters(wrapper, tmp_path)  # names are relative to the injected module
    # (peft's key for the tensor the model names model.layers.0.fc1.lora_A.default.weight)
    assert "base_model.model.model.layers.0.fc1.lora_A.weight" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    fresh = load_adapters(build_model(), tmp_path)
    torch.testing.assert_close(fresh(inputs()), inner(inputs()), rtol=0, atol=0)


# ---------------------------------------------------------------- errors


def test_no_match_lists_linear_layers():
    with pytest.raises(ValueError) as error:
        inject_adapters(build_model(), AdapterConfig("lora", ["query"], r=2))
    message = str(error.value)
    assert "No module matches target_modules=['query']" in message
    assert "fc1, fc2, head, k_proj, o_proj, q_proj, v_proj" in message  # the distinct endings
    assert "model.layers.0.self_attn.q_proj" in message


def test_no_match_message_is_truncated_for_many_layers():
    many = nn.Sequential(*(nn.Linear(2, 2) for _ in range(300)))
    with pytest.raises(ValueError, match=r"300 nn.Linear layers.*and 275 more\.") as error:
        inject_adapters(many, AdapterConfig("lora", ["nothing"], r=1))
    assert len(str(error.value)) < 1000


def test_non_linear_target_is_an_error():
    with pytest.raises(ValueError, match=r"not nn.Linear: model.layers.0.norm \(LayerNorm\)"):
        inject_adapters(build_model(), AdapterConfig("kradapter", ["norm", "fc1"]))


def test_multihead_attention_out_proj_is_refused():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "fc": nn.Linear(8, 8)})
    with pytest.raises(ValueError, match="out_proj of torch.nn.MultiheadAttention: attn.out_proj"):
        inject_adapters(model, AdapterConfig("kradapter", ["out_proj", "fc"]))


def test_double_injection_is_an_error():
    model = adapted("kradapter")
    with pytest.raises(RuntimeError, match="already holds adapters"):
        inject_adapters(model, AdapterConfig("lora", ["fc1"], r=2))
    frozen = inject_adapters(build_model(), AdapterConfig("none"))
    with pytest.raises(RuntimeError, match="already holds adapters"):
        inject_adapters(frozen, AdapterConfig("none"))


def test_load_state_dict_is_strict():
    model = adapted("kradapter")
    good = {name: tensor.clone() for name, tensor in adapter_state_dict(model).items()}

    wrong_shape = dict(good, **{"model.layers.0.fc1.kr_v": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"different shape: model.layers.0.fc1.kr_v \(given \(3, 3\)"):
        load_adapter_state_dict(model, wrong_shape)
    missing = {name: tensor for name, tensor in good.items() if name != "model.layers.1.fc2.kr_u"}
    with pytest.raises(ValueError, match="1 missing: model.layers.1.fc2.kr_u"):
        load_adapter_state_dict(model, missing)
    extra = dict(good, **{"model.layers.0.fc1.lora_A.default.weight": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="1 unexpected: model.layers.0.fc1.lora_A.default.weight"):
        load_adapter_state_dict(model, extra)
    # nothing was loaded by the failed calls
    for name, tensor in adapter_state_dict(model).items():
        assert torch.equal(tensor, good[name])

    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        load_adapter_state_dict(model, good)


def test_load_errors_name_the_problem(tmp_path):
    model = adapted("lora")
    save_adapters(model, tmp_path / "lora")

    with pytest.raises(FileNotFoundError, match=f"No adapter config at {tmp_path / 'missing'}"):
        load_adapters(build_model(), tmp_path / "missing")
    (tmp_path / "lora_only_config").mkdir()
    (tmp_path / "lora_only_config" / "adapter_config.json").write_text(
        (tmp_path / "lora" / "adapter_config.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match="No adapter weights at .*adapter_model.safetensors"):
        load_adapters(build_model(), tmp_path / "lora_only_config")

    with pytest.raises(ValueError, match="already holds adapters with"):
        load_adapters(adapted("kradapter"), tmp_path / "lora")

    # a checkpoint for a model with another shape names the mis-shaped tensors
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.fc1.lora_B.weight"] = torch.zeros(HIDDEN + 1, 2)
    save_file(tensors, tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.fc1.lora_B.default.weight"):
        load_adapters(build_model(), tmp_path / "lora")

    # (lora is saved in peft's format: kr_vlm's config and its format version are in their own file)
    config = json.loads((tmp_path / "lora" / "kr_vlm_adapter_config.json").read_text())
    (tmp_path / "lora" / "kr_vlm_adapter_config.json").write_text(json.dumps(dict(config, format_version=99)))
    with pytest.raises(ValueError, match="format version 99"):
        load_adapters(build_model(), tmp_path / "lora")


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no adapters"):
        save_adapters(build_model(), tmp_path)


# ---------------------------------------------------------------- the method registry and labels


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_every_layer_answers_the_protocol(method):
    model = adapted(method)
    for name, layer in adapted_layers(model):
        assert isinstance(layer, AdaptedLayer), name
        prefixed = {f"{name}.{key}" for key in layer.adapter_state_dict()}
        assert prefixed <= set(adapter_state_dict(model)) | {
            key
            for key in prefixed
            if "vera_" in key or "randlora_" in key  # shared: saved once
        }


@dataclasses.dataclass
class ScaleOptions:
    scale: float = 1.0


class ScaledLinear(nn.Module):
    """A method made up for the test: ΔW = scale * diag(d) @ W0 with a trainable vector d."""

    def __init__(self, base: nn.Linear, scale: float) -> None:
        super().__init__()
        self.base_layer, self.scale, self.merged = base, scale, False
        self.d = nn.Parameter(torch.zeros(base.out_features))
        self.in_features, self.out_features = base.in_features, base.out_features

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.d[:, None] * self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if self.merged else self.base_layer(x) + x @ self.delta_weight().T

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.merged = False
        self.base_layer.weight /= 1 + self.scale * self.d[:, None]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"d": self.d}


def test_a_new_method_is_a_module_and_a_registry_line(monkeypatch, tmp_path):
    def inject(model, names, options):
        replace_layers(model, names, lambda base: ScaledLinear(base, options.scale))

    monkeypatch.setitem(REGISTRY, "scaled", Method(ScaleOptions, inject, find=instances_of(ScaledLinear)))
    with pytest.raises(ValueError, match="Unknown option 'scal' for method 'scaled'. Valid options: scale"):
        AdapterConfig("scaled", ["fc1"], scal=2.0)
    model = inject_adapters(build_model(), AdapterConfig("scaled", ["fc1", "fc2"], scale=0.5))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.d.normal_()
    x = inputs()
    expected = model(x)
    assert [name for name, _ in adapted_layers(model)] == [
        f"model.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")
    ]
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    save_adapters(model, tmp_path)
    torch.testing.assert_close(load_adapters(build_model(), tmp_path)(x), expected, rtol=0, atol=0)
    merge_adapters(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("model.layers.3.self_attn.q_proj", {"tower": "model", "block": 3, "layer": "self_attn.q_proj"}),
        (
            "vision_model.encoder.layers.0.self_attn.v_proj",
            {"tower": "vision_model", "block": 0, "layer": "self_attn.v_proj"},
        ),
        ("text_model.encoder.layers.11.mlp.fc2", {"tower": "text_model", "block": 11, "layer": "mlp.fc2"}),
        ("encoder.layer.0.output.dense", {"tower": "encoder", "block": 0, "layer": "output.dense"}),
        ("transformer.h.2.attn.c_attn", {"tower": "transformer", "block": 2, "layer": "attn.c_attn"}),
        ("lm_head", {"tower": "model", "layer": "lm_head"}),
        ("0", {"tower": "model", "layer": "0"}),
        ("0.fc", {"tower": "model", "block": 0, "layer": "fc"}),
    ],
)
def test_labels_from_the_module_path(name, labels):
    assert path_labels(name) == labels


LABELLED = {
    "model.layers.0.fc1": {"tower": "model", "layer": "fc1", "block": 0},
    "model.layers.1.self_attn.q_proj": {"tower": "model", "layer": "q", "block": 1},
}


def test_labelled_targets_are_exact_names_and_their_labels_are_saved(tmp_path):
    # a mapping selects exactly its names: "layers.0.fc1" as a suffix target would also match nothing else,
    # but the full name "model.layers.0.fc1" must not match "xmodel.layers.0.fc1" or "a.model.layers.0.fc1"
    nested = nn.ModuleDict({"a": build_model(), "model": build_model().model})
    config = AdapterConfig("kradapter", {"model.layers.0.fc1": LABELLED["model.layers.0.fc1"]})
    inject_adapters(nested, config)
    assert [name for name, _ in adapted_layers(nested)] == ["model.layers.0.fc1"]

    model = inject_adapters(build_model(), AdapterConfig("lora", LABELLED, r=2))
    assert layer_labels(model) == LABELLED
    assert layer_labels(nn.Sequential(model))["0.model.layers.0.fc1"] == LABELLED["model.layers.0.fc1"]
    save_adapters(model, tmp_path)
    written = json.loads((tmp_path / "kr_vlm_adapter_config.json").read_text())  # lora: peft's format
    assert written["target_modules"] == LABELLED
    loaded = load_adapters(build_model(), tmp_path)
    assert loaded.kr_vlm_adapter_config.labels == LABELLED and layer_labels(loaded) == LABELLED


def test_adapter_files_without_labels_still_load(tmp_path):
    model = inject_adapters(build_model(), AdapterConfig("lora", list(LABELLED), r=2))
    save_adapters(model, tmp_path)  # a list of names: what kr_vlm wrote before targets had labels
    # into a model whose adapters carry labels: the same layers, so the same config
    labelled = inject_adapters(build_model(), AdapterConfig("lora", LABELLED, r=2))
    assert labelled.kr_vlm_adapter_config == model.kr_vlm_adapter_config
    torch.testing.assert_close(load_adapters(labelled, tmp_path)(inputs()), model(inputs()), rtol=0, atol=0)
    # without labels, the layers are labelled by their paths
    assert layer_labels(load_adapters(build_model(), tmp_path))["model.layers.0.fc1"] == path_labels(
        "model.layers.0.fc1"
    )


def test_options_left_out_equal_their_defaults():
    assert AdapterConfig("kradapter", ["fc1"]) == AdapterConfig("kradapter", ["fc1"], rank=None, scaling=2.0)
    assert AdapterConfig("kradapter", ["fc1"], factor_dtype="torch.float32") == AdapterConfig(
        "kradapter", ["fc1"]
    )
    assert AdapterConfig("kradapter", ["fc1"]) != AdapterConfig("kradapter", ["fc1"], scaling=1.0)


# ---------------------------------------------------------------- back to a plain model


def plain_linears_only(model: nn.Module) -> bool:
    return all(type(module) is nn.Linear for module in model.modules() if isinstance(module, nn.Linear))


@pytest.mark.parametrize("method", ADAPTING_METHODS)
def test_merge_and_unload_leaves_a_plain_model(method, tmp_path):
    model = adapted(method)
    x = inputs()
    expected = model(x)
    assert merge_and_unload(model) is model
    assert plain_linears_only(model) and not list(adapted_layers(model))
    assert not hasattr(model, "kr_vlm_adapter_config")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # a stock model: its state dict loads strictly into the model as built, without kr_vlm
    torch.save(model.state_dict(), tmp_path / "merged.pt")
    stock = build_model()
    stock.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True), strict=True)
    torch.testing.assert_close(stock(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", [method for method in ADAPTING_METHODS if method != "full"])
def test_unload_and_disabled_adapters_give_the_base_model(method):
    x = inputs()
    base_output = build_model()(x)
    model = adapted(method)
    adapted_output = model(x)
    with disabled_adapters(model):
        torch.testing.assert_close(model(x), base_output, rtol=0, atol=0)
        assert plain_linears_only(model)
    torch.testing.assert_close(model(x), adapted_output, rtol=0, atol=0)
    with pytest.raises(KeyError), disabled_adapters(model):  # put back after an error too
        raise KeyError
    torch.testing.assert_close(model(x), adapted_output, rtol=0, atol=0)

    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"), disabled_adapters(model):
        pass
    unload(model)  # takes the merged updates out first
    assert plain_linears_only(model) and not hasattr(model, "kr_vlm_adapter_config")
    torch.testing.assert_close(model(x), base_output, rtol=1e-5, atol=1e-6)


def test_full_finetuning_has_no_adapter_to_drop():
    model = adapted("full")
    for drop in (unload, lambda model: disabled_adapters(model).__enter__()):
        with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.*method 'full'"):
            drop(model)
    assert len(list(adapted_layers(model))) == 8


class TiedHead(nn.Module):
    """A head whose weight is another module's (as tied input and output embeddings are)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, WIDTH)
        self.body = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_kradapter_refuses_tied_weights_unless_allowed():
    model = TiedHead()
    with pytest.raises(
        ValueError, match="head shares its weight with embed.weight.*allow_shared_weights=True"
    ):
        inject_adapters(model, AdapterConfig("kradapter", ["body", "head"]))
    assert all(parameter.requires_grad for parameter in model.parameters())  # left as it was
    inject_adapters(model, AdapterConfig("kradapter", ["body", "head"], allow_shared_weights=True))
    with torch.no_grad():
        model.head.kr_u.normal_()
    x = inputs()
    expected, embedding = model(x), model.embed.weight.detach().clone()
    for merge in (merge_adapters, merged_state_dict, merge_and_unload):
        with pytest.raises(RuntimeError, match="head shares its weight with embed.weight"):
            merge(model)
        # nothing was merged, not even the untied layer
        assert not any(layer.merged for _, layer in adapted_layers(model))
        assert torch.equal(model.embed.weight, embedding) and torch.equal(model(x), expected)


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_merging_peft_adapters_into_tied_weights_is_refused(method):
    model = inject_adapters(TiedHead(), AdapterConfig(method, ["head"], **METHOD_OPTIONS[method]))
    with pytest.raises(RuntimeError, match="head shares its weight with embed.weight"):
        merge_adapters(model)


class SmallLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.first = nn.Linear(WIDTH, WIDTH)
        self.last = nn.Linear(WIDTH, 3)


@pytest.mark.parametrize(
    ("method", "options", "error"),
    [
        ("kradapter", {"rank": 4}, "rank must be an integer in \\[1, min\\(d_out, d_in\\)\\] = \\[1, 3\\]"),
        ("lora", {"r": 0}, "r"),
    ],
)
def test_a_failed_injection_leaves_the_model_as_it_was(method, options, error):
    model = SmallLast()
    model.norm.requires_grad_(False)  # flags of the model's own, which must survive
    modules = dict(model.named_modules())
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attributes = set(vars(model))
    with pytest.raises((ValueError, TypeError), match=error):  # the first layer is adapted, the last fails
        inject_adapters(model, AdapterConfig(method, ["first", "last"], **options))
    assert dict(model.named_modules()) == modules
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    assert set(vars(model)) == attributes and not list(adapted_layers(model))
    inject_adapters(model, AdapterConfig("kradapter", ["first", "last"]))  # and can be adapted again


def test_all_linear_selects_every_linear_but_the_output_head():
    linears = [name for name, module in build_model().named_modules() if isinstance(module, nn.Linear)]
    assert find_target_linears(build_model(), "all-linear") == linears  # no output head to tell: all
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1), nn.Linear(4, 4))
    assert find_target_linears(model, "ALL-LINEAR") == ["0", "2"]  # MultiheadAttention never calls out_proj

    class WithHead(TinyTransformer):  # a Hugging Face model says which module is its output head
        def get_output_embeddings(self) -> nn.Module:
            return self.head

    names = [
        name for name, _ in adapted_layers(inject_adapters(WithHead(), AdapterConfig("lora", "all-linear")))
    ]
    assert names == [name for name in linears if name != "head"]


def test_print_trainable_parameters(capsys):
    model = adapted("kradapter")
    trainable, total = count_parameters(model)
    print_trainable_parameters(model)
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )
