"""GLoRA layers: one frozen linear layer, five learnable corrections (Chavan et al., 2023, "One-for-All:
Generalized LoRA for Parameter-Efficient Fine-tuning", https://arxiv.org/abs/2306.07967).

For ``W0: (out, in)`` and ``b0: (out,)``::

    W_eff = W0 + W0 ⊙ A + B                 ΔW = W0 ⊙ A + B                  (out, in)
    b_eff = b0 + b0 ⊙ D + E + W0 C          Δb = b0 ⊙ D + E + (W0 C)[:, 0]   (out,)
    y     = x W_effᵀ + b_eff = base(x) + x ΔWᵀ + Δb

Each matrix is one of (PEFT's parametrisations and tensor names, so files cross):

- ``"lora"``: ``Xd Xu`` with ``Xd: (rows, r)``, ``Xu: (r, cols)``: ``A, B: (out, r) (r, in)``, ``C: (in, r) (r, 1)``;
- ``"vector"``: ``X: (out, 1)`` for ``A, B`` (one value per output row, broadcast over the inputs), ``(in, 1)`` for
  ``C``, ``(out,)`` for ``D, E``;
- ``"constant"``: ``X: (1,)``, one scalar;
- ``"none"``: a zero buffer ``zeros`` of the matrix's shape (PEFT keeps and saves it, so files hold it too).

``C, D, E`` are zeros (``"none"``) on a layer without bias. Several active adapters add their updates, each
against ``W0`` and ``b0`` (PEFT's). Merging folds ``ΔW`` into the weight and ``Δb`` into the bias; every merged
term is computed from the weight and bias *before* the first merge, which the layer keeps (on the CPU) until the
last unmerge restores them exactly (PEFT divides by ``1 + Σ A`` instead, which is not exact).

Supported bases: ``nn.Linear`` (PEFT's only one) and transformers' ``Conv1D`` (``W0`` stored ``(in, out)``; ``ΔW``
is transposed to merge; PEFT refuses it, so such a file does not load in PEFT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import MergeError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


# ---- the four parametrisations (each a module whose ``value()`` broadcasts to its matrix) ----------------------

class LowRank(nn.Module):
    """``Xd Xu: (rows, cols)``; ``Xu`` He-uniform, ``Xd`` zero (``zero``) or He-uniform."""

    def __init__(self, rows: int, cols: int, r: int, zero: bool) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
        if not zero:
            nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))

    def value(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class Vector(nn.Module):
    """``X: shape`` (``(rows, 1)`` broadcast over the columns, or ``(out,)``); zero or He-uniform (a 1-D vector is
    drawn as one row, fan-in ``out``, as PEFT)."""

    def __init__(self, shape: tuple[int, ...], zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(shape))
        if not zero:
            nn.init.kaiming_uniform_(self.X.unsqueeze(0) if self.X.dim() == 1 else self.X, a=math.sqrt(5))

    def value(self) -> torch.Tensor:
        return self.X


class Constant(nn.Module):
    """One scalar ``X: (1,)``; zero or ``N(0, 0.02²)``."""

    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        if not zero:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def value(self) -> torch.Tensor:
        return self.X[0]


class Zeros(nn.Module):
    """Nothing trains: a zero buffer ``zeros`` of the matrix's shape (PEFT's, saved in its files)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def value(self) -> torch.Tensor:
        return self.zeros


def make_path(kind: str, shape: tuple[int, ...], vector_shape: tuple[int, ...], r: int, zero: bool) -> nn.Module:
    """The parametrisation ``kind`` of a matrix of ``shape`` (``vector_shape``: its ``"vector"`` form)."""
    if kind == "lora":
        return LowRank(*shape, r, zero)
    if kind == "vector":
        return Vector(vector_shape, zero)
    if kind == "constant":
        return Constant(zero)
    return Zeros(shape)


