"""AdaLoRA layers: an SVD-shaped update ``ΔW = P Λ Q`` beside a frozen layer.

Tensor names are PEFT's, so state-dict keys and files line up: ``lora_B = P: (out, r)`` (left singular
vectors), ``lora_E = Λ: (r, 1)`` (singular values), ``lora_A = Q: (r, in)`` (right singular vectors) and the
frozen ``ranknum`` (the starting rank ``init_r``, never saved). With ``x: (..., in)``::

    y = base(x) + s / (ranknum + 1e-5) · ((dropout(x) Qᵀ ⊙ Λᵀ) Pᵀ),    s = lora_alpha

Masking a triplet sets its ``Λ_i`` to 0, which removes ``P[:, i] Λ_i Q[i]`` from ``ΔW``; ``ranknum`` stays
``init_r`` so the scaling does not change when triplets are masked or sliced away at save time.
On ``nn.Conv2d`` ``Q: (r, in · kh · kw)`` and ``ΔW`` is reshaped to the kernel ``(out, in, kh, kw)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer, peft_layer_type
from deltatune.errors import ConfigError
from deltatune.quantization import dense_weight_shape

if TYPE_CHECKING:
    from deltatune.adalora.allocator import RankAllocator

EPS = 1e-5  # PEFT divides by ranknum + 1e-5; kept so outputs match PEFT's to the last bit we can


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:
        return None


def supported_types() -> tuple[type, ...]:
    conv1d = _conv1d_type()
    return (nn.Linear, nn.Conv2d) + ((conv1d,) if conv1d is not None else ())


class AdaLoraLayer(AdapterLayer):
    """AdaLoRA on ``nn.Linear``, ``transformers``' ``Conv1D`` (``W: (in, out)``) or ``nn.Conv2d`` (groups=1).

    Attributes:
        lora_A, lora_B, lora_E: Per adapter ``Q: (r, in)``, ``P: (out, r)``, ``Λ: (r, 1)`` (trainable).
        ranknum: Per adapter, a frozen ``(1,)`` tensor holding ``init_r``.
        scaling: Per adapter ``lora_alpha`` (``init_r`` if ``lora_alpha <= 0``), divided by ``ranknum``.
        allocator: Per trainable adapter, the :class:`RankAllocator` that schedules its masking.
        init_r, slots: Per adapter, the starting rank and which of those ``init_r`` triplets this layer holds
            (all of them, unless it was loaded pruned); rank patterns always have ``init_r`` entries.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum", "allocator", "init_r", "slots")

    def _get_name(self) -> str:
        """PEFT's class names: ``adalora.SVDLinear``, ``adalora.SVDConv2d``, ``adalora.SVDLinear4bit``, ..."""
        return "adalora.SVD" + peft_layer_type(self.get_base_layer())

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        conv1d = _conv1d_type()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        weight = base_layer.weight
        shape = dense_weight_shape(base_layer)  # (out, in) for bitsandbytes layers, whose weight is packed
        if self.is_conv:
            if base_layer.groups != 1:
                raise ConfigError(f"AdaLoRA supports Conv2d with groups=1 only, got groups={base_layer.groups}")
            self.out_features, self.in_features = weight.shape[0], weight[0].numel()
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = shape
        else:
            self.out_features, self.in_features = shape
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.allocator: dict[str, RankAllocator] = {}
        self.init_r: dict[str, int] = {}
        self.slots: dict[str, list[int]] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, init_r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool = True, allocator: RankAllocator | None = None,
                     keep: list[bool] | None = None) -> None:
        """Create adapter ``adapter_name`` with ``init_r`` triplets, or only those ``keep`` marks (a saved,
        pruned adapter: ``keep`` is its ``rank_pattern`` entry, ``init_r`` booleans).

        Init (PEFT's): ``Λ = 0`` and ``P, Q ~ N(0, 0.02²)``, so the adapted layer starts equal to the base;
        ``init_lora_weights=False`` leaves all three ``N(0, 1)`` (for tests).
        """
        if keep is not None and len(keep) != init_r:
            raise ConfigError(f"rank_pattern entry has {len(keep)} flags but init_r={init_r}: the adapter_config.json "
                              "does not belong to these tensors")
        slots = list(range(init_r)) if keep is None else [i for i, k in enumerate(keep) if k]
        r = len(slots)
        self.init_r[adapter_name] = init_r
        self.slots[adapter_name] = slots
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(init_r)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Same draws, same order as PEFT, so a seed gives the same starting adapter in both libraries.
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        torch.randn(1)  # PEFT draws ranknum from randn before filling it
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self._place_adapter(adapter_name)
        weight = self.base_layer.weight
        self.ranknum[adapter_name] = nn.Parameter(
            torch.full((1,), float(init_r), device=weight.device, dtype=self.lora_A[adapter_name].dtype),
            requires_grad=False,
        )
        if allocator is not None:
            self.allocator[adapter_name] = allocator
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- rank patterns (always in init_r coordinates) ---------------------------------------
    def full_pattern(self, adapter_name: str, kept: list[bool]) -> list[bool]:
        """``init_r`` flags from one flag per triplet held (triplets not held are off)."""
        out = [False] * self.init_r[adapter_name]
        for slot, k in zip(self.slots[adapter_name], kept, strict=True):
            out[slot] = bool(k)
        return out

    def held_pattern(self, adapter_name: str, full: list[bool]) -> list[bool] | None:
        """One flag per triplet held, from ``init_r`` flags (``None`` if ``full`` has the wrong length)."""
        if len(full) != self.init_r[adapter_name]:
            return None
        return [bool(full[slot]) for slot in self.slots[adapter_name]]

    # ---- the math ----------------------------------------------------------------------------
    def _denominator(self, adapter_name: str) -> torch.Tensor:
        """``ranknum + 1e-5`` as a ``(1,)`` tensor; outputs are ``(...) * s / this`` (PEFT's order)."""
        return self.ranknum[adapter_name] + EPS

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s / (ranknum + ε) · P (Q ⊙ Λ)``, shaped like ``base_layer.weight``."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = b @ (a * e) * self.scaling[adapter_name] / self._denominator(adapter_name)  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.reshape(dense_weight_shape(self.base_layer))

    def _adapter_out(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's own output for ``x`` (``(..., out)``, or ``(N, out, H', W')`` on a conv)."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        if self.is_conv:
            base = self.base_layer
            kernel = (b @ (a * e) * self.scaling[adapter_name] / self._denominator(adapter_name)).reshape(
                base.weight.shape)
            return F.conv2d(x, kernel.to(x.dtype), stride=base.stride, padding=base.padding,
                            dilation=base.dilation, groups=base.groups)
        # (..., in) -> (..., r) -> (..., out); ΔW itself is never formed
        return (x @ (a * e).T @ b.T) * self.scaling[adapter_name] / self._denominator(adapter_name)

    def forward_adapters(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``W x + Σ s / (ranknum + ε) · P (Λ ⊙ Q x)`` over the active adapters (``x: (..., in)``)."""
        result = self.base_layer(x, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            for name in self.active_adapters:
                if name in self.allocator:
                    self.allocator[name].note_training_forward(self)
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self._adapter_out(x, name).to(result.dtype)
        return result

    def _forward_rows(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each batch row through its own adapter (``row_adapters``, ``"__base__"`` for none): the base output
        plus, for each adapter present, its update on its rows (``index_add``)."""
        result = self.base_layer(x, *args, **kwargs)
        rows = self._row_names(x.shape[0])
        for name in sorted(set(rows)):
            if name not in self.lora_A:
                continue
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            result = result.index_add(0, index, self._adapter_out(x[index], name).to(result.dtype))
        return result

    def _place_adapter(self, adapter_name: str) -> None:
        """On the base weight's device; fp32 over a half-precision base (as LoRA and PEFT do)."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            item = container[adapter_name]
            container[adapter_name] = nn.Parameter(item.data.to(weight.device, dtype), requires_grad=item.requires_grad)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}" for n in self.r)


def make_adalora_layer(target: nn.Module) -> AdaLoraLayer | None:
    """Wrap ``target`` if AdaLoRA supports its type, else ``None``."""
    if isinstance(target, supported_types()):
        return AdaLoraLayer(target)
    return None
