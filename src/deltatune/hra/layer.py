"""HRA layers: the base weight times a product of Householder reflections (Yuan et al., 2024).

For ``W: (out, d)`` (``d = in`` for a linear layer, ``in · kh · kw`` for a convolution's flattened kernel) and
``U = hra_u: (d, r)`` with unit columns ``û_i = u_i / ‖u_i‖``::

    H_i = I_d − 2 û_i û_iᵀ                 (a reflection: H_i = H_iᵀ = H_i⁻¹)
    R   = H_1 H_2 ⋯ H_r                     (orthogonal, (d, d))
    W'  = W R,   y = W' x + b

With ``apply_GS`` the columns are first orthonormalised by (modified) Gram-Schmidt, ``Q: (d, r)``, and
``R = I − 2 Q Qᵀ`` (one reflection of the span of ``U``). ``R`` is never formed: ``W R`` is
``W ← W − 2 (W û_i) û_iᵀ`` for ``i = 1..r`` (``r · out · d`` multiply-adds), or ``W − 2 (W Q) Qᵀ``. Several active
adapters multiply in order, ``W R_1 R_2``. Merging writes ``W R``; unmerging applies the reflections in reverse
(``R⁻¹ = H_r ⋯ H_1``; with Gram-Schmidt ``R⁻¹ = R``). The tensor name is PEFT's (``hra_u``), so files cross.

Init (PEFT's): ``init_weights`` with an even ``r`` draws ``r/2`` He-uniform columns and repeats each once
(``[u_1, u_1, u_2, u_2, ...]``): ``H_i H_i = I``, so the adapter starts as the identity; an odd ``r`` warns and
draws all columns (not the identity). ``init_weights=False`` draws all columns.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer, peft_layer_type
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns ``Q: (d, r)`` spanning ``u: (d, r)``'s, by modified Gram-Schmidt (differentiable;
    the order PEFT uses, so the same ``Q`` to rounding)."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


def reflect(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool, reverse: bool = False) -> torch.Tensor:
    """``weight · R`` (``reverse``: ``weight · R⁻¹``) for ``weight: (out, d)``, ``u: (d, r)``; see the module text."""
    if apply_gs:
        q = gram_schmidt(u)
        return weight - 2 * (weight @ q) @ q.T
    unit = u / u.norm(dim=0)
    order = range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])
    for i in order:
        col = unit[:, i : i + 1]  # (d, 1)
        weight = weight - 2 * (weight @ col) @ col.T
    return weight


class HRALayer(AdapterLayer):
    """HRA on ``nn.Linear``, ``nn.Conv2d`` (groups 1) and ``transformers``' ``Conv1D``.

    Attributes:
        hra_u: Per adapter, the reflection vectors ``(d, r)`` (one per column).
        hra_r, hra_apply_GS: Per adapter: the number of reflections, and whether Gram-Schmidt is applied.
    """

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")

    @property
    def peft_class_name(self) -> str:  # PEFT's classes: HRALinear, HRAConv2d (repr "hra.HRALinear(...)")
        return "HRA" + peft_layer_type(self.get_base_layer())

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}
        base = self.get_base_layer()
        self.is_conv = isinstance(base, nn.Conv2d)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base, Conv1D)
        if self.is_conv and base.groups > 1:
            raise ConfigError(f"HRA does not support {type(base).__name__} layers with groups > 1 "
                              f"(got groups={base.groups}). Exclude this module (exclude_modules) or use LoRA")
        shape = base.weight.shape
        self.weight_shape = tuple(shape)
        self.rows_shape = (shape[1], shape[0]) if self.fan_in_fan_out else (shape[0], math.prod(shape[1:]))

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, apply_GS: bool = False, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name`` with ``r`` reflections of ``d``-vectors, and initialise it."""
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = apply_GS
        d = self.rows_shape[1]
        if init_weights and r % 2 == 0:
            half = torch.empty(d, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)  # equal pairs: H_i H_i = I, the identity at init
        else:
            if init_weights:
                warnings.warn("The symmetric initialization can NOT be performed when r is odd! (the adapter "
                              "does not start as the identity; use an even r)", stacklevel=4)
            u = torch.empty(d, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u[adapter_name] = nn.Parameter(u)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _rows_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as ``W: (out, d)`` (``Conv1D`` stores ``Wᵀ``)."""
        return weight.T if self.fan_in_fan_out else weight.reshape(self.rows_shape)

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T if self.fan_in_fan_out else rows.reshape(self.weight_shape)

    def _reflected(self, weight: torch.Tensor, names: list[str], reverse: bool = False) -> torch.Tensor:
        """``weight`` (storage layout) times each named adapter's ``R`` in turn (``reverse``: ``R⁻¹``, last first)."""
        rows = self._rows_view(weight)
        for name in (reversed(names) if reverse else names):
            u = self.hra_u[name]
            rows = reflect(rows.to(u.dtype), u, self.hra_apply_GS[name], reverse=reverse)
        return self._from_rows(rows)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n for n in self.active_adapters if n in self.hra_u]
        base = self.get_base_layer()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self._reflected(self.read_base_weight(), names)
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        xw = x.to(weight.dtype) if self.cast_input_dtype_enabled else x.to(base.weight.dtype)
        if self.is_conv:
            out = base._conv_forward(xw, weight, bias)  # the base's stride/padding/dilation
        elif self.fan_in_fan_out:
            out = F.linear(xw, weight.T, bias)
        else:
            out = F.linear(xw, weight, bias)
        return out.to(x.dtype)

    # ---- merging -----------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``W R`` (in the storage layout and dtype of ``weight``)."""
        return self._reflected(weight, [adapter_name]).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``W' R⁻¹``: the reflections in reverse order (each is its own inverse)."""
        return self._reflected(weight, [adapter_name], reverse=True).to(weight.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W R − W``, shaped like ``base_layer.weight`` (PEFT's ``get_delta_weight`` returns ``R`` itself; deltatune's
        layers all return the additive change)."""
        weight = self.read_base_weight()
        return self.merged_weight(weight, adapter_name) - weight


def make_hra_layer(target: nn.Module) -> HRALayer | None:
    """The HRA wrapper for ``target``, or ``None`` if HRA cannot adapt its type."""
    return HRALayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.Conv2d) + ((Conv1D,) if Conv1D is not None else ())
