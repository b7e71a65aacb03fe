"""Singular-value spectra of weight updates and the ranks read off them.

The matrix functions work on batches: ``matrices`` is a tensor ``(..., m, n)`` (or a sequence of same-shaped
``(m, n)`` tensors, stacked) and the result keeps the leading ``...`` dimensions; they run a full SVD, the
general path. A weight update described by its factors (``KhatriRaoFactors``, ``LowRankFactors``,
``KroneckerFactors``, ``DenseUpdate``; every adapted layer gives one from ``spectral_factors()``) has an exact
shortcut to its singular values instead, see ``UpdateFactors``.

- effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO
  2007): with ``p_i = σ_i / Σ_j σ_j``, ``erank = exp(-Σ_i p_i log p_i)``. It lies in ``[1, min(m, n)]``:
  ``n`` for an ``n x n`` identity, 1 for any rank-one matrix. KRAdapter's authors (arXiv 2508.00230) use it
  to compare adapters; their code adds 1e-10 to every ``p_i`` before the entropy, which here is replaced
  by the exact convention ``0 log 0 = 0`` (relative difference below 1e-6 for up to a few thousand
  singular values). The all-zero matrix has no spectrum to normalise; its effective rank is defined here
  as 0, so a zero update (e.g. an adapter before its first step) reads as "no rank" rather than NaN.
- stable rank (Rudelson & Vershynin, 2007): ``||W||_F² / ||W||_2² = Σ σ_i² / σ_max²``, in
  ``[1, rank(W)]`` and insensitive to tiny singular values; 0 for the all-zero matrix, likewise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

_SVD_DTYPES = (torch.float32, torch.float64)


def singular_values(
    matrices: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Singular values ``(..., min(m, n))`` in descending order of matrices ``(..., m, n)``.

    The decomposition runs in ``dtype`` (float32 or float64): half-precision inputs are cast up, since
    LAPACK / cuSOLVER have no half-precision SVD and half precision would blur the small singular values.
    Runs on the matrices' device.
    """
    if dtype not in _SVD_DTYPES:
        raise ValueError(f"singular_values computes in float32 or float64, got dtype={dtype}.")
    if not isinstance(matrices, torch.Tensor):
        matrices = torch.stack(list(matrices))
    if matrices.ndim < 2:
        raise ValueError(
            f"singular_values needs matrices shaped (..., m, n), got shape {tuple(matrices.shape)}."
        )
    return torch.linalg.svdvals(matrices.to(dtype))


def effective_rank_from_singular_values(sigma: torch.Tensor) -> torch.Tensor:
    """``exp(entropy(σ / Σσ))`` over the last dimension of ``sigma`` (0 where all σ are 0)."""
    total = sigma.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    p = sigma / torch.where(nonzero, total, torch.ones_like(total))
    erank = torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))
    return torch.where(nonzero.squeeze(-1), erank, torch.zeros_like(erank))


def stable_rank_from_singular_values(sigma: torch.Tensor) -> torch.Tensor:
    """``Σ σ² / σ_max²`` over the last dimension of ``sigma`` (0 where all σ are 0)."""
    largest = sigma.amax(dim=-1)
    nonzero = largest > 0
    ratio = sigma.square().sum(dim=-1) / torch.where(nonzero, largest, torch.ones_like(largest)).square()
    return torch.where(nonzero, ratio, torch.zeros_like(ratio))


