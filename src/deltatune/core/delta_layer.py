"""Layers whose adapter is a dense weight update built from small factors (LoHa, LoKr: the LyCORIS family).

Such an adapter has no cheap factored forward: each step forms ``ΔW`` (shaped like the base weight) and
runs the base layer's operation with it, ``y = base(x) + op(x, ΔW)``, where ``op`` is ``F.linear`` or the
base convolution (same stride, padding, dilation, groups; no bias). Training adds two regularisers:

- rank dropout: each output row of ``ΔW`` is zeroed with probability ``rank_dropout`` (optionally the kept
  rows are rescaled by ``1 / mean(mask)``);
- module dropout: with probability ``module_dropout`` the whole adapter is skipped for a step.

``ΔW`` is built in the layout ``(out, in, *kernel)`` (for ``transformers``' ``Conv1D``, which stores
``W^T``, it is transposed only to merge), so a method supplies one function, :meth:`_delta_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class DeltaWeightLayer(AdapterLayer):
    """Shared part of LoHa/LoKr layers on ``nn.Linear``, ``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d``.

    Attributes:
        r, alpha, scaling: Per adapter; ``scaling = alpha / r``.
        rank_dropout, module_dropout: Per-adapter probabilities (training only).
        rank_dropout_scale: Per adapter: rescale kept rows by ``1 / mean(mask)``.
        delta_shape: ``(out, in, *kernel)``: the layout ``_delta_weight`` returns (``in`` is per group).
    """

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    conv_types: tuple[type, ...] = (nn.Conv1d, nn.Conv2d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self.is_conv = isinstance(base_layer, self.conv_types)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        shape = tuple(dense_weight_shape(base_layer))  # (out, in) for a bitsandbytes layer, not its packed storage
        self.delta_shape = (shape[1], shape[0]) if self.fan_in_fan_out else shape
        self.out_features, self.in_features = self.delta_shape[0], self.delta_shape[1]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """LoHa's and LoKr's updates are additive (``W' = W + ΔW``), so plain LoRA can approximate them (PEFT's)."""
        return True

    def _set_hyper(self, adapter_name: str, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                   rank_dropout_scale: bool) -> None:
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.rank_dropout_scale[adapter_name] = rank_dropout_scale
        self.module_dropout[adapter_name] = module_dropout

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.delta_shape[2:])

    # ---- the update --------------------------------------------------------------------------
    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The scaled ``ΔW`` with ``delta_shape``'s number of elements (reshaped by the caller)."""
        raise NotImplementedError

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.r

    def _training_delta(self, adapter_name: str) -> torch.Tensor:
        """``ΔW: delta_shape``, with rank dropout applied when training."""
        delta = self._delta_weight(adapter_name).reshape(self.delta_shape)
        p = self.rank_dropout[adapter_name]
        if self.training and p > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
            if self.rank_dropout_scale[adapter_name]:
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)  # all dropped stays 0, not NaN
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1)))
        return delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` shaped like ``base_layer.weight`` (transposed for ``Conv1D``), no dropout."""
        delta = self._delta_weight(adapter_name).reshape(self.delta_shape)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return self.base_layer._conv_forward(x, delta, None)  # the base's stride/padding/dilation/groups
        return F.linear(x, delta)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if not self._has(name):
                continue
            if self.training and torch.rand(1).item() < self.module_dropout[name]:
                continue  # module dropout: skip the whole adapter this step
            delta = self._training_delta(name)
            result = result + self._apply_delta(x.to(delta.dtype), delta)
        return result.to(out_dtype)


def dense_supported_types(conv_types: tuple[type, ...]) -> tuple[type, ...]:
    return (nn.Linear, *conv_types) + ((Conv1D,) if Conv1D is not None else ())
