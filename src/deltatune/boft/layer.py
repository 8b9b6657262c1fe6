"""BOFT layers: OFT's rotation as a product of butterfly factors, plus a per-output scale (Liu et al., 2024).

For an input size ``d = D · b`` (``Conv2d``: ``d = in · kh · kw``) and ``m`` butterfly factors::

    C_ij = cayley(A_ij) = (I - S)(I + S)⁻¹,  S = (A_ij - A_ijᵀ) / 2        A = boft_R: (m, D, b, b)
    B_i  = P_i diag(C_i1, ..., C_iD) P_iᵀ                                   P_i: butterfly permutation (d, d)
    R    = B_(m-1) ··· B_1 B_0                                              (d, d), orthogonal
    y    = s ⊙ ((x R) Wᵀ) + b        (x a row)                              s = boft_s
    merged:  W' = diag(s) W Rᵀ

``P_i`` groups the input into chunks of ``b · 2^i`` features and, inside each chunk, puts the even-numbered
half-blocks (``b/2`` features) before the odd-numbered ones, so factor ``i`` mixes features ``2^i`` half-blocks
apart (``P_0 = I``; with ``m = 1`` BOFT is OFT). ``Linear`` and GPT-2 ``Conv1D`` rotate the input with
``m`` gathers and block products (never a dense ``(d, d)`` matrix: ``O(tokens · d · b · m)``), then scale the
output; ``Conv2d`` rotates and scales its weight and convolves with it (equal to the merged layer). Several
active adapters compose as ``x R_2 R_1 ...`` with scales multiplied (PEFT's order). Tensor names and shapes are
PEFT's: ``boft_R: (m, D, b, b)``, ``boft_s: (out, 1)`` (``Conv2d``: ``(1, out)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError
from deltatune.oft.layer import block_dropout, rotate_blocks
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def butterfly_permutation(d: int, chunk: int, half: int) -> torch.Tensor:
    """``perm: (d,)`` of ``P`` (``P[a, perm[a]] = 1``): in each ``chunk`` of features, the ``half``-sized pieces
    in the order 0, 2, 4, ..., 1, 3, 5, ..."""
    pieces = chunk // half
    order = list(range(0, pieces, 2)) + list(range(1, pieces, 2))
    within = torch.cat([torch.arange(p * half, (p + 1) * half) for p in order])
    return torch.cat([start + within for start in range(0, d, chunk)])


def block_shape(d: int, block_size: int, block_num: int, n_factors: int) -> tuple[int, int]:
    """``(b, D)`` for a rotated size ``d``, with PEFT's checks (so the same configs are accepted)."""
    extra = n_factors - 1  # butterfly factors beyond the first
    if block_size == 0:
        if d % block_num:
            raise ConfigError(f"the layer's input size {d} is not divisible by boft_block_num={block_num}")
        if extra and (extra > int(math.log2(block_num)) or block_num % (2 ** extra)):
            raise ConfigError(f"boft_n_butterfly_factor={n_factors} needs boft_block_num ({block_num}) to be a "
                              f"multiple of 2^{extra}")
        block_size = d // block_num
    else:
        if d % block_size:
            raise ConfigError(f"the layer's input size {d} is not divisible by boft_block_size={block_size}; pick "
                              "a divisor, or exclude the layer")
        if extra and d % (block_size * 2 ** extra):
            raise ConfigError(f"boft_n_butterfly_factor={n_factors} with boft_block_size={block_size} needs the input "
                              f"size ({d}) to be a multiple of {block_size * 2 ** extra}")
        block_num = d // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ConfigError(f"butterfly factors need an even block size and count, got boft_block_size={block_size}, "
                          f"boft_block_num={block_num}")
    return block_size, block_num


def cayley(a: torch.Tensor) -> torch.Tensor:
    """``(I - S)(I + S)⁻¹`` with ``S = (a - aᵀ)/2``, for ``a: (..., b, b)``: an orthogonal matrix per block."""
    s = 0.5 * (a - a.transpose(-1, -2))
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s)  # (I + S)⁻¹(I - S): the two factors commute


