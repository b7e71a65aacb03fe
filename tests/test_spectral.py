"""Spectra and ranks: known spectra, batching, dtypes, the zero matrix."""

from __future__ import annotations

import math

import pytest
import torch

from kr_vlm import spectral


def test_identity_has_full_effective_and_stable_rank():
    for n in (1, 5, 32):
        eye = torch.eye(n)
        assert spectral.effective_rank(eye).item() == pytest.approx(n, rel=1e-5)
        assert spectral.stable_rank(eye).item() == pytest.approx(n, rel=1e-5)


def test_rank_one_matrix_has_rank_one():
    torch.manual_seed(0)
    outer = torch.outer(torch.randn(12), torch.randn(7))
    assert spectral.effective_rank(outer).item() == pytest.approx(1.0, abs=1e-4)
    assert spectral.stable_rank(outer).item() == pytest.approx(1.0, abs=1e-4)


def test_known_spectrum_matches_definitions():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = torch.tensor([3.0, 2.0, 1.0]) / 6.0
    expected_erank = math.exp(-(p * p.log()).sum().item())
    assert spectral.effective_rank_from_singular_values(sigma).item() == pytest.approx(
        expected_erank, rel=1e-6
    )
    assert spectral.stable_rank_from_singular_values(sigma).item() == pytest.approx(14.0 / 9.0, rel=1e-6)
    # A diagonal matrix has exactly these singular values.
    assert spectral.effective_rank(torch.diag(sigma)).item() == pytest.approx(expected_erank, rel=1e-5)


def test_matches_authors_formula_closely():
    torch.manual_seed(1)
    matrix = torch.randn(64, 48)
    sigma = torch.linalg.svdvals(matrix)
    p = sigma / sigma.sum() + 1e-10  # the KRAdapter authors' version
    authors = torch.exp(-(p * p.log()).sum())
    assert spectral.effective_rank(matrix).item() == pytest.approx(authors.item(), rel=1e-6)


def test_batched_shapes_and_values():
    torch.manual_seed(2)
    stack = torch.randn(2, 3, 10, 6)
    sigma = spectral.singular_values(stack)
    assert sigma.shape == (2, 3, 6)
    assert torch.all(sigma[..., :-1] >= sigma[..., 1:])  # descending
    erank = spectral.effective_rank(stack)
    stable = spectral.stable_rank(stack)
    assert erank.shape == stable.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert erank[i, j].item() == pytest.approx(spectral.effective_rank(stack[i, j]).item(), rel=1e-5)
    assert torch.all((erank >= 1) & (erank <= 6)) and torch.all((stable >= 1) & (stable <= 6))


def test_sequence_of_matrices_is_stacked():
    matrices = [torch.eye(4), torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0]))]
    assert spectral.effective_rank(matrices).tolist() == pytest.approx([4.0, 1.0], rel=1e-5)


def test_float64_path_and_half_inputs():
    torch.manual_seed(3)
    matrix = torch.randn(20, 20, dtype=torch.float64)
    sigma64 = spectral.singular_values(matrix, dtype=torch.float64)
    assert sigma64.dtype == torch.float64
    torch.testing.assert_close(sigma64, torch.linalg.svdvals(matrix))
    assert spectral.effective_rank(matrix, dtype=torch.float64).dtype == torch.float64
    half = matrix.to(torch.float16)
    sigma_half = spectral.singular_values(half)  # cast up, no half-precision SVD needed
    assert sigma_half.dtype == torch.float32
    torch.testing.assert_close(sigma_half, torch.linalg.svdvals(half.float()))
    with pytest.raises(ValueError, match="float32 or float64"):
        spectral.singular_values(matrix, dtype=torch.float16)


def test_zero_matrix_has_rank_zero_not_nan():
    zeros = torch.zeros(3, 5, 4)
    zeros[1] = torch.eye(5, 4)
    assert spectral.effective_rank(zeros).tolist() == pytest.approx([0.0, 4.0, 0.0], rel=1e-5)
    assert spectral.stable_rank(zeros).tolist() == pytest.approx([0.0, 4.0, 0.0], rel=1e-5)


def test_rejects_vectors():
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        spectral.singular_values(torch.ones(5))


def test_spectral_imports_no_torch_nn_code_of_the_project():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(spectral))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [name for name in imported if name.startswith("kr_vlm")]


# ------------------------------------------------------------------ exact spectra from the update's factors
# "Exact to 1e-4" means max_i |σ̂_i - σ_i| <= 1e-4 · σ_max against torch.linalg.svdvals of the dense matrix in
# float64: relative to the largest singular value, the honest measure for Gram methods (they resolve small σ to
# a fixed fraction of σ_max, not to a fraction of themselves).
SPECTRUM_TOLERANCE = 1e-4


def assert_spectrum_matches(sigma: torch.Tensor, dense: torch.Tensor) -> None:
    expected = torch.linalg.svdvals(dense.double())
    assert sigma.dtype == torch.float64 and sigma.shape == expected.shape
    assert torch.all(sigma[:-1] >= sigma[1:])  # descending
    scale = expected.max().clamp_min(torch.finfo(torch.float64).tiny)
    assert (sigma - expected).abs().max() <= SPECTRUM_TOLERANCE * scale


