"""KRAdapterLinear under torch.compile: one graph with no breaks for every shape, eager's numbers, no recompile storm.

Most tests compile with the ``aot_eager`` backend: it runs dynamo (where graph breaks come from) and
AOTAutograd (which traces the custom backward) without generating C++, so they stay fast; one slow test
compiles with the default inductor backend.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, KRAdapterLinear, adapted_layers, inject_adapters

# (d_out, d_in): square, wide (d_out < d_in), tall, ragged (r * r2 > K) both ways, and r * r2 == K.
SHAPES = [(12, 12), (7, 20), (20, 7), (10, 26), (26, 10), (16, 16)]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> None:
    """Within 1e-5 of the largest entry of each eager gradient (float32 sums in another order)."""
    for name, g, w in zip(names, got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), name


def gradients(function, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = function()
    grads = torch.autograd.grad(out.square().sum(), inputs)
    return out.detach(), list(grads)


def random_layer(d_out: int, d_in: int) -> KRAdapterLinear:
    torch.manual_seed(d_out * d_in)
    layer = KRAdapterLinear(nn.Linear(d_in, d_out))
    with torch.no_grad():
        layer.kr_u.normal_()
    return layer


@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_fullgraph_compile_equals_eager_for_every_shape(d_out, d_in):
    layer = random_layer(d_out, d_in)
    x = torch.randn(3, 4, d_in, requires_grad=True)
    inputs = [x, layer.kr_u, layer.kr_v]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    eager_out, eager_grads = gradients(lambda: layer(x), inputs)
    out, grads = gradients(lambda: compiled(x), inputs)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, eager_grads, ["x", "U", "V"])


def test_compiled_layers_save_no_fused_weight_for_backward():
    """Across several layers the compiler could keep every fused weight alive until backward; it must not."""
    torch.manual_seed(0)
    layers = [
        KRAdapterLinear(nn.Linear(d_in, d_out)) for d_out, d_in in [(40, 24), (24, 40), (26, 24), (10, 26)]
    ]
    model = nn.Sequential(*layers)
    x = torch.randn(3, 24, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        out = compiled(x)
    out.sum().backward()
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    weight_sized = [t for t in saved if t.numel() >= 240 and t.untyped_storage().data_ptr() not in parameters]
    assert weight_sized == []
    expected = sum(
        x.numel() // 24 * layer.in_features + layer.weight.numel() + layer.kr_u.numel() + layer.kr_v.numel()
        for layer in layers
    )
    assert sum(t.numel() for t in saved) == expected  # per layer: its input, W0 (no copy), U, V


def test_fullgraph_compile_under_bf16_autocast():
    layer = random_layer(10, 26)
    x = torch.randn(3, 26, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_out = layer(x)
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager_out.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_inductor_compile_equals_eager():
    layer = random_layer(10, 26)
    x = torch.randn(5, 26, requires_grad=True)
    inputs = [x, layer.kr_u, layer.kr_v]
    eager_out, eager_grads = gradients(lambda: layer(x), inputs)
    out, grads = gradients(lambda: torch.compile(layer, fullgraph=True)(x), inputs)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, eager_grads, ["x", "U", "V"])


@pytest.mark.slow
def test_open_clip_towers_have_no_graph_break(tiny_clip_cfg):
    from kr_vlm.models.attention import convert_attention
    from kr_vlm.models.targets import clip_target_modules

    # Width 40: fc2 is 40 x 160 with r=6, r2=27, so its last block is cut (the case that broke graphs).
    tiny_clip_cfg["vision_cfg"].update(width=40, head_width=20)
    tiny_clip_cfg["text_cfg"].update(width=40, heads=2)
    import open_clip

    torch.manual_seed(0)
    model = convert_attention(open_clip.CLIP(**tiny_clip_cfg))
    inject_adapters(model, AdapterConfig("kradapter", clip_target_modules(model)))
    shapes = {(layer.out_features, layer.in_features) for _, layer in adapted_layers(model)}
    assert (40, 160) in shapes and (160, 40) in shapes
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog.", "a cat."])
    for encode, batch in ((model.encode_image, images), (model.encode_text, tokens)):
        explanation = torch._dynamo.explain(encode)(batch)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=40,  # q/o 40x40 (r=6, r2=7: cut), k/v 20x40, gate/up 100x40, down 40x100 (r2=17: cut)
        intermediate_size=100,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=10,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    inject_adapters(model, AdapterConfig("kradapter", LLAMA_TARGETS))
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.kr_u.normal_(std=0.1)
    return model


@pytest.mark.slow
def test_llama_compiles_as_one_graph_with_eager_gradients():
    model = tiny_llama().train()
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons

    names, factors = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, factors)
    grads = torch.autograd.grad(compiled(input_ids=ids, labels=ids).loss, factors)
    assert_grads_close(list(grads), list(eager_grads), list(names))


@pytest.mark.slow
def test_llama_trains_then_evaluates_compiled_without_hitting_the_recompile_limit():
    model = tiny_llama()
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            compiled(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = compiled(input_ids=ids).logits
            torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2  # one graph for training, one for evaluation
