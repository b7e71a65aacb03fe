"""KRAdapterLinear: exact against a plain-autograd reference, shapes, rank, merge, dtypes, memory contract,
dropout; on nn.Linear and on transformers' Conv1D (weight stored transposed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kr_vlm.adapters import AdapterConfig, KRAdapterLinear, adapted_layers, inject_adapters, kradapter_shapes
from kr_vlm.adapters.layer import dense_weight
from kr_vlm.spectral import effective_rank, effective_rank_from_singular_values

# (d_out, d_in): square, wide (d_out < d_in), tall (d_out > d_in), ragged (r * r2 > K) both ways,
# and one where r * r2 == K exactly.
SHAPES = [(12, 12), (7, 20), (20, 7), (10, 26), (26, 10), (16, 16)]
# The base layer kinds: nn.Linear, and transformers' Conv1D (GPT-2's linears, weight (in, out)).
KINDS = ["linear", "conv1d"]


def base_layer(kind: str, d_out: int, d_in: int, dtype=torch.float32) -> nn.Module:
    linear = nn.Linear(d_in, d_out, dtype=dtype)
    if kind == "linear":
        return linear
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(d_out, d_in).to(dtype)
    with torch.no_grad():  # the same layer, stored as Conv1D stores it
        conv1d.weight.copy_(linear.weight.T)
        conv1d.bias.copy_(linear.bias)
    return conv1d


def reference_delta(u: torch.Tensor, v: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """ΔW written the straightforward way: row i of M is kron(V[i], U[i]) cut to K; k lies on the smaller side."""
    k, big_k = min(d_out, d_in), max(d_out, d_in)
    rows = torch.stack([torch.kron(v[i], u[i])[:big_k] for i in range(k)])
    return rows if d_out <= d_in else rows.T


def random_layer(
    d_out: int, d_in: int, dtype=torch.float64, kind: str = "linear", **kwargs
) -> KRAdapterLinear:
    layer = KRAdapterLinear(base_layer(kind, d_out, d_in, dtype), factor_dtype=dtype, **kwargs)
    with torch.no_grad():  # nonzero U, so every term of the update and its gradient is exercised
        layer.kr_u.normal_()
        layer.kr_v.normal_()
    return layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trainable-base"])
@pytest.mark.parametrize("input_shape", [(5,), (3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_forward_and_gradients_match_plain_autograd(d_out, d_in, input_shape, train_base, kind):
    torch.manual_seed(0)
    layer = random_layer(d_out, d_in, scaling=1.5, kind=kind)
    base = layer.base_layer
    base.weight.requires_grad_(train_base)
    base.bias.requires_grad_(train_base)
    x = torch.randn(*input_shape, d_in, dtype=torch.float64, requires_grad=True)

    out = layer(x)
    delta = reference_delta(layer.kr_u, layer.kr_v, d_out, d_in)
    expected = x @ (dense_weight(base) + 1.5 * delta).T + base.bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    inputs = [x, layer.kr_u, layer.kr_v] + ([base.weight, base.bias] if train_base else [])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, got, want in zip(["x", "U", "V", "W0", "b"][: len(inputs)], grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_delta_weight_matches_reference_and_is_differentiable(d_out, d_in, kind):
    torch.manual_seed(0)
    layer = random_layer(d_out, d_in, kind=kind)
    delta = layer.delta_weight()
    assert delta.shape == (d_out, d_in)
    torch.testing.assert_close(delta, 2.0 * reference_delta(layer.kr_u, layer.kr_v, d_out, d_in))
    delta.square().sum().backward()
    assert layer.kr_u.grad is not None and layer.kr_v.grad is not None


def test_no_gradient_for_x_when_it_does_not_need_one():
    layer = random_layer(6, 9)
    x = torch.randn(4, 9, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.kr_u.grad is not None and layer.base_layer.weight.grad is None


@pytest.mark.parametrize(
    ("d_out", "d_in", "expected"),
    [
        (768, 768, (768, 768, 27, 29, 43_008)),
        (768, 3072, (768, 3072, 27, 114, 108_288)),
        (3072, 768, (768, 3072, 27, 114, 108_288)),
        (1024, 1024, (1024, 1024, 32, 32, 65_536)),
    ],
)
def test_reference_shapes_and_parameter_counts(d_out, d_in, expected):
    k, big_k, r, r2, n_params = expected
    assert kradapter_shapes(d_out, d_in) == (k, big_k, r, r2)
    layer = KRAdapterLinear(nn.Linear(d_in, d_out))
    assert (layer.rank, layer.rank2) == (r, r2)
    assert layer.kr_u.shape == (k, r) and layer.kr_v.shape == (k, r2)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == n_params == k * (r + r2)


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 12), (7, 20), (20, 7), (100, 37)])
@pytest.mark.parametrize("rank", [None, 1, 2, 5])
def test_r2_is_the_smallest_that_covers_k(d_out, d_in, rank):
    k, big_k, r, r2 = kradapter_shapes(d_out, d_in, rank)
    assert (k, big_k) == (min(d_out, d_in), max(d_out, d_in))
    assert r == (rank if rank is not None else int(k**0.5))
    assert r * r2 >= big_k > r * (r2 - 1)


def test_custom_rank():
    layer = KRAdapterLinear(nn.Linear(64, 48), rank=4)
    assert (layer.rank, layer.rank2) == (4, 16)
    assert layer.kr_u.shape == (48, 4) and layer.kr_v.shape == (48, 16)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 48 * (4 + 16)


def test_the_layer_s_update_is_nearly_full_rank_where_lora_s_of_the_same_budget_is_not():
    """What the rank monitor reports, through the layers' own code: KRAdapter's update (its factors as the
    layer lays them out, and their spectral shortcut) reaches about the effective rank of a Gaussian matrix
    and its rank cap is the layer's full rank; LoRA injected with the same budget stays at its r."""
    torch.manual_seed(0)
    d = 256
    base = nn.Sequential(nn.Linear(d, d))
    kradapter = inject_adapters(copy.deepcopy(base), AdapterConfig("kradapter", ["0"]))
    ((_, kr_layer),) = adapted_layers(kradapter)
    lora_rank = kr_layer.kr_u.numel() + kr_layer.kr_v.numel()
    lora_rank //= 2 * d  # the same parameter budget spent on B @ A
    lora = inject_adapters(copy.deepcopy(base), AdapterConfig("lora", ["0"], r=lora_rank))
    ((_, lora_layer),) = adapted_layers(lora)
    with torch.no_grad():  # as if trained: every factor nonzero
        for model in (kradapter, lora):
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_()

    gaussian = effective_rank(torch.randn(d, d))
    kr_sigma = kr_layer.spectral_factors().singular_values()
    assert kr_layer.rank_cap == d and effective_rank_from_singular_values(kr_sigma) >= 0.9 * gaussian
    assert effective_rank(kr_layer.delta_weight().detach()) >= 0.9 * gaussian
    lora_sigma = lora_layer.spectral_factors().singular_values()
    assert lora_layer.rank_cap == lora_rank
    assert 0.5 * lora_rank <= effective_rank_from_singular_values(lora_sigma) <= lora_rank + 1e-6


