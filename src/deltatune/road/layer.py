"""RoAd layers: pairs of a layer's output features turned and scaled by learned 2x2 matrices (Liao et al., 2024).

For a base layer ``h = W x + b`` with ``W: (out, in)``, ``x: (..., in)``, ``h: (..., out)``, and ``g =
group_size`` (even, dividing ``out``): the output is cut into ``out/g`` groups, and in each group feature ``i``
is paired with feature ``i + g/2`` (``i < g/2``). Each output feature ``j`` has two coefficients ``a_j, s_j``
and the adapter computes, pair by pair (``u = h_i``, ``v = h_{i+g/2}``)::

    z_i       = a_i u       − s_i v              [z_i      ]   [a_i       −s_i    ] [u]
    z_{i+g/2} = s_{i+g/2} u + a_{i+g/2} v,  i.e. [z_{i+g/2}] = [s_{i+g/2}  a_{i+g/2}] [v]

which is ``z = h ⊙ a + rot(h) ⊙ s`` with ``rot(h) = (−h_{g/2:g}, h_{0:g/2})`` in every group: two elementwise
products of the output, no matmul. As a matrix, ``z = R h`` with ``R: (out, out)`` made of these 2x2 blocks.
The coefficients come from angles ``θ = road_theta`` and scales ``α = road_alpha`` (PEFT's tensor names):

- ``road_1``: ``θ, α: (out/2,)``, one per pair (group ``k``'s ``g/2`` entries serve both halves):
  ``a = α cos θ`` and ``s = α sin θ`` on both rows of a pair (a scaled rotation);
- ``road_2``: ``θ, α: (out,)``, one per feature: ``a_j = α_j cos θ_j``, ``s_j = α_j sin θ_j``;
- ``road_4``: ``θ, α: (2·out,)``, per group ``k`` laid out ``(2, g)``: ``a = α[k, 0] cos θ[k, 0]`` and
  ``s = α[k, 1] sin θ[k, 1]``.

Several active adapters apply in turn, ``z = R_2 R_1 h``. Merging uses ``R (W x + b) = (R W) x + R b``: the
weight's output rows and the bias get the same pair transform, ``W' = R W``, ``b' = R b``. Unmerging applies
``R⁻¹``, which is also pairwise: a 2x2 block ``[[p, −q], [r, t]]`` has inverse ``[[t, q], [−r, p]] / (p t + q r)``.
Where a determinant is zero (``α = 0``) ``R`` cannot be inverted (PEFT's unmerge fails there): the pre-merge weight
and bias are kept and restored instead. Init (PEFT's): ``θ = 0``, ``α = 1`` (``R = I``); ``init_weights=False``:
``θ ~ N(0, 0.5²)``, ``α ~ N(1, 0.5²)``. The coefficients are computed in the adapter's dtype (fp32 over a
half-precision base, as PEFT) and the output is cast back.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None

# Trainable values per output feature, by variant (θ and α each have ``out · factor`` entries)
SIZE_FACTOR = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def coefficients(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, s)``, each ``(out,)``: the diagonal and the off-diagonal coefficient of every output feature (see
    the module text), from ``theta``, ``alpha`` of ``variant``'s size."""
    half = group_size // 2
    if variant == "road_1":  # (groups, g/2) -> both halves of each group: (groups, 2, g/2)
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":  # per group (2, g): row 0 makes a, row 1 makes s
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    raise ConfigError(f"Unsupported variant {variant} for RoadLayer. Supported variants are road_1, road_2, and "
                      "road_4.")


