"""GraLoRA layers: a ``k x k`` grid of small LoRAs over one weight (Jung et al., 2025, "GraLoRA: Granular Low-Rank
Adaptation for Parameter-Efficient Fine-Tuning", arXiv 2505.20355).

For ``W0: (out, in)``, ``k`` blocks per side and rank ``r`` (``s = r / k`` per block), cut ``x: (..., in)`` into
``x_n: (..., in/k)`` and the output into ``y_j: (..., out/k)``. Block ``(j, n)`` of the update has its own pair::

    ΔW_jn = B_jn A_jn,    A_jn: (s, in/k),  B_jn: (out/k, s)
    y_j   = (W0 x + b)_j + scaling · Σ_n B_jn A_jn dropout(x)_n,    scaling = alpha / (r + hybrid_r)

``k² · s (in/k + out/k) = r (in + out)`` values train, as many as a LoRA of rank ``r``, yet ``rank(ΔW)`` can reach
``k r`` and each input block reaches each output block through its own subspace. With ``hybrid_r > 0`` a plain
LoRA over the whole matrix is added (Hybrid GraLoRA): ``ΔW += B_h A_h``, ``A_h: (hybrid_r, in)``,
``B_h: (out, hybrid_r)``, under the same ``scaling``.

Layout (PEFT's tensor names and shapes, so files cross): the ``A_jn`` of input block ``n`` sit side by side,
``gralora_A[n] = [A_n0ᵀ | A_n1ᵀ | ... ]: (in/k, r)``, and the ``B_jn`` of output block ``j`` stacked,
``gralora_B[j] = [B_j0ᵀ ; B_j1ᵀ ; ...]: (r, out/k)``; so ``gralora_A: (k, in/k, r)``, ``gralora_B: (k, r, out/k)``.
The forward is two batched matmuls: every input block projected onto all ``r`` directions, the ``s``-wide
slice meant for output block ``j`` routed to it, then ``gralora_B[j]``. The hybrid pair is ``gralora_A_general``
/ ``gralora_B_general`` (``nn.Linear`` without bias; ``nn.Identity`` when ``hybrid_r = 0``, as PEFT).

Supported bases: ``nn.Linear`` and ``transformers``' ``Conv1D`` (``W0`` stored ``(in, out)``: ``ΔW`` is transposed
to merge), PEFT's two. The update is additive, so merging is ``W0 + ΔW`` and plain LoRA can hold it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def block_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dense ``Σ`` of every block's ``B_jn A_jn`` as one ``(out, in)`` matrix, unscaled.

    ``a: (k, in/k, r)``, ``b: (k, r, out/k)`` (the layout above). With ``r = k s``: ``A_jn[t, i] = a[n, i, j s + t]``
    and ``B_jn[o, t] = b[j, n s + t, o]``, so ``ΔW[j, o, n, i] = Σ_t b[j, n, t, o] a[n, i, j, t]``.
    """
    k, in_block, r = a.shape
    out_block = b.shape[-1]
    s = r // k
    a4 = a.reshape(k, in_block, k, s)  # [n, i, j, t]
    b4 = b.reshape(k, k, s, out_block)  # [j, n, t, o]
    return torch.einsum("nijt,jnto->joni", a4, b4).reshape(k * out_block, k * in_block)


