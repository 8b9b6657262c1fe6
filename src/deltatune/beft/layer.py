"""BEFT layers: a learned offset on a frozen layer's output bias (Huang et al., 2025).

For a base layer ``h = W x + b`` (``x: (..., in)``, ``h: (..., out)``) and ``β = beft_bias: (1, out)`` (PEFT's
name and shape)::

    y = h + Σ_active β_a        (β broadcast over every axis but the last)

Merged, ``b' = b + β``: only the bias changes, so the weight is never read or written (over a 4/8-bit base
nothing is requantised). Beyond PEFT, which refuses to merge into a layer without a bias: such a layer is given a
frozen zero bias first, and the last unmerge removes it again (a merged model saved for a config without biases,
e.g. Llama's ``attention_bias=False``, would drop it on reload: keep such adapters unmerged to share them).
Init (PEFT's): ``β = 0``; ``init_weights=False``: ``β ~ N(0, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class BeftLayer(AdapterLayer):
    """BEFT on ``nn.Linear`` (bitsandbytes' 4/8-bit linears included) and ``transformers``' ``Conv1D``.

    Attributes:
        beft_bias: ``adapter -> β: (1, out)``.
    """

    adapter_layer_names = ("beft_bias",)
    # PEFT's BEFT layer is one class, ``Linear``, over any linear base, without a "beft." prefix in its repr
    peft_package = ""
    peft_class_name = "Linear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.beft_bias = nn.ParameterDict()
        self._created_bias = False  # a merge gave the base layer a bias it did not have

    def update_layer(self, adapter_name: str, init_weights: bool = True) -> None:
        """Create ``beft_bias[adapter_name]``: zeros (the identity) or, with ``init_weights=False``, N(0, 1)."""
        shape = (1, self.out_features)
        self.beft_bias[adapter_name] = nn.Parameter(torch.zeros(shape) if init_weights else torch.randn(shape))
        self._clear_row_cache()
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ β`` over the active adapters (summed in their dtype, the result cast back)."""
        result = self.base_layer(x, *args, **kwargs)
        offsets = [self.beft_bias[n].flatten() for n in self.active_adapters if n in self.beft_bias]
        if not offsets:
            return result
        return (result + sum(offsets[1:], offsets[0])).to(result.dtype)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A mixed-adapter batch in one pass: the base runs once on every row, then each row gets its adapter's
        ``β`` (zero for ``"__base__"`` and adapters this layer lacks), gathered as ``(batch, 1, ..., out)``."""
        names = self._row_names(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        held = {n: self.beft_bias[n].flatten() for n in dict.fromkeys(names) if n in self.beft_bias}
        if not held:
            return result
        zero = torch.zeros_like(next(iter(held.values())))
        offsets = torch.stack([held.get(n, zero) for n in names])  # (batch, out)
        offsets = offsets.reshape((offsets.shape[0],) + (1,) * (result.dim() - 2) + (offsets.shape[1],))
        return (result + offsets).to(result.dtype)

    # ---- merging: only the bias changes ------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Zero: the weight does not change (the adapter lives in the bias)."""
        return torch.zeros_like(self.read_base_weight())

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``b + β`` (``β`` alone where the base has no bias): what ``safe_merge`` checks before writing it."""
        beta = self.beft_bias[adapter_name].detach().flatten()
        return beta.clone() if bias is None else bias + beta.to(bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``b ← b + β`` for each adapter (default: the active ones); ``safe_merge`` refuses NaN/Inf first."""
        if safe_merge:
            self.check_merge(adapter_names)
        for name in self.active_adapters if adapter_names is None else adapter_names:
            if name in self.merged_adapters or name not in self.beft_bias:
                continue
            with torch.no_grad():
                self._merge_bias(name, +1)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """``b ← b − β``, last merged first; a bias the merge created is removed with the last one."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._merge_bias(name, -1)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        base = self.get_base_layer()
        beta = self.beft_bias[adapter_name].data.flatten()
        if base.bias is None:
            weight = base.weight
            dtype = weight.dtype if weight.is_floating_point() else beta.dtype  # a 4/8-bit weight is packed
            base.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=weight.device),
                                     requires_grad=False)
            self._created_bias = True
        base.bias.data = base.bias.data + sign * beta.to(base.bias.dtype)
        if sign < 0 and self._created_bias and not self.merged_adapters:
            base.bias = None  # the last unmerge: back to the bias-free layer
            self._created_bias = False


def make_beft_layer(target: nn.Module) -> BeftLayer | None:
    """The BEFT wrapper for ``target``, or ``None`` if BEFT cannot adapt its type."""
    return BeftLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