def test_update_is_zero_at_init():
    torch.manual_seed(0)
    base = nn.Linear(20, 7)
    layer = KRAdapterLinear(base)
    assert not layer.kr_u.any() and layer.kr_v.abs().sum() > 0
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), base(x))
    assert not layer.delta_weight().any()


def test_base_is_frozen_and_proxied():
    base = nn.Linear(10, 26)
    layer = KRAdapterLinear(base, rank=2, scaling=0.5)
    assert layer.base_layer is base
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features, layer.scaling) == (10, 26, 0.5)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["kr_u", "kr_v"]
    text = repr(layer)
    for field in (
        "in_features=10",
        "out_features=26",
        "k=10",
        "r=2",
        "r2=13",
        "scaling=0.5",
        "trainable=150",
    ):
        assert field in text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_merge_then_unmerge_restores_the_base(d_out, d_in, kind):
    torch.manual_seed(0)
    layer = random_layer(d_out, d_in, dtype=torch.float32, kind=kind)
    original = dense_weight(layer.base_layer).detach().clone()
    x = torch.randn(3, d_in)
    unmerged_out = layer(x)

    layer.merge()
    assert layer.merged
    # written into the layer's own weight, as the layer stores it ((in, out) for a Conv1D)
    torch.testing.assert_close(dense_weight(layer.base_layer), original + layer.delta_weight())
    torch.testing.assert_close(layer(x), unmerged_out)  # merged forward does not add the update twice

    layer.unmerge()
    assert not layer.merged
    assert (dense_weight(layer.base_layer) - original).norm() <= 1e-6 * original.norm()
    torch.testing.assert_close(layer(x), unmerged_out)


