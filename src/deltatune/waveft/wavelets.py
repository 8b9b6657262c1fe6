"""Orthogonal wavelet filters derived from their defining equations, and the one-level 2-D inverse transform.

No filter table is stored: each family is computed (in float64, once per name) from the conditions that define it,
and checked against PyWavelets' values (the ones PEFT uses) in the tests.

**Daubechies ``dbN``** (``N`` vanishing moments, length ``L = 2N``). The low-pass filter is
``H(z) = √2 · ((1 + z⁻¹) / 2)^N · Q(z)`` with ``|Q(e^{iω})|² = P(sin²(ω/2))``, ``P(y) = Σ_{k<N} C(N-1+k, k) yᵏ``.
Each root ``y_j`` of ``P`` gives the pair ``z, 1/z`` solving ``(2 - z - 1/z) / 4 = y_j``; ``Q(z) = Π (1 - z_j z⁻¹)``
takes one of each pair. ``dbN`` takes the roots inside the unit circle (minimum phase). ``Σ h = √2``.

**Symlets ``symN``**: the same ``|H|``, with the choice of roots (one per reciprocal pair, conjugate pairs together)
whose phase is closest to linear: the least squared distance of ``arg Q(e^{iω})`` on ``[0, π]`` from the chord
between its ends. The chosen filter and its time reverse are equally symmetric; PyWavelets' orientation is the one
whose largest coefficient comes later, except for ``N`` in :data:`_SYM_EARLY_PEAK`.

**Coiflets ``coifN``** (length ``L = 6N``): the filter with ``2N`` vanishing wavelet moments
``Σ_k (-1)ᵏ kᵐ h_k = 0`` (``m < 2N``), ``2N - 1`` vanishing scaling moments about ``k = 2N``
``Σ_k (k - 2N)ᵐ h_k = 0`` (``1 <= m < 2N``), ``Σ h = √2`` and orthonormal shifts ``Σ_k h_k h_{k+2j} = δ_j``; solved by
Gauss-Newton from the Haar filter at ``k = 2N - 1, 2N``, which reaches Daubechies' (and PyWavelets') solution.

The reconstruction filters are ``lo = h`` and ``hi[k] = (-1)ᵏ h[L-1-k]`` (the quadrature mirror).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from deltatune.errors import ConfigError

# Orders computed here: Daubechies to 20 (orthonormal to 1e-12 in float64; the root finding loses digits beyond),
# symlets and coiflets as far as PyWavelets' values (which PEFT ships) check them.
DAUBECHIES_ORDERS = range(1, 21)
SYMLET_ORDERS = range(2, 11)
COIFLET_ORDERS = range(1, 4)
# Symlet orders whose PyWavelets orientation has the largest coefficient early
_SYM_EARLY_PEAK = frozenset({2, 3, 7})

SUPPORTED_FAMILIES: tuple[str, ...] = (
    tuple(f"db{n}" for n in DAUBECHIES_ORDERS) + tuple(f"sym{n}" for n in SYMLET_ORDERS)
    + tuple(f"coif{n}" for n in COIFLET_ORDERS)
)


def _poly_roots(coeffs: list[float]) -> torch.Tensor:
    """Complex roots of ``Σ c_i x^(n-i)`` (highest degree first), the eigenvalues of its companion matrix."""
    c = torch.tensor(coeffs, dtype=torch.float64)
    c = c / c[0]
    n = len(c) - 1
    if n == 0:
        return torch.zeros(0, dtype=torch.complex128)
    companion = torch.zeros(n, n, dtype=torch.float64)
    companion[0] = -c[1:]
    companion[1:, :-1] = torch.eye(n - 1, dtype=torch.float64)
    return torch.linalg.eigvals(companion)


def _root_pairs(n: int) -> list[tuple[complex, complex]]:
    """For each root ``y`` of ``P``: ``(z inside, z outside)`` of ``z² - (2 - 4y) z + 1 = 0`` (``|z_in| < 1``)."""
    pairs = []
    for y in _poly_roots([math.comb(n - 1 + k, k) for k in range(n)][::-1]).tolist():
        b = 2 - 4 * y
        d = complex(b * b - 4) ** 0.5
        z1, z2 = (b + d) / 2, (b - d) / 2
        pairs.append((z1, z2) if abs(z1) < 1 else (z2, z1))
    return pairs


def _lowpass(n: int, roots: list[complex]) -> torch.Tensor:
    """``h``: the coefficients of ``(1 + z⁻¹)^n · Π (1 - r z⁻¹)`` in powers of ``z⁻¹``, scaled to ``Σ h = √2``."""
    h = torch.ones(1, dtype=torch.complex128)
    for r in [-1.0] * n + list(roots):
        h = F.pad(h, (0, 1)) - r * F.pad(h, (1, 0))  # multiply by (1 - r z⁻¹)
    h = h.real
    return h * (math.sqrt(2) / h.sum())


def daubechies(n: int) -> torch.Tensor:
    """``dbN``'s low-pass filter ``(2N,)``: the minimum-phase root of every pair."""
    return _lowpass(n, [inside for inside, _ in _root_pairs(n)])


def _phase_nonlinearity(roots: list[complex], grid: int = 2048) -> float:
    """Σ over ``ω ∈ [0, π]`` of the squared distance of ``arg Q(e^{iω})`` from the chord between its ends (``Q``
    has no zero on the unit circle, so its phase is the running sum of the phase steps between grid points)."""
    w = torch.linspace(0, math.pi, grid, dtype=torch.float64)
    e = torch.exp(-1j * w)
    q = torch.ones_like(e)
    for r in roots:
        q = q * (1 - r * e)
    phase = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.angle(q[1:] / q[:-1]), 0)])
    chord = phase[-1] * w / math.pi
    return float(((phase - chord) ** 2).sum())