class BOFTLayer(AdapterLayer):
    """BOFT on ``nn.Linear``, ``transformers``' ``Conv1D`` and ``nn.Conv2d``.

    Attributes:
        boft_R: ``adapter -> (m, D, b, b)``, the Cayley generators.
        boft_s: ``adapter -> (out, 1)`` (``Conv2d``: ``(1, out)``), the output scale.
        boft_block_size, boft_block_num, boft_dropout: Per adapter.
        rotated_features: ``d``.
    """

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout", "_perms")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self._perms: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        shape = dense_weight_shape(base_layer)  # (out, in) for a bitsandbytes layer, not its packed storage
        if self.is_conv:
            if base_layer.groups > 1:
                raise ConfigError(f"BOFT cannot adapt a Conv2d with groups={base_layer.groups}; exclude that layer "
                                  "from target_modules")
            self.rotated_features, self.out_features = math.prod(shape[1:]), shape[0]
        elif self.fan_in_fan_out:
            self.rotated_features, self.out_features = shape
        else:
            self.out_features, self.rotated_features = shape

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, boft_block_size: int, boft_block_num: int, boft_n_butterfly_factor: int,
                     boft_dropout: float = 0.0, init_weights: bool = True) -> None:
        """Create adapter ``adapter_name``: ``R_ij = I`` and ``s = 1`` (or random with ``init_weights=False``)."""
        d, m = self.rotated_features, boft_n_butterfly_factor
        b, n = block_shape(d, boft_block_size, boft_block_num, m)
        perms: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i in range(m):
            if m == 1 or i == 0:
                perms.append(None)  # P_0 = I: chunks of one block, nothing to reorder
                continue
            perm = butterfly_permutation(d, chunk=b * 2 ** i, half=b // 2)
            perms.append((perm, torch.argsort(perm)))
        generator = torch.zeros(m, n, b, b)
        scale = torch.ones((1, self.out_features) if self.is_conv else (self.out_features, 1))
        if not init_weights:
            nn.init.normal_(generator, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(generator)
        self.boft_s[adapter_name] = nn.Parameter(scale)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = b, n
        self.boft_dropout[adapter_name] = boft_dropout
        self._perms[adapter_name] = perms
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- the rotation ------------------------------------------------------------------------
    def _factors(self, adapter_name: str, dtype: torch.dtype | None = None, dropout: bool = True) -> torch.Tensor:
        """``C: (m, D, b, b)``, with ``boft_dropout`` applied to one random factor when training (and ``dropout``)."""
        gen = self.boft_R[adapter_name]
        blocks = cayley(gen if dtype is None else gen.to(dtype))
        p = self.boft_dropout[adapter_name]
        if dropout and self.training and p > 0:
            i = int(torch.randint(0, blocks.shape[0], (1,)).item())
            blocks = torch.cat([blocks[:i], block_dropout(blocks[i], p)[None], blocks[i + 1:]])
        return blocks

    def _perm(self, adapter_name: str, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        pair = self._perms[adapter_name][i]
        if pair is not None and pair[0].device != device:
            pair = (pair[0].to(device), pair[1].to(device))
            self._perms[adapter_name][i] = pair
        return pair

    def rotate(self, x: torch.Tensor, adapter_name: str, factors: torch.Tensor, transpose: bool = False
               ) -> torch.Tensor:
        """``x R`` for ``x: (..., d)``: ``x B_(m-1) ··· B_0``, each ``x P_i diag(C_i) P_iᵀ`` as a gather, block
        products and a gather back. ``transpose``: ``x Rᵀ = x B_0ᵀ ··· B_(m-1)ᵀ`` (the inverse rotation)."""
        order = range(factors.shape[0]) if transpose else range(factors.shape[0] - 1, -1, -1)
        for i in order:
            blocks = factors[i].transpose(-1, -2) if transpose else factors[i]
            pair = self._perm(adapter_name, i, x.device)
            if pair is None:
                x = rotate_blocks(x, blocks)
            else:
                perm, inverse = pair
                x = rotate_blocks(x[..., inverse], blocks)[..., perm]
        return x

    def _rotated_weight(self, rows: torch.Tensor, names: list[str], dtype: torch.dtype,
                        detach: bool = False) -> torch.Tensor:
        """``diag(s) W Rᵀ`` for ``W = rows: (out, d)`` and the rotation of ``names`` as forward applies them
        (``R = R_last ··· R_first``, so ``W Rᵀ = W R_firstᵀ ··· R_lastᵀ``), block by block, never dense."""
        rows = rows.to(dtype)
        for name in names:
            factors = self._factors(name, dtype, dropout=not detach)  # a merge never drops blocks
            s = self.boft_s[name].to(dtype).reshape(-1, 1)
            if detach:
                factors, s = factors.detach(), s.detach()
            rows = self.rotate(rows, name, factors, transpose=True) * s
        return rows

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``s ⊙ ((x R) Wᵀ) + b`` (``Conv2d``: ``conv(x, diag(s) W Rᵀ) + b``)."""
        names = [n for n in self.active_adapters if n in self.boft_R]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        dtype = self.boft_R[names[0]].dtype
        if self.is_conv:
            flat = base.weight.reshape(self.out_features, -1)
            weight = self._rotated_weight(flat, names, dtype).reshape(base.weight.shape)
            return base._conv_forward(x.to(dtype), weight, None if base.bias is None else base.bias.to(dtype)
                                      ).to(x.dtype)
        in_dtype = x.dtype
        h = x.to(dtype)
        scale = None
        for name in reversed(names):  # x R_last ··· R_first (PEFT's order)
            h = self.rotate(h, name, self._factors(name))
            s = self.boft_s[name].reshape(-1)
            scale = s if scale is None else scale * s
        if self.quantized:  # the bitsandbytes layer computes (x R) Wᵀ + b from its packed weight
            out = base(h.to(in_dtype), *args, **kwargs)
            out = out - base.bias if base.bias is not None else out
            out = out * scale.to(out.dtype)
        else:
            weight = base.weight.T if self.fan_in_fan_out else base.weight
            out = F.linear(h.to(weight.dtype), weight) * scale.to(weight.dtype)
        if base.bias is not None:
            out = out + base.bias
        return out.to(in_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as ``W: (out, d)``."""
        return weight.T if self.fan_in_fan_out else weight.reshape(self.out_features, -1)

    def _store(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (rows.T if self.fan_in_fan_out else rows.reshape(like.shape)).to(like.dtype)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``diag(s) W Rᵀ`` in ``weight``'s storage layout (computed in float64)."""
        return self._store(self._rotated_weight(self._rows(weight), [adapter_name], torch.float64, detach=True),
                           weight)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``diag(1/s) W' R`` (``R`` is orthogonal), computed in float64."""
        factors = self._factors(adapter_name, torch.float64, dropout=False).detach()
        scale = self.boft_s[adapter_name].detach().double().reshape(-1, 1)
        return self._store(self.rotate(self._rows(weight).double() / scale, adapter_name, factors), weight)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``diag(s) W Rᵀ - W``, shaped like ``base_layer.weight``."""
        weight = self.read_base_weight()
        return self.merged_weight(weight, adapter_name) - weight


def make_boft_layer(target: nn.Module) -> BOFTLayer | None:
    """The BOFT wrapper for ``target``, or ``None`` if BOFT cannot adapt its type."""
    return BOFTLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.Conv2d) + ((Conv1D,) if Conv1D is not None else ())
