"""Tower kinds: the exact conversions (timm's fused q/k/v and k/v, EVA's fused attention, pointwise MLPs,
ResNet's attention pool) and their export back, and the labels of every tower kind."""

from __future__ import annotations

import logging

import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from timm.layers import Attention, AttentionPoolLatent, AttentionRope, LayerNorm, Mlp, RotaryEmbeddingCat
from timm.models.eva import EvaAttention
from timm.models.fastvit import Attention as FastVitAttention
from timm.models.fastvit import ConvMlp
from timm.models.swin_transformer import WindowAttention
from torch import nn

from kr_vlm.adapters import adapted_layers
from kr_vlm.errors import ConfigError
from kr_vlm.models.converted import PointwiseConv, SeparateAttentionPool2d, SplitLinear, fuse_qkv_state_dict
from kr_vlm.models.targets import clip_layer_labels, clip_targets
from kr_vlm.models.towers import clip_towers, convert_towers, tower_labels
from kr_vlm.models.towers.timm import CONVERSIONS
from kr_vlm.models.zoo import build_model, shrunk_config

DIM, HEADS = 64, 2


def _convert(module: nn.Module) -> nn.Module:
    """``module`` with timm's conversions applied to it and its submodules, as convert_towers does."""
    for name, child in list(module.named_modules()):
        for conversion in CONVERSIONS:
            if conversion.applies(child):
                replacement = conversion.convert(child)
                if replacement is not child:
                    module.set_submodule(name, replacement)
    return module


def _assert_equal_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: the largest difference within 1e-6 of the largest output."""
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-6


def _randomise(module: nn.Module) -> nn.Module:
    """Random values in every parameter (timm starts some biases, EVA's q/v biases, at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.2)
    return module.eval()


def _rope(tokens_side: int) -> torch.Tensor:
    return RotaryEmbeddingCat(
        DIM // HEADS, in_pixels=False, feat_shape=(tokens_side, tokens_side)
    ).get_embed()


def _attention_cases():
    x = torch.randn(2, 10, DIM)
    boolean_mask = torch.rand(2, 1, 10, 10) > 0.3
    boolean_mask[..., 0] = True  # every query may attend to something
    float_mask = torch.randn(2, 1, 10, 10)
    return {
        "timm Attention, qk norm, float mask": (
            lambda: Attention(DIM, HEADS, qkv_bias=True, qk_norm=True, norm_layer=LayerNorm),
            (x,),
            {"attn_mask": float_mask},
        ),
        "timm Attention, no bias, bool mask": (
            lambda: Attention(DIM, HEADS),
            (x,),
            {"attn_mask": boolean_mask},
        ),
        "timm Attention, causal": (lambda: Attention(DIM, HEADS, qkv_bias=True), (x,), {"is_causal": True}),
        "timm AttentionRope (PE)": (
            lambda: AttentionRope(DIM, HEADS, num_prefix_tokens=1),
            (x,),
            {"rope": _rope(3)},
        ),
        "EVA fused, q/v biases, rope": (
            lambda: EvaAttention(DIM, HEADS, qkv_fused=True, num_prefix_tokens=1, norm_layer=LayerNorm),
            (x,),
            {"rope": _rope(3)},
        ),
        "EVA fused, separate bias add": (
            lambda: EvaAttention(DIM, HEADS, qkv_fused=True, qkv_bias_separate=True, scale_norm=False),
            (x,),
            {"attn_mask": float_mask},
        ),
        "EVA fused, no bias": (
            lambda: EvaAttention(DIM, HEADS, qkv_fused=True, qkv_bias=False, scale_norm=False),
            (x,),
            {},
        ),
        "Swin window attention, shifted-window mask": (
            lambda: WindowAttention(DIM, HEADS, window_size=(3, 3)),
            (torch.randn(4, 9, DIM),),
            {"mask": torch.where(torch.rand(2, 9, 9) > 0.5, 0.0, -100.0)},
        ),
        "FastViT attention": (lambda: FastVitAttention(DIM, head_dim=32), (torch.randn(2, DIM, 3, 3),), {}),
        "attention pool (SigLIP), qk norm, mask": (
            lambda: AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, norm_layer=LayerNorm),
            (x,),
            {"attn_mask": float_mask[:, :, :1]},
        ),
    }


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("case", list(_attention_cases()))
def test_fused_projections_split_exactly_and_export_back(case, fused_attn):
    make, args, kwargs = _attention_cases()[case]
    torch.manual_seed(0)
    module = _randomise(make())
    module.fused_attn = fused_attn
    with torch.no_grad():
        reference = module(*args, **kwargs)
        stock_state = module.state_dict()
        converted = _convert(module)
        _assert_equal_outputs(converted(*args, **kwargs), reference)
    split = [child for child in converted.modules() if isinstance(child, SplitLinear)]
    assert split and all(isinstance(part, nn.Linear) for layer in split for part in layer.parts())
    assert not any(name.endswith(("q_bias", "v_bias")) for name, _ in converted.named_parameters())
    exported = fuse_qkv_state_dict(converted, converted.state_dict())
    assert exported.keys() == stock_state.keys()
    for key, value in stock_state.items():
        assert torch.equal(exported[key], value), key


