"""Orthogonal matrices from unconstrained vectors: the Cayley transform of a skew-symmetric ``Q`` (OFT, PSOFT).

A vector ``q`` of ``b(b-1)/2`` values fills the upper triangle of ``Q: (b, b)`` (row-major, ``torch.triu_indices``
order) and its negation the lower one, so ``Qᵀ = -Q``. Then::

    cayley(Q)            = (I + Q)(I - Q)⁻¹                                  exactly orthogonal
    cayley_neumann(Q, n) = I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)            ≈ cayley(Q) for small ‖Q‖

(the series is ``(I + Q)(I + Q + Q² + ...)`` cut after ``n`` terms: PEFT's truncation, shared by its OFT and PSOFT,
which for ``n = 3`` still ends with ``2Q² + Q³``). ``cayley(-Q) = cayley(Q)ᵀ = (I - Q)(I + Q)⁻¹`` is the other
common convention. Every function takes a batch of matrices ``(..., b, b)``.
"""

from __future__ import annotations

import torch


def skew_symmetric(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., b(b-1)/2) -> (..., b, b)``: ``Q`` with ``vec`` above the diagonal at ``(rows, cols)`` (from
    ``torch.triu_indices(b, b, 1)``) and ``-vec`` below it."""
    q = vec.new_zeros(*vec.shape[:-1], size, size)
    q[..., rows, cols] = vec
    return q - q.transpose(-1, -2)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I - Q)⁻¹`` for skew ``Q: (..., b, b)``, as ``X (I - Q) = I + Q`` solved from the right.

    The LU solve runs in fp32 at least and the result is cast back to ``q``'s dtype: torch has no
    half-precision LU on CPU, and fp16 would lose the orthogonality anyway (PEFT does the same).
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    qw = q.to(wide)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=wide).expand_as(qw)
    return torch.linalg.solve(eye - qw, eye + qw, left=False).to(q.dtype)


def cayley_neumann(q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann series for ``cayley(Q)``: ``I`` (1 term), ``I + 2Q`` (2), else doubled powers
    ``Q .. Q^(m-1)`` and ``Q^m`` once, ``m = max(3, num_terms - 1)``. Matrix products only (no solve)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if num_terms <= 1:
        return eye.clone()
    r = eye + 2 * q
    if num_terms == 2:
        return r
    last = max(3, num_terms - 1)
    power = q
    for _ in range(2, last):
        power = power @ q
        r = r + 2 * power
    return r + power @ q


__all__ = ["cayley", "cayley_neumann", "skew_symmetric"]
