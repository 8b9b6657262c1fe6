"""DEFT layers: a learned rank-``r`` subspace of the frozen weight removed and new content injected in its place
(Decompositional Efficient Fine-Tuning; PEFT's ``deft`` tuner, which also offers PaRa, pure subspace removal).

For ``W: (out, in)`` (``Conv1D`` stores ``Wᵀ``), ``P: (out, r)``, ``R: (r, in)`` and ``s = alpha / r`` (1 when
``alpha`` is ``None``)::

    relu: Q_P = P,          right = relu(P)       P_proj = Q_P rightᵀ = P relu(P)ᵀ     (out, out), not orthogonal
    qr:   Q_P = qr(P).Q,    right = Q_P           P_proj = Q_P Q_Pᵀ                    orthogonal projector

    W' = (I - P_proj) W + Q_P (s R)
    ΔW = W' - W = Q_P (s R - rightᵀ W)            (out, in): rank <= r, the (out, out) P_proj never formed
    PaRa (para=True): ΔW = -Q_P (rightᵀ W)        no R

    y = base(x) + [dropout(x) (s R)ᵀ - (x Wᵀ) right] Q_Pᵀ        x: (..., in); x Wᵀ = base(x) - bias

The update is computed in float32 (QR is unreliable in half precision) and cast back, as PEFT. Identity at init
(``init_weights=True``): ``R = rightᵀ W / s``, so ``ΔW = 0``.

``ΔW`` depends on ``W``, so merging is not plain addition: every merged adapter's ``rightᵀ W0`` (``(r, in)``, ``W0``
the weight before any merge) is kept while it is merged, which makes several merged adapters sum as their
forward does and makes unmerge subtract exactly what merge added. (PEFT computes that factor from the weight at the
time of each ``merge`` call, so two adapters merged in two calls differ there from its own forward.)

Supported bases: ``nn.Linear`` and transformers' ``Conv1D`` (PEFT's two).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None

COMPUTE_DTYPE = torch.float32
INIT_STD = 0.02  # PEFT's std for P, and for R's random draw (times init_scale)


class DeftLayer(AdapterLayer):
    """DEFT on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        deft_P: Per adapter, the projection direction ``P: (out, r)``.
        deft_R: Per adapter, the injection ``R: (r, in)`` (absent under PaRa).
        deft_r, deft_decomposition, deft_init_scale, deft_para, deft_scaling: Per-adapter settings (PEFT's names).
        deft_dropout: Per adapter, dropout on the injection's input (``nn.Identity`` at 0).
        fan_in_fan_out: The base stores ``Wᵀ`` (``Conv1D``).
    """

    adapter_layer_names = ("deft_P", "deft_R")
    other_param_names = ("deft_r", "deft_decomposition", "deft_init_scale", "deft_para", "deft_scaling",
                         "deft_dropout")
    peft_class_name = "DeftLinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.deft_P = nn.ParameterDict()
        self.deft_R = nn.ParameterDict()
        self.deft_r: dict[str, int] = {}
        self.deft_decomposition: dict[str, str] = {}
        self.deft_init_scale: dict[str, float] = {}
        self.deft_para: dict[str, bool] = {}
        self.deft_scaling: dict[str, float] = {}
        self.deft_dropout = nn.ModuleDict()
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        # adapter -> rightᵀ W0 (r, in), float32, for each adapter whose ΔW is in the weight now (see the module doc)
        self._merge_factors: dict[str, torch.Tensor] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, decomposition_method: str = "relu", init_scale: float = 1.0,
                     alpha: int | None = None, para: bool = False, deft_dropout: float = 0.0,
                     init_weights: bool = True) -> None:
        """Create adapter ``adapter_name``: ``P ~ N(0, 0.02²)``, then ``R`` (the identity's ``rightᵀ W / s``, or
        ``N(0, (0.02 init_scale)²)``), drawn in PEFT's order so that one seed gives both libraries the same tensors.

        ``r`` is capped at ``out`` (``P_proj`` has rank at most ``out``; QR gives at most ``out`` columns), as PEFT.
        """
        r = min(r, self.out_features)
        self.deft_r[adapter_name] = r
        self.deft_decomposition[adapter_name] = decomposition_method
        self.deft_init_scale[adapter_name] = init_scale
        self.deft_para[adapter_name] = para
        self.deft_scaling[adapter_name] = alpha / r if alpha else 1.0  # PEFT's: alpha None or 0 means no scaling
        self.deft_dropout[adapter_name] = nn.Dropout(p=deft_dropout) if deft_dropout > 0 else nn.Identity()
        P = torch.empty(self.out_features, r)
        nn.init.normal_(P, mean=0.0, std=INIT_STD)
        self.deft_P[adapter_name] = nn.Parameter(P)
        if not para:
            if init_weights:
                weight = self.read_base_weight()
                _, right = self._project(adapter_name, P.to(weight.device))
                R = right.T @ self._logical(weight) / self.deft_scaling[adapter_name]
            else:
                R = torch.empty(r, self.in_features)
                nn.init.normal_(R, mean=0.0, std=INIT_STD * init_scale)
            self.deft_R[adapter_name] = nn.Parameter(R)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def scale_layer(self, scale: float) -> None:
        """PEFT's: DEFT has no scale to change (a warning when asked for another than 1)."""
        if scale != 1 and any(name in self.deft_P for name in self.active_adapters):
            warnings.warn("Scaling operation for DEFT not supported! Automatically set scale to 1.", stacklevel=2)

    # ---- the math ----------------------------------------------------------------------------
    def _project(self, adapter_name: str, P: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_P, right)``, both ``(out, r)`` float32, with ``P_proj = Q_P rightᵀ``."""
        P = (self.deft_P[adapter_name] if P is None else P).to(COMPUTE_DTYPE)
        if self.deft_decomposition[adapter_name] == "qr":
            Q_P = torch.linalg.qr(P).Q
            return Q_P, Q_P
        return P, torch.relu(P)

    def _logical(self, weight: torch.Tensor) -> torch.Tensor:
        """``W: (out, in)`` float32 from the weight in storage layout."""
        return (weight.T if self.fan_in_fan_out else weight).to(COMPUTE_DTYPE)

    def _delta_from_factor(self, adapter_name: str, factor: torch.Tensor) -> torch.Tensor:
        """``ΔW = Q_P (s R - factor)`` (PaRa: ``-Q_P factor``) for ``factor = rightᵀ W``, ``(out, in)`` float32."""
        Q_P, _ = self._project(adapter_name)
        factor = factor.to(Q_P.device)
        if self.deft_para[adapter_name]:
            return -(Q_P @ factor)
        R = self.deft_R[adapter_name].to(COMPUTE_DTYPE) * self.deft_scaling[adapter_name]
        return Q_P @ (R - factor)

    def _unmerged_logical(self, weight: torch.Tensor) -> torch.Tensor:
        """``W0: (out, in)`` float32: ``weight`` less the ``ΔW`` of every adapter merged into it."""
        w = self._logical(weight)
        for name, factor in self._merge_factors.items():
            w = w - self._delta_from_factor(name, factor)
        return w

    def _factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``rightᵀ W0: (r, in)`` for the weight ``weight`` (storage layout, possibly holding merged adapters)."""
        _, right = self._project(adapter_name)
        return right.T @ self._unmerged_logical(weight).to(right.device)

    def _storage(self, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (delta.T if self.fan_in_fan_out else delta).to(like.device, like.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` against the unmerged weight, shaped and typed like ``base_layer.weight``."""
        weight = self.read_base_weight()
        factor = self._merge_factors.get(adapter_name)
        if factor is None:
            factor = self._factor(adapter_name, weight)
        return self._storage(self._delta_from_factor(adapter_name, factor), weight)

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active [dropout(x) (s R)ᵀ - (x Wᵀ) right] Q_Pᵀ``; ``x: (..., in)``, in float32."""
        result = self.base_layer(x, *args, **kwargs)
        names = [name for name in self.active_adapters if name in self.deft_P]
        if not names:
            return result
        out_dtype = result.dtype
        result = result.to(COMPUTE_DTYPE)
        bias = self.bias
        base_product = result if bias is None else result - bias.to(COMPUTE_DTYPE)  # x Wᵀ, shared by every adapter
        h = x.to(COMPUTE_DTYPE) if self.cast_input_dtype_enabled else x
        for name in names:
            Q_P, right = self._project(name)
            update = -(base_product @ right)  # (..., r): the removed subspace's coordinates
            if not self.deft_para[name]:
                R = self.deft_R[name].to(COMPUTE_DTYPE) * self.deft_scaling[name]
                update = update + F.linear(self.deft_dropout[name](h), R)
            result = result + update @ Q_P.T
        return result.to(out_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + ΔW(W0)``; ``rightᵀ W0`` is kept until the adapter is unmerged."""
        factor = self._factor(adapter_name, weight)
        self._merge_factors[adapter_name] = factor
        return weight + self._storage(self._delta_from_factor(adapter_name, factor), weight)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight - ΔW(W0)`` with the kept ``rightᵀ W0`` (recomputed if none was kept, exact only if nothing else
        is merged, as PEFT's fallback)."""
        factor = self._merge_factors.pop(adapter_name, None)
        if factor is None:
            factor = self._factor(adapter_name, weight)
        return weight - self._storage(self._delta_from_factor(adapter_name, factor), weight)

    def _forget_merge_state(self, adapter_name: str) -> None:
        if adapter_name not in self.merged_adapters:  # a check or an export computed a merge that did not happen
            self._merge_factors.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_factors.pop(adapter_name, None)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_deft_layer(target: nn.Module) -> DeftLayer | None:
    """The DEFT wrapper for ``target``, or ``None`` if DEFT cannot adapt its type."""
    return DeftLayer(target) if isinstance(target, supported_types()) else None