def symlet(n: int) -> torch.Tensor:
    """``symN``'s low-pass filter ``(2N,)``: the least asymmetric choice of roots, in PyWavelets' orientation."""
    pairs = _root_pairs(n)
    groups: list[list[int]] = []  # a complex y's conjugate is chosen with it, so h stays real
    free = list(range(len(pairs)))
    while free:
        i = free.pop(0)
        group = [i]
        if abs(pairs[i][0].imag) > 1e-9:
            j = min(free, key=lambda j: abs(pairs[j][0] - pairs[i][0].conjugate()))
            free.remove(j)
            group.append(j)
        groups.append(group)
    best = min(itertools.product((0, 1), repeat=len(groups)),
               key=lambda choice: _phase_nonlinearity([pairs[i][c] for c, g in zip(choice, groups) for i in g]))
    h = _lowpass(n, [pairs[i][c] for c, g in zip(best, groups) for i in g])
    late_peak = int(h.abs().argmax()) >= len(h) // 2
    return h if late_peak != (n in _SYM_EARLY_PEAK) else h.flip(0)


def _coiflet_system(h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The coiflet equations at ``h: (6N,)``: their residuals ``(E,)`` and Jacobian ``(E, 6N)``. The sum and the
    moments are linear in ``h`` (moments of ``k / L``: better conditioned); a shift product
    ``Σ_k h_k h_{k+2j}`` has the gradient ``h_{k+2j} + h_{k-2j}``."""
    length = 6 * n
    k = torch.arange(length, dtype=torch.float64)
    linear = [torch.ones(length, dtype=torch.float64)]
    linear += [(-1.0) ** k * (k / length) ** m for m in range(2 * n)]  # wavelet moments
    linear += [((k - 2 * n) / length) ** m for m in range(1, 2 * n)]  # scaling moments about 2N
    rows = torch.stack(linear)
    targets = torch.zeros(len(linear), dtype=torch.float64)
    targets[0] = math.sqrt(2)
    shifts, grads = [], []
    for j in range(3 * n):
        shifts.append((h[: length - 2 * j] * h[2 * j:]).sum() - float(j == 0))
        grads.append(F.pad(h[2 * j:], (0, 2 * j)) + F.pad(h[: length - 2 * j], (2 * j, 0)))
    residual = torch.cat([rows @ h - targets, torch.stack(shifts)])
    return residual, torch.cat([rows, torch.stack(grads)])


def coiflet(n: int) -> torch.Tensor:
    """``coifN``'s low-pass filter ``(6N,)``, solved by Gauss-Newton (see the module docstring)."""
    h = torch.zeros(6 * n, dtype=torch.float64)
    h[2 * n - 1] = h[2 * n] = 1 / math.sqrt(2)
    for _ in range(100):
        residual, jacobian = _coiflet_system(h, n)
        if residual.abs().max() < 1e-14:
            break
        h = h + torch.linalg.lstsq(jacobian, -residual[:, None]).solution[:, 0]
    if _coiflet_system(h, n)[0].abs().max() > 1e-12:
        raise ConfigError(f"coif{n}: the coiflet equations did not converge")
    return h


@functools.cache
def reconstruction_filters(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, each ``(L,)`` float64: the synthesis filters of wavelet ``name`` (``"db1"`` ... ``"coif3"``).

    Raises:
        ConfigError: a family outside :data:`SUPPORTED_FAMILIES`.
    """
    if name not in SUPPORTED_FAMILIES:
        raise ConfigError(f"Wavelet family {name} not supported. Supported wavelet families are: "
                          f"{list(SUPPORTED_FAMILIES)}")
    order = int(name.lstrip("dbsymcoif"))
    maker = daubechies if name.startswith("db") else symlet if name.startswith("sym") else coiflet
    lo = maker(order)
    sign = (-1.0) ** torch.arange(len(lo), dtype=torch.float64)
    return lo, sign * lo.flip(0)


def idwt2(approx: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor,
          name: str) -> torch.Tensor:
    """One level of the 2-D inverse discrete wavelet transform (PyWavelets' ``waverec2`` on one level).

    Each band ``c: (a, b)`` is upsampled by 2 along both axes and filtered with a pair of synthesis filters, rows
    then columns: approx ``(lo, lo)``, horizontal ``(hi, lo)``, vertical ``(lo, hi)``, diagonal ``(hi, hi)``::

        X[p, q] = Σ_bands Σ_{i,j} c[i, j] · f_row[p + L - 2 - 2i] · f_col[q + L - 2 - 2j]

    for ``p < 2a - L + 2``, ``q < 2b - L + 2`` (the full transposed convolution cropped by ``L - 2`` on each side).

    Returns:
        ``(2a - L + 2, 2b - L + 2)`` in the bands' dtype.
    """
    lo, hi = (f.to(approx.device, approx.dtype) for f in reconstruction_filters(name))
    kernels = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])
    bands = torch.stack([approx, horizontal, vertical, diagonal])[None]  # (1, 4, a, b)
    full = F.conv_transpose2d(bands, kernels[:, None], stride=2)[0, 0]  # sums the four bands: (2a+L-2, 2b+L-2)
    crop = len(lo) - 2
    return full[crop: full.shape[0] - crop, crop: full.shape[1] - crop]
