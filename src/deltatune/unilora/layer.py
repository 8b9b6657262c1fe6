"""Uni-LoRA layers: LoRA factors whose every entry is a scaled entry of one trained vector shared by the model.

"Uni-LoRA: One Vector Is All You Need" (arXiv:2506.00799), as PEFT 0.21.2 computes it. For ``W: (out, in)``
(GPT-2's ``Conv1D`` stores ``Wᵀ``) and one adapter with ``θ: (d,)`` (``d = theta_d_length``, the only trained
tensor, shared by every adapted layer)::

    A = θ[I_A] ⊙ S_A: (r, in)       B = θ[I_B] ⊙ S_B: (out, r)       I_A, I_B: fixed indices into θ
    S[j] = 1 / √c(I[j])             c(k): how many entries of all the adapter's factors use θ_k
    ΔW = B A,   y = W x + b + B (A dropout(x))        x: (..., in), y: (..., out)

The indices come from one balanced, shuffled assignment over the concatenated factors of every target (each ``θ_k``
used ``⌊D/d⌋`` or ``⌈D/d⌉`` times, ``D = Σ r (in + out)``; numpy's generator seeded with ``proj_seed``, PEFT's
:func:`generate_index`), laid out target by target in model order, ``A`` then ``B``. ``θ`` starts uniform and
non-zero, so a fresh adapter is not the identity (as PEFT's); merging adds ``ΔW``.

Tensors and names are PEFT's, so files cross: ``θ`` is the model's, ``base_model.unilora_theta_d.<adapter>``
(filed as ``base_model.unilora_theta_d``), seen by each layer through a :class:`SharedParameterView`, which registers
nothing; the indices and scales are the layer's buffers ``unilora_indices_A/B`` and ``unilora_scales_A/B``, in
files only with ``save_indices`` (else regenerated from the seed when loading).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict
from deltatune.core.shared import SharedParameterView

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def generate_index(count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` indices into ``θ: (length,)``, each value used ``⌊count/length⌋`` or ``⌈count/length⌉`` times, in
    a seeded shuffled order: PEFT's ``UniLoraModel.generate_index`` (numpy's ``default_rng(seed)``: the same seed
    gives the same assignment)."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def inverse_sqrt_counts(indices: torch.Tensor, length: int) -> torch.Tensor:
    """``(length,)``: ``1 / √c(k)`` for each ``θ_k`` used ``c(k) > 0`` times in ``indices``, else 0."""
    counts = torch.bincount(indices, minlength=length)
    out = torch.zeros(length, dtype=torch.float32)
    used = counts > 0
    out[used] = counts[used].float().rsqrt()
    return out


class UniLoraLayer(AdapterLayer):
    """Uni-LoRA on ``nn.Linear`` or ``transformers``' ``Conv1D``.

    Attributes:
        unilora_theta_d: ``adapter -> θ: (theta_d_length,)``, the model's (a view).
        unilora_indices_A, unilora_indices_B: ``adapter -> I_A: (r, in)``, ``I_B: (out, r)`` (int64 buffers).
        unilora_scales_A, unilora_scales_B: ``adapter -> S_A: (r, in)``, ``S_B: (out, r)`` (buffers).
        r: ``adapter -> r``.
    """

    adapter_layer_names = ("unilora_theta_d",)
    other_param_names = ("r", "unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B",
                         "unilora_dropout")

    def __init__(self, base_layer: nn.Module, thetas: nn.ParameterDict) -> None:
        super().__init__(base_layer)
        self.unilora_theta_d = SharedParameterView(thetas)
        self.unilora_indices_A = ProjectionDict()
        self.unilora_indices_B = ProjectionDict()
        self.unilora_scales_A = ProjectionDict()
        self.unilora_scales_B = ProjectionDict()
        self.unilora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``ΔW = B A`` is a rank-``r`` LoRA update (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, indices_A: torch.Tensor, indices_B: torch.Tensor,
                     scale_of: torch.Tensor, unilora_dropout: float = 0.0, save_indices: bool = False) -> None:
        """Create ``adapter_name`` here from its indices ``I_A: (r, in)``, ``I_B: (out, r)`` and the adapter's
        ``1/√count`` table ``scale_of: (theta_d_length,)``; its ``θ`` must already be in the model's container.

        The scales are rounded to the base weight's dtype (PEFT stores them so) and kept in float32 over a
        half-precision base (its adapter-dtype autocast does the same)."""
        self.unilora_theta_d.bind(adapter_name)
        self.r[adapter_name] = r
        weight = self.base_layer.weight
        keep = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for name, idx in (("A", indices_A), ("B", indices_B)):
            idx = idx.to(weight.device)
            getattr(self, f"unilora_indices_{name}").add(adapter_name, idx, persistent=save_indices)
            scales = scale_of.to(weight.device)[idx].to(weight.dtype).to(keep)
            getattr(self, f"unilora_scales_{name}").add(adapter_name, scales, persistent=save_indices)
        self.unilora_dropout[adapter_name] = nn.Dropout(unilora_dropout) if unilora_dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = θ[I_A] ⊙ S_A: (r, in)`` and ``B = θ[I_B] ⊙ S_B: (out, r)``, in ``θ``'s dtype (at least that of
        the scales)."""
        theta = self.unilora_theta_d[adapter_name]
        a = theta[self.unilora_indices_A[adapter_name]] * self.unilora_scales_A[adapter_name]
        b = theta[self.unilora_indices_B[adapter_name]] * self.unilora_scales_B[adapter_name]
        return a, b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = B A: (out, in)`` (float32 math over half-precision tensors), transposed for ``Conv1D``."""
        a, b = self.factors(adapter_name)
        dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        delta = b.to(dtype) @ a.to(dtype)
        return delta.T if self.fan_in_fan_out else delta

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active B (A dropout(x))``; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        for name in self.active_adapters:
            if name not in self.unilora_indices_A:
                continue
            a, b = self.factors(name)
            h = x.to(a.dtype) if self.cast_input_dtype_enabled else x
            result = result + F.linear(F.linear(self.unilora_dropout[name](h), a), b)
        return result.to(previous_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
