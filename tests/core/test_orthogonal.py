"""``core.orthogonal`` (shared by OFT and PSOFT) against explicit float64 formulas: the skew matrix from its upper
triangle, the Cayley transform ``(I + Q)(I − Q)⁻¹`` by an explicit inverse, and PEFT's truncated Neumann series
written out term by term."""

from __future__ import annotations

import pytest
import torch

from deltatune.core.orthogonal import cayley, cayley_neumann, skew_symmetric


def _q(batch: tuple[int, ...] = (3,), b: int = 5, scale: float = 0.1) -> torch.Tensor:
    torch.manual_seed(0)
    rows, cols = torch.triu_indices(b, b, 1)
    return skew_symmetric(torch.randn(*batch, b * (b - 1) // 2) * scale, rows, cols, b)


def test_skew_symmetric_places_the_vector_above_the_diagonal():
    rows, cols = torch.triu_indices(3, 3, 1)
    q = skew_symmetric(torch.tensor([1.0, 2.0, 3.0]), rows, cols, 3)
    assert torch.equal(q, torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cayley_is_the_orthogonal_transform_in_the_input_dtype(dtype):
    q = _q()
    eye = torch.eye(5, dtype=torch.float64)
    want = (eye + q.double()) @ torch.linalg.inv(eye - q.double())
    got = cayley(q.to(dtype))
    assert got.dtype == dtype and got.shape == (3, 5, 5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    torch.testing.assert_close(got.double() @ got.double().transpose(-1, -2), eye.expand(3, 5, 5), atol=tol, rtol=0)
    torch.testing.assert_close(cayley(-q), cayley(q).transpose(-1, -2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("terms,powers", [(1, [1]), (2, [1, 2]), (3, [1, 2, 2, 1]), (4, [1, 2, 2, 1]),
                                          (6, [1, 2, 2, 2, 2, 1])])
def test_cayley_neumann_is_peft_truncation(terms, powers):
    q = _q(scale=0.3).double()
    want = sum(c * torch.linalg.matrix_power(q, k) for k, c in enumerate(powers))
    torch.testing.assert_close(cayley_neumann(q, terms), want, atol=1e-12, rtol=0)


def test_cayley_neumann_converges_to_cayley():
    q = _q(scale=0.05).double()
    torch.testing.assert_close(cayley_neumann(q, 20), cayley(q), atol=1e-12, rtol=0)
