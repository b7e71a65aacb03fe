"""KRAdapter's kernel: ``y = x (W0 + s ΔW)ᵀ + b`` with one matmul, and its backward (the math: ``kradapter.py``).

``kradapter_linear`` is the entry point. Eagerly it runs a custom ``torch.autograd.Function``; under
``torch.compile`` the same code runs inside two custom operators (``kr_vlm::kradapter_linear`` and its
backward), which the compiler treats as opaque steps, so a compiled model has no graph break at these layers
and keeps their memory behaviour. (Dynamo cannot trace the ``addcmul`` into views of the fused weight, and a
traced formulation would let the compiler keep every layer's full-precision fused weight alive until
backward.)

Per call the forward builds the fused weight ``W0 + s ΔW`` in the compute dtype with one ``addcmul`` (the
sum formed in the dtype ``W0`` and the factors promote to, float32 with float32 factors, and rounded once)
and runs one ``F.linear`` with it. What backward needs of the weight depends on the compute dtype:

- the compute dtype is ``W0``'s (float32 training, or half weights without autocast): the fused weight is as
  large as ``W0`` itself, so it is not kept; backward rebuilds it from ``W0`` and the factors;
- autocast narrows the compute dtype (bf16 or fp16 from a float32 ``W0``): the fused weight is kept for
  backward, as autocast keeps the cast weight of every plain linear (the frozen ones included), so it costs
  the memory the model pays anyway under autocast and saves the rebuild.

The factor gradients come from the dense gradient of the weight, ``G = grad_yᵀ x``, contracted against the
factors in the factors' dtype (float32: more exact than the compute dtype, and on CPUs batched float32
products read ``G`` several times faster than bf16 ones): ``grad_U[i, b] = s Σ_a G[i, a r + b] V[i, a]`` and
``grad_V[i, a] = s Σ_b G[i, a r + b] U[i, b]``.

On the CPU the transient full-size tensors (a fused weight that is not kept, ``G`` when ``W0`` gets no
gradient, the float32 forms of both) are written into reusable per-thread buffers (``_scratch``): the
default CPU allocator hands large blocks back to the system when they are freed, and faulting fresh pages in
on every call costs more than the pass that fills them. CUDA's caching allocator reuses blocks by itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def khatri_rao_update(u: torch.Tensor, v: torch.Tensor, big_k: int, transposed: bool) -> torch.Tensor:
    """The unscaled update ``ΔW`` shaped ``(d_out, d_in)``, built with plain (differentiable) torch ops.

    ``transposed`` means ``d_out > d_in`` (``ΔW = Mᵀ``). That case is built directly in the ``(r2, r, k)``
    layout, so cutting to ``K`` rows keeps the result contiguous and no transposed copy is made.
    """
    if transposed:
        return (v.t()[:, None, :] * u.t()[None, :, :]).flatten(0, 1)[:big_k]
    return (v[:, :, None] * u[:, None, :]).flatten(1)[:, :big_k]


def _blocks(matrix: torch.Tensor, rank: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a ``(k, K)`` matrix (``(K, k)`` if ``transposed``) split along ``K`` into ``r``-blocks.

    Returns the full blocks as a 3-D view, ``(k, q, r)`` (``(q, r, k)`` if transposed) with ``q = K // r``,
    and the cut-off last block of ``K % r`` entries (empty when ``r`` divides ``K``). No copies.
    """
    block_dim = 0 if transposed else 1
    full_blocks = matrix.shape[block_dim] // rank
    cut = full_blocks * rank
    full = matrix.narrow(block_dim, 0, cut).unflatten(block_dim, (full_blocks, rank))
    return full, matrix.narrow(block_dim, cut, matrix.shape[block_dim] - cut)


