"""SHiRA layers: a sparse update at fixed positions of the base weight (Bhardwaj et al., 2024, "Sparse High Rank
Adapters").

For ``W: (out, in)``, ``K = r · (out + in)`` positions ``shira_indices: (2, K)`` (rows, columns; fixed, from the
mask) and trained values ``shira_weight: (K,)``::

    ΔW[i_k, j_k] = s · w_k  (k = 1..K),  ΔW = 0 elsewhere,   y = (W + ΔW) x + b,   x: (..., in),  y: (..., out)

``s`` is the per-adapter ``scaling`` (1; PEFT's ``set_scale`` changes it at inference). ``ΔW`` is sparse but its
rank is not bounded by ``r``. The values start at zero, so a fresh adapter is the identity; merging adds ``ΔW``.
Tensor names are PEFT's: ``shira_weight`` (trained) and ``shira_indices`` (int32 buffers, written to the file
beside the values, so a custom mask crosses too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.buffers import BufferDict
from deltatune.core.delta_layer import DeltaWeightLayer, dense_supported_types
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError
from deltatune.shira.mask_functions import num_shira_weights


class ShiraLayer(DeltaWeightLayer):
    """SHiRA on ``nn.Linear`` (PEFT's support) and ``transformers``' ``Conv1D`` (``W`` stored as ``(in, out)``).

    Attributes:
        shira_weight: ``adapter -> w: (K,)``, the trained values.
        shira_indices: ``adapter -> (2, K)`` int32 positions (rows, columns) in ``(out, in)``.
        r: ``adapter -> r`` (sets ``K = r · (out + in)``).
        scaling: ``adapter -> s``.
    """

    adapter_layer_names = ("shira_weight",)
    other_param_names = ("r", "scaling", "shira_indices")
    conv_types = ()  # linear layers only: the positions index a 2-D weight

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = BufferDict()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``False``, as PEFT says: a sparse ``ΔW`` is generally of high rank, which a LoRA cannot hold."""
        return False

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, indices: torch.Tensor | None, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name``: ``K = r · (out + in)`` values at ``indices: (2, K)``.

        Args:
            r: Sets ``K``.
            indices: The positions (rows, columns) of ``(out, in)``; ``None`` (no mask function: a loaded
                adapter's come from its file) leaves zeros for the file to overwrite.
            init_weights: Values start at zero (identity) if ``True``, else ``N(0, 1)`` (tests).

        Raises:
            ConfigError: ``r <= 0``, ``K > out · in``, or ``indices`` not ``K`` positions (PEFT's sentences
                first).
        """
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        count = num_shira_weights(self.out_features, self.in_features, r)
        total = self.out_features * self.in_features
        if count > total:
            largest = total // (self.out_features + self.in_features)
            raise ConfigError(
                f"The set rank {r} results in more shira params than the total number of params in the base layer "
                f"{total} and this is not allowed. SHiRA trains r · (out + in) = {count} values of this "
                f"{self.out_features}x{self.in_features} layer: use r <= {largest}"
            )
        if indices is None:
            indices = torch.zeros(2, count, dtype=torch.int32)
        if indices.shape != (2, count):
            raise ConfigError(
                f"The SHiRA indices and weights are not the same dimensions for adapter {adapter_name} in layer "
                f"{self.base_layer}: the mask has {indices.shape[-1]} ones, r={r} needs r · (out + in) = {count}"
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = 1.0  # PEFT's: any non-negative value at inference (set_scale)
        values = torch.zeros(count) if init_weights else torch.randn(count)
        self.shira_weight[adapter_name] = nn.Parameter(values)
        self.shira_indices[adapter_name] = indices.to(device=self.base_layer.weight.device, dtype=torch.int32)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_shira_parameters(self, adapter_name: str) -> None:
        """Values back to zero (PEFT's name)."""
        nn.init.zeros_(self.shira_weight[adapter_name])

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set ``s`` for ``adapter`` (ignored for adapters this layer does not hold), as PEFT's."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    def _has(self, adapter_name: str) -> bool:
        return adapter_name in self.shira_weight

    # ---- the update --------------------------------------------------------------------------
    def _delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW: (out, in)`` with ``s · w`` at the positions (differentiable in ``w``)."""
        values = self.shira_weight[adapter_name]
        rows, cols = self.shira_indices[adapter_name].to(values.device).long()
        delta = values.new_zeros(self.delta_shape)
        # accumulate: repeated positions (a custom mask cannot have them; a file could) add, as PEFT's sparse sum
        return delta.index_put((rows, cols), values * self.scaling[adapter_name], accumulate=True)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = (W + Σ ΔW) x + b`` over the active adapters, one matmul with the updated weight (PEFT's way, so
        logits agree). Over a quantised base, or a base with hooks (the fused path would skip them), the base runs
        itself: ``y = base(x) + Σ ΔW x``; so does another method's layer below this one in a ``PeftMixedModel``
        chain (its ``weight`` is the original one: the fused path would drop that method's update)."""
        names = [n for n in self.active_adapters if self._has(n)]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        if self.quantized or isinstance(base, AdapterLayer) or base._forward_hooks or base._forward_pre_hooks:
            result = base(x, *args, **kwargs)
            for name in names:
                delta = self._delta_weight(name)
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
            return result
        weight = base.weight.T if self.fan_in_fan_out else base.weight  # (out, in)
        for name in names:
            weight = weight + self._delta_weight(name).to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, base.bias)


def make_shira_layer(target: nn.Module) -> ShiraLayer | None:
    """The SHiRA wrapper for ``target``, or ``None`` if SHiRA cannot adapt its type."""
    return ShiraLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return dense_supported_types(ShiraLayer.conv_types)
