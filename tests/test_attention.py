"""SeparateQKVAttention / convert_attention reproduce nn.MultiheadAttention and open_clip's attention."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.transformer import Attention as OpenClipAttention
from torch import nn

from kr_vlm.models.attention import SeparateQKVAttention, SeparateQKVCustomAttention, convert_attention

EMBED, HEADS, BATCH, LENGTH = 32, 4, 3, 6


def _inputs(batch_first: bool, kdim: int = EMBED) -> tuple[torch.Tensor, torch.Tensor]:
    query = torch.randn(BATCH, LENGTH, EMBED)
    context = torch.randn(BATCH, LENGTH + 1, kdim)
    if not batch_first:
        query, context = query.transpose(0, 1), context.transpose(0, 1)
    return query, context


def _masks(kind: str) -> dict[str, torch.Tensor]:
    source = LENGTH + 1
    bool_mask = torch.rand(LENGTH, source) > 0.6
    bool_mask[:, 0] = False  # every query keeps one key: fully masked rows are NaN in both
    padding = torch.zeros(BATCH, source, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "none": {},
        "bool": {"attn_mask": bool_mask},
        "float": {"attn_mask": torch.randn(LENGTH, source)},
        "float_per_head": {"attn_mask": torch.randn(BATCH * HEADS, LENGTH, source)},
        "bool_per_head": {"attn_mask": bool_mask.repeat(BATCH * HEADS, 1, 1)},
        "key_padding": {"key_padding_mask": padding},
        "float_key_padding": {"key_padding_mask": torch.zeros(BATCH, source).masked_fill(padding, -1e4)},
        "bool_and_key_padding": {"attn_mask": bool_mask, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "none",
        "bool",
        "float",
        "float_per_head",
        "bool_per_head",
        "key_padding",
        "float_key_padding",
        "bool_and_key_padding",
    ],
)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_matches_multihead_attention(kind, batch_first, training):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first).train(training)
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    assert converted.training == training
    query, context = _inputs(batch_first)
    masks = _masks(kind)

    expected = mha(query, context, context, need_weights=False, **masks)[0]
    out, weights = converted(query, context, context, need_weights=False, **masks)

    assert weights is None
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_open_clip_call_signature_and_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    x = torch.randn(BATCH, LENGTH, EMBED)
    causal = torch.full((LENGTH, LENGTH), float("-inf")).triu_(1)  # open_clip's build_causal_mask

    expected = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(converted(x, x, x, need_weights=False, attn_mask=causal)[0], expected)
    torch.testing.assert_close(converted(x, x, x, is_causal=True)[0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_input(batch_first):
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first).eval()
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    x = torch.randn(LENGTH, EMBED)
    torch.testing.assert_close(converted(x, x, x)[0], mha(x, x, x, need_weights=False)[0])


def test_no_bias_and_different_key_value_dims():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, bias=False, kdim=16, vdim=16, batch_first=True).eval()
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    assert converted.q_proj.bias is None and converted.out_proj.bias is None
    assert converted.k_proj.in_features == 16 and converted.v_proj.in_features == 16
    query, context = _inputs(True, kdim=16)
    torch.testing.assert_close(converted(query, context, context)[0], mha(query, context, context)[0])


def test_weights_are_copied_exactly_and_keep_requires_grad_and_dtype():
    mha = nn.MultiheadAttention(EMBED, HEADS, dtype=torch.float64)
    mha.in_proj_weight.requires_grad_(False)
    converted = SeparateQKVAttention.from_multihead_attention(mha)

    weight = torch.cat([converted.q_proj.weight, converted.k_proj.weight, converted.v_proj.weight])
    bias = torch.cat([converted.q_proj.bias, converted.k_proj.bias, converted.v_proj.bias])
    assert torch.equal(weight, mha.in_proj_weight) and torch.equal(bias, mha.in_proj_bias)
    assert torch.equal(converted.out_proj.weight, mha.out_proj.weight)
    assert converted.q_proj.weight.dtype == torch.float64
    assert not converted.q_proj.weight.requires_grad and converted.q_proj.bias.requires_grad
    assert converted.q_proj.weight.data_ptr() != mha.in_proj_weight.data_ptr()  # a copy, not a view


def test_gradients_match_the_fused_projection():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    x = torch.randn(BATCH, LENGTH, EMBED)

    mha(x, x, x, need_weights=False)[0].square().sum().backward()
    converted(x, x, x)[0].square().sum().backward()

    fused_grad = torch.cat(
        [converted.q_proj.weight.grad, converted.k_proj.weight.grad, converted.v_proj.weight.grad]
    )
    assert converted.q_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(fused_grad, mha.in_proj_weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(converted.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_attention_dropout_only_in_training():
    mha = nn.MultiheadAttention(EMBED, HEADS, dropout=0.5, batch_first=True)
    converted = SeparateQKVAttention.from_multihead_attention(mha)
    x = torch.randn(BATCH, LENGTH, EMBED)

    torch.manual_seed(1)
    first = converted(x, x, x)[0]
    second = converted(x, x, x)[0]
    assert not torch.allclose(first, second)

    converted.eval()
    mha.eval()
    torch.testing.assert_close(converted(x, x, x)[0], converted(x, x, x)[0])
    torch.testing.assert_close(converted(x, x, x)[0], mha(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"add_bias_kv": True}, "add_bias_kv"), ({"add_zero_attn": True}, "add_zero_attn")],
)
def test_unsupported_multihead_attention_options_are_refused(kwargs, message):
    with pytest.raises(NotImplementedError, match=message):
        SeparateQKVAttention.from_multihead_attention(nn.MultiheadAttention(EMBED, HEADS, **kwargs))


def test_need_weights_is_refused():
    converted = SeparateQKVAttention.from_multihead_attention(nn.MultiheadAttention(EMBED, HEADS))
    x = torch.randn(LENGTH, BATCH, EMBED)
    with pytest.raises(ValueError, match="need_weights=False"):
        converted(x, x, x, need_weights=True)


def test_convert_attention_refuses_a_bare_attention_module():
    with pytest.raises(TypeError, match="from_multihead_attention"):
        convert_attention(nn.MultiheadAttention(EMBED, HEADS))


def _tokens(context_length: int = 77) -> torch.Tensor:
    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)(["a photo of a dog.", "a cat"])


def _assert_same_features(reference: nn.Module, converted: nn.Module, image_size: int) -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, image_size, image_size)
    tokens = _tokens(converted.context_length if hasattr(converted, "context_length") else 77)
    with torch.no_grad():
        torch.testing.assert_close(
            converted.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            converted.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0
        )


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.MultiheadAttention, OpenClipAttention))]


@pytest.mark.parametrize("training", [False, True])
def test_tiny_clip_features_unchanged(tiny_clip, training):
    reference = tiny_clip.train(training)
    converted = convert_attention(copy.deepcopy(reference))

    assert not _attention_modules(converted)
    assert isinstance(converted.transformer.resblocks[1].attn.v_proj, nn.Linear)
    assert isinstance(converted.visual.transformer.resblocks[0].attn.out_proj, nn.Linear)
    assert converted.training == training
    _assert_same_features(reference, converted, image_size=32)


def test_convert_attention_is_idempotent(tiny_clip):
    converted = convert_attention(tiny_clip)
    names = [name for name, _ in converted.named_parameters()]
    assert convert_attention(converted) is converted
    assert [name for name, _ in converted.named_parameters()] == names


def test_gradients_flow_through_converted_clip(tiny_clip):
    model = convert_attention(tiny_clip)
    image_features = model.encode_image(torch.randn(2, 3, 32, 32))
    text_features = model.encode_text(_tokens())
    (image_features @ text_features.T).sum().backward()
    for tower in (model.visual.transformer, model.transformer):
        for layer in ("q_proj", "k_proj", "v_proj", "out_proj"):
            grad = getattr(tower.resblocks[0].attn, layer).weight.grad
            assert grad is not None and grad.abs().sum() > 0


def test_text_padding_and_class_token_masks(tiny_clip_cfg):
    # embed_cls makes open_clip's TextTransformer build a per-sample (batch*heads, L, L) additive mask.
    tiny_clip_cfg["text_cfg"].update(embed_cls=True, pool_type="last")
    torch.manual_seed(0)
    reference = open_clip.CustomTextCLIP(**tiny_clip_cfg).eval()
    _assert_same_features(reference, convert_attention(copy.deepcopy(reference)), image_size=32)


def test_attentional_pooler_with_different_key_dim(tiny_clip_cfg):
    tiny_clip_cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    torch.manual_seed(0)
    reference = open_clip.CLIP(**tiny_clip_cfg).eval()
    converted = convert_attention(copy.deepcopy(reference))
    assert converted.visual.attn_pool.attn.k_proj.in_features == 64
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(
            converted.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "options",
    [
        {"block_type": "custom"},
        {"qk_norm": True},
        {"scale_heads": True, "scale_attn_inner": True, "scale_attn": True},
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_custom_blocks_are_converted_exactly(tiny_clip_cfg, options, training):
    tiny_clip_cfg["vision_cfg"].update(options)
    tiny_clip_cfg["text_cfg"].update(options)
    torch.manual_seed(0)
    reference = open_clip.CLIP(**tiny_clip_cfg).train(training)
    with torch.no_grad():  # non-trivial head scales and norms, so a mismatch would show
        for module in reference.modules():
            if isinstance(module, OpenClipAttention) and module.head_scale is not None:
                module.head_scale.uniform_(0.5, 1.5)
    converted = convert_attention(copy.deepcopy(reference))

    assert not _attention_modules(converted)
    attn = converted.transformer.resblocks[0].attn
    assert isinstance(attn, SeparateQKVCustomAttention) and isinstance(attn.q_proj, nn.Linear)
    _assert_same_features(reference, converted, image_size=32)


def test_custom_attention_boolean_and_per_head_masks():
    torch.manual_seed(0)
    source = OpenClipAttention(EMBED, HEADS, qk_norm=True).eval()
    converted = SeparateQKVCustomAttention(source)
    x = torch.randn(BATCH, LENGTH, EMBED)
    bool_mask = torch.rand(LENGTH, LENGTH) > 0.5
    bool_mask.fill_diagonal_(False)
    for mask in (bool_mask, torch.randn(BATCH * HEADS, LENGTH, LENGTH)):
        torch.testing.assert_close(converted(x, attn_mask=mask), source(x, attn_mask=mask))


def test_scaled_cosine_attention_is_refused(tiny_clip_cfg):
    tiny_clip_cfg["text_cfg"]["scaled_cosine_attn"] = True
    model = open_clip.CLIP(**tiny_clip_cfg)
    with pytest.raises(NotImplementedError, match="scaled_cosine_attn"):
        convert_attention(model)


def test_low_precision_weights_keep_their_dtype(tiny_clip):
    open_clip.convert_weights_to_lp(tiny_clip, dtype=torch.bfloat16)
    converted = convert_attention(tiny_clip)
    attn = converted.visual.transformer.resblocks[0].attn
    assert attn.q_proj.weight.dtype == torch.bfloat16 and attn.out_proj.bias.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_vit_b_features_unchanged(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    images = torch.randn(1, 3, 224, 224)
    tokens = open_clip.get_tokenizer(name)(["a photo of a dog."])
    with torch.no_grad():
        image_before, text_before = model.encode_image(images), model.encode_text(tokens)
        convert_attention(model)  # in place: one ~150M-parameter model in memory, not two
        assert not _attention_modules(model)
        torch.testing.assert_close(model.encode_image(images), image_before, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), text_before, atol=1e-5, rtol=0)