def block_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``block_delta(a, b) @ x`` without forming it: ``x: (..., in)`` → ``(..., out)``.

    ``z_n = x_n a[n]: (..., r)`` projects input block ``n`` on all ``r`` directions; the slice ``z_n[j s:(j+1) s]``
    goes to output block ``j``, which concatenates them over ``n`` (``(..., r)``) and applies ``b[j]``.
    """
    k, in_block, r = a.shape
    lead = x.shape[:-1]
    z = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, in_block), a)  # (..., n, r)
    routed = z.reshape(*lead, k, k, r // k).transpose(-3, -2).reshape(*lead, k, r)  # (..., j, n·s)
    return torch.einsum("...jr,jro->...jo", routed, b).reshape(*lead, k * b.shape[-1])


class GraloraLayer(AdapterLayer):
    """GraLoRA on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        gralora_A, gralora_B: Per adapter, the blocks' factors ``(k, in/k, r)`` and ``(k, r, out/k)``.
        gralora_A_general, gralora_B_general: Per adapter, the hybrid LoRA (``nn.Linear(in, hybrid_r)``,
            ``nn.Linear(hybrid_r, out)``, no bias), or ``nn.Identity`` when ``hybrid_r = 0``.
        r, hybrid_r, alpha, gralora_k, scaling: Per adapter; ``scaling = alpha / (r + hybrid_r)``.
        gralora_dropout: Per adapter, dropout on the adapter's input (``nn.Identity`` at 0).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")
    other_param_names = ("r", "hybrid_r", "alpha", "scaling", "gralora_dropout", "gralora_k")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.gralora_A = nn.ParameterDict()
        self.gralora_B = nn.ParameterDict()
        self.gralora_A_general = nn.ModuleDict()
        self.gralora_B_general = nn.ModuleDict()
        self.gralora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.hybrid_r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.gralora_k: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """The update is additive (``W' = W + ΔW``), so LoRA can hold it (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, alpha: float = 64, gralora_k: int = 2, hybrid_r: int = 0,
                     gralora_dropout: float = 0.0, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name`` and initialise it (PEFT's checks and sentences, then the fix).

        Raises:
            ConfigError: ``r <= 0``, ``hybrid_r < 0``, or ``gralora_k`` not dividing the layer's sizes.
        """
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if hybrid_r < 0:
            raise ConfigError(f"`hybrid_r` should be a non-negative integer value but the value passed is {hybrid_r}")
        for side, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % gralora_k != 0:
                raise ConfigError(f"{side} should be divisible by gralora_k, but got {size} and {gralora_k}; pick "
                                  "a gralora_k that divides every adapted layer's sizes, or exclude this layer")
        k = gralora_k
        self.r[adapter_name], self.hybrid_r[adapter_name] = r, hybrid_r
        self.alpha[adapter_name], self.gralora_k[adapter_name] = alpha, k
        self.scaling[adapter_name] = alpha / (r + hybrid_r)
        self.gralora_dropout[adapter_name] = nn.Dropout(p=gralora_dropout) if gralora_dropout > 0 else nn.Identity()
        in_block, out_block = self.in_features // k, self.out_features // k
        self.gralora_A[adapter_name] = nn.Parameter(torch.empty(k, in_block, r))
        self.gralora_B[adapter_name] = nn.Parameter(torch.empty(k, r, out_block))
        if hybrid_r > 0:
            self.gralora_A_general[adapter_name] = nn.Linear(self.in_features, hybrid_r, bias=False)
            self.gralora_B_general[adapter_name] = nn.Linear(hybrid_r, self.out_features, bias=False)
        else:
            self.gralora_A_general[adapter_name] = nn.Identity()
            self.gralora_B_general[adapter_name] = nn.Identity()
        self._init_weights(adapter_name, init_weights)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    @torch.no_grad()
    def _init_weights(self, adapter_name: str, init_weights: bool) -> None:
        """PEFT's distributions: He-uniform (``a = √5``, bound ``1 / √fan_in``) for every ``A`` (each block's
        ``A_jn`` has ``fan_in = in/k``, the hybrid ``A_h`` ``fan_in = in``); ``B = 0`` (the identity) unless
        ``init_weights`` is ``False``, then He-uniform too (``fan_in = r``, resp. ``hybrid_r``)."""
        k, r = self.gralora_k[adapter_name], self.r[adapter_name]
        bound_a = 1 / math.sqrt(self.in_features // k)
        self.gralora_A[adapter_name].uniform_(-bound_a, bound_a)
        hybrid = self.hybrid_r[adapter_name] > 0
        if hybrid:
            nn.init.kaiming_uniform_(self.gralora_A_general[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            self.gralora_B[adapter_name].zero_()
            if hybrid:
                nn.init.zeros_(self.gralora_B_general[adapter_name].weight)
        else:
            bound_b = 1 / math.sqrt(r)
            self.gralora_B[adapter_name].uniform_(-bound_b, bound_b)
            if hybrid:
                nn.init.kaiming_uniform_(self.gralora_B_general[adapter_name].weight, a=math.sqrt(5))

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active scaling · (block_apply(h) + B_h A_h h)``, ``h = dropout(x)``; ``x: (..., in)``.

        One dropout draw feeds both the blocks and the hybrid pair (PEFT draws twice)."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.gralora_A:
                continue
            a, b = self.gralora_A[name], self.gralora_B[name]
            h = self.gralora_dropout[name](x.to(a.dtype) if self.cast_input_dtype_enabled else x)
            update = block_apply(h, a, b)
            if self.hybrid_r[name] > 0:
                update = update + self.gralora_B_general[name](self.gralora_A_general[name](h))
            result = result + (self.scaling[name] * update).to(out_dtype)
        return result

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · (block_delta + B_h A_h)`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = block_delta(self.gralora_A[adapter_name], self.gralora_B[adapter_name])
        if self.hybrid_r[adapter_name] > 0:
            delta = delta + self.gralora_B_general[adapter_name].weight @ self.gralora_A_general[adapter_name].weight
        delta = delta * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_gralora_layer(target: nn.Module) -> GraloraLayer | None:
    """The GraLoRA wrapper for ``target``, or ``None`` if GraLoRA cannot adapt its type."""
    return GraloraLayer(target) if isinstance(target, supported_types()) else None
