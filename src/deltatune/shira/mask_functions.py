"""SHiRA's sparse masks: which entries of ``W: (out, in)`` an adapter trains.

A mask function has PEFT's signature ``mask_fn(base_layer, r, **kwargs) -> mask``: ``mask: (out, in)``, ones at
the ``K = r · (out + in)`` trained positions (as many values as a rank-``r`` LoRA has), zeros elsewhere. A layer
keeps only the positions, ``shira_indices: (2, K)`` int32 (row, column) pairs in row-major order, which is what
``torch.where(mask == 1)`` returns and what PEFT writes into the adapter file.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def weight_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear layer (transformers' ``Conv1D`` stores its weight as ``(in, out)``)."""
    rows, cols = dense_weight_shape(base_layer)
    return (cols, rows) if Conv1D is not None and isinstance(base_layer, Conv1D) else (rows, cols)


def num_shira_weights(out_features: int, in_features: int, r: int) -> int:
    """``K = r · (out + in)``: the trained values of one layer, a rank-``r`` LoRA's count."""
    return r * (out_features + in_features)


def random_flat_positions(out_features: int, in_features: int, r: int, random_seed: int | None) -> torch.Tensor:
    """The ``K`` trained positions of the random mask, as flat row-major indices into ``(out, in)``, sorted.

    They are the first ``K`` entries of a permutation of ``out · in`` drawn from a fresh CPU generator seeded with
    ``random_seed`` (an unseeded fresh generator has torch's fixed default seed, so ``None`` is reproducible
    too): PEFT's draw, so the same seed picks the same positions in both libraries.
    """
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    perm = torch.randperm(out_features * in_features, generator=generator)
    return perm[: num_shira_weights(out_features, in_features, r)].sort().values


def random_indices(out_features: int, in_features: int, r: int, random_seed: int | None) -> torch.Tensor:
    """``shira_indices: (2, K)`` int32 (rows, columns) of :func:`random_flat_positions`, row-major."""
    flat = random_flat_positions(out_features, in_features, r, random_seed)
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> torch.Tensor:
    """PEFT's default mask function: a ``(out, in)`` bool mask with ``r · (out + in)`` random ones.

    Args:
        base_layer: The linear layer to adapt (``nn.Linear`` or ``Conv1D``).
        r: Sets the number of ones, ``r · (out + in)``.
        random_seed: Seed of the CPU generator (see :func:`random_flat_positions`).
        kwargs: Ignored (PEFT passes layer details a custom mask function may use).

    Returns:
        ``mask: (out, in)`` bool, on the base weight's device.
    """
    out_features, in_features = weight_shape(base_layer)
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[random_flat_positions(out_features, in_features, r, random_seed)] = True
    return mask.view(out_features, in_features).to(base_layer.weight.device)


def indices_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(2, K)`` int32 (rows, columns) of the ones of ``mask: (out, in)``, row-major (PEFT's order)."""
    rows, cols = torch.where(mask == 1)
    return torch.stack([rows, cols]).to(torch.int32)