def effective_rank(
    matrices: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of matrices ``(..., m, n)``, shaped ``(...)``; see the module doc."""
    return effective_rank_from_singular_values(singular_values(matrices, dtype))


def stable_rank(
    matrices: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stable rank ``||W||_F² / ||W||_2²`` of matrices ``(..., m, n)``, shaped ``(...)``."""
    return stable_rank_from_singular_values(singular_values(matrices, dtype))


# ------------------------------------------------------------------------------------------------------------
# Spectra of weight updates without their dense matrix.
#
# Each adapted layer describes its update ``ΔW`` (scaling included) as one of the types below
# (``spectral_factors()``); ``singular_values()`` then takes that method's exact fast path. All paths compute in
# float64: a Gram matrix squares the condition number, so its eigenvalue round-off, about 1e-16 · σ_max² (times a
# factor that grows slowly with the size), moves the smallest σ by about 1e-8 · σ_max (float32 would give
# 3e-4 · σ_max). Error bounds are therefore stated relative to σ_max, the honest measure for Gram methods: small
# σ are exact to a fixed fraction of σ_max, not to a fraction of themselves.


def _to_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def _padded(sigma: torch.Tensor, count: int) -> torch.Tensor:
    """``sigma`` (descending) cut or padded with zeros to ``count`` values."""
    sigma = sigma[:count]
    return torch.cat([sigma, sigma.new_zeros(count - sigma.shape[0])]) if sigma.shape[0] < count else sigma


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a matrix ``A`` from its Gram matrix ``A Aᵀ`` (symmetric, n x n).

    The eigenvalues of ``A Aᵀ`` are ``σ²``; round-off can leave the smallest slightly negative, so they are
    clamped at zero before the square root. Should the symmetric eigensolver not converge, an SVD of the Gram
    matrix (whose singular values are its eigenvalues, as it is positive semi-definite) is the fallback.
    """
    try:
        squares = torch.linalg.eigvalsh(gram).flip(-1)
    except torch.linalg.LinAlgError:
        squares = torch.linalg.svdvals(gram)
    return squares.clamp_min(0).sqrt()


class UpdateFactors:
    """A weight update ``ΔW`` (``shape``: ``(d_out, d_in)``, scaling included) as the factors it is built from.

    Subclasses are frozen dataclasses whose tensor fields are the factors; ``singular_values()`` is exact
    (see the section comment above) and never forms ``ΔW`` unless the update is dense.
    """

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the update."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors by field name."""
        return {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}

    def snapshot(self) -> UpdateFactors:
        """A detached copy on the CPU, which later training steps do not change (the factors are small)."""
        copies = {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.tensors().items()}
        return dataclasses.replace(self, **copies)

    def is_finite(self) -> bool:
        """True when every factor entry is finite (a NaN or an infinity has no spectrum)."""
        return all(bool(torch.isfinite(tensor).all()) for tensor in self.tensors().values())

    def singular_values(self) -> torch.Tensor:
        """All ``min(d_out, d_in)`` singular values of ``ΔW``, descending, float64, on the factors' device."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class KhatriRaoFactors(UpdateFactors):
    """``ΔW = scaling · M`` (or ``Mᵀ``) where row ``i`` of ``M`` (``(k, length)``) is ``kron(v[i], u[i])`` cut to
    ``length`` entries: entry ``a r + b`` is ``v[i, a] u[i, b]`` (KRAdapter; ``u`` is ``(k, r)``, ``v`` is
    ``(k, r2)`` with ``r * r2 >= length``).

    σ from the ``k x k`` Gram matrix of ``M``, built from the two small Grams: with ``q = length // r`` full
    blocks and ``t = length % r`` entries of the cut block, ``M Mᵀ = (V_q V_qᵀ) ∘ (U Uᵀ) + (v_q v_qᵀ) ∘ (U_t U_tᵀ)``
    (``V_q`` the first ``q`` columns of ``v``, ``v_q`` its next column, ``U_t`` the first ``t`` columns of
    ``u``, ``∘`` the entrywise product). That is the uncut ``(V Vᵀ) ∘ (U Uᵀ)`` minus the cut-off entries'
    term, written as a sum so that nothing cancels.
    """

    u: torch.Tensor
    v: torch.Tensor
    length: int
    scaling: float = 1.0
    transposed: bool = False

    def __post_init__(self) -> None:
        (k, rank), (k_v, rank2) = self.u.shape, self.v.shape
        if k != k_v or rank * rank2 < self.length:
            raise ValueError(
                f"KhatriRaoFactors needs u (k, r) and v (k, r2) with r * r2 >= length; got u {tuple(self.u.shape)}, "
                f"v {tuple(self.v.shape)}, length {self.length}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        k = self.u.shape[0]
        return (self.length, k) if self.transposed else (k, self.length)

    def singular_values(self) -> torch.Tensor:
        u, v = _to_float64(self.u), _to_float64(self.v)
        full_blocks, tail = divmod(self.length, u.shape[1])
        v_full = v[:, :full_blocks]
        gram = (v_full @ v_full.T) * (u @ u.T)
        if tail:
            v_cut, u_cut = v[:, full_blocks : full_blocks + 1], u[:, :tail]
            gram += (v_cut @ v_cut.T) * (u_cut @ u_cut.T)
        return gram_singular_values(gram) * abs(self.scaling)


@dataclasses.dataclass(frozen=True)
class LowRankFactors(UpdateFactors):
    """``ΔW = scaling · b a`` with ``b`` ``(d_out, r)`` and ``a`` ``(r, d_in)`` (LoRA, VeRA).

    σ from an ``r x r`` core: with ``b = Q_b R_b`` and ``aᵀ = Q_a R_a`` (thin QR), ``b a = Q_b (R_b R_aᵀ) Q_aᵀ``
    and the orthonormal ``Q`` factors keep the singular values; the other ``min(d_out, d_in) - r`` are zero.
    """

    b: torch.Tensor
    a: torch.Tensor
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.b.shape[1] != self.a.shape[0]:
            raise ValueError(
                f"LowRankFactors needs b (d_out, r) and a (r, d_in); got b {tuple(self.b.shape)}, "
                f"a {tuple(self.a.shape)}."
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def singular_values(self) -> torch.Tensor:
        r_b = torch.linalg.qr(_to_float64(self.b), mode="r").R
        r_a = torch.linalg.qr(_to_float64(self.a).T, mode="r").R
        sigma = torch.linalg.svdvals(r_b @ r_a.T) * abs(self.scaling)
        return _padded(sigma, min(self.shape))


@dataclasses.dataclass(frozen=True)
class KroneckerFactors(UpdateFactors):
    """``ΔW = scaling · kron(left, right)`` (LoKr): its singular values are all products ``σ_i(left) σ_j(right)``."""

    left: torch.Tensor
    right: torch.Tensor
    scaling: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (
            self.left.shape[0] * self.right.shape[0],
            self.left.shape[1] * self.right.shape[1],
        )

    def singular_values(self) -> torch.Tensor:
        left = torch.linalg.svdvals(_to_float64(self.left))
        right = torch.linalg.svdvals(_to_float64(self.right))
        products = torch.outer(left, right).flatten().sort(descending=True).values * abs(self.scaling)
        return _padded(products, min(self.shape))


@dataclasses.dataclass(frozen=True)
class DenseUpdate(UpdateFactors):
    """``ΔW`` itself, ``(d_out, d_in)`` (full fine-tuning, and methods without a simpler structure).

    σ from the Gram matrix of the smaller side (``ΔW ΔWᵀ`` when ``d_out <= d_in``, else ``ΔWᵀ ΔW``).
    """

    matrix: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def singular_values(self) -> torch.Tensor:
        matrix = _to_float64(self.matrix)
        if matrix.shape[0] > matrix.shape[1]:
            matrix = matrix.T
        return gram_singular_values(matrix @ matrix.T)
