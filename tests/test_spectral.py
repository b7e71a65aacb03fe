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