def rotate_pairs(h: torch.Tensor, a: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``h ⊙ a + rot(h) ⊙ s`` along ``h``'s last axis (``out`` features; ``a, s`` broadcast against ``h``, last
    axis ``out``), ``rot(h) = (−h_{g/2:g}, h_{0:g/2})`` per group of ``g = group_size``."""
    grouped = h.unflatten(-1, (-1, 2, group_size // 2))  # (..., groups, 2, g/2)
    rotated = torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).flatten(-3)
    return h * a + rotated * s


def inverse_coefficients(a: torch.Tensor, s: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a', s')`` with ``rotate_pairs(·, a', s')`` the inverse of ``rotate_pairs(·, a, s)``: per pair
    ``[[p, −q], [r, t]]⁻¹ = [[t, q], [−r, p]] / (p t + q r)``, so ``a'`` is ``a`` with the halves of each group
    swapped over the determinant, and ``s' = −s / det``. Infinite where a determinant is zero."""

    def swap_halves(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 2, group_size // 2).flip(1).reshape(-1)

    det = a * swap_halves(a) + s * swap_halves(s)  # the same p t + q r on both rows of a pair
    return swap_halves(a) / det, -s / det


class RoadLayer(AdapterLayer):
    """RoAd on ``nn.Linear`` (bitsandbytes' 4/8-bit linears included) and ``transformers``' ``Conv1D``.

    Attributes:
        road_theta, road_alpha: Per adapter, the angles and scales (sizes: the module text).
        variant, group_size: Per adapter, the config's.
    """

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(self.get_base_layer(), Conv1D)
        # Pre-merge (weight, bias) of adapters whose R is singular (α = 0 somewhere): R⁻¹ does not exist.
        self._merge_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, variant: str = "road_1", group_size: int = 64,
                     init_weights: bool = True) -> None:
        """Create ``road_theta``/``road_alpha`` of ``adapter_name`` and initialise them (the module text)."""
        if self.out_features % group_size != 0:  # PEFT's sentence first
            raise ConfigError(f"The out_features of the base layer must be divisible by group_size ({group_size}) "
                              f"when using RoadLayer. (out_features={self.out_features}: pass a group_size that "
                              "divides it, or exclude this module)")
        if variant not in SIZE_FACTOR:
            raise ConfigError(f"Unsupported variant {variant} for RoadLayer. Supported variants are road_1, road_2, "
                              "and road_4.")
        size = int(self.out_features * SIZE_FACTOR[variant])
        if init_weights:
            theta, alpha = torch.zeros(size), torch.ones(size)
        else:
            theta, alpha = torch.randn(size) * 0.5, 1 + torch.randn(size) * 0.5
        self.variant[adapter_name] = variant
        self.group_size[adapter_name] = group_size
        self.road_theta[adapter_name] = nn.Parameter(theta)
        self.road_alpha[adapter_name] = nn.Parameter(alpha)
        self._clear_row_cache()
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, s)``, each ``(out,)``, of ``adapter_name`` (differentiable)."""
        return coefficients(self.variant[adapter_name], self.group_size[adapter_name],
                            self.road_theta[adapter_name], self.road_alpha[adapter_name])

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``R_n ⋯ R_1 base(x)`` over the active adapters; ``x: (..., in)`` -> ``(..., out)``."""
        result = self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.road_theta]
        if not names:
            return result
        out = result
        for name in names:
            a, s = self.coefficients(name)
            out = rotate_pairs(out.to(a.dtype), a, s, self.group_size[name])
        return out.to(result.dtype)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A mixed-adapter batch in one pass: the base runs once on every row, then each row is transformed by its
        own adapter's ``(a, s)`` (``a = 1``, ``s = 0`` for ``"__base__"`` and adapters this layer lacks), gathered
        per row: ``(batch, 1, ..., out)``. One group size per batch (rows of different sizes: one pass per size)."""
        names = self._row_names(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        held = [n for n in dict.fromkeys(names) if n in self.road_theta]
        if not held:
            return result
        out = result
        for group_size in dict.fromkeys(self.group_size[n] for n in held):
            table = {n: self.coefficients(n) for n in held if self.group_size[n] == group_size}
            ref = next(iter(table.values()))[0]
            identity = (torch.ones_like(ref), torch.zeros_like(ref))
            a = torch.stack([table.get(n, identity)[0] for n in names])  # (batch, out)
            s = torch.stack([table.get(n, identity)[1] for n in names])
            shape = (a.shape[0],) + (1,) * (out.dim() - 2) + (a.shape[1],)
            out = rotate_pairs(out.to(a.dtype), a.reshape(shape), s.reshape(shape), group_size)
        return out.to(result.dtype)

    # ---- merging -----------------------------------------------------------------------------
    def _transform_rows(self, weight: torch.Tensor, a: torch.Tensor, s: torch.Tensor, group_size: int
                        ) -> torch.Tensor:
        """``R W`` for ``weight`` in its storage layout: the pair transform along the output axis (``Conv1D``
        stores ``(in, out)``: its last axis; ``nn.Linear`` ``(out, in)``: its first)."""
        w = weight.to(a.dtype)
        if self.fan_in_fan_out:
            return rotate_pairs(w, a, s, group_size).to(weight.dtype)
        return rotate_pairs(w.T, a, s, group_size).T.to(weight.dtype)

    def _merge_coefficients(self, adapter_name: str, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            a, s = self.coefficients(adapter_name)
            if inverse:
                a, s = inverse_coefficients(a, s, self.group_size[adapter_name])
        return a, s

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``R W`` (storage layout and dtype of ``weight``); the pre-merge weight and bias are kept when ``R`` is
        singular."""
        a, s = self._merge_coefficients(adapter_name)
        if not torch.isfinite(inverse_coefficients(a, s, self.group_size[adapter_name])[0]).all():
            bias = self.bias
            self._merge_cache[adapter_name] = (weight.clone(), None if bias is None else bias.data.clone())
        return self._transform_rows(weight, a, s, self.group_size[adapter_name])

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``R⁻¹ W'`` (or the kept pre-merge weight where ``R`` is singular)."""
        if adapter_name in self._merge_cache:
            return self._merge_cache[adapter_name][0]
        a, s = self._merge_coefficients(adapter_name, inverse=True)
        return self._transform_rows(weight, a, s, self.group_size[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``R W − W``, shaped like ``base_layer.weight`` (PEFT's ``_get_delta_weight`` returns ``R`` itself;
        deltatune's layers all return the additive change)."""
        weight = self.read_base_weight()
        return self.merged_weight(weight, adapter_name) - weight

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """``R b`` (``safe_merge`` checks it before it is written), ``None`` without a bias."""
        if bias is None:
            return None
        a, s = self._merge_coefficients(adapter_name)
        return rotate_pairs(bias.to(a.dtype), a, s, self.group_size[adapter_name]).to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = self.bias
        if sign < 0 and adapter_name in self._merge_cache:
            kept = self._merge_cache.pop(adapter_name)[1]
            if bias is not None:
                bias.data = kept
            return
        if bias is None:
            return
        a, s = self._merge_coefficients(adapter_name, inverse=sign < 0)
        bias.data = rotate_pairs(bias.data.to(a.dtype), a, s, self.group_size[adapter_name]).to(bias.dtype)

    def _forget_merge_state(self, adapter_name: str) -> None:
        self._merge_cache.pop(adapter_name, None)

    def unmerge(self) -> None:
        super().unmerge()
        self._merge_cache.clear()


def make_road_layer(target: nn.Module) -> RoadLayer | None:
    """The RoAd wrapper for ``target``, or ``None`` if RoAd cannot adapt its type."""
    return RoadLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