_SCRATCH = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """An uninitialised tensor for a value that dies within the call: on the CPU a view of this thread's
    buffer for ``(dtype, slot)`` (grown when too small, kept for the next call), elsewhere a new tensor.

    Two tensors alive at once must use different slots (or dtypes).
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = buffers.get((dtype, slot))
    if buffer is None or buffer.numel() < numel:
        # Outside inference mode, so a buffer made during evaluation can be written again in training.
        with torch.inference_mode(False):
            buffer = buffers[dtype, slot] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def free_scratch_buffers() -> None:
    """Drop this thread's scratch buffers (at most two of each dtype, as large as the largest adapted layer's
    weight); the next CPU call makes them again."""
    _SCRATCH.__dict__.pop("buffers", None)


# Scratch slots: the float32 (product dtype) form of a fused weight or of G, and a transient compute-dtype
# fused weight or G. Backward reuses both once the fused weight it rebuilt has served the gradient of x.
_WIDE, _NARROW = 0, 1


def keeps_fused_weight(base_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether forward keeps the fused weight for backward: only when it is smaller than ``W0`` (autocast)."""
    return compute_dtype.itemsize < base_dtype.itemsize


def fused_weight(
    base_weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
    transient: bool = True,
) -> torch.Tensor:
    """``W0 + s ΔW`` in ``compute_dtype``, from one pass over ``W0`` (``ΔW`` is never materialised).

    ``addcmul`` forms ``W0[i, a r + b] + s V[i, a] U[i, b]`` in the dtype ``W0`` and the factors promote to;
    when that is not ``compute_dtype`` the sum is written to a scratch buffer and rounded once into the
    result. ``transient``: the result dies within the call, so it may live in a scratch buffer.
    """
    shape, device = base_weight.shape, base_weight.device
    product_dtype = torch.promote_types(base_weight.dtype, u.dtype)
    if product_dtype == compute_dtype:
        sum_ = fused = _scratch(shape, compute_dtype, device, _NARROW) if transient else None
        if fused is None:
            sum_ = fused = torch.empty(shape, dtype=compute_dtype, device=device)
    else:
        sum_ = _scratch(shape, product_dtype, device, _WIDE)
        fused = (
            _scratch(shape, compute_dtype, device, _NARROW)
            if transient
            else torch.empty(shape, dtype=compute_dtype, device=device)
        )
    rank = u.shape[1]
    base_full, base_tail = _blocks(base_weight, rank, transposed)
    sum_full, sum_tail = _blocks(sum_, rank, transposed)
    if transposed:  # row a r + b of W0 pairs with V[:, a] * U[:, b]; contiguous transposed factors
        u, v = u.t().contiguous(), v.t().contiguous()  # keep the broadcast's inner (k) axis unit-stride
        full_blocks, tail = base_full.shape[0], base_tail.shape[0]
        torch.addcmul(base_full, v[:full_blocks, None, :], u[None, :, :], value=scaling, out=sum_full)
        if tail:
            torch.addcmul(base_tail, v[full_blocks], u[:tail], value=scaling, out=sum_tail)
    else:  # column a r + b of W0 pairs with V[:, a] * U[:, b]
        full_blocks, tail = base_full.shape[1], base_tail.shape[1]
        torch.addcmul(base_full, v[:, :full_blocks, None], u[:, None, :], value=scaling, out=sum_full)
        if tail:
            torch.addcmul(base_tail, v[:, full_blocks, None], u[:, :tail], value=scaling, out=sum_tail)
    return fused if fused is sum_ else fused.copy_(sum_)


