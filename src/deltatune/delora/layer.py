"""DeLoRA layers: a low-rank update whose direction and strength are decoupled (Bini et al., ICLR 2025, "Decoupling
Angles and Strength in Low-rank Adaptation", https://huggingface.co/papers/2503.18225).

For ``W: (out, in)`` (GPT-2's ``Conv1D`` stores ``Wᵀ``; everything here is in the ``(out, in)`` layout)::

    ΔW = (λ / r) · B diag(1 / (‖a_i‖ ‖b_i‖)) A · diag(w),    A: (r, in) rows a_i,  B: (out, r) columns b_i
    y  = W x + b + B (s ⊙ (A (w ⊙ dropout(x)))),   s_i = (λ / r) / (‖a_i‖ ‖b_i‖)

``w: (in,)`` (``delora_w_norm``) are the column norms ``‖W[:, j]‖`` of the weight when the adapter was created, kept
(and saved) so the update does not move with later merges. Each ``b_i a_iᵀ / (‖a_i‖ ‖b_i‖)`` has unit Frobenius
norm, so ``‖ΔW‖_F <= λ · max_j w_j``: ``λ`` (``delora_lambda``, one trained scalar) bounds how far the layer can
move, whatever the direction ``B A`` learns. The norms are clamped at ``1e-4`` (PEFT's), so ``B = 0`` at init is
the identity. Merging adds ``ΔW`` (transposed for ``Conv1D``); unmerging subtracts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.buffers import BufferDict
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None

NORM_FLOOR = 1e-4  # PEFT's clamp of ‖a_i‖ and ‖b_i‖


class DeloraLayer(AdapterLayer):
    """DeLoRA on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        delora_A: ``adapter -> A: (r, in)``; delora_B: ``adapter -> B: (out, r)``; delora_lambda: ``adapter -> λ:
            (1,)`` (all trained).
        delora_w_norm: ``adapter -> w: (in,)``, the weight's column norms at creation (frozen, saved).
        r: Per adapter, the rank.
        delora_dropout: Per adapter, dropout on the adapter's input (``nn.Identity`` at 0).
    """

    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda")
    other_param_names = ("r", "delora_dropout", "delora_w_norm")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = BufferDict()
        self.delora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        rows, cols = base_layer.weight.shape
        self.out_features, self.in_features = (cols, rows) if self.fan_in_fan_out else (rows, cols)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """DeLoRA's update is an additive rank-``r`` ``ΔW``, so plain LoRA holds it (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, delora_lambda: float, module_dropout: float = 0.0,
                     init_weights: bool = True) -> None:
        """Create ``A, B, λ`` for ``adapter_name`` and keep the weight's column norms ``w``.

        ``A`` is He-uniform; ``B = 0`` (``init_weights=False``: He-uniform too); ``λ = delora_lambda``."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.delora_dropout[adapter_name] = nn.Dropout(p=module_dropout) if module_dropout > 0 else nn.Identity()
        self.delora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.delora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.delora_lambda[adapter_name] = nn.Parameter(torch.full((1,), float(delora_lambda)))
        nn.init.kaiming_uniform_(self.delora_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.delora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.delora_B[adapter_name], a=math.sqrt(5))
        weight = self.base_layer.weight
        if weight.is_meta:  # no values to measure (PEFT's fallback); a load overwrites it
            norms = torch.ones(self.in_features, device=weight.device)
        else:
            norms = torch.linalg.vector_norm(self.read_base_weight().detach(), dim=1 if self.fan_in_fan_out else 0)
        self.delora_w_norm[adapter_name] = norms
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _scales(self, adapter_name: str) -> torch.Tensor:
        """``s: (r,)``, ``s_i = (λ / r) / (‖a_i‖ ‖b_i‖)`` with both norms clamped at :data:`NORM_FLOOR`."""
        a, b = self.delora_A[adapter_name], self.delora_B[adapter_name]
        a_norm = a.norm(dim=1).clamp(min=NORM_FLOOR)
        b_norm = b.norm(dim=0).clamp(min=NORM_FLOOR)
        return self.delora_lambda[adapter_name] / self.r[adapter_name] / (a_norm * b_norm)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B diag(s) A diag(w)``, shaped like ``base_layer.weight`` (transposed for ``Conv1D``)."""
        a, b = self.delora_A[adapter_name], self.delora_B[adapter_name]
        delta = (b * self._scales(adapter_name)) @ a * self.delora_w_norm[adapter_name].to(a.dtype)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active B (s ⊙ (A (w ⊙ dropout(x))))``; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.delora_A:
                continue
            a, b = self.delora_A[name], self.delora_B[name]
            h = self.delora_dropout[name](x.to(a.dtype)) * self.delora_w_norm[name].to(a.dtype)
            result = result + F.linear(F.linear(h, a) * self._scales(name), b)
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