class GloraLayer(AdapterLayer):
    """GLoRA on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        glora_A ... glora_E: Per adapter, the parametrisation modules of ``A`` ... ``E`` (``value()``).
        r: Per adapter, the rank of its ``"lora"`` matrices.
        fan_in_fan_out: The base stores ``W0ᵀ`` (``Conv1D``).
    """

    adapter_layer_names = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
    other_param_names = ("r",)
    peft_class_name = "GloraLinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self.r: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        # W0 and b0 before the first merge (CPU, storage layout): every merged term is computed from them, and the
        # last unmerge puts them back exactly
        self._weight_before_merge: torch.Tensor | None = None
        self._bias_before_merge: torch.Tensor | None = None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``False``, as PEFT: ``W0 ⊙ A`` depends on the base weight and the bias changes too."""
        return False

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, config_A_B: str = "lora", config_C: str = "lora",
                     config_D_E: str = "constant", init_weights: bool = True) -> None:
        """Create adapter ``adapter_name``: ``A, B, C, D, E`` as the configs say (see the module docstring), drawn
        in PEFT's order so that under one seed both libraries draw the same adapter."""
        out, inp = self.out_features, self.in_features
        has_bias = getattr(self.base_layer, "bias", None) is not None
        zero = bool(init_weights)
        self.r[adapter_name] = r
        kind_c, kind_d_e = (config_C, config_D_E) if has_bias else ("none", "none")
        self.glora_A[adapter_name] = make_path(config_A_B, (out, inp), (out, 1), r, zero)
        self.glora_B[adapter_name] = make_path(config_A_B, (out, inp), (out, 1), r, zero)
        self.glora_C[adapter_name] = make_path(kind_c, (inp, 1), (inp, 1), r, zero)
        self.glora_D[adapter_name] = make_path(kind_d_e, (out,), (out,), r, zero)
        self.glora_E[adapter_name] = make_path(kind_d_e, (out,), (out,), r, zero)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def _w0(self, weight: torch.Tensor) -> torch.Tensor:
        """``W0: (out, in)`` from the base weight in storage layout."""
        return weight.T if self.fan_in_fan_out else weight

    def _delta(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW = W0 ⊙ A + B: (out, in)`` for the base weight ``weight`` (storage layout), in the adapter's dtype."""
        a, b = self.glora_A[adapter_name].value(), self.glora_B[adapter_name].value()
        w0 = self._w0(weight).to(a.dtype)
        return w0 * a + b

    def _bias_delta(self, adapter_name: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``Δb = b0 ⊙ D + E + (W0 C)[:, 0]: (out,)`` for base weight ``weight`` and bias ``bias``."""
        c, d, e = (getattr(self, f"glora_{m}")[adapter_name].value() for m in "CDE")
        w0 = self._w0(weight).to(c.dtype)
        return bias.to(c.dtype) * d + e + (w0 @ c)[:, 0]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` of the unmerged ``W0`` (kept while adapters are merged), shaped like ``base_layer.weight``."""
        weight = self._weight_before_merge
        weight = self.read_base_weight() if weight is None else weight.to(self.base_layer.weight.device)
        delta = self._delta(adapter_name, weight)
        return delta.T if self.fan_in_fan_out else delta

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active (x ΔWᵀ + Δb)``; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        weight, bias = self.read_base_weight(), self.bias
        for name in self.active_adapters:
            if name not in self.glora_A:
                continue
            delta = self._delta(name, weight)
            h = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
            bias_delta = None if bias is None else self._bias_delta(name, weight, bias)
            result = result + F.linear(h, delta, bias_delta)
        return result.to(out_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def _keep_originals(self, weight: torch.Tensor) -> None:
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().to("cpu", copy=True)
            bias = self.bias
            self._bias_before_merge = None if bias is None else bias.detach().to("cpu", copy=True)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + ΔW(W0)``, ``W0`` the weight before the first merge (kept here from now on)."""
        self._keep_originals(weight)
        return weight + self.get_delta_weight(adapter_name).to(weight.device, weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``bias + Δb(W0, b0)`` (a new tensor), or ``None`` for a layer without bias."""
        if bias is None:
            return None
        w0 = self._weight_before_merge
        b0 = self._bias_before_merge
        if w0 is None or b0 is None:  # merged_weight runs first and keeps them; this is only a fallback
            w0, b0 = self.read_base_weight(), bias
        device = bias.device
        return bias + self._bias_delta(adapter_name, w0.to(device), b0.to(device)).to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        """Add (``sign = 1``) or remove ``Δb``; the last unmerge restores ``b0`` exactly."""
        bias = self.bias
        if bias is None:
            return
        if sign < 0 and not self.merged_adapters:  # the last merged adapter (unmerged_weight has restored W0)
            bias.data = self._bias_before_merge.to(bias.device, bias.dtype)
            self._bias_before_merge = None
            return
        w0, b0 = self._weight_before_merge, self._bias_before_merge
        delta = self._bias_delta(adapter_name, w0.to(bias.device), b0.to(bias.device)).to(bias.dtype)
        bias.data = bias.data + sign * delta

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight - ΔW(W0)``; the last unmerge gives ``W0`` back exactly.

        Raises:
            MergeError: no ``W0`` was kept (the adapter was marked merged without :meth:`merge`).
        """
        w0 = self._weight_before_merge
        if w0 is None:
            raise MergeError(f"Cannot unmerge GLoRA adapter {adapter_name!r}: the base weight before the merge was "
                             "not kept (W0 ⊙ A depends on it). Reload the base model instead.")
        if not self.merged_adapters:  # unmerge() popped it first: it was the last merged adapter
            self._weight_before_merge = None
            return w0.to(weight.device, weight.dtype)
        return weight - self.get_delta_weight(adapter_name).to(weight.device, weight.dtype)

    def _forget_merge_state(self, adapter_name: str) -> None:
        if not self.merged_adapters:  # a check or an export computed a merge that did not happen
            self._weight_before_merge = self._bias_before_merge = None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_glora_layer(target: nn.Module) -> GloraLayer | None:
    """The GLoRA wrapper for ``target``, or ``None`` if GLoRA cannot adapt its type."""
    return GloraLayer(target) if isinstance(target, supported_types()) else None
