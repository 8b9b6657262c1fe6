"""MiSS layers: matrix shard sharing (Kang & Yin, 2024, https://arxiv.org/abs/2409.15371; PEFT's ``miss``).

For ``W: (out, in)``, ``x: (..., in)`` and a shard width ``r`` (``1 <= r <= in``) the input dimension is cut
into ``ceil(in / r)`` shards of width ``r`` (the last one zero-padded), and one trainable block is shared by all
of them. Three variants, picked by ``init_weights`` (PEFT's names; the block is PEFT's ``miss_block``):

- balance (``True``; ``False``: the block drawn He-uniform instead of zeros)::

      D: (r, out),   ΔW[o, i] = D[i mod r, o]
      y = W x + b + (Σ_k x_k) D,      x_k = x[k r : (k + 1) r]  (zero-padded): (..., r)

  so the adapter costs one sum over shards and an ``(r, out)`` product, and merging adds ``ΔW``.
- ``"mini"``: a narrower block ``D: (r, mini_r)`` repeated ``out / mini_r`` times along ``out``
  (``D_full[j, o] = D[j, o mod mini_r]``), then as balance.
- ``"bat"`` (needs ``r | in`` and ``r | out``): ``D: (out / r, r, r)``, one ``r×r`` matrix per block row ``a``;
  each ``r×r`` block ``W_ac`` of ``W`` becomes::

      W'_ac = W_ac + W_ac D_a + D_a = W_ac (I + D_a) + D_a

  The update depends on ``W``, so the forward builds ``W'`` and runs ``F.linear(x, W', b)``; unmerging inverts
  it exactly, ``W_ac = (W'_ac - D_a)(I + D_a)⁻¹``. Several active adapters apply in turn, each to the weight the
  previous ones left (as merging them one after the other does).

Every variant starts as the identity except ``init_weights=False``. ``miss_dropout`` drops entries of the balance
and mini input ``x``. GPT-2's ``Conv1D`` (``W`` stored as ``(in, out)``) is adapted too, in the ``(out, in)``
layout above, transposed only to merge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class MissLayer(AdapterLayer):
    """MiSS on ``nn.Linear`` (and quantised linears) and ``transformers``' ``Conv1D``.

    Attributes:
        miss_block: Per adapter, the shared block: ``(r, out)`` balance, ``(r, mini_r)`` mini,
            ``(out / r, r, r)`` bat.
        miss_r, miss_mini_r: Per adapter, the shard width and the mini block's width.
        miss_dropout: Per adapter, dropout on the input (``nn.Identity`` when 0).
        miss_variant: Per adapter, ``"balance"``, ``"mini"`` or ``"bat"``. (PEFT keeps one variant per layer,
            the first adapter's; here each adapter keeps its own.)
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (``Conv1D``).
    """

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_dropout", "miss_mini_r", "miss_variant")
    peft_class_name = "MissLinear"  # PEFT prints its layer as "miss.MissLinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_variant: dict[str, str] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """As PEFT: MiSS's update is a dense ``ΔW`` of the current base weight (``get_delta_weight``)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, mini_r: int = 1, miss_dropout: float = 0.0,
                     init_weights: bool | str = True) -> None:
        """Create adapter ``adapter_name`` of shard width ``r`` in the variant ``init_weights`` names.

        Raises:
            ConfigError: ``r`` is not in ``[1, in_features]``; ``"bat"`` with ``in`` or ``out`` not divisible
                by ``r``; ``"mini"`` with ``out`` not divisible by ``mini_r`` (PEFT's sentences first).
        """
        out_features, in_features = self.out_features, self.in_features
        if r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {r}")
        if r > in_features:
            raise ConfigError(f"`r` ({r}) must be less than or equal to in_features ({in_features}). The shards "
                              "are cut along the input dimension: choose a smaller r")
        variant = init_weights if isinstance(init_weights, str) else "balance"
        if variant == "bat":
            if in_features % r or out_features % r:
                raise ConfigError(f"The weight matrix must be fully divisible into [r, r] blocks. Got r={r} for a "
                                  f"({out_features}, {in_features}) weight: choose an r dividing both")
            block = torch.zeros(out_features // r, r, r)
        elif variant == "mini":
            if mini_r <= 0 or out_features % mini_r:
                # PEFT's text, its missing spaces and un-interpolated braces included (code may match on it)
                raise ConfigError(
                    "mini_r is divided along the out_features dimension. For optimal performance and implementation "
                    "simplicity,it is recommended that out_features be divisible by mini_r.Error: "
                    "{self.out_features} % mini_r != 0 "
                    f"(here out_features={out_features}, mini_r={mini_r}: choose a positive divisor of {out_features})"
                )
            block = torch.zeros(r, mini_r)
        elif variant == "balance":
            block = torch.zeros(r, out_features)
            if init_weights is False:  # a random start, for tests (PEFT's)
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        else:
            raise ConfigError(f"MiSS init_weights must be True, False, 'bat' or 'mini', got {init_weights!r}")
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_variant[adapter_name] = variant
        self.miss_dropout[adapter_name] = nn.Dropout(p=miss_dropout) if miss_dropout > 0 else nn.Identity()
        self.miss_block[adapter_name] = nn.Parameter(block)
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the update --------------------------------------------------------------------------
    def shared_block(self, adapter_name: str) -> torch.Tensor:
        """The balance/mini block over the full output width, ``D: (r, out)`` (mini's repeated ``out / mini_r``
        times)."""
        block = self.miss_block[adapter_name]
        if self.miss_variant[adapter_name] == "mini":
            block = block.repeat(1, self.out_features // self.miss_mini_r[adapter_name])
        return block

    def _shared_delta(self, adapter_name: str) -> torch.Tensor:
        """Balance/mini ``ΔW: (out, in)``, ``ΔW[o, i] = D[i mod r, o]``: ``Dᵀ`` tiled along ``in``, cut at ``in``."""
        d = self.shared_block(adapter_name)
        tiles = -(-self.in_features // d.shape[0])
        return d.T.repeat(1, tiles)[:, : self.in_features]

    def _bat_weight(self, weight: torch.Tensor, adapter_name: str, reverse: bool = False) -> torch.Tensor:
        """Bat on a dense ``W: (out, in)``: ``W_ac (I + D_a) + D_a`` per ``r×r`` block, or its inverse
        ``(W_ac - D_a)(I + D_a)⁻¹`` when ``reverse``."""
        d = self.miss_block[adapter_name].to(weight.dtype)
        r = d.shape[-1]
        out_features, in_features = weight.shape
        blocks = weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)  # (a, c, r, r): W_ac
        d = d.unsqueeze(1)  # (a, 1, r, r): D_a, shared by every block of row a
        if reverse:  # X (I + D) = W' - D, solved for X (exact up to rounding, no explicit inverse)
            eye = torch.eye(r, dtype=d.dtype, device=d.device)
            blocks = torch.linalg.solve(eye + d, blocks - d, left=False)
        else:
            blocks = blocks + blocks @ d + d
        return blocks.transpose(1, 2).reshape(out_features, in_features)

    def _dense_merged(self, weight: torch.Tensor, adapter_name: str, reverse: bool = False) -> torch.Tensor:
        """``W: (out, in)`` with the adapter folded in (or out, when ``reverse``), in ``weight``'s dtype."""
        if self.miss_variant[adapter_name] == "bat":
            return self._bat_weight(weight, adapter_name, reverse)
        delta = self._shared_delta(adapter_name).to(weight.dtype)
        return weight - delta if reverse else weight + delta

    # ---- forward -----------------------------------------------------------------------------
    def _dense_base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.read_base_weight().to(dtype)
        return weight.T if self.fan_in_fan_out else weight

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n for n in self.active_adapters if n in self.miss_block]
        if any(self.miss_variant[n] == "bat" for n in names):
            return self._forward_dense(x, names)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            d = self.shared_block(name)  # (r, out)
            h = x.to(d.dtype) if self.cast_input_dtype_enabled else x
            h = self.miss_dropout[name](h)
            r = d.shape[0]
            pad = -h.shape[-1] % r
            if pad:  # the last shard is zero-padded to width r
                h = F.pad(h, (0, pad))
            shard_sum = h.reshape(*h.shape[:-1], -1, r).sum(dim=-2)  # Σ_k x_k: (..., r)
            result = result + shard_sum @ d
        return result.to(x.dtype)

    def _forward_dense(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``F.linear(x, W', b)`` with ``W'`` the base weight after each adapter of ``names`` in turn (a bat adapter
        is active: its update depends on ``W``). Balance/mini adapters then fold in without input dropout."""
        block_dtype = self.miss_block[names[0]].dtype
        weight = self._dense_base_weight(block_dtype)
        for name in names:
            weight = self._dense_merged(weight, name)
        bias = getattr(self.base_layer, "bias", None)
        result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return result.to(x.dtype)

    # ---- merging -----------------------------------------------------------------------------
    def _in_storage(self, dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (dense.T if self.fan_in_fan_out else dense).to(like.dtype)

    def _compute_dtype(self, adapter_name: str) -> torch.dtype:
        # half-precision blocks merge in fp32 (CPUs are slow and lossy at fp16/bf16 matmuls; PEFT does the same)
        dtype = self.miss_block[adapter_name].dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dense = weight.to(self._compute_dtype(adapter_name))
        dense = dense.T if self.fan_in_fan_out else dense
        return self._in_storage(self._dense_merged(dense, adapter_name), weight)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dense = weight.to(self._compute_dtype(adapter_name))
        dense = dense.T if self.fan_in_fan_out else dense
        return self._in_storage(self._dense_merged(dense, adapter_name, reverse=True), weight)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` shaped like ``base_layer.weight``: balance/mini's own; bat's for the current base weight
        (``W' - W``)."""
        if self.miss_variant[adapter_name] != "bat":
            delta = self._shared_delta(adapter_name)
            return delta.T if self.fan_in_fan_out else delta
        weight = self.read_base_weight()
        return self.merged_weight(weight, adapter_name).to(torch.float32) - weight.to(torch.float32)


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def make_miss_layer(target: nn.Module) -> MissLayer | None:
    """The MiSS wrapper for ``target``, or ``None`` if MiSS cannot adapt its type."""
    return MissLayer(target) if isinstance(target, supported_types()) else None