def factor_grads(
    weight_grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract the ``(k, K)`` dense gradient ``G`` of ``M`` against the factors (all in one dtype).

    ``G[i, a r + b]`` pairs with ``V[i, a] U[i, b]``: ``grad_U[i, b] = s Σ_a G[i, a r + b] V[i, a]`` and
    ``grad_V[i, a] = s Σ_b G[i, a r + b] U[i, b]``. The full ``r``-blocks are a free ``(k, q, r)`` view (a
    batched vector-matrix product each); the cut-off last block is added separately, so ``G`` is never padded.
    """
    full, tail = _blocks(weight_grad, u.shape[1], transposed=False)
    full_blocks, tail_size = full.shape[1], tail.shape[1]
    # Both as a batch of row vector x matrix products: far faster on CPU than einsum's (or bmm's
    # matrix x column vector) choice, which costs several times one read of G.
    grad_u = torch.bmm(v[:, None, :full_blocks], full).squeeze(1)
    grad_v = torch.bmm(u[:, None, :], full.transpose(1, 2)).squeeze(1)
    if tail_size:
        grad_u[:, :tail_size].addcmul_(tail, v[:, full_blocks, None])
        grad_v = torch.cat([grad_v, (tail * u[:, :tail_size]).sum(1, keepdim=True)], dim=1)
    return grad_u.mul_(scaling), grad_v.mul_(scaling)


def _forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.linear(x, W0 + s ΔW, b)`` with one matmul, and the fused weight if backward keeps it (else None)."""
    keep = keeps_fused_weight(base_weight.dtype, compute_dtype)
    fused = fused_weight(base_weight, u, v, scaling, transposed, compute_dtype, transient=not keep)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, fused, bias), fused if keep else None


def _backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_is_fused: bool,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
    base_dtype: torch.dtype,
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    """Gradients for ``(x, W0, b, U, V)``, each only if ``needs`` says so (else None).

    ``weight`` is the fused weight kept by forward if ``weight_is_fused``, else ``W0`` (the fused weight is
    then rebuilt for the gradient of ``x``); ``base_dtype`` is ``W0``'s dtype, that of its gradient.
    """
    needs_x, needs_w, needs_b, needs_u, needs_v = needs
    grad_x = grad_w = grad_b = grad_u = grad_v = None
    with torch.autocast(grad_out.device.type, enabled=False):
        grad_out = grad_out.to(compute_dtype)
        if needs_x:
            fused = (
                weight if weight_is_fused else fused_weight(weight, u, v, scaling, transposed, compute_dtype)
            )
            grad_x = grad_out @ fused
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if needs_w or needs_u or needs_v:
            x_2d = x.reshape(-1, x.shape[-1])
            # The dense gradient of M (k, K): one matmul, in whichever orientation puts k first.
            left, right = (x_2d, grad_out_2d) if transposed else (grad_out_2d, x_2d)
            shape = (left.shape[1], right.shape[1])
            if needs_w:  # W0's gradient is returned, so it cannot live in a scratch buffer
                grad_m = left.t() @ right
                grad_w = (grad_m.t() if transposed else grad_m).to(base_dtype)
            else:  # the rebuilt fused weight has served; its slot takes G
                grad_m = torch.mm(left.t(), right, out=_scratch(shape, compute_dtype, x.device, _NARROW))
            if needs_u or needs_v:
                if grad_m.dtype != u.dtype:
                    grad_m = _scratch(shape, u.dtype, x.device, _WIDE).copy_(grad_m)
                grad_u, grad_v = factor_grads(grad_m, u, v, scaling)
        if needs_b:
            grad_b = grad_out_2d.sum(0)
    return [grad_x, grad_w, grad_b, grad_u, grad_v]


def _saved_for_backward(ctx) -> tuple:
    """``_backward``'s arguments between ``grad_out`` and ``needs``, from what forward saved on ``ctx``."""
    x, weight, u, v = ctx.saved_tensors
    return (
        x,
        weight,
        ctx.weight_is_fused,
        u,
        v,
        ctx.scaling,
        ctx.transposed,
        ctx.compute_dtype,
        ctx.base_dtype,
    )


