"""BitFit layers: a trainable offset on a frozen layer's bias.

``y = base(x) + Σ_active Δb_a`` with ``Δb: (out,)`` broadcast over the last axis (``x: (..., in) ->
(..., out)``). Merged, ``b' = b + Δb`` (a zero bias is created first when the base layer has none; unmerging
removes it again), so the merged model computes the same function with no extra cost.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def _out_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[-1]
    return layer.weight.shape[1]  # Conv1D stores W as (in, out)


class BitFitLayer(AdapterLayer):
    """BitFit on ``nn.Linear``, ``transformers``' ``Conv1D`` or ``nn.LayerNorm``.

    Attributes:
        bitfit_bias: ``adapter -> Δb: (out,)``.
    """

    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.out_features = _out_features(base_layer)
        self._created_bias = False  # merge added a bias the base layer did not have

    def update_layer(self, adapter_name: str, init_weights: bool = True) -> None:
        """Create ``bitfit_bias[adapter_name]``: zeros (identity) or, with ``init_weights=False``, random."""
        shape = (self.out_features,)
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(shape) if init_weights else torch.randn(shape))
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ Δb`` over the active adapters."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.bitfit_bias:
                result = result + self.bitfit_bias[name].to(result.dtype)
        return result

    # ---- merging: only the bias changes ----------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``b + Δb`` (``Δb`` alone where the base has no bias): what ``safe_merge`` checks before writing it."""
        delta = self.bitfit_bias[adapter_name].detach()
        return delta.clone() if bias is None else bias + delta.to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        base = self.base_layer
        delta = self.bitfit_bias[adapter_name].data
        if base.bias is None:
            weight = base.weight
            base.bias = nn.Parameter(torch.zeros(self.out_features, dtype=weight.dtype, device=weight.device),
                                     requires_grad=False)
            self._created_bias = True
        base.bias.data = base.bias.data + sign * delta.to(base.bias.dtype)
        if sign < 0 and self._created_bias and not self.merged_adapters:
            base.bias = None  # the last unmerge: back to the bias-free layer
            self._created_bias = False


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.LayerNorm) + ((Conv1D,) if Conv1D is not None else ())
