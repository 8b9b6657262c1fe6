"""OSF layers: orthogonal subspace fine-tuning, for continual learning (PEFT's ``osf``; Nayak et al., "Sculpting
Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning", https://arxiv.org/abs/2504.07097).

For ``W: (out, in)``, ``W = U S Vᵀ`` (thin SVD, ``m = min(out, in)`` singular values, descending) and
``k = effective_rank``::

    W = U_high S_high V_high + U_low S_low V_low     U_high: (out, k), V_high: (k, in)       frozen (the past)
                                                     U_low: (out, m-k), S_low: (m-k,), V_low: (m-k, in)  trained
    ΔW = U_low diag(S_low) V_low − U₀ diag(S₀) V₀    U₀, S₀, V₀: the low factors at creation (frozen)
    y  = base(x) + ΔW x,   run as  (x [V_low; V₀]ᵀ) [U_low S_low, −U₀ S₀]ᵀ   (rank 2(m-k), no (out, in) product)

``ΔW = 0`` at init. Training moves only the low part, and the gradients of ``U_low`` and ``V_low`` are projected
orthogonal to the high subspace: ``∇U ← (I − U_high U_highᵀ) ∇U``, ``∇V ← ∇V (I − V_highᵀ V_high)``. Where ``U`` is
square (``out ≤ in``) that projector is ``U₀ U₀ᵀ`` (the complement of ``U_high`` is spanned by ``U₀``), which PEFT
uses there instead of keeping ``U_high``; likewise for ``V`` (``out ≥ in``). Here the projection is an identity
in the forward whose backward projects (so it holds for any trainer and survives copies), not a tensor hook.

The base weight is not rewritten: the adapter is an additive ``ΔW`` (PEFT 0.21.2's OSF), so ``disable_adapter``
gives the base, merging adds ``ΔW`` and, beyond PEFT (which refuses to unmerge), unmerging subtracts it.

Files hold the trained factors under PEFT's names, ``osf_svd_params.<adapter>.U_low / S_low / V_low``; ``U₀, S₀,
V₀`` and the high factors are rebuilt from the base weight when the adapter is created (never saved), so an
adapter loads onto the base it was trained on. Layers: ``nn.Linear`` and, beyond PEFT (which skips it), GPT-2's
``Conv1D`` (``W`` stored ``(in, out)``: the SVD is of ``Wᵀ``, ``ΔW`` is transposed to merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class _ProjectedGrad(torch.autograd.Function):
    """Identity on ``factor`` whose backward projects the gradient: ``(I − H Hᵀ) g`` / ``g (I − Hᵀ H)`` with the
    high basis ``H``, or ``L Lᵀ g`` / ``g Lᵀ L`` with the low basis at init ``L`` where ``H`` is not kept."""

    @staticmethod
    def forward(ctx, factor: torch.Tensor, high: torch.Tensor | None, low_init: torch.Tensor,  # noqa: D102
                left: bool) -> torch.Tensor:
        ctx.high, ctx.low_init, ctx.left = high, low_init, left
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        high, low, left = ctx.high, ctx.low_init, ctx.left
        if left:  # U: (out, m-k), bases (out, ·)
            grad = grad - high @ (high.T @ grad) if high is not None else low @ (low.T @ grad)
        else:  # V: (m-k, in), bases (·, in)
            grad = grad - (grad @ high.T) @ high if high is not None else (grad @ low.T) @ low
        return grad, None, None, None


class FrozenSubspace(nn.Module):
    """One adapter's frozen SVD parts, as buffers that follow the layer's device and are never saved (PEFT's
    ``_osf_U_low_init`` ... ``_osf_V_high``): ``U_low_init: (out, m-k)``, ``S_low_init: (m-k,)``, ``V_low_init:
    (m-k, in)``, and ``U_high: (out, k)`` only where ``out > in``, ``V_high: (k, in)`` only where ``out < in``."""

    def __init__(self, parts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in ("U_low_init", "S_low_init", "V_low_init", "U_high", "V_high"):
            self.register_buffer(name, parts.get(name), persistent=False)


def svd_split(weight: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The thin SVD of ``weight: (out, in)`` (in fp32) split after the top ``k`` directions: ``U_high, S_high,
    V_high`` and ``U_low, S_low, V_low`` (``V`` as rows, ``Vᵀ``'s layout)."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    k = min(k, s.shape[0])
    return {"U_high": u[:, :k], "S_high": s[:k], "V_high": vh[:k], "U_low": u[:, k:], "S_low": s[k:], "V_low": vh[k:]}


class OSFLayer(AdapterLayer):
    """OSF on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        osf_svd_params: ``adapter -> ParameterDict(U_low, S_low, V_low)`` (trained, saved).
        osf_frozen: ``adapter -> FrozenSubspace`` (rebuilt from the base, not saved).
        effective_rank: Per adapter, ``k`` (the frozen high rank).
    """

    adapter_layer_names = ("osf_svd_params",)
    other_param_names = ("osf_frozen", "effective_rank")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.osf_svd_params = nn.ModuleDict()
        self.osf_frozen = nn.ModuleDict()
        self.effective_rank: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        shape = tuple(dense_weight_shape(base_layer))  # (out, in) for a bitsandbytes layer, not its packed storage
        self.out_features, self.in_features = (shape[1], shape[0]) if self.fan_in_fan_out else shape

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``ΔW`` is additive and independent of later base changes, so LoRA can approximate it."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, effective_rank: int, init_weights: bool | None = True) -> None:
        """Create adapter ``adapter_name``: split the SVD of the current base weight at ``effective_rank``; the
        trainable factors start at the low part (``init_weights``) or at ``N(0, 1)`` draws (PEFT's test init).

        Raises:
            ConfigError: ``effective_rank`` is not positive (PEFT's sentence).
        """
        if effective_rank <= 0:
            raise ConfigError("`effective_rank` should be a positive integer value but the value passed is "
                              f"{effective_rank}")
        self.effective_rank[adapter_name] = effective_rank
        with torch.no_grad():
            weight = self.read_base_weight()
            split = svd_split(weight.T if self.fan_in_fan_out else weight, effective_rank)
        low = {name: split[name].contiguous() for name in ("U_low", "S_low", "V_low")}
        frozen = {f"{name}_init": value.clone() for name, value in low.items()}
        if self.out_features > self.in_features:  # U not square: its complement is not spanned by U_low_init
            frozen["U_high"] = split["U_high"].contiguous()
        if self.out_features < self.in_features:
            frozen["V_high"] = split["V_high"].contiguous()
        if init_weights is False:
            low = {name: torch.randn_like(value) for name, value in low.items()}
        self.osf_frozen[adapter_name] = FrozenSubspace(frozen)
        self.osf_svd_params[adapter_name] = nn.ParameterDict({k: nn.Parameter(v) for k, v in low.items()})
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``ΔW = a b`` as ``a: (out, 2(m-k)) = [U_low S_low, −U₀ S₀]``, ``b: (2(m-k), in) = [V_low; V₀]``, with
        the gradient projections on ``U_low`` and ``V_low``."""
        params, fr = self.osf_svd_params[adapter_name], self.osf_frozen[adapter_name]
        u = _ProjectedGrad.apply(params["U_low"], fr.U_high, fr.U_low_init, True)
        v = _ProjectedGrad.apply(params["V_low"], fr.V_high, fr.V_low_init, False)
        a = torch.cat([u * params["S_low"][None], -(fr.U_low_init * fr.S_low_init[None])], dim=1)
        b = torch.cat([v, fr.V_low_init], dim=0)
        return a.to(dtype), b.to(dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``U_low diag(S_low) V_low − U₀ diag(S₀) V₀``, shaped like ``base_layer.weight``."""
        params, fr = self.osf_svd_params[adapter_name], self.osf_frozen[adapter_name]
        current = (params["U_low"] * params["S_low"][None]) @ params["V_low"]
        initial = (fr.U_low_init * fr.S_low_init[None]) @ fr.V_low_init
        delta = current - initial
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active (x bᵀ) aᵀ`` (see :meth:`_factors`); ``x: (..., in)``. PEFT runs only the first
        active adapter; here every active one adds its ``ΔW``, as merging them does in both libraries."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.osf_svd_params:
                continue
            params = self.osf_svd_params[name]
            a, b = self._factors(name, params["U_low"].dtype)
            h = x.to(a.dtype) if self.cast_input_dtype_enabled else x
            result = result + F.linear(F.linear(h, b), a)
        return result.to(out_dtype)


def make_osf_layer(target: nn.Module) -> OSFLayer | None:
    """The OSF wrapper for ``target``, or ``None`` if OSF cannot adapt its type."""
    return OSFLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
