"""RandLoRA layers: a full-rank update from frozen random bases shared by all layers, scaled by trained diagonals.

Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models". For ``W: (out, in)``
let ``d = min(out, in)``, ``D = max(out, in)`` and ``n = ceil(d / r)`` (enough rank-``r`` bases for rank ``d``)::

    ΔW = s Σ_b B_b Λ_b A Γ_b,   s = randlora_alpha / r

with ``B_b: (D, r)`` and ``A: (r, d)`` frozen and random, shared by every layer (and ``A`` by every basis), and
only the diagonals ``Λ_b = diag(λ[:, b])``, ``λ: (r, n)``, and ``Γ_b = diag(γ[b])``, ``γ: (n, d)``, trained. The
random factors sit on the layer's small side ``d`` so ``γ`` is as small as it can be.

Tensors and names are PEFT's (so files cross): the model's ``randlora_A: (r, 1, d_max)`` and ``randlora_B: (D_max,
n_max, r)`` (sized for the largest target, sliced by each layer), the layer's ``randlora_lambda`` (``λ``) and
``randlora_gamma`` (``γ``). With ``Ã[k, b, j] = λ[k, b] A[k, j] γ[b, j]`` flattened to ``(r n, d)`` (row ``k n +
b``) and ``B̃ = B[:D, :n]`` flattened to ``(D, n r)`` (column ``b r + k``)::

    M = B̃ Ã: (D, d),   ΔW = s M if in <= out else s Mᵀ,   y = W x + bias + ΔW x

The two flattenings pair ``B̃``'s column ``c`` (basis ``c // r``, rank ``c % r``) with ``Ã``'s row ``c`` (rank
``c // n``, basis ``c % n``): PEFT's layout, kept for equal numbers. As ``B``'s entries are i.i.d. this is the
paper's sum with ``B``'s columns in another fixed order, the same distribution.

The forward never forms ``ΔW``: ``x`` goes through ``Ã`` then ``B̃`` (or ``B̃`` then ``Ã``), two matmuls of width
``r n ≈ d``; ``Ã`` is built from ``λ, A, γ`` by :class:`ScaledBasis`, which keeps only those for the backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def num_bases(out_features: int, in_features: int, r: int) -> int:
    """``n = ceil(min(out, in) / r)``: the fewest rank-``r`` bases whose sum can have full rank."""
    return -(-min(out_features, in_features) // r)


def _basis_dtype() -> torch.dtype:
    """PEFT draws the dense bases in bfloat16 where the accelerator has it (CPU always, CUDA from Ampere), else in
    float16; drawing in the same dtype gives the same numbers from the same seed."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _he_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """torch's ``kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``fan_in = shape[1] ·
    prod(shape[2:])``, drawn from ``generator``."""
    tensor = torch.empty(shape, dtype=_basis_dtype())
    with torch.no_grad():
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``-1`` where ``u < 1/(2 sparsity)``, ``+1`` where ``u > 1 - 1/(2 sparsity)``, else ``0`` (Li et al.'s very
    sparse random projections); ``u ~ U(0, 1)``."""
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def draw_bases(r: int, out_max: int, in_max: int, seed: int, sparse: bool = False,
               very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``A: (r, 1, d)`` and ``B: (D, n, r)`` (``d, D``: the smaller and larger of ``out_max, in_max``;
    ``n = ceil(d / r)``) from one CPU generator seeded with ``seed``, each divided by its std, as fp32.

    Dense: He-uniform, ``A`` then ``B`` one basis at a time, in bfloat16 (PEFT's draw, so the same seed gives the
    same bases). ``sparse``: ternary with ``P(±1) = 1/6``; ``very_sparse``: ``P(±1) = 1/(2 sqrt(d))``.
    """
    big, small = max(out_max, in_max), min(out_max, in_max)
    n = num_bases(out_max, in_max, r)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if very_sparse or sparse:
        sparsity = math.sqrt(small) if very_sparse else 3
        a = _ternary(torch.rand((r, 1, small), generator=generator), sparsity)
        b = _ternary(torch.rand((big, n, r), generator=generator), sparsity)
    else:
        a = _he_uniform((r, 1, small), generator)
        b = torch.cat([_he_uniform((big, 1, r), generator) for _ in range(n)], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


class ScaledBasis(torch.autograd.Function):
    """``Ã[k, b, j] = λ[k, b] · A[k, j] · γ[b, j]``: ``A: (r, d)`` frozen, ``λ: (r, n)``, ``γ: (n, d)`` -> ``(r, n,
    d)``. The backward keeps the three factors, not the ``(r, n, d)`` partial products autograd would keep::

        ∂L/∂λ[k, b] = Σ_j G[k, b, j] A[k, j] γ[b, j],   ∂L/∂γ[b, j] = Σ_k G[k, b, j] A[k, j] λ[k, b]
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, lam, gamma)
        return lam[:, :, None] * a[:, None, :] * gamma[None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        a, lam, gamma = (t.to(grad.dtype) for t in ctx.saved_tensors)
        grad_lam = torch.einsum("kbj,kj,bj->kb", grad, a, gamma)
        grad_gamma = torch.einsum("kbj,kj,kb->bj", grad, a, lam)
        return None, grad_lam, grad_gamma


class RandLoraLayer(AdapterLayer):
    """RandLoRA on ``nn.Linear`` or ``transformers``' ``Conv1D``.

    Attributes:
        randlora_lambda: ``adapter -> λ: (r, n)``.
        randlora_gamma: ``adapter -> γ: (n, d)``.
        scaling: ``adapter -> s = randlora_alpha / r``.
        randlora_A, randlora_B: The model's shared :class:`ProjectionDict` s (references, not submodules).
    """

    adapter_layer_names = ("randlora_lambda", "randlora_gamma")
    other_param_names = ("r", "scaling", "randlora_dropout")

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """RandLoRA's update is additive, so plain LoRA can hold it (PEFT's)."""
        return True

    def __init__(self, base_layer: nn.Module, randlora_A: ProjectionDict, randlora_B: ProjectionDict) -> None:
        super().__init__(base_layer)
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.randlora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        # Plain attributes (bypassing nn.Module registration): the model owns the bases.
        self.__dict__["randlora_A"] = randlora_A
        self.__dict__["randlora_B"] = randlora_B

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, randlora_alpha: float = 640, randlora_dropout: float = 0.0,
                     init_weights: bool = True) -> None:
        """Create ``λ, γ`` for ``adapter_name``; its bases must already be in ``randlora_A/randlora_B``."""
        if adapter_name not in self.randlora_A:
            raise ConfigError(f"RandLoRA adapter {adapter_name!r} has no shared bases; add it through the model")
        small, big = min(self.out_features, self.in_features), max(self.out_features, self.in_features)
        n = num_bases(self.out_features, self.in_features, r)
        a, b = self.randlora_A[adapter_name], self.randlora_B[adapter_name]
        if a.shape[0] != r or a.shape[-1] < small or b.shape[0] < big or b.shape[1] < n:
            raise ConfigError(
                f"RandLoRA bases of {adapter_name!r} are A {tuple(a.shape)} / B {tuple(b.shape)}, which do not fit "
                f"this layer (r={r}, out={self.out_features}, in={self.in_features}: {n} bases)"
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = randlora_alpha / r
        self.randlora_dropout[adapter_name] = nn.Dropout(randlora_dropout) if randlora_dropout > 0 else nn.Identity()
        if init_weights:
            lam, gamma = torch.zeros(r, n), torch.full((n, small), 1 / max(n, small))
        else:
            lam, gamma = torch.randn(r, n), torch.ones(n, small) / big
        self.randlora_lambda[adapter_name] = nn.Parameter(lam)
        self.randlora_gamma[adapter_name] = nn.Parameter(gamma)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``Ã: (r n, d)`` and ``B̃: (D, n r)`` of the module docstring, on ``λ``'s device and dtype."""
        lam, gamma = self.randlora_lambda[adapter_name], self.randlora_gamma[adapter_name]
        n, small = gamma.shape
        big = max(self.out_features, self.in_features)
        # A: (r, 1, d_max) -> (r, d); B: (D_max, n_max, r) -> (D, n, r), both shared and sized for the largest target
        a = self.randlora_A[adapter_name][:, 0, :small].to(lam.device, lam.dtype)
        b = self.randlora_B[adapter_name][:big, :n].to(lam.device, lam.dtype)
        return ScaledBasis.apply(a, lam, gamma).flatten(0, 1), b.flatten(1)

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s B̃ Ã`` (``in <= out``) or its transpose: ``(out, in)``, transposed again for ``Conv1D``."""
        a_scaled, b = self._factors(adapter_name)
        delta = (b @ a_scaled) * self.scaling[adapter_name]
        if self.in_features > self.out_features:
            delta = delta.T
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + s · B̃ (Ã dropout(x))`` (``in <= out``; else ``s · Ãᵀ (B̃ᵀ dropout(x))``) for each active
        adapter; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.randlora_lambda:
                continue
            a_scaled, b = self._factors(name)
            h = self.randlora_dropout[name](x.to(a_scaled.dtype))
            if self.in_features <= self.out_features:
                update = F.linear(F.linear(h, a_scaled), b)  # (..., d) -> (..., r n) -> (..., D)
            else:
                update = (h @ b) @ a_scaled  # (..., D) -> (..., n r) -> (..., d)
            result = result + update * self.scaling[name]
        return result.to(out_dtype)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
