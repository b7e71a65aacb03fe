"""KRAdapterLinear in the precisions users train in: under bf16 autocast its forward and gradients equal a
reference that computes the same thing step by step with plain torch ops, and it keeps for backward what
autocast keeps of a plain linear (one bf16 copy of the weight), never the dense update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.adapters import KRAdapterLinear
from kr_vlm.adapters.layer import dense_weight
from kr_vlm.adapters.methods import kradapter_kernel

# (d_out, d_in): square, wide, tall, ragged (r * r2 > K) both ways, and ViT-B-16's MLP shape.
SHAPES = [(12, 12), (7, 20), (20, 7), (10, 26), (26, 10), (96, 384)]
KINDS = ["linear", "conv1d"]


def bf16_layer(d_out: int, d_in: int, kind: str) -> KRAdapterLinear:
    torch.manual_seed(d_out * 1000 + d_in)
    base = nn.Linear(d_in, d_out)
    if kind == "conv1d":
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(d_out, d_in)
        with torch.no_grad():
            conv1d.weight.copy_(base.weight.T)
            conv1d.bias.copy_(base.bias)
        base = conv1d
    layer = KRAdapterLinear(base)
    with torch.no_grad():  # an update of a realistic size next to W0: some of it survives the bf16 rounding
        layer.kr_u.normal_(std=0.05)
    return layer


def reference_step(layer: KRAdapterLinear, x: torch.Tensor, grad_out: torch.Tensor):
    """The layer's bf16 computation written out: fused weight formed in float32 and rounded once to bf16, one
    bf16 matmul, the bf16 weight gradient G (k first), its float32 contraction against the factors."""
    weight, bias = dense_weight(layer.base_layer), layer.base_layer.bias
    s, u, v = layer.scaling, layer.kr_u.detach(), layer.kr_v.detach()
    fused = (weight + layer.delta_weight().detach()).to(torch.bfloat16)
    x16, g16 = x.detach().to(torch.bfloat16), grad_out.to(torch.bfloat16)
    out = F.linear(x16, fused, bias.to(torch.bfloat16))
    grad_x = (g16 @ fused).float()
    x2, g2 = x16.reshape(-1, x16.shape[-1]), g16.reshape(-1, g16.shape[-1])
    transposed = layer.out_features > layer.in_features
    grad_m = (x2.t() @ g2 if transposed else g2.t() @ x2).double()  # (k, K)
    k, big_k = grad_m.shape
    r, r2 = u.shape[1], v.shape[1]
    padded = torch.zeros(k, r2 * r, dtype=torch.float64)
    padded[:, :big_k] = grad_m
    blocks = padded.view(k, r2, r)  # entry a r + b pairs with V[i, a] U[i, b]
    grad_u = s * torch.einsum("iab,ia->ib", blocks, v.double())
    grad_v = s * torch.einsum("iab,ib->ia", blocks, u.double())
    return out, grad_x, grad_u.float(), grad_v.float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_bf16_autocast_equals_the_same_computation_written_out(d_out, d_in, kind):
    layer = bf16_layer(d_out, d_in, kind)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad_out = torch.randn(out.shape)
    out.backward(grad_out.to(out.dtype))

    want_out, want_grad_x, want_grad_u, want_grad_v = reference_step(layer, x, grad_out)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want_out)  # the same bf16 operands through the same matmul
    assert torch.equal(x.grad, want_grad_x)
    assert layer.kr_u.grad.dtype == layer.kr_v.grad.dtype == torch.float32
    # The contraction sums in another order than the float64 reference: float32 rounding apart.
    torch.testing.assert_close(layer.kr_u.grad, want_grad_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.kr_v.grad, want_grad_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("d_out", "d_in"), [(24, 40), (40, 24)])
def test_autocast_keeps_only_the_bf16_fused_weight_for_backward(d_out, d_in, kind):
    """Under autocast the one weight-sized tensor kept for backward is the bf16 fused weight: the size of
    the bf16 copy autocast keeps of any plain linear's weight, never the float32 W0 + s ΔW or ΔW."""
    layer = bf16_layer(d_out, d_in, kind)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        out = layer(x)
    out.float().sum().backward()

    weight = dense_weight(layer.base_layer)
    weight_sized = [t for t in saved if t.numel() >= weight.numel()]
    assert len(weight_sized) == 1 and weight_sized[0].dtype == torch.bfloat16
    fused = (weight + layer.delta_weight().detach()).to(torch.bfloat16)
    assert torch.equal(weight_sized[0], fused)
    assert sum(t.numel() for t in saved) == x.numel() + weight.numel() + layer.kr_u.numel() + layer.kr_v.numel()


def test_a_plain_linear_under_autocast_keeps_a_bf16_weight_too():
    """What the memory claim above compares with: autocast keeps the cast weight of a frozen linear."""
    linear = nn.Linear(40, 24).requires_grad_(False)
    x = torch.randn(3, 40, requires_grad=True)
    saved = []
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        linear(x)
    assert [t.dtype for t in saved if t.numel() == linear.weight.numel()] == [torch.bfloat16]


def test_evaluation_under_inference_mode_then_training_reuses_the_scratch_buffers():
    """The CPU scratch buffers are made outside inference mode, so training after an evaluation works."""
    layer = bf16_layer(20, 7, "linear")
    x = torch.randn(4, 7)
    kradapter_kernel.free_scratch_buffers()  # so that evaluation makes them
    with torch.inference_mode():
        evaluated = layer(x)
    out = layer(x.requires_grad_())
    out.sum().backward()
    torch.testing.assert_close(out.detach(), evaluated)
    assert layer.kr_u.grad is not None
