"""Bottleneck adapter layers: a small non-linear MLP on a sub-layer's output.

Sequential: ``y = h + s · W_up f(W_down h + b_down) + s · b_up`` with ``h = base(x)``; parallel: the adapter
reads ``x`` instead of ``h``. ``x: (..., d_in)``, ``h: (..., d_out)``, ``W_down: (m, d)``, ``W_up: (d_out, m)``.
The base may be a linear layer or a whole block (Llama's ``mlp``) whose forward maps one tensor to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def _features(layer: nn.Module, hidden_size: int | None) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer, or the model's hidden size for a block."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(layer, "nf"):  # transformers Conv1D
        return weight.shape[0], weight.shape[1]
    if hidden_size is None:
        raise ConfigError(f"cannot tell the width of {type(layer).__name__}; target linear layers or use a model "
                          "whose config has hidden_size")
    return hidden_size, hidden_size


class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters around ``base_layer``.

    Attributes:
        bottleneck_down: ``adapter -> Linear(d_in or d_out, m)``.
        bottleneck_up: ``adapter -> Linear(m, d_out)``.
        parallel, scaling, non_linearity: per adapter.
    """

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("parallel", "scaling", "non_linearity")

    def __init__(self, base_layer: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__(base_layer)
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.in_features, self.out_features = _features(base_layer, hidden_size)

    @property
    def weight(self) -> torch.Tensor:
        return next(self.base_layer.parameters())

    def update_layer(self, adapter_name: str, reduction_factor: int, non_linearity: str, parallel: bool,
                     scaling: float, init_weights: bool = True) -> None:
        """Create the adapter: ``W_down`` Kaiming-uniform (nn.Linear's init), ``W_up = 0`` (identity)."""
        width = max(1, self.out_features // reduction_factor)
        d_in = self.in_features if parallel else self.out_features
        down, up = nn.Linear(d_in, width), nn.Linear(width, self.out_features)
        if init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.parallel[adapter_name] = parallel
        self.scaling[adapter_name] = scaling
        self.non_linearity[adapter_name] = non_linearity
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _place_adapter(self, adapter_name: str) -> None:
        weight = self.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            getattr(self, attr)[adapter_name].to(weight.device, dtype)

    def adapter(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """``s · W_up f(W_down z)`` for adapter ``name``: ``(..., d) -> (..., d_out)``."""
        down = self.bottleneck_down[name]
        z = z.to(down.weight.dtype)
        return self.scaling[name] * self.bottleneck_up[name](_ACTIVATIONS[self.non_linearity[name]](down(z)))

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs):
        """Sequential ``h + A(h)`` or parallel ``h + A(x)`` per active adapter (a tuple output adapts its
        first element). Never merged (:meth:`merge` refuses), so ``forward``'s merged path never runs."""
        out = self.base_layer(x, *args, **kwargs)
        h, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        y = h
        for name in self.active_adapters:
            if name in self.bottleneck_down:
                y = y + self.adapter(name, x if self.parallel[name] else h).to(h.dtype)
        return (y, *rest) if rest is not None else y

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MergeError("bottleneck adapters cannot be merged: s·W_up f(W_down h) is non-linear in the "
                         "activations; keep the adapter unmerged or unload() it")

    def check_merge(self, adapter_names: list[str] | None = None, where: str = "") -> None:
        self.merge()