def khatri_rao_reference(u: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """Row i = kron(v[i], u[i]) cut to ``length`` (entry a*r + b = v[i, a] * u[i, b]), written the plain way."""
    return torch.stack([torch.kron(v[i], u[i])[:length] for i in range(u.shape[0])])


# (k, K, r): square, r * r2 == K exactly, wide, ragged tails (r * r2 > K), custom ranks 1 and 5, and one of
# ViT-B's MLP shapes scaled down (768 x 3072 has k=768, r=27, r2=114, a ragged tail of 6).
KHATRI_RAO_SHAPES = [
    (12, 12, 3),
    (16, 16, 4),
    (7, 20, 2),
    (10, 26, 3),
    (12, 30, 1),
    (20, 50, 5),
    (96, 384, 9),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["wide", "tall"])
@pytest.mark.parametrize(("k", "big_k", "rank"), KHATRI_RAO_SHAPES)
def test_khatri_rao_spectrum_is_exact(k, big_k, rank, transposed):
    torch.manual_seed(k + big_k)
    rank2 = -(-big_k // rank)
    u, v = torch.randn(k, rank), torch.randn(k, rank2)
    factors = spectral.KhatriRaoFactors(u, v, big_k, scaling=-1.5, transposed=transposed)
    dense = -1.5 * khatri_rao_reference(u.double(), v.double(), big_k)
    assert factors.shape == ((big_k, k) if transposed else (k, big_k))
    assert_spectrum_matches(factors.singular_values(), dense.T if transposed else dense)


def test_khatri_rao_factors_reject_rows_shorter_than_the_length():
    with pytest.raises(ValueError, match="r \\* r2 >= length"):
        spectral.KhatriRaoFactors(torch.ones(4, 2), torch.ones(4, 3), length=7)


@pytest.mark.parametrize(
    ("d_out", "d_in", "rank"), [(20, 7, 3), (7, 20, 3), (12, 12, 12), (5, 9, 8), (64, 48, 1)]
)
def test_low_rank_spectrum_is_exact(d_out, d_in, rank):
    torch.manual_seed(d_out * d_in)
    b, a = torch.randn(d_out, rank), torch.randn(rank, d_in)
    factors = spectral.LowRankFactors(b, a, scaling=0.5)
    assert factors.shape == (d_out, d_in)
    assert_spectrum_matches(factors.singular_values(), 0.5 * b.double() @ a.double())


@pytest.mark.parametrize(("left", "right"), [((3, 4), (5, 2)), ((2, 2), (6, 9)), ((4, 1), (3, 7))])
def test_kronecker_spectrum_is_exact(left, right):
    torch.manual_seed(sum(left + right))
    w1 = torch.randn(*left)
    w2 = torch.randn(right[0], 1) @ torch.randn(1, right[1]) + torch.randn(*right)
    factors = spectral.KroneckerFactors(w1, w2, scaling=3.0)
    assert factors.shape == (left[0] * right[0], left[1] * right[1])
    assert_spectrum_matches(factors.singular_values(), 3.0 * torch.kron(w1.double(), w2.double()))


@pytest.mark.parametrize(("d_out", "d_in"), [(20, 7), (7, 20), (12, 12)])
def test_dense_spectrum_is_exact_also_for_a_rank_deficient_update(d_out, d_in):
    torch.manual_seed(d_out + d_in)
    full_rank = torch.randn(d_out, d_in)
    rank_two = torch.randn(d_out, 2) @ torch.randn(2, d_in)
    for matrix in (full_rank, rank_two):
        assert_spectrum_matches(spectral.DenseUpdate(matrix).singular_values(), matrix)


def test_zero_updates_have_zero_spectra():
    zero_u = spectral.KhatriRaoFactors(torch.zeros(6, 2), torch.randn(6, 5), length=9)
    zero_b = spectral.LowRankFactors(torch.zeros(6, 2), torch.randn(2, 9))
    for factors in (zero_u, zero_b, spectral.DenseUpdate(torch.zeros(6, 9))):
        sigma = factors.singular_values()
        assert sigma.shape == (6,) and not sigma.any()
        assert spectral.effective_rank_from_singular_values(sigma) == 0


def test_gram_spectrum_falls_back_to_an_svd_when_the_eigensolver_fails(monkeypatch):
    torch.manual_seed(4)
    matrix = torch.randn(9, 14, dtype=torch.float64)
    expected = spectral.DenseUpdate(matrix).singular_values()

    def failing_eigvalsh(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_eigvalsh)
    torch.testing.assert_close(spectral.DenseUpdate(matrix).singular_values(), expected)


def test_snapshot_is_a_cpu_copy_and_finiteness_covers_every_factor():
    u, v = torch.randn(5, 2, requires_grad=True), torch.randn(5, 3, dtype=torch.float64)
    factors = spectral.KhatriRaoFactors(u, v, length=6, scaling=2.0)
    snapshot = factors.snapshot()
    with torch.no_grad():
        u.add_(1.0)
    assert snapshot.u.device.type == "cpu" and not snapshot.u.requires_grad
    assert snapshot.v.dtype == torch.float64 and (snapshot.length, snapshot.scaling) == (6, 2.0)
    torch.testing.assert_close(snapshot.u, u.detach() - 1.0)
    assert snapshot.is_finite()
    for bad in (float("nan"), float("inf")):
        broken = v.clone()
        broken[3, 1] = bad
        assert not spectral.KhatriRaoFactors(u, broken, length=6).is_finite()
