"""(IA)³ layers: a learned vector ``l`` that rescales a frozen layer's output or input.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning".
For a layer ``y = W x + b`` with ``W: (out, in)``:

- attention keys/values (and any other non-feedforward target): ``y = l ⊙ (W x + b)`` with ``l: (out,)``,
  stored as ``ia3_l: (out, 1)``; merged, ``W' = diag(l) W`` and ``b' = l ⊙ b``;
- feedforward targets: ``y = W (l ⊙ x) + b`` with ``l: (in,)``, stored as ``ia3_l: (1, in)``; merged,
  ``W' = W diag(l)`` and the bias is untouched.

Convolutions use ``ia3_l: (1, channels, 1, ...)`` over output (or, feedforward, input) channels. Several
active adapters multiply. The update is multiplicative, so merging scales the weight and unmerging divides
by ``l`` (exact restore from a saved copy where ``l`` has zeros, which division cannot undo).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class IA3Layer(AdapterLayer):
    """(IA)³ on ``nn.Linear``, ``transformers``' ``Conv1D`` (``W: (in, out)``) or ``nn.Conv1d/2d/3d``.

    Attributes:
        ia3_l: ``adapter -> l``; ``(out, 1)`` / ``(1, in)`` for linear layers, ``(1, C, 1, ...)`` for convs.
        is_feedforward: ``adapter -> bool``: whether ``l`` scales the input (``True``) or the output.
    """

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)
    peft_package = ""  # PEFT's IA3 layers print bare ("Linear", "Conv2d")
    nan_bias_noun = "bias"  # PEFT's IA3 says "NaNs detected in the merged bias"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.is_conv = isinstance(base_layer, _CONV_TYPES)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # also bitsandbytes Linear4bit/Linear8bitLt, whose stored weight is packed
            self.out_features, self.in_features = dense_weight_shape(base_layer)
        # Pre-merge (weight, bias) of adapters whose l has zeros: W ⊙ 0 cannot be divided back.
        self._merge_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        """Create ``ia3_l[adapter_name]``: ones (identity) or, with ``init_ia3_weights=False``, random."""
        if self.is_conv:
            n = self.in_features if is_feedforward else self.out_features
            shape = (1, n) + (1,) * (self.base_layer.weight.dim() - 2)
        else:
            shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l[adapter_name] = nn.Parameter(torch.ones(shape) if init_ia3_weights else torch.randn(shape))
        self.is_feedforward[adapter_name] = is_feedforward
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- l as a factor of the weight, the bias and the activations ---------------------------
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``l`` shaped to multiply ``base_layer.weight`` in its storage layout."""
        l_vec = self.ia3_l[adapter_name]
        if not self.is_conv:
            return l_vec.T if self.fan_in_fan_out else l_vec  # Conv1D stores W^T
        base = self.base_layer
        if not self.is_feedforward[adapter_name]:
            return l_vec.transpose(0, 1)  # (out, 1, 1, ...): one factor per output channel
        if base.groups == 1:
            return l_vec  # (1, in, 1, ...): one factor per input channel
        # Grouped conv: W is (out, in/groups, k...); output channel o reads the input channels of its group.
        g, per_in, per_out = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        kernel = (1,) * (l_vec.dim() - 2)
        return l_vec.reshape(g, 1, per_in, *kernel).expand(g, per_out, per_in, *kernel).reshape(
            base.out_channels, per_in, *kernel)

    def _activation_scale(self, l_vec: torch.Tensor) -> torch.Tensor:
        """``l`` shaped to broadcast over activations: ``(features,)`` for linear, ``(1, C, 1, ...)`` for conv."""
        return l_vec if self.is_conv else l_vec.flatten()

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = W ⊙ (l - 1)`` (the additive view of the rescaling), shaped like ``base_layer.weight``
        (dense ``(out, in)`` over a quantised base)."""
        weight = self.read_base_weight()
        return weight * (self._weight_scale(adapter_name).to(weight.dtype) - 1)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        scale = self._weight_scale(adapter_name).to(weight.dtype)
        if (scale == 0).any():
            bias = self.bias if not self.is_feedforward[adapter_name] else None
            self._merge_cache[adapter_name] = (weight.clone(), None if bias is None else bias.data.clone())
        return weight * scale

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name in self._merge_cache:
            return self._merge_cache[adapter_name][0]
        return weight / self._weight_scale(adapter_name).to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``b ⊙ l`` where the output is rescaled (``safe_merge`` checks it before it is written), else ``None``."""
        if self.is_feedforward[adapter_name] or bias is None:
            return None
        return bias * self.ia3_l[adapter_name].detach().flatten().to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = self.bias
        if self.is_feedforward[adapter_name] or bias is None:
            return  # scaling the input leaves the bias alone
        if sign < 0 and adapter_name in self._merge_cache:
            bias.data = self._merge_cache.pop(adapter_name)[1]
            return
        l_vec = self.ia3_l[adapter_name].data.flatten().to(bias.dtype)
        bias.data = bias.data * l_vec if sign > 0 else bias.data / l_vec

    def _forget_merge_state(self, adapter_name: str) -> None:
        self._merge_cache.pop(adapter_name, None)

    def unmerge(self) -> None:
        super().unmerge()
        self._merge_cache.clear()  # feedforward entries (no bias to restore) are done with too

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x ⊙ Π l_ff) ⊙ Π l_out`` over the active adapters (``x: (..., in)`` or ``(B, C, ...)``)."""
        in_scale = out_scale = None
        for name in self.active_adapters:
            if name not in self.ia3_l:
                continue
            l_vec = self.ia3_l[name]
            if self.is_feedforward[name]:
                in_scale = l_vec if in_scale is None else in_scale * l_vec
            else:
                out_scale = l_vec if out_scale is None else out_scale * l_vec
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * self._activation_scale(in_scale)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * self._activation_scale(out_scale)).to(result.dtype)
        return result


def make_ia3_layer(target: nn.Module) -> IA3Layer | None:
    """The (IA)³ wrapper for ``target``, or ``None`` if (IA)³ cannot adapt its type."""
    if isinstance(target, (nn.Linear, *_CONV_TYPES)) or (Conv1D is not None and isinstance(target, Conv1D)):
        return IA3Layer(target)
    return None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, *_CONV_TYPES) + ((Conv1D,) if Conv1D is not None else ())

