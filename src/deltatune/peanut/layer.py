"""PEANuT layers: the weight update is a small non-linear network of the frozen weight (Zhong et al., 2024,
"PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers", https://arxiv.org/abs/2410.01870).

For ``W0: (out, in)``, hidden width ``r``, ``depth`` hidden layers per side, activation ``σ`` and factor ``s``,
the network reads ``W0``'s ``in`` columns (vectors of length ``out``) as a batch::

    H_0 = σ(W0ᵀ Aᵀ)                                  A: (r, out)   H_0: (in, r)
    H_i = σ(H_{i-1} E_iᵀ),          i = 1..depth      E_i: (r, r)   encoders
    G_0 = H_depth
    G_j = σ(G_{j-1} D_jᵀ) + H_{depth-j},  j = 1..depth  D_j: (r, r)   decoders, U-Net residuals
    ΔW  = s · (G_depth Bᵀ)ᵀ = s · B G_depthᵀ          B: (out, r)   ΔW: (out, in)
    y   = base(x) + x ΔWᵀ = base(x) + s · (x G_depth) Bᵀ

``ΔW`` depends on nothing but ``W0`` and the adapter, so it is a fixed dense update and merges exactly. Its rank
is at most ``r`` (``ΔW = s B Gᵀ``), so the forward never forms it: ``x G`` then ``Bᵀ`` costs ``r (in + out)`` per
token, where PEFT's ``x ΔWᵀ`` costs ``in · out`` (``G`` itself costs ``in · out · r`` per step in both).
``B = 0`` at init makes the adapter the identity.

Layouts (tensor names are PEFT's, so files cross): ``peanut_A.<adapter>``, ``peanut_B.<adapter>`` (``nn.Linear``
without bias, ``weight`` ``(r, out)`` and ``(out, r)``), ``peanut_encoders.<adapter>.<i>`` and
``peanut_decoders.<adapter>.<i>`` (``(r, r)`` each; PEFT files them as ``peanut_encoders.<i>.weight``).
PEFT adapts ``nn.Linear``; deltatune also adapts transformers' ``Conv1D`` (``W0`` stored ``(in, out)``, the same
network on ``W0ᵀ``'s transpose) and ``nn.Conv1d/2d`` (``W0: (out, in/groups, *k)`` read as ``(out, in/groups ·
Πk)``: one column per input channel and kernel position; the update runs as the base convolution with ``ΔW``).
Such files do not load in PEFT.

Merging: ``W' = W0 + Σ_i ΔW_i(W0)``, every term from the weight *before* the first merge, which the layer keeps
(on the CPU, as PEFT) until the last unmerge restores it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from deltatune.core.delta_layer import DeltaWeightLayer, dense_supported_types
from deltatune.errors import MergeError


class PeanutLayer(DeltaWeightLayer):
    """PEANuT on ``nn.Linear``, ``transformers``' ``Conv1D`` and ``nn.Conv1d/2d``.

    Attributes:
        r, depth, scaling, act_fn: Per adapter: hidden width, hidden layers per side, factor ``s``, the name of
            ``σ`` in transformers' ``ACT2FN``.
        delta_shape: ``(out, in, *kernel)``: the layout of ``ΔW`` here (``Conv1D``'s weight transposed).
    """

    adapter_layer_names = ("peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders")
    other_param_names = ("r", "depth", "scaling", "act_fn")
    conv_types = (nn.Conv1d, nn.Conv2d)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.peanut_A = nn.ModuleDict()
        self.peanut_B = nn.ModuleDict()
        self.peanut_encoders = nn.ModuleDict()
        self.peanut_decoders = nn.ModuleDict()
        self.depth: dict[str, int] = {}
        self.act_fn: dict[str, str] = {}
        self._activation: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # ACT2FN[act_fn], built once
        # W0 before the first merge (CPU, storage layout), for the later merges and the exact restore on the last
        # unmerge: ΔW is a function of W0, so it cannot be recomputed from the merged weight
        self._weight_before_merge: torch.Tensor | None = None

    @property
    def columns(self) -> int:
        """``n``: how many column vectors of length ``out`` the network reads (``in · Πkernel``)."""
        return math.prod(self.delta_shape[1:])

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``False``, as PEFT (its base class's answer): ``ΔW`` is a function of the base weight, not an adapter of
        its own (``export_to_lora`` still writes it against the current base)."""
        return False

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, depth: int = 0, act_fn: str = "relu", scaling: float = 1.0,
                     init_weights: bool = True) -> None:
        """Create adapter ``adapter_name`` (see the module docstring for the shapes) and initialise it.

        The modules are created in PEFT's order (``A``, encoders, decoders, ``B``) and then re-initialised in
        PEFT's order, so under one seed both libraries draw the same adapter.
        """
        out_dim = self.delta_shape[0]
        self.r[adapter_name] = r
        self.depth[adapter_name] = depth
        self.scaling[adapter_name] = scaling
        self.act_fn[adapter_name] = act_fn
        self._activation[adapter_name] = ACT2FN[act_fn]
        self.peanut_A[adapter_name] = nn.Linear(out_dim, r, bias=False)
        self.peanut_encoders[adapter_name] = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(depth))
        self.peanut_decoders[adapter_name] = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(depth))
        self.peanut_B[adapter_name] = nn.Linear(r, out_dim, bias=False)
        self._init_weights(adapter_name, init_weights)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _init_weights(self, adapter_name: str, init_weights: bool) -> None:
        """PEFT's: ``A`` and the hidden layers He-uniform (``a = √5``, ``nn.Linear``'s own rule); ``B = 0`` when
        ``init_weights`` (the identity), else He-uniform too."""
        hidden = [*self.peanut_encoders[adapter_name], *self.peanut_decoders[adapter_name]]
        for module in (self.peanut_A[adapter_name], *hidden):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.peanut_B[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.peanut_B[adapter_name].weight, a=math.sqrt(5))

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.peanut_A

    # ---- the update --------------------------------------------------------------------------
    def _hidden(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``G_depth: (n, r)``, the network's last hidden state for the columns of ``weight`` (the base weight in
        storage layout; ``n`` = :attr:`columns`), in the adapter's dtype."""
        a = self.peanut_A[adapter_name].weight
        w0 = weight.T if self.fan_in_fan_out else weight  # (out, in, *k)
        columns = w0.reshape(w0.shape[0], -1).T.to(a.dtype)  # (n, out): one row per column of W0
        sigma = self._activation[adapter_name]
        h = sigma(columns @ a.T)  # H_0: (n, r)
        skips = []
        for encoder in self.peanut_encoders[adapter_name]:
            skips.append(h)
            h = sigma(encoder(h))
        for decoder in self.peanut_decoders[adapter_name]:
            h = sigma(decoder(h)) + skips.pop()  # G_j = σ(G_{j-1} D_jᵀ) + H_{depth-j}
        return h

    def _delta_from(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW = s · B Gᵀ`` for base weight ``weight`` (storage layout), in ``delta_shape``'s layout."""
        g = self._hidden(adapter_name, weight)
        delta = self.peanut_B[adapter_name].weight @ g.T  # (out, n)
        return (delta * self.scaling[adapter_name]).reshape(self.delta_shape)

    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` of the unmerged base weight ``W0`` (kept while adapters are merged, else the current weight)."""
        weight = self._weight_before_merge
        if weight is None:
            weight = self.read_base_weight()
        else:
            weight = weight.to(self.base_layer.weight.device)
        return self._delta_from(adapter_name, weight)

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active s · (x G) Bᵀ`` (a linear layer: ``x: (..., in)``, ``ΔW`` never formed), or the base
        convolution with ``ΔW`` (``x: (batch, in, *spatial)``)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        weight = self.read_base_weight()  # not merged here (forward took the merged path otherwise): W0
        for name in self.active_adapters:
            if not self._has(name):
                continue
            b = self.peanut_B[name].weight
            h = x.to(b.dtype) if self.cast_input_dtype_enabled else x
            if self.is_conv:
                result = result + self._apply_delta(h, self._delta_from(name, weight))
                continue
            g = self._hidden(name, weight)  # (in, r)
            result = result + F.linear((h @ g) * self.scaling[name], b)
        return result.to(out_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + ΔW(W0)``, ``W0`` the weight before the first merge (kept here from now on)."""
        if self._weight_before_merge is None:
            self._weight_before_merge = weight.detach().to("cpu", copy=True)
        return weight + self.get_delta_weight(adapter_name).to(weight.device, weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight - ΔW(W0)``; the last unmerge gives ``W0`` back exactly.

        Raises:
            MergeError: no ``W0`` was kept (the adapter was marked merged without :meth:`merge`): a non-linear
                function of ``W0`` cannot be subtracted from the merged weight alone.
        """
        w0 = self._weight_before_merge
        if w0 is None:
            raise MergeError(f"Cannot unmerge PEANuT adapter {adapter_name!r}: the base weight before the merge was "
                             "not kept (ΔW is a function of it). Reload the base model instead.")
        if not self.merged_adapters:  # unmerge() popped it first: it was the last merged adapter
            self._weight_before_merge = None
            return w0.to(weight.device, weight.dtype)
        return weight - self.get_delta_weight(adapter_name).to(weight.device, weight.dtype)

    def _forget_merge_state(self, adapter_name: str) -> None:
        if not self.merged_adapters:  # a check or an export computed a merge that did not happen
            self._weight_before_merge = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._activation.pop(adapter_name, None)


def make_peanut_layer(target: nn.Module) -> PeanutLayer | None:
    """The PEANuT wrapper for ``target``, or ``None`` if PEANuT cannot adapt its type."""
    return PeanutLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return dense_supported_types(PeanutLayer.conv_types)
