"""X-LoRA's per-token gate on a LoRA expert, written as a LoRA variant (:mod:`deltatune.lora.variants`).

The experts are deltatune LoRA adapters (:mod:`deltatune.lora.layer`), loaded from their folders. X-LoRA changes
one thing in each expert's math, which is what a variant's ``forward`` is for: LoRA layer ``l`` computes, for
expert ``e`` with LoRA scaling ``s_e = lora_alpha / r``,

    y = base(x) + Σ_e  w · s_e · B_e A_e dropout(g[..., l, e] · x)        x: (batch, seq, in), y: (batch, seq, out)

with ``g: (batch, seq, n_layers, n_experts)`` the classifier's weights (after top-k, :func:`select`) and ``w`` the
config's ``global_scaling_weight`` (PEFT scales the layer's *input* by the weight, as here; for an embedding the
weight multiplies the looked-up update ``s_e A_e^T[ids] B_e^T``, which is the same by linearity). Without a
mixture in progress (``g`` unset: the model called directly) an expert is plain LoRA, as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.lora.variants import LoraVariant
from deltatune.xlora.config import XLoraConfig

_MERGE_REFUSAL = ("X-LoRA cannot be merged: the mixture depends on the input (each token weighs the LoRA experts "
                  "by the classifier's output), so no single weight update equals it. Keep the PeftModel for "
                  "inference, or merge one expert on its own by loading its folder as a LoRA adapter")


def select(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """PEFT's ``get_maybe_topk_scalings`` on every layer at once: ``scalings: (..., n_experts)``.

    ``top_k_lora = k``: the ``k`` largest weights per token and layer stay, the others become 0 (ties as
    ``torch.topk`` breaks them, as PEFT). ``enable_softmax_topk``: a softmax over the weights that are not 0.
    """
    if config.top_k_lora is not None:
        _, top = torch.topk(scalings, k=config.top_k_lora, dim=-1)
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
        scalings = scalings * keep.to(scalings.dtype)
    if config.enable_softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


class Mixture:
    """The weights of one X-LoRA adapter's experts for the forward in progress.

    Attributes:
        config: The adapter's config (``global_scaling_weight`` is read at each call, so PEFT's setters act at once).
        gates: ``(batch, seq, n_layers, n_experts)``: set by each forward (the scaling pass's constant, then the
            classifier's weights) and kept until the next one (checkpointed layers recompute in backward); ``None``
            before the first.
    """

    def __init__(self, config: XLoraConfig) -> None:
        self.config = config
        self.gates: torch.Tensor | None = None


class XLoraGate(LoraVariant):
    """Expert ``expert`` (its index in the adapter's ``adapters``) on LoRA layer ``layer_number`` (its index among
    the layers the adapter's experts adapt, in model order: PEFT's numbering), weighted per token by ``mixture``.

    It is attached to the expert's LoRA adapter when the X-LoRA adapter is built, not asked for by a config flag:
    an expert's file is a plain LoRA adapter. It keeps no tensors (nothing to save), and refuses merging.
    """

    label = "X-LoRA expert"
    merge_refusal = _MERGE_REFUSAL
    weighted_merge_refusal = ("X-LoRA experts are weighted per token by the classifier; combine the experts' own "
                              "LoRA folders instead")
    adalora = False
    lora_bias = False

    def __init__(self, mixture: Mixture, layer_number: int, expert: int) -> None:
        self.mixture = mixture
        self.layer_number = layer_number
        self.expert = expert

    def _gate(self) -> tuple[torch.Tensor | None, float]:
        """``(g[..., l, e, None]: (batch, seq, 1), w)``, or ``(None, 1)`` before any mixture (plain LoRA)."""
        gates = self.mixture.gates
        if gates is None:
            return None, 1.0
        return gates[:, :, self.layer_number, self.expert].unsqueeze(-1), self.mixture.config.global_scaling_weight

    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + w · s · B A dropout(g · x)`` (Linear, ``x: (batch, seq, in)``), or ``result + w · g · ΔW[ids]``
        (Embedding: ``x`` is the looked-up update ``(batch, seq, dim)``)."""
        g, w = self._gate()
        if layer.layer_kind == "embedding":
            delta = x if g is None else x * g * w
            return result + delta.to(result.dtype)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        h = x if g is None else x * g
        return result + (lora_b(lora_a(layer.lora_dropout[name](h))) * layer.scaling[name] * w).to(result.dtype)
