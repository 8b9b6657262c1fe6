"""Task-vector merging: prune, elect a sign, merge. Method-agnostic tensor ops on a list of "task tensors".

A task tensor ``τ_i`` is one adapter's contribution to one weight (a dense ``ΔW`` or one LoRA factor); all
tensors of one merge share a shape ``S``, and ``weights: (n,)`` holds one scalar per tensor. The combinations:

- ``linear`` (task arithmetic, Ilharco et al., 2023): ``Σ_i w_i τ_i``.
- ``magnitude_prune``: keep the ``density`` fraction of each ``τ_i`` with the largest ``|τ|``, then linear.
- ``ties`` (Yadav et al., 2023): magnitude-prune each ``τ_i``; elect a sign per element from the pruned
  tensors (``total``: the sign of ``Σ_i τ_i``; ``frequency``: the sign most tensors have); average the weighted
  entries that agree with it (disjoint merge: ``Σ_i [sign τ_i = s] w_i τ_i / max(1, #agreeing)``).
- ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): drop each entry with probability ``1 - density`` and
  rescale the survivors by ``1 / density`` (so the expectation is unchanged), then linear / TIES' sign
  election and disjoint merge.

The random drop draws ``torch.bernoulli`` from the global generator, one tensor after another in list order,
exactly as Hugging Face PEFT does, so under the same ``torch.manual_seed`` both libraries drop the same entries.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from deltatune.errors import ConfigError

COMBINATIONS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def check_density(density: float | None, how: str) -> None:
    """``density`` must be given for pruning combinations and lie in ``[0, 1]`` (``> 0`` for DARE's rescale)."""
    if how == "linear":
        return
    if density is None:
        raise ConfigError(f"combination {how!r} prunes each adapter: pass density=<fraction to keep>, e.g. 0.5")
    if not 0.0 <= float(density) <= 1.0:
        raise ConfigError(f"density={density!r} must be in [0, 1] (the fraction of entries kept)")
    if how.startswith("dare") and density == 0:
        raise ConfigError("density=0 with DARE drops everything and rescales by 1/0; use a density above 0")


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density · numel)`` entries of largest ``|tensor|``, zero the rest (same shape)."""
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.topk(flat.abs(), k=k, largest=True).indices
    # index_copy_ rather than a 0/1 mask written by `mask[keep] = 1`: the same values, and on CPU the
    # advanced-indexing write (index_put_) is ~1000x slower than index_copy_ for these sizes.
    return torch.zeros_like(flat).index_copy_(0, keep, flat.index_select(0, keep)).view_as(tensor)


def prune_randomly(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` (a Bernoulli mask from the global RNG);
    with ``rescale`` divide the survivors by ``density`` so ``E[out] = tensor``."""
    mask = torch.bernoulli(torch.full_like(tensor, density))
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Sparsify one task tensor; ``density >= 1`` keeps everything (with a warning, as PEFT)."""
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned", stacklevel=3)
        return tensor
    if density < 0:
        raise ConfigError(f"density={density!r} must be >= 0")
    if method == "magnitude":
        return prune_by_magnitude(tensor, density)
    if method == "random":
        return prune_randomly(tensor, density, rescale)
    raise ConfigError(f"unknown pruning method {method!r}; use 'magnitude' or 'random'")


def majority_sign_mask(stacked: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES' sign election over ``stacked: (n, *S)`` -> bool ``(n, *S)``: where ``τ_i`` has the elected sign.

    ``total`` elects ``sign(Σ_i τ_i)``, ``frequency`` ``sign(Σ_i sign τ_i)``; a tie elects ``+``. Zero (pruned)
    entries have sign 0 and never agree, so they do not count in the disjoint mean.
    """
    sign = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = sign.sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method={method!r}: use 'total' or 'frequency'")
    elected = torch.where(score >= 0, 1, -1)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_i mask_i w_i τ_i / max(1, Σ_i mask_i)`` over ``weighted, mask: (n, *S)`` -> ``S``."""
    total = (weighted * mask).sum(dim=0)
    return total / torch.clamp(mask.sum(dim=0), min=1.0)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w_i τ_i`` for ``stacked: (n, *S)``, ``weights: (n,)``."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, how: str, density: float | None = None,
            majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Merge ``tensors`` (``n`` tensors of shape ``S``) with ``weights: (n,)`` by ``how`` (see the module doc).

    Returns a tensor of shape ``S``. Raises :class:`ConfigError` for an unknown ``how``, a missing or
    out-of-range ``density``, or an unknown ``majority_sign_method``.
    """
    if how not in COMBINATIONS:
        raise ConfigError(f"unknown combination {how!r}; use one of {', '.join(COMBINATIONS)}")
    check_density(density, how)
    if how in ("ties", "dare_ties") and majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}: use 'total' or 'frequency'")
    if how in ("magnitude_prune", "ties"):
        tensors = [prune(t, density, "magnitude") for t in tensors]
    elif how.startswith("dare"):
        tensors = [prune(t, density, "random", rescale=True) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if how.endswith("ties"):
        mask = majority_sign_mask(stacked, majority_sign_method)  # elected on the unweighted pruned tensors
        return disjoint_merge(_weighted(stacked, weights), mask)
    return _weighted(stacked, weights).sum(dim=0)
