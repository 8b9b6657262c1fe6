"""HiRA layers: a Hadamard product of the frozen weight with a low-rank product (Huang et al., ICLR 2025, "HiRA:
Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models").

For ``W0: (out, in)`` and rank ``r``::

    ΔW = W0 ⊙ (B A),    A: (r, in),  B: (out, r)
    y  = W0 x + b + ΔW · dropout(x) = base(x) + (W0 ⊙ B A) · dropout(x)

``rank(ΔW)`` is not bounded by ``r`` (``W0`` is full-rank), yet only ``r (out + in)`` values train. There is no
scaling (PEFT's HiRA has no ``alpha``). ``B = 0`` at init makes the adapter the identity.

Layouts (tensor names are PEFT's, so files cross):

- ``nn.Linear``: ``hira_A: (r, in)``, ``hira_B: (out, r)``; transformers' ``Conv1D`` (``W0`` stored ``(in, out)``)
  keeps the same factors and transposes ``B A`` to merge.
- ``nn.Conv1d/2d/3d``: ``hira_A: (r, in/groups, *k)``, ``hira_B: (out, r, 1, ...)``, ``(B A)[o, c, k] = Σ_p B[o, p]
  A[p, c, k]``; the adapter runs the base convolution (stride, padding, dilation, groups) with ``W0 ⊙ B A``.
  PEFT refuses ``groups > 1``; the math holds per group, so deltatune adapts grouped convolutions too (such a
  file does not load in PEFT).
- ``nn.Embedding`` (``W0: (num, dim)``): ``hira_embedding_A: (r, num)``, ``hira_embedding_B: (dim, r)``,
  ``ΔW = W0 ⊙ (B A)ᵀ``, looked up with the ids.

Merging is multiplicative in ``W0``: ``W' = W0 + Σ_i W0 ⊙ (B_i A_i)``, every term against the weight *before* the
first merge, which the layer keeps (on the CPU, as PEFT) until the last unmerge restores it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.delta_layer import DeltaWeightLayer, dense_supported_types
from deltatune.errors import ConfigError


class HiraLayer(DeltaWeightLayer):
    """HiRA on ``nn.Linear``, ``transformers``' ``Conv1D``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``.

    Attributes:
        r: Per adapter, the rank of ``B A``.
        hira_dropout: Per adapter, dropout on the adapter's input (``nn.Identity`` at 0).
        delta_shape: ``(out, in, *kernel)`` (``(num, dim)`` for an embedding): the layout of ``B A`` here.
    """

    adapter_layer_names = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
    other_param_names = ("r", "hira_dropout")
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hira_dropout = nn.ModuleDict()
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        if self.is_embedding:  # PEFT's features of an embedding: rows in, width out
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        # W0 before the first merge (CPU), for the later merges and the exact restore on the last unmerge
        self._weight_before_merge: torch.Tensor | None = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``False``, as PEFT: the additive residual ``W0 ⊙ B A`` depends on the base weight, so the update is
        not a LoRA of its own (``export_to_lora`` still writes the residual against the current base)."""
        return False

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, hira_dropout: float = 0.0,
                     init_weights: bool | str = True) -> None:
        """Create adapter ``adapter_name`` (rank ``r``) and initialise it (see :meth:`_init_weights`)."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.hira_dropout[adapter_name] = nn.Dropout(p=hira_dropout) if hira_dropout > 0 else nn.Identity()
        if self.is_embedding:
            num, dim = self.delta_shape
            self.hira_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
            self.hira_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))
        else:
            out_dim, in_dim, kernel = self.delta_shape[0], self.delta_shape[1], self.kernel_size
            self.hira_A[adapter_name] = nn.Parameter(torch.randn(r, in_dim, *kernel))
            self.hira_B[adapter_name] = nn.Parameter(torch.randn(out_dim, r, *([1] * len(kernel))))
        self._init_weights(adapter_name, init_weights)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _init_weights(self, adapter_name: str, init_weights: bool | str) -> None:
        """PEFT's: ``False`` keeps ``A, B ~ N(0, 1)``. Otherwise ``B = 0`` and ``A`` He-uniform (``True``, and
        convolutions always) or ``N(0, 1/r²)`` (``"gaussian"``); an embedding takes ``A = 0``, ``B ~ N(0, 1)``."""
        if init_weights is False:
            return
        if self.is_embedding:
            nn.init.zeros_(self.hira_embedding_A[adapter_name])
            nn.init.normal_(self.hira_embedding_B[adapter_name])
            return
        if init_weights is True or self.is_conv:
            nn.init.kaiming_uniform_(self.hira_A[adapter_name], a=math.sqrt(5))
        elif str(init_weights).lower() == "gaussian":
            nn.init.normal_(self.hira_A[adapter_name], std=1 / self.r[adapter_name])
        else:
            raise ConfigError(f"Unknown initialization init_weights={init_weights!r}")
        nn.init.zeros_(self.hira_B[adapter_name])

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.hira_A or adapter_name in self.hira_embedding_A

    # ---- the update --------------------------------------------------------------------------
    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B A`` in ``delta_shape``'s layout (``(B A)ᵀ: (num, dim)`` for an embedding); PEFT's
        ``get_delta_weight`` (which :meth:`get_delta_weight` returns in the base weight's layout)."""
        if self.is_embedding:
            return (self.hira_embedding_B[adapter_name] @ self.hira_embedding_A[adapter_name]).T
        a, b = self.hira_A[adapter_name], self.hira_B[adapter_name]
        return (b.flatten(1) @ a.flatten(1)).reshape(self.delta_shape)  # Σ_p B[o, p] A[p, c, k]

    def _base_weight(self) -> torch.Tensor:
        """``W0`` in ``delta_shape``'s layout (``Conv1D``'s ``(in, out)`` transposed), without gradient."""
        weight = self.read_base_weight()
        return weight.T if self.fan_in_fan_out else weight

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active op(dropout(x), W0 ⊙ B A)``: ``op`` is ``F.linear``, the base convolution, or the
        embedding lookup. ``x: (..., in)`` (ids ``(...)`` for an embedding, ``(batch, in, *spatial)`` for a conv)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if not self._has(name):
                continue
            modulation = self._delta_weight(name)
            delta = self._base_weight().to(modulation.dtype) * modulation  # W0 ⊙ B A
            if self.is_embedding:
                result = result + F.embedding(x, delta)  # PEFT's lookup (no padding_idx / max_norm)
                continue
            h = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
            result = result + self._apply_delta(self.hira_dropout[name](h), delta)
        return result.to(out_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + W0 ⊙ get_delta_weight``, ``W0`` the weight before the first merge (cached here)."""
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().to("cpu", copy=True)
        w0 = self._weight_before_merge.to(weight.device, weight.dtype)
        return weight + w0 * self.get_delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight - W0 ⊙ get_delta_weight``; the last unmerge gives ``W0`` back exactly."""
        w0 = self._weight_before_merge
        if w0 is None:  # no W0 kept (one adapter merged without merge()): W' = W0 ⊙ (1 + Δ)
            return weight / (1 + self.get_delta_weight(adapter_name).to(weight.dtype))
        if not self.merged_adapters:  # unmerge() popped it first: it was the last merged adapter
            self._weight_before_merge = None
            return w0.to(weight.device, weight.dtype)
        return weight - w0.to(weight.device, weight.dtype) * self.get_delta_weight(adapter_name).to(weight.dtype)

    def _forget_merge_state(self, adapter_name: str) -> None:
        if not self.merged_adapters:  # a check or an export computed a merge that did not happen
            self._weight_before_merge = None


def make_hira_layer(target: nn.Module) -> HiraLayer | None:
    """The HiRA wrapper for ``target``, or ``None`` if HiRA cannot adapt its type."""
    return HiraLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (*dense_supported_types(HiraLayer.conv_types), nn.Embedding)