def test_merging_twice_or_unmerging_unmerged_warns_and_does_nothing():
    layer = random_layer(6, 9)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    layer.merge()
    merged_weight = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, merged_weight)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.float16, marks=needs_cuda),
        pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
    ],
)
@pytest.mark.parametrize(("d_out", "d_in"), [(48, 64), (64, 48)])
def test_autocast_is_close_to_fp32(d_out, d_in, device, dtype):
    torch.manual_seed(0)
    layer = random_layer(d_out, d_in, dtype=torch.float32).to(device)
    with torch.no_grad():
        layer.kr_u.mul_(0.01)
    x = torch.randn(2, 8, d_in, device=device, requires_grad=True)
    params = [x, layer.kr_u, layer.kr_v]

    reference = layer(x)
    ref_grads = torch.autograd.grad(reference.square().sum(), params)
    with torch.autocast(device, dtype=dtype):
        out = layer(x)
        assert out.dtype == dtype
        grads = torch.autograd.grad(out.float().square().sum(), params)

    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.03 * want.norm()


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_base_weights_keep_fp32_factors_and_grads(base_dtype):
    torch.manual_seed(0)
    layer = KRAdapterLinear(nn.Linear(20, 12).to(base_dtype))
    assert layer.kr_u.dtype == layer.kr_v.dtype == torch.float32
    with torch.no_grad():
        layer.kr_u.normal_(std=0.1)
    x = torch.randn(4, 20, dtype=base_dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == base_dtype
    out.float().sum().backward()
    assert layer.kr_u.grad.dtype == layer.kr_v.grad.dtype == torch.float32
    assert x.grad.dtype == base_dtype

    expected = x.float() @ (layer.weight.float() + layer.delta_weight()).T + layer.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), [(24, 40), (40, 24)])
def test_backward_saves_no_dense_update(d_out, d_in, kind):
    """Only x, the factors and the base weight parameter itself (no copy) are kept for backward (in the
    base weight's dtype; under autocast see tests/test_kradapter_precision.py)."""
    layer = random_layer(d_out, d_in, dtype=torch.float32, kind=kind)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    out.float().sum().backward()

    weight = layer.base_layer.weight
    weight_sized = [t for t in saved if t.numel() >= weight.numel()]
    assert len(weight_sized) == 1
    assert weight_sized[0].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    saved_elements = sum(t.numel() for t in saved)
    assert saved_elements == x.numel() + weight.numel() + layer.kr_u.numel() + layer.kr_v.numel()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), [(12, 12), (7, 20), (26, 10)])
def test_dropout_acts_on_the_update_input_only(d_out, d_in, kind):
    torch.manual_seed(0)
    layer = random_layer(d_out, d_in, kind=kind, dropout=0.5, scaling=1.5)
    x = torch.randn(3, 4, d_in, dtype=torch.float64, requires_grad=True)
    w0, delta = dense_weight(layer.base_layer), 1.5 * reference_delta(layer.kr_u, layer.kr_v, d_out, d_in)

    torch.manual_seed(1)
    out = layer.train()(x)
    torch.manual_seed(1)  # the same dropout mask
    expected = x @ w0.T + layer.base_layer.bias + torch.nn.functional.dropout(x, 0.5) @ delta.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, layer.kr_u, layer.kr_v]
    grad_out = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, inputs, grad_out),
        torch.autograd.grad(expected, inputs, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    # evaluation: no dropout, the fused layer
    torch.testing.assert_close(
        layer.eval()(x), x @ (w0 + delta).T + layer.base_layer.bias, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.1", True])
def test_rejects_bad_dropout(dropout):
    with pytest.raises(ValueError, match="dropout must be a probability"):
        KRAdapterLinear(nn.Linear(12, 20), dropout=dropout)


def test_rejects_non_linear_base():
    with pytest.raises(TypeError, match="nn.Linear"):
        KRAdapterLinear(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("rank", [0, -1, 13, 2.5, True])
def test_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        KRAdapterLinear(nn.Linear(12, 20), rank=rank)
