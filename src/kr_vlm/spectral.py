"""Singular-value spectra of weight updates and the ranks read off them.

All functions work on batches: ``matrices`` is a tensor ``(..., m, n)`` (or a sequence of same-shaped
``(m, n)`` tensors, stacked) and the result keeps the leading ``...`` dimensions.

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