class _KRAdapterLinearFunction(torch.autograd.Function):
    """``_forward`` with one matmul; backward uses the kept fused weight or rebuilds it from the factors.

    Saved for backward: ``x`` (as the matmul saw it), the two factors, and either the fused weight (when
    autocast narrowed it, see ``keeps_fused_weight``) or the base weight parameter itself (no copy); never the
    dense ``ΔW``. Autocast is decided by the caller: every tensor arrives in ``compute_dtype`` except the base
    weight and the factors, and the inner ops run with autocast disabled, so the same code serves CPU and
    CUDA, fp32, fp16 and bf16.
    """

    @staticmethod
    def forward(ctx, x, base_weight, bias, u, v, scaling, transposed, compute_dtype):
        out, kept = _forward(x, base_weight, bias, u, v, scaling, transposed, compute_dtype)
        ctx.save_for_backward(x, base_weight if kept is None else kept, u, v)
        ctx.weight_is_fused, ctx.base_dtype = kept is not None, base_weight.dtype
        ctx.scaling, ctx.transposed, ctx.compute_dtype = scaling, transposed, compute_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grads = _backward(grad_out, *_saved_for_backward(ctx), ctx.needs_input_grad[:5])
        return *grads, None, None, None


# Under torch.compile the layer calls these two custom operators instead of the Function. The forward one
# also returns the fused weight it keeps for backward (an empty tensor when it keeps none), so that the
# compiler saves it like any other value; it never sees the scratch buffers, which die within each call.
@torch.library.custom_op("kr_vlm::kradapter_linear", mutates_args=())
def _compiled_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, kept = _forward(x, base_weight, bias, u, v, scaling, transposed, compute_dtype)
    return out, x.new_empty(0) if kept is None else kept


@_compiled_linear.register_fake
def _(x, base_weight, bias, u, v, scaling, transposed, compute_dtype):
    kept = base_weight.shape if keeps_fused_weight(base_weight.dtype, compute_dtype) else (0,)
    return x.new_empty((*x.shape[:-1], base_weight.shape[0])), x.new_empty(kept, dtype=compute_dtype)


@torch.library.custom_op("kr_vlm::kradapter_linear_backward", mutates_args=())
def _compiled_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_is_fused: bool,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
    base_dtype: torch.dtype,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward(
        grad_out, x, weight, weight_is_fused, u, v, scaling, transposed, compute_dtype, base_dtype, needs
    )
    # An operator returns tensors only: an empty one stands for a gradient nobody needs.
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


@_compiled_linear_backward.register_fake
def _(grad_out, x, weight, weight_is_fused, u, v, scaling, transposed, compute_dtype, base_dtype, needs):
    shapes = [
        (x.shape, compute_dtype),
        (weight.shape, base_dtype),
        (grad_out.shape[-1:], compute_dtype),
        (u.shape, u.dtype),
        (v.shape, v.dtype),
    ]
    return tuple(
        x.new_empty(shape if need else (0,), dtype=dtype if need else x.dtype)
        for need, (shape, dtype) in zip(needs, shapes, strict=True)
    )


def _save_for_compiled_backward(ctx, inputs, output) -> None:
    x, base_weight, _, u, v, ctx.scaling, ctx.transposed, ctx.compute_dtype = inputs
    ctx.weight_is_fused = keeps_fused_weight(base_weight.dtype, ctx.compute_dtype)
    ctx.base_dtype = base_weight.dtype
    ctx.save_for_backward(x, output[1] if ctx.weight_is_fused else base_weight, u, v)


def _compiled_backward(ctx, grad_out: torch.Tensor, _grad_kept: torch.Tensor):
    needs = list(ctx.needs_input_grad[:5])
    grads = _compiled_linear_backward(grad_out, *_saved_for_backward(ctx), needs)
    return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), None, None, None


_compiled_linear.register_autograd(_compiled_backward, setup_context=_save_for_compiled_backward)


def kradapter_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    transposed: bool,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``x (W0 + s ΔW)ᵀ + b`` with ``ΔW`` from the factors ``U``, ``V`` (``transposed``: ``d_out > d_in``).

    ``x`` and ``bias`` arrive in ``compute_dtype`` (the caller applies autocast's casts), ``base_weight`` shaped
    ``(d_out, d_in)`` and the factors in their own dtypes. Differentiable in all five tensors; compiles.
    """
    if torch.compiler.is_compiling():
        return _compiled_linear(x, base_weight, bias, u, v, scaling, transposed, compute_dtype)[0]
    return _KRAdapterLinearFunction.apply(x, base_weight, bias, u, v, scaling, transposed, compute_dtype)
