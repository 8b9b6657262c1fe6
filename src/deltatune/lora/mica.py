"""MiCA initialisation (Minor Component Adaptation, https://arxiv.org/abs/2604.01694), PEFT's
``init_lora_weights="mica"``.

For a base weight ``W: (out, in)`` with SVD ``W = U S V^T`` (singular values descending), ``B`` is set to the last
``r`` left singular vectors ``U[:, -r:]: (out, r)`` (the *minor* components, smallest singular values) and
``A: (r, in)`` to zero, so ``B A = 0`` and the model is unchanged at creation. ``B`` then stays frozen: only ``A``
trains, i.e. the update is confined to the span of the minor directions. Forward, merge and the file are plain
LoRA's. An embedding's effective projection is ``W^T: (dim, vocab)``, so there ``lora_embedding_B: (dim, r)`` is
``U[:, -r:]`` of ``W^T`` and ``lora_embedding_A: (r, vocab)`` is zero (PEFT's layout).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.errors import ConfigError


@torch.no_grad()
def minor_left_vectors(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``U[:, -r:]`` of ``weight: (m, n)`` computed in fp32: the left singular vectors of the ``r`` smallest
    singular values, ``(m, r)``."""
    u, _, _ = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    return u[:, -r:].contiguous()


def _check_rank(r: int, shape: tuple[int, ...], where: str) -> None:
    if r > min(shape):
        dims = "num_embeddings, embedding_dim" if where == "the embedding" else "in_features, out_features"
        layer = "an embedding layer" if where == "the embedding" else "a layer"
        raise ConfigError(f"MiCA requires `r` <= min({dims}) but got r={r} for {layer} with weight shape "
                          f"{tuple(shape)} (max usable r is {min(shape)}). "
                          f"init_lora_weights='mica' needs r <= min(in, out) of every adapted layer; {where} has "
                          f"weight {tuple(shape)} and r={r}; lower r (or rank_pattern for that layer) to "
                          f"<= {min(shape)}")


@torch.no_grad()
def init_mica(layer: nn.Module, adapter_name: str) -> None:
    """Set ``adapter_name``'s factors on the LoRA ``layer`` by MiCA and freeze its ``B`` (see the module doc)."""
    r = layer.r[adapter_name]
    weight = layer.read_base_weight()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ConfigError(f"init_lora_weights='mica' needs a floating-point base weight, got {weight.dtype}")
    if adapter_name in layer.lora_A:  # Linear: B (out, r), A (r, in)
        if not isinstance(layer.lora_A[adapter_name], nn.Linear):
            raise ConfigError("init_lora_weights='mica' is supported on Linear and Embedding layers, not on "
                              f"{type(layer.base_layer).__name__}")
        w = weight.T if getattr(layer, "fan_in_fan_out", False) else weight  # Conv1D stores (in, out)
        if w.dim() != 2:
            raise ConfigError("init_lora_weights='mica' is supported on Linear and Embedding layers, not on "
                              f"{type(layer.base_layer).__name__}")
        _check_rank(r, tuple(w.shape), type(layer.base_layer).__name__)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        b.copy_(minor_left_vectors(w, r).to(b))
        a.zero_()
        frozen = "lora_B"
    else:  # Embedding: the projection is W^T (dim, vocab); B (dim, r), A (r, vocab)
        _check_rank(r, tuple(weight.shape), "the embedding")
        a, b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        b.copy_(minor_left_vectors(weight.T, r).to(b))
        a.zero_()
        frozen = "lora_embedding_B"
    # Only A trains (as PEFT's MiCA variant): set_adapter keeps this container frozen for this adapter.
    layer.frozen_adapter_weights[adapter_name] = (frozen,)
    b.requires_grad_(False)
