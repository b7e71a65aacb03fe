"""KRAdapter: a Khatri-Rao product update for ``nn.Linear`` and transformers' ``Conv1D`` (arXiv 2508.00230).

For a weight ``W0`` of shape ``(d_out, d_in)`` let ``k = min(d_out, d_in)`` and ``K = max(d_out, d_in)``.
The trainable factors are ``U`` of shape ``(k, r)`` and ``V`` of shape ``(k, r2)`` with ``r * r2 >= K``.
Row ``i`` of the ``(k, K)`` matrix ``M`` is ``kron(V[i], U[i])`` cut to length ``K`` (entry ``a * r + b``
is ``V[i, a] * U[i, b]``); the k axis lies on the smaller side of the layer, so ``ΔW = M`` when
``d_out <= d_in`` and ``ΔW = Mᵀ`` otherwise. The layer computes ``y = x (W0 + s ΔW)ᵀ + b``.

Every row of ``M`` is an independent rank-one outer product, so ``M`` is generically full rank with only
``k * (r + r2)`` parameters (about ``2 k sqrt(K)``), unlike LoRA's ``B @ A``.

The authors' snippet builds ``ΔW`` on every call and adds a second matmul ``x @ ΔWᵀ``; autograd then keeps
the dense ``ΔW`` alive for backward. Here ``kradapter_kernel.kradapter_linear`` runs ONE matmul with the
fused weight ``W0 + s ΔW`` and never keeps ``ΔW``: backward rebuilds the fused weight from the factors (or,
under autocast, uses the narrowed fused weight it kept, as autocast keeps every plain linear's cast weight).
The factor gradients come from the dense weight gradient ``G = grad_yᵀ x`` contracted against the factors:
``grad_U[i, b] = s Σ_a G[i, a r + b] V[i, a]`` and ``grad_V[i, a] = s Σ_b G[i, a r + b] U[i, b]``.
Under ``torch.compile`` the same code runs inside two custom operators, so a compiled model has no graph
break at these layers and keeps their memory behaviour.

A ``Conv1D`` stores ``W0ᵀ``; the Function is handed its transposed view ``W0`` (no copy), so autograd
routes the weight gradient back into the ``(in, out)`` parameter and merging writes through the same view.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.adapters.base import AdapterLayer
from kr_vlm.adapters.layer import (
    Method,
    dense_weight,
    describe_shared,
    instances_of,
    replace_layers,
    shared_parameters,
)
from kr_vlm.adapters.methods.kradapter_kernel import khatri_rao_update, kradapter_linear
from kr_vlm.errors import ConfigError
from kr_vlm.spectral import KhatriRaoFactors


def kradapter_shapes(d_out: int, d_in: int, rank: int | None = None) -> tuple[int, int, int, int]:
    """Return ``(k, K, r, r2)`` for a ``(d_out, d_in)`` weight.

    ``k = min(d_out, d_in)``, ``K = max(d_out, d_in)``, ``r = floor(sqrt(k))`` unless ``rank`` is given, and
    ``r2 = ceil(K / r)``, the smallest ``r2`` with ``r * r2 >= K``. For every ``r <= sqrt(K)`` (the default
    included) this is the authors' ``r + d`` rule; for a larger custom rank their rule would keep
    ``r2 = r`` and pay for columns that are cut off, so the smallest sufficient ``r2`` is used instead.
    Trainable parameters: ``k * (r + r2)``.
    """
    if d_out < 1 or d_in < 1:
        raise ValueError(f"KRAdapter needs a weight with positive dimensions, got ({d_out}, {d_in}).")
    k, big_k = min(d_out, d_in), max(d_out, d_in)
    if rank is None:
        rank = math.isqrt(k)
    elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ConfigError(
            f"KRAdapter rank must be an integer in [1, min(d_out, d_in)] = [1, {k}] for a ({d_out}, {d_in}) "
            f"weight, got {rank!r}. Leave it as None for the default floor(sqrt({k})) = {math.isqrt(k)}."
        )
    rank2 = -(-big_k // rank)
    return k, big_k, rank, rank2


class KRAdapterLinear(AdapterLayer):
    """A linear layer (``nn.Linear`` or transformers' ``Conv1D``) plus a trainable Khatri-Rao update ``s ΔW``
    (see the module docstring).

    Args:
        base: the layer to adapt; kept as the frozen submodule ``base_layer``.
        rank: ``r``, the width of ``U``; default ``floor(sqrt(min(d_out, d_in)))``.
        scaling: ``s``, the factor on the update (the authors use 2).
        factor_dtype: dtype of the trainable factors (float32 even when the base weight is half).
        dropout: dropout probability on the update's input, as peft's ``lora_dropout``: in training the
            layer computes ``x W0ᵀ + b + s dropout(x) ΔWᵀ``. 0 (the default) is the paper's layer.

    ``update_scale`` (α, set with ``set_update_scale``; 1 by default) multiplies ``s``: the layer computes
    ``W0 + α s ΔW``, and at α = 0 it is the base layer itself. It is evaluation state, never saved.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int | None = None,
        scaling: float = 2.0,
        factor_dtype: torch.dtype = torch.float32,
        dropout: float = 0.0,
    ) -> None:
        if not factor_dtype.is_floating_point:
            raise TypeError(f"factor_dtype must be a floating point dtype, got {factor_dtype}.")
        check_dropout(dropout)
        super().__init__(base)  # the frozen base_layer, merged, update_scale
        k, big_k, rank, rank2 = kradapter_shapes(self.out_features, self.in_features, rank)
        self.rank, self.rank2, self.scaling, self.dropout = rank, rank2, float(scaling), float(dropout)
        device = base.weight.device
        self.kr_u = nn.Parameter(torch.zeros(k, rank, device=device, dtype=factor_dtype))
        self.kr_v = nn.Parameter(torch.empty(k, rank2, device=device, dtype=factor_dtype))
        # a=5 (not sqrt(5)) as in the authors' code: a small uniform range, the update starts at zero via U.
        nn.init.kaiming_uniform_(self.kr_v, a=5)

    @property
    def _transposed(self) -> bool:
        # The k axis is the smaller side; ΔW = Mᵀ when the outputs are the larger side.
        return self.out_features > self.in_features

    # rank_cap is AdapterLayer's min(d_out, d_in): every row of ΔW is a Khatri-Rao product of its own, so
    # the update is generically full rank.

    @property
    def _applied_scaling(self) -> float:
        """``α s``: the factor on ``ΔW`` that the layer applies now."""
        return self.scaling * self.update_scale

    def update(self) -> torch.Tensor:
        """``s ΔW``, the update at the update scale α = 1."""
        big_k = max(self.out_features, self.in_features)
        return self.scaling * khatri_rao_update(self.kr_u, self.kr_v, big_k, self._transposed)

    def delta_weight(self) -> torch.Tensor:
        """``α s ΔW`` shaped ``(out_features, in_features)`` in the factors' dtype, differentiable."""
        big_k = max(self.out_features, self.in_features)
        return self._applied_scaling * khatri_rao_update(self.kr_u, self.kr_v, big_k, self._transposed)

    def spectral_factors(self) -> KhatriRaoFactors:
        """The update as its Khatri-Rao factors, for its singular values without the dense ``ΔW``."""
        big_k = max(self.out_features, self.in_features)
        return KhatriRaoFactors(self.kr_u, self.kr_v, big_k, self._applied_scaling, self._transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.update_scale == 0:
            return self.base_layer(x)
        bias = self.base_layer.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast as autocast would cast F.linear's inputs. Doing it outside the Function lets autograd
            # route the gradients of x (and of a trainable bias) back through the casts.
            compute_dtype = torch.get_autocast_dtype(device_type)
            x = x.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
        else:
            # Like nn.Linear: no silent casts; a dtype mismatch between x and the weight is F.linear's error.
            compute_dtype = self.base_layer.weight.dtype
        base_weight = dense_weight(self.base_layer)
        if not (self.dropout and self.training):
            return self._fused_linear(x, base_weight, bias, compute_dtype)
        # The update sees dropout(x), the base weight all of x: the fused call on dropout(x) gives
        # dropout(x) (W0 + s ΔW)ᵀ + b, and the part of x that dropout changed goes through W0 alone.
        dropped = F.dropout(x, self.dropout, training=True)
        rest = F.linear(x - dropped, base_weight)
        return self._fused_linear(dropped, base_weight, bias, compute_dtype) + rest

    def _fused_linear(
        self,
        x: torch.Tensor,
        base_weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        return kradapter_linear(
            x, base_weight, bias, self.kr_u, self.kr_v, self._applied_scaling, self._transposed, compute_dtype
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``α s ΔW`` into the base weight in place (summed in float32, then cast)."""
        if self.merged:
            warnings.warn("KRAdapterLinear is already merged; merge() did nothing.", stacklevel=2)
            return
        self._add_to_base(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ``α s ΔW`` from the base weight, restoring it (to rounding)."""
        if not self.merged:
            warnings.warn("KRAdapterLinear is not merged; unmerge() did nothing.", stacklevel=2)
            return
        self._add_to_base(-1.0)
        self.merged = False

    def _add_to_base(self, sign: float) -> None:
        weight = dense_weight(
            self.base_layer
        )  # a Conv1D's transposed view: the copy lands in its (in, out) weight
        delta = self.delta_weight().to(torch.float32)
        weight.copy_(torch.add(weight.to(torch.float32), delta, alpha=sign).to(weight.dtype))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The two Khatri-Rao factors, ``kr_u`` and ``kr_v``, as trained (``update_scale`` is not in them)."""
        return {"kr_u": self.kr_u, "kr_v": self.kr_v}

    def extra_repr(self) -> str:
        k = min(self.in_features, self.out_features)
        trainable = self.kr_u.numel() + self.kr_v.numel()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={k}, r={self.rank}, "
            f"r2={self.rank2}, scaling={self.scaling}, dropout={self.dropout}, trainable={trainable}, "
            f"merged={self.merged}"
        )


def check_dropout(dropout: float) -> None:
    """A dropout probability is a number in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(
            f"KRAdapter dropout must be a probability in [0, 1), got {dropout!r}; 0 turns it off."
        )


def factor_dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` (or ``"torch.float32"``) -> ``torch.float32``; only floating point dtypes."""
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"factor_dtype must name a floating point torch dtype such as 'float32' or 'bfloat16', got {name!r}."
        )
    return dtype


@dataclasses.dataclass
class KRAdapterOptions:
    """KRAdapter's options (``KRAdapterLinear``'s arguments, and what to do about shared weights).

    Attributes:
        rank: ``r``, the width of ``U``; None for ``floor(sqrt(min(d_out, d_in)))``.
        scaling: ``s``, the factor on the update (the authors use 2).
        factor_dtype: the name of the factors' dtype, e.g. ``"float32"`` (also for half-precision base weights).
        dropout: dropout on the update's input (peft's ``lora_dropout``); 0 is the paper's layer.
        allow_shared_weights: adapt a layer whose weight is also another module's (tied embeddings). The
            update then stays unmerged: merging it would change the other module too, so ``merge_adapters``
            and ``merge_and_unload`` refuse such a layer. By default such a target is an error.
    """

    rank: int | None = None
    scaling: float = 2.0
    factor_dtype: str = "float32"
    dropout: float = 0.0
    allow_shared_weights: bool = False

    def __post_init__(self) -> None:
        factor_dtype_from_name(self.factor_dtype)
        self.factor_dtype = self.factor_dtype.removeprefix("torch.")
        check_dropout(self.dropout)


def inject_kradapter(model: nn.Module, names: Sequence[str], options: KRAdapterOptions) -> None:
    """Replace each named linear layer with a ``KRAdapterLinear`` around it; a layer whose weight another
    module shares is refused unless ``options.allow_shared_weights``."""
    shared = {} if options.allow_shared_weights else shared_parameters(model, names)
    if shared:
        tied = describe_shared(shared)
        raise ConfigError(
            f"KRAdapter cannot adapt layers whose weights are tied to other modules: {tied}. Merging the update "
            "would change those modules too. Leave these layers out of target_modules (e.g. target_modules="
            "'all-linear', which skips the output head), untie the weights first, or pass "
            "allow_shared_weights=True to train the update unmerged (merge_adapters and merge_and_unload then "
            "refuse these layers)."
        )
    factor_dtype = factor_dtype_from_name(options.factor_dtype)
    replace_layers(
        model,
        names,
        lambda base: KRAdapterLinear(base, options.rank, options.scaling, factor_dtype, options.dropout),
    )


KRADAPTER = Method(
    KRAdapterOptions,
    inject_kradapter,
    find=instances_of(KRAdapterLinear),
    adapts_conv1d=True,
    layer=KRAdapterLinear,
)