def test_split_parts_are_the_rows_of_the_fused_weight():
    linear = _randomise(nn.Linear(DIM, 3 * DIM))
    split = SplitLinear.split(linear, ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(split.k_proj.weight, linear.weight[DIM : 2 * DIM])
    assert torch.equal(split.v_proj.bias, linear.bias[2 * DIM :])
    assert (split.in_features, split.out_features) == (DIM, 3 * DIM)


@pytest.mark.parametrize(
    "make",
    [lambda: Mlp(DIM, 2 * DIM, use_conv=True), lambda: ConvMlp(DIM, 2 * DIM)],
    ids=["timm conv Mlp (ConvNeXt conv_mlp)", "FastViT ConvMlp"],
)
def test_pointwise_convolutions_become_linears_exactly(make):
    mlp = _randomise(make())
    x = torch.randn(2, DIM, 5, 5)
    with torch.no_grad():
        reference, stock_state = mlp(x), mlp.state_dict()
        converted = _convert(mlp)
        _assert_equal_outputs(converted(x), reference)
    assert isinstance(converted.fc1, PointwiseConv) and isinstance(converted.fc2.linear, nn.Linear)
    exported = fuse_qkv_state_dict(converted, converted.state_dict())
    assert {key: value.shape for key, value in exported.items()} == {
        k: v.shape for k, v in stock_state.items()
    }
    assert all(torch.equal(exported[key], value) for key, value in stock_state.items())


def test_only_pointwise_convolutions_are_converted():
    assert PointwiseConv.from_conv(nn.Conv2d(4, 8, 1)) is not None
    for conv in (nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(4, 8, 1, groups=2)):
        with pytest.raises(ValueError, match="not a pointwise"):
            PointwiseConv.from_conv(conv)


def test_resnet_attention_pool_calls_its_projections_exactly():
    torch.manual_seed(0)
    pool = _randomise(AttentionPool2d(spacial_dim=4, embed_dim=DIM, num_heads=4, output_dim=32))
    x = torch.randn(2, DIM, 4, 4)
    with torch.no_grad():
        converted = SeparateAttentionPool2d(pool)
        _assert_equal_outputs(converted(x), pool(x))
    assert converted.state_dict().keys() == pool.state_dict().keys()  # stock open_clip loads it as it is


# --- labels of every tower kind, on models of the zoo at reduced depth and width -----------------------


@pytest.fixture(scope="module")
def siglip():
    return convert_towers(build_model("ViT-B-16-SigLIP", shrunk_config("ViT-B-16-SigLIP", small=True)))


def test_timm_vit_labels_the_split_attention_and_the_attention_pool(siglip):
    labels = clip_targets(siglip, towers="vision")
    assert labels["visual.trunk.blocks.0.attn.qkv.q_proj"] == {"tower": "vision", "layer": "q", "block": 0}
    assert labels["visual.trunk.blocks.1.attn.proj"] == {"tower": "vision", "layer": "o", "block": 1}
    assert labels["visual.trunk.attn_pool.kv.v_proj"] == {"tower": "vision", "layer": "v", "block": "pool"}
    assert labels["visual.trunk.attn_pool.mlp.fc2"] == {"tower": "vision", "layer": "fc2", "block": "pool"}
    assert len(labels) == 2 * 6 + 6
    assert list(clip_targets(siglip, layers="q", towers="vision", blocks="last_1")) == [
        "visual.trunk.blocks.1.attn.qkv.q_proj"
    ]
    assert list(clip_targets(siglip, layers=["q", "k"], towers="vision", blocks=[0, "pool"])) == [
        "visual.trunk.blocks.0.attn.qkv.q_proj",
        "visual.trunk.blocks.0.attn.qkv.k_proj",
        "visual.trunk.attn_pool.q",
        "visual.trunk.attn_pool.kv.k_proj",
    ]


def test_gated_mlps_give_both_input_linears_fc1():
    model = convert_towers(build_model("EVA02-B-16", shrunk_config("EVA02-B-16", small=True)))
    fc1 = clip_targets(model, layers="fc1", towers="vision", blocks=[0])
    assert list(fc1) == ["visual.trunk.blocks.0.mlp.fc1_g", "visual.trunk.blocks.0.mlp.fc1_x"]
    # EVA02 keeps q, k and v apart already.
    assert "visual.trunk.blocks.0.attn.q_proj" in clip_targets(model, layers="q", towers="vision")


def test_convnext_has_mlp_labels_only(caplog):
    model = convert_towers(build_model("convnext_base", shrunk_config("convnext_base", small=True)))
    assert {labels["layer"] for labels in clip_targets(model, towers="vision").values()} == {"fc1", "fc2"}
    with pytest.raises(ConfigError, match="selects no linear layer"):
        clip_targets(model, layers=["q"], towers="vision")
    with caplog.at_level(logging.WARNING):
        both = clip_targets(model, layers=["q"], towers="both")
    assert all(name.startswith("transformer.") for name in both)
    assert "timm ConvNeXt" in caplog.text and "its labelled layers: fc1, fc2" in caplog.text


def test_coca_decoder_is_a_tower_of_its_own_with_alternating_blocks():
    model = convert_towers(build_model("coca_ViT-B-32", shrunk_config("coca_ViT-B-32", small=True)))
    assert [tower.label for tower in clip_towers(model)] == ["vision", "text", "decoder"]
    decoder = clip_targets(model, layers="q", towers="decoder")
    assert decoder == {
        "text_decoder.resblocks.0.attn.q_proj": {"tower": "decoder", "layer": "q", "block": 0},
        "text_decoder.cross_attn.0.attn.q_proj": {"tower": "decoder", "layer": "q", "block": 1},
        "text_decoder.resblocks.1.attn.q_proj": {"tower": "decoder", "layer": "q", "block": 2},
        "text_decoder.cross_attn.1.attn.q_proj": {"tower": "decoder", "layer": "q", "block": 3},
    }
    # "both" is vision and text, "all" adds the decoder; the vision attention pool is labelled too.
    assert not any(name.startswith("text_decoder.") for name in clip_targets(model))
    assert any(name.startswith("text_decoder.") for name in clip_targets(model, towers="all"))
    assert clip_targets(model, layers="k", towers="vision", blocks=["pool"]) == {
        "visual.attn_pool.attn.k_proj": {"tower": "vision", "layer": "k", "block": "pool"}
    }


def test_labels_need_converted_towers_and_a_known_kind(tiny_clip):
    model = build_model("EVA01-g-14", shrunk_config("EVA01-g-14", small=True))
    with pytest.raises(ConfigError, match=r"vision tower .*timm ViT.* not converted .*convert_towers"):
        clip_targets(model, towers="vision")
    tiny_clip.visual = nn.Sequential(nn.Linear(4, 4))
    (vision,) = [tower for tower in clip_towers(tiny_clip) if tower.label == "vision"]
    with pytest.raises(
        ConfigError, match=r"vision tower \(visual: Sequential, of a kind kr_vlm has no labels"
    ):
        tower_labels(vision)
    assert all(labels["tower"] == "text" for labels in clip_layer_labels(tiny_clip).values())


# --- CLIPFineTuner on converted timm towers: the forward check, and the merged export for stock open_clip ---


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA01-g-14", "RN50"])
def test_finetuner_exports_timm_towers_for_stock_open_clip(name, tmp_path):
    from safetensors.torch import load_file

    from kr_vlm.adapters import disabled_adapters
    from kr_vlm.models import CLIPFineTuner

    cfg = shrunk_config(name, small=True)
    # open_clip's own tokenizer (the zoo's SigLIP tokenizers are Hugging Face ones, not cached here; the
    # name says nothing of SigLIP, for which open_clip would fetch SigLIP's vocabulary).
    cfg["text_cfg"].pop("hf_tokenizer_name", None)
    cfg["text_cfg"]["vocab_size"] = 49408
    module = CLIPFineTuner(
        clip={"name": "kr-test-timm-tower", "model_cfg": cfg}, adapter={"method": "kradapter"}
    )
    adapted = dict(adapted_layers(module.clip_model))
    assert any(layer.endswith("q_proj") for layer in adapted)  # split q/k/v are adapted one by one
    with torch.no_grad():
        for layer in adapted.values():
            layer.kr_u.normal_(std=0.05)
    plain = build_model(name, cfg).eval()
    plain.load_state_dict(load_file(module.export_merged(tmp_path / "merged.safetensors")), strict=True)
    images = torch.randn(
        2,
        3,
        *(
            plain.visual.image_size
            if isinstance(plain.visual.image_size, tuple)
            else (plain.visual.image_size,) * 2
        ),
    )
    model = module.clip_model.eval()
    with torch.no_grad():
        expected, exported = model.encode_image(images), plain.encode_image(images)
        with disabled_adapters(model):
            base = model.encode_image(images)
    _assert_equal_outputs(exported, expected)
    assert (exported - base).abs().max() > 1e-3 * base.abs().max()  # the adapters changed the vision tower


@pytest.mark.parametrize("precision", ["fp16", "bf16", "pure_bf16"])
def test_the_forward_check_runs_at_the_precision_of_the_weights(tiny_clip_cfg, precision):
    from kr_vlm.models import CLIPFineTuner

    module = CLIPFineTuner(
        clip={"name": "kr-test-tiny-lp", "model_cfg": tiny_clip_cfg, "precision": precision},
        adapter={"method": "kradapter"},
    )
    assert len(list(adapted_layers(module.clip_model))) == 2 * 2 * 6
