"""Super-Tuning layers: trained scalars added to a sparse support of the frozen weight, chosen by magnitude, with an
optional LoRA on top (PEFT's ``supertuning`` tuner; the paper's "Super" and "Supra").

For ``W: (out, in)`` (``Conv1D`` stores ``Wᵀ``; positions always index the ``(out, in)`` matrix), ``K = int(out · in
· (1 - sparsity))`` flat positions ``supertuning_indices: (K,)`` (int32; the top-``K`` of ``|W|``, or the bottom
``K``), trained ``supertuning_values: (K,)`` and, with ``r`` set, ``A: (r, in)``, ``B: (out, r)``::

    S = zeros(out · in).scatter_add(indices, values).view(out, in)
    y = x (W + Σ S)ᵀ + b + Σ (α / r) B A dropout(x)            x: (..., in)
    ΔW = S + (α / r) B A                                        (merging adds it)

Values and ``B`` start at zero (the identity). PEFT's forward composes ``W + Σ S`` and runs one ``F.linear``; so does
this one (logits agree), except over a quantised base or a base with hooks, where the base runs itself and
``x Sᵀ`` is added. Positions come from the base weight when the adapter is created; ``save_precomputed_indices``
decides whether files carry them (the buffers are then non-persistent and a load recomputes them).

Supported bases: ``nn.Linear`` (PEFT's only one) and transformers' ``Conv1D``.
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


class SupertuningLayer(AdapterLayer):
    """Super-Tuning on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        supertuning_values: ``adapter -> (K,)`` trained values.
        supertuning_indices: ``adapter -> (K,)`` int32 flat positions in ``(out, in)``.
        supertuning_lora_A, supertuning_lora_B: ``adapter -> nn.Linear`` (``A: (r, in)``, ``B: (out, r)``), Supra only.
        supertuning_lora_dropout: ``adapter -> dropout`` of the LoRA input (Supra only).
        supertuning_rank, supertuning_lora_alpha: ``adapter -> r`` (0: no LoRA) and ``α``.
    """

    adapter_layer_names = ("supertuning_values", "supertuning_lora_A", "supertuning_lora_B")
    other_param_names = ("supertuning_indices", "supertuning_rank", "supertuning_lora_alpha",
                         "supertuning_lora_dropout")
    peft_package = ""  # PEFT prints its layer bare: "Linear"

    def __init__(self, base_layer: nn.Module, save_precomputed_indices: bool = True) -> None:
        super().__init__(base_layer)
        self.supertuning_values = nn.ParameterDict()
        # persistence fixed by the first adapter: PEFT refuses adapters that disagree (see create_or_update)
        self.supertuning_indices = BufferDict(persistent=save_precomputed_indices)
        self.supertuning_lora_A = nn.ModuleDict()
        self.supertuning_lora_B = nn.ModuleDict()
        self.supertuning_lora_dropout = nn.ModuleDict()
        self.supertuning_rank: dict[str, int] = {}
        self.supertuning_lora_alpha: dict[str, float] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, sparsity: float = 0.99, select_top: bool = True, r: int | None = None,
                     lora_alpha: float | None = None, lora_dropout: float = 0.0, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name``: the ``K`` positions by magnitude, then (PEFT's draw order, so one seed
        gives both libraries the same tensors) the values, and with ``r`` the LoRA pair.

        Raises:
            ConfigError: ``sparsity`` leaves no entry of this layer to train (PEFT's sentence first).
        """
        weight = self._logical(self.read_base_weight())
        scores = weight.abs().flatten()
        count = int(scores.numel() * (1 - sparsity))
        if count < 1:
            raise ConfigError(
                f"sparsity={sparsity} leaves no trainable entries for a weight with {scores.numel()} elements — no "
                "parameter would be adapted. Lower the sparsity so at least one entry is trainable."
            )
        indices = torch.topk(scores, k=count, largest=select_top).indices
        self.supertuning_indices[adapter_name] = indices.to(torch.int32)
        values = torch.zeros(count) if init_weights else torch.randn(count)
        self.supertuning_values[adapter_name] = nn.Parameter(values)
        if r is None:
            self.supertuning_rank[adapter_name] = 0
            self.supertuning_lora_alpha[adapter_name] = 0.0
        else:
            self.supertuning_rank[adapter_name] = r
            self.supertuning_lora_alpha[adapter_name] = float(lora_alpha)
            A = nn.Linear(self.in_features, r, bias=False)  # nn.Linear's own init draws too, as in PEFT
            B = nn.Linear(r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(B.weight)
            else:
                nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
            self.supertuning_lora_A[adapter_name] = A
            self.supertuning_lora_B[adapter_name] = B
            dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.supertuning_lora_dropout[adapter_name] = dropout
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _logical(self, weight: torch.Tensor) -> torch.Tensor:
        """``W: (out, in)`` from the weight in storage layout."""
        return weight.T if self.fan_in_fan_out else weight

    def _scatter(self, flat: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``flat + S`` for ``flat: (out · in,)`` (differentiable in the values)."""
        indices = self.supertuning_indices[adapter_name].to(flat.device, torch.int64)
        return flat.scatter_add(0, indices, self.supertuning_values[adapter_name].to(flat.dtype))

    def _lora_delta(self, adapter_name: str) -> torch.Tensor:
        """``(α / r) B A: (out, in)``."""
        r = self.supertuning_rank[adapter_name]
        A, B = self.supertuning_lora_A[adapter_name].weight, self.supertuning_lora_B[adapter_name].weight
        return (self.supertuning_lora_alpha[adapter_name] / r) * (B @ A)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = S + (α / r) B A``, shaped and typed like ``base_layer.weight``."""
        weight = self.read_base_weight()
        zeros = torch.zeros(self.out_features * self.in_features, device=weight.device, dtype=weight.dtype)
        delta = self._scatter(zeros, adapter_name).view(self.out_features, self.in_features)
        if self.supertuning_rank[adapter_name] > 0:
            delta = delta + self._lora_delta(adapter_name).to(weight.device, weight.dtype)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x (W + Σ S)ᵀ + b + Σ (α / r) B A dropout(x)``; ``x: (..., in)``."""
        names = [n for n in self.active_adapters if n in self.supertuning_values]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if self.quantized or isinstance(base, AdapterLayer) or base._forward_hooks or base._forward_pre_hooks:
            # the base runs itself (its hooks, its quantised kernel, a stacked method's update): y = base(x) + x Sᵀ
            result = base(x, *args, **kwargs)
            zeros = torch.zeros(self.out_features * self.in_features, device=x.device)
            for name in names:
                sparse = self._scatter(zeros, name).view(self.out_features, self.in_features)
                result = result + F.linear(x.to(sparse.dtype), sparse).to(result.dtype)
        else:
            weight = self._logical(base.weight)
            flat = weight.reshape(-1)
            for name in names:
                flat = self._scatter(flat, name)
            result = F.linear(x, flat.view_as(weight), base.bias)
        for name in names:
            if self.supertuning_rank[name] > 0:
                A, B = self.supertuning_lora_A[name], self.supertuning_lora_B[name]
                h = self.supertuning_lora_dropout[name](x).to(A.weight.dtype)
                scale = self.supertuning_lora_alpha[name] / self.supertuning_rank[name]
                result = result + (scale * B(A(h))).to(result.dtype)
        return result


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_supertuning_layer(target: nn.Module, save_precomputed_indices: bool = True) -> SupertuningLayer | None:
    """The Super-Tuning wrapper for ``target``, or ``None`` if Super-Tuning cannot adapt its type."""
    if not isinstance(target, supported_types()):
        return None
    return SupertuningLayer(target, save_precomputed_indices=save_precomputed_indices)
