"""LoKr layers: a Kronecker product of two small factors (Yeh et al., 2023, "LyCORIS").

For ``W: (out, in)``, split ``out = a·b`` and ``in = c·d`` (:func:`factorization`)::

    ΔW = s · W1 ⊗ W2,    W1: (a, c),  W2: (b, d),  s = alpha / r
    ΔW[i·b + j, k·d + l] = s · W1[i, k] · W2[j, l]

A factor is stored whole, or as a rank-``r`` product when ``r`` is below half its larger side
(``W2 = W2a W2b``; ``W1 = W1a W1b`` only with ``decompose_both``). ``y = W x + b + ΔW x``; merging adds ``ΔW``.

Convolutions (``W: (out, in/groups, *k)``) put the kernel into ``W2``: whole ``W2: (b, d, *k)`` with
``ΔW = s · (W1 ⊗ W2)`` over the channel axes, or ``W2a W2b`` with the kernel flattened into ``W2b``, or with
``use_effective_conv2d`` a core tensor ``W2[j, l, k] = Σ_{p,q} T[p, q, k] W2a[p, j] W2b[q, l]``.

One layout follows PEFT 0.21 rather than the plain formula, so that adapter files give the same outputs in
both libraries: on ``Conv1d`` with a whole 3-D ``W2``, ``torch.kron`` of the 2-D ``W1`` and 3-D ``W2`` treats
``W1`` as ``(1, a, c)``, giving a ``(b, a·d, c·k)`` tensor that is then reshaped to ``(out, in, k)``.
Tensor names are PEFT's (``lokr_w1``, ``lokr_w2_a`` ...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.delta_layer import DeltaWeightLayer, dense_supported_types
from deltatune.errors import ConfigError


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = m · n`` with ``m <= n`` for the Kronecker factors (LyCORIS' rule, as in PEFT).

    With ``factor > 0`` dividing ``dimension`` the split is ``(factor, dimension // factor)`` as given.
    Otherwise divisors ``m`` are tried in increasing order, keeping the last one that does not exceed
    ``factor`` (any, for ``-1``) and stopping once ``m² >= dimension``: for ``-1`` the most square split.
    Examples: ``256 -> (16, 16)``, ``128 -> (8, 16)``, ``127 -> (1, 127)``, ``(128, 4) -> (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if m * m >= dimension or d > limit:
            break
        if dimension % d == 0:
            m = d
    n = dimension // m
    return min(m, n), max(m, n)


class LoKrLayer(DeltaWeightLayer):
    """LoKr on ``nn.Linear``, ``transformers``' ``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d``."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool | str = True,
                     use_effective_conv2d: bool = False, decompose_both: bool = False,
                     decompose_factor: int = -1, rank_dropout_scale: bool = False) -> None:
        """Create adapter ``adapter_name`` and initialise it."""
        if r <= 0:
            raise ConfigError(f"rank must be positive, got r={r}")
        self._set_hyper(adapter_name, r, alpha, rank_dropout, module_dropout, rank_dropout_scale)
        out_dim, in_dim = self.delta_shape[:2]
        kernel = self.kernel_size
        a, b = factorization(out_dim, decompose_factor)
        c, d = factorization(in_dim, decompose_factor)
        param = nn.Parameter
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a[adapter_name] = param(torch.empty(a, r))
            self.lokr_w1_b[adapter_name] = param(torch.empty(r, c))
        else:
            self.lokr_w1[adapter_name] = param(torch.empty(a, c))
        if r >= max(b, d) / 2:
            self.lokr_w2[adapter_name] = param(torch.empty(b, d, *kernel))
        elif use_effective_conv2d and self.is_conv and math.prod(kernel) > 1:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)  # Conv1d: (r, r, k, 1) as PEFT
            self.lokr_t2[adapter_name] = param(torch.empty(core))
            self.lokr_w2_a[adapter_name] = param(torch.empty(r, b))
            self.lokr_w2_b[adapter_name] = param(torch.empty(r, d))
        else:
            self.lokr_w2_a[adapter_name] = param(torch.empty(b, r))
            self.lokr_w2_b[adapter_name] = param(torch.empty(r, d * math.prod(kernel)))
        self._init_weights(adapter_name, init_weights)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _init_weights(self, adapter_name: str, init_weights: bool | str) -> None:
        """He-uniform everywhere, then zero one side so that ``ΔW = 0``: ``W1`` (or ``W1a``) by default,
        ``W2`` (or ``W2b``) for ``"lycoris"``; ``False`` keeps everything random."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                nn.init.kaiming_uniform_(container[adapter_name], a=math.sqrt(5))
        if init_weights == "lycoris":
            nn.init.zeros_((self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b)[adapter_name])
        elif init_weights:
            nn.init.zeros_((self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a)[adapter_name])

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.lokr_w1 or adapter_name in self.lokr_w1_a

    # ---- the update --------------------------------------------------------------------------
    def _w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        a, b = self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name]
        if adapter_name in self.lokr_t2:
            return torch.einsum("pq...,pj,ql->jl...", self.lokr_t2[adapter_name], a, b)
        return a @ b

    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s · W1 ⊗ W2`` (over the channel axes; see the module docstring for the Conv1d layout)."""
        w1, w2 = self._w1(adapter_name), self._w2(adapter_name)
        (a, c), (b, d) = w1.shape, w2.shape[:2]
        if w2.dim() == 2:
            delta = torch.kron(w1, w2)  # (a·b, c·d'), d' = d·Πk when the kernel is flattened into W2b
        elif w2.dim() == 4:
            # Kronecker over the channel axes only, the kernel comes from W2: ΔW[i·b+j, k·d+l, ...]
            delta = torch.einsum("ik,jl...->ijkl...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])
        else:
            # PEFT 0.21's Conv1d layout: torch.kron(W1, W2) with W1 broadcast to (1, a, c), kept for file parity
            delta = torch.einsum("ik,jlm->jilkm", w1, w2).reshape(b, a * d, c * w2.shape[2])
        return delta * self.scaling[adapter_name]


def make_lokr_layer(target: nn.Module) -> LoKrLayer | None:
    """The LoKr wrapper for ``target``, or ``None`` if LoKr cannot adapt its type."""
    return LoKrLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return dense_supported_types(LoKrLayer.conv_types)
