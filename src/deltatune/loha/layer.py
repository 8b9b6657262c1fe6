"""LoHa layers: a Hadamard product of two low-rank updates (Hyeon-Woo et al., 2022, "FedPara").

For ``W: (out, in)`` and rank ``r``::

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),    W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r

``rank(ΔW) <= r²`` while storing ``4 r (out + in)`` values. ``y = W x + b + ΔW x``; merging adds ``ΔW``.

Convolutions (``W: (out, in/groups, *k)``) flatten the kernel into the input side,
``W1b: (r, in/groups · Πk)``, unless ``use_effective_conv2d`` factors it with a core tensor per product
(FedPara's Proposition 3)::

    ΔW_i[o, c, k] = Σ_{p,q} T_i[p, q, k] · Wia[p, o] · Wib[q, c],   T_i: (r, r, *k),  Wia: (r, out),  Wib: (r, in)
    ΔW = s · ΔW_1 ⊙ ΔW_2

(``Conv1d`` stores ``T_i`` as ``(r, r, k, 1)``, as PEFT does.) Tensor names are PEFT's (``hada_w1_a`` ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.delta_layer import DeltaWeightLayer, dense_supported_types
from deltatune.errors import ConfigError


class HadamardDelta(torch.autograd.Function):
    """``ΔW = s · (W1a W1b) ⊙ (W2a W2b)`` that keeps only the four thin factors for backward.

    Plain autograd would hold both ``(out, in)`` products from forward to backward (two extra weight-sized
    tensors per layer); here backward recomputes them::

        G = s · dL/dΔW,   T1 = G ⊙ (W2a W2b):  dW1a = T1 W1bᵀ,  dW1b = W1aᵀ T1
                          T2 = G ⊙ (W1a W1b):  dW2a = T2 W2bᵀ,  dW2b = W2aᵀ T2
    """

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        # In the factors' dtype also under autocast (the layer's F.linear casts ΔW as autocast says); backward
        # then sees one dtype.
        with torch.autocast(w1a.device.type, enabled=False):
            return (w1a @ w1b).mul_(w2a @ w2b).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g = grad.to(w1a.dtype) * ctx.scale
        d1a = d1b = d2a = d2b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            t = g * (w2a @ w2b)
            d1a = t @ w1b.T if ctx.needs_input_grad[0] else None
            d1b = w1a.T @ t if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            t = g.mul_(w1a @ w1b)  # g is not needed any more
            d2a = t @ w2b.T if ctx.needs_input_grad[2] else None
            d2b = w2a.T @ t if ctx.needs_input_grad[3] else None
        return d1a, d1b, d2a, d2b, None


class LoHaLayer(DeltaWeightLayer):
    """LoHa on ``nn.Linear``, ``transformers``' ``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d``."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool = True,
                     use_effective_conv2d: bool = False) -> None:
        """Create adapter ``adapter_name`` (rank ``r``) and initialise it."""
        if r <= 0:
            raise ConfigError(f"rank must be positive, got r={r}")
        self._set_hyper(adapter_name, r, alpha, rank_dropout, module_dropout, rank_dropout_scale=True)
        out_dim, in_dim = self.delta_shape[:2]
        kernel = self.kernel_size
        if use_effective_conv2d and self.is_conv and math.prod(kernel) > 1:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter_name] = nn.Parameter(torch.empty(core))
                getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(r, out_dim))
                getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, in_dim))
        else:
            flat_in = in_dim * math.prod(kernel)
            for i in ("1", "2"):
                getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(out_dim, r))
                getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, flat_in))
        self._init_weights(adapter_name, init_weights)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _init_weights(self, adapter_name: str, init_weights: bool) -> None:
        """He-uniform everywhere (FedPara); with ``init_weights`` ``W2b = 0`` makes ``ΔW = 0`` at the start."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                nn.init.kaiming_uniform_(container[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.hada_w1_a

    # ---- the update --------------------------------------------------------------------------
    def _factor(self, adapter_name: str, i: str) -> torch.Tensor:
        """One low-rank factor: ``Wia Wib: (out, in · Πk)``, or the core form ``(out, in, *k)``."""
        a, b = getattr(self, f"hada_w{i}_a")[adapter_name], getattr(self, f"hada_w{i}_b")[adapter_name]
        cores = getattr(self, f"hada_t{i}")
        if adapter_name not in cores:
            return a @ b
        return torch.einsum("pq...,po,qc->oc...", cores[adapter_name], a, b)

    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · (W1a W1b) ⊙ (W2a W2b)``."""
        if adapter_name not in self.hada_t1:  # the flat form: recomputed in backward (HadamardDelta)
            return HadamardDelta.apply(self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name],
                                       self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name],
                                       self.scaling[adapter_name])
        return self._factor(adapter_name, "1") * self._factor(adapter_name, "2") * self.scaling[adapter_name]


def make_loha_layer(target: nn.Module) -> LoHaLayer | None:
    """The LoHa wrapper for ``target``, or ``None`` if LoHa cannot adapt its type."""
    return LoHaLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return dense_supported_types(LoHaLayer.conv_types)
