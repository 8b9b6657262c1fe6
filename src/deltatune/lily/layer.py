"""Lily layers: a low-rank update whose down-projection ``A`` is shared by neighbouring layers and whose
up-projection is a routed mix of experts shared by every layer of a target.

Zhong et al., 2024, "Low-Rank Interconnected Adaptation across Layers" (arXiv:2407.09946), as PEFT 0.21.2
computes it. For ``x: (..., in)`` and one adapter::

    h = A x                                   A: (r, in)            h: (..., r)
    p = mean over every token of the batch of softmax(R h)      R: (E, r)     p: (E,)
    B̄ = Σ_e p_e B_e                           B_e: (r, out)         B̄: (r, out)
    y = W x + b + s · h B̄

``E = num_B`` experts are stored stacked as ``lily_B.<adapter>.weight: (E · r, out)`` (PEFT's
``nn.Linear(out, E · r)``), read as ``(E, r, out)``. The router averages over the whole batch the layer sees, so
rows of one batch are coupled (as in PEFT): ``p`` depends on the other rows. ``B̄`` changes with the input, so
the update is no fixed ``ΔW``: Lily cannot be merged.

Sharing (made by :func:`share_across_layers` once every target is wrapped): within one target, layers ``i`` with
the same ``i // stride_A`` hold the very same ``lily_A`` module, and all hold the first layer's ``lily_B``;
``lily_router`` is each layer's own. Files still list each layer's tensors (PEFT's layout, copies of the shared
ones), and loading writes each copy into the one shared tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class LilyLayer(AdapterLayer):
    """Lily on ``nn.Linear`` (PEFT's) or ``transformers``' ``Conv1D`` (its ``(in, out)`` weight is only read
    by the base layer: the adapter sees features).

    Attributes:
        lily_A: ``adapter -> nn.Linear(in, r)``: weight ``A: (r, in)``; shared by ``stride_A`` neighbours.
        lily_B: ``adapter -> nn.Linear(out, num_B · r)``: weight ``(num_B · r, out)``, the stacked experts;
            shared by every layer of the target.
        lily_router: ``adapter -> nn.Linear(r, num_B)``: weight ``R: (num_B, r)``, this layer's own.
        r, scaling, stride_A, num_B: ``adapter -> value`` (the config's).
    """

    adapter_layer_names = ("lily_A", "lily_B", "lily_router")
    other_param_names = ("r", "scaling", "stride_A", "num_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lily_A = nn.ModuleDict()
        self.lily_B = nn.ModuleDict()
        self.lily_router = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.stride_A: dict[str, int] = {}
        self.num_B: dict[str, int] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, scaling: float = 1.0, stride_A: int = 1, num_B: int = 2,
                     init_weights: bool = True) -> None:
        """Create this layer's own ``A``, experts and router for ``adapter_name`` (sharing comes after).

        Init (PEFT's): ``A`` and ``R`` Kaiming-uniform (``a = √5``, ``nn.Linear``'s default); the experts zero
        (``init_weights``: the update starts at zero) or Kaiming-uniform too.
        """
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.stride_A[adapter_name] = stride_A
        self.num_B[adapter_name] = num_B
        self.lily_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lily_B[adapter_name] = nn.Linear(self.out_features, num_B * r, bias=False)
        self.lily_router[adapter_name] = nn.Linear(r, num_B, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lily_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lily_router[adapter_name].weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(self.lily_B[adapter_name].weight)
            else:
                nn.init.kaiming_uniform_(self.lily_B[adapter_name].weight, a=math.sqrt(5))
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def routing(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``p: (num_B,)``: the router's softmax over the experts, averaged over every token of ``h: (..., r)``."""
        logits = F.linear(h, self.lily_router[adapter_name].weight)  # (..., num_B)
        return F.softmax(logits, dim=-1).reshape(-1, self.num_B[adapter_name]).mean(dim=0)

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · h B̄: (..., out)`` for ``x: (..., in)``, routed over all of ``x`` (in the adapter's dtype)."""
        a = self.lily_A[adapter_name].weight
        stacked = self.lily_B[adapter_name].weight  # (num_B · r, out)
        x = x.to(a.dtype) if self.cast_input_dtype_enabled else x
        h = F.linear(x, a)  # (..., r)
        experts = stacked.reshape(self.num_B[adapter_name], -1, stacked.shape[1])  # (num_B, r, out)
        combined = torch.einsum("e,eio->io", self.routing(adapter_name, h), experts)  # (r, out)
        return torch.matmul(h, combined) * self.scaling[adapter_name]

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active s · h B̄``; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.lily_A:
                result = result + self.delta(name, x).to(result.dtype)
        return result

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Mixed-adapter batch: each row gets its adapter's update, with that adapter's router averaged over the
        whole batch (not only its own rows), as a single-adapter run of this batch routes. So a row equals the
        single-adapter run wherever this layer's input does not depend on which adapters earlier layers ran."""
        names = self._row_names(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(names):
            if name not in self.lily_A:  # "__base__", or an adapter this layer does not hold
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            update = self.delta(name, x).index_select(0, rows).to(result.dtype)
            result = result.index_add(0, rows, update)
        return result

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Refused: ``B̄`` depends on the batch, so no fixed ``ΔW`` exists (PEFT's sentence first)."""
        raise MergeError("This method is not supported for Lily. (Its router mixes the experts per batch, so the "
                         "update is no fixed weight change; keep the adapter unmerged.)")


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def _target_of(key: str, target_modules: set[str] | str | None) -> str | None:
    """The target ``key`` was matched by: a regex string is one target; of a set of names, the longest one
    ``key`` ends with (PEFT takes the last match in set order; the two agree unless names overlap)."""
    if isinstance(target_modules, str):
        return target_modules
    matches = [t for t in (target_modules or ()) if key.endswith(t)]
    return max(matches, key=len) if matches else None


def share_across_layers(model: nn.Module, adapter_name: str, target_modules: set[str] | str | None,
                        stride_A: int) -> None:
    """Make ``adapter_name``'s layers of one target share tensors, as PEFT's ``_post_injection_hook``.

    Layers are grouped by (target, base weight shape) in ``model.named_modules()`` order; in a group, layer ``i``
    takes the ``lily_A`` of layer ``(i // stride_A) · stride_A`` and every layer the first layer's ``lily_B``.
    The modules themselves are shared, so one parameter trains for them all (and ``named_parameters`` lists it
    once).
    """
    groups: dict[tuple[str, torch.Size], list[LilyLayer]] = {}
    for key, module in model.named_modules():
        if not isinstance(module, LilyLayer) or adapter_name not in module.lily_A:
            continue
        target = _target_of(key, target_modules)
        if target is not None:
            groups.setdefault((target, module.get_base_layer().weight.shape), []).append(module)
    for layers in groups.values():
        for i, layer in enumerate(layers):
            if i:
                layer.lily_B[adapter_name] = layers[0].lily_B[adapter_name]
            leader = (i // stride_A) * stride_A
            if i != leader:
                layer.lily_A[adapter_name] = layers[leader].lily_A[adapter_name]
