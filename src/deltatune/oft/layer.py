"""OFT layers: a block-diagonal orthogonal rotation of a frozen layer's input space (Qiu et al., 2023,
"Controlling Text-to-Image Diffusion by Orthogonal Finetuning").

For ``W: (out, D)`` (``D`` = input size; for a ``Conv2d``, ``in · kh · kw``) and ``r`` blocks of size ``b``
(``r · b = D``)::

    Q_i = skew(q_i)              q_i: (b(b-1)/2,) the upper triangle, Q_i: (b, b), Q_iᵀ = -Q_i
    R_i = cayley(Q_i)            exact:    (I - Q)(I + Q)⁻¹
                                 Neumann:  I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)  (PEFT's truncation, n terms)
    R   = diag(R_1, ..., R_r)    (D, D)
    y   = W (R x) ... written for a row vector x: y = (x R) Wᵀ + b,   merged: W' = W Rᵀ

``Linear`` and GPT-2 ``Conv1D`` rotate the input (``x: (..., D)`` viewed as ``(..., r, b)``, one small matmul
per block); ``Conv2d`` rotates its weight over ``(in, kh, kw)`` and convolves with ``W Rᵀ`` (equal to the
merged layer for any kernel, stride, padding and dilation); ``Embedding`` rotates its output, ``y = E[ids] R``,
merged ``E' = E R``. With ``block_share`` one block serves all ``r`` positions. COFT projects each ``q_i`` in
place into a small ball before every use. Several active adapters apply in order: ``x R_1 R_2 ...``.

Tensor names are PEFT's: ``oft_R.<adapter>.weight: (r, b(b-1)/2)`` (``(1, ...)`` with ``block_share``),
``oft_embedding_R`` for embeddings.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.orthogonal import cayley, cayley_neumann, skew_symmetric
from deltatune.errors import ConfigError
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest to ``value`` (ties go down; at least ``n`` itself): PEFT's rule for an
    ``r``/``oft_block_size`` that does not divide a layer's input size, so both libraries pick the same shape."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher:
        higher += 1
    lower = value
    while lower > 1 and n % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p · n)`` of the ``n`` blocks ``(n, b, b)``, drawn at random, become ``I``.

    One block (``block_share``) is never dropped, as in PEFT.
    """
    n, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * n)
    if n == 1 or k == 0:
        return blocks
    mask = torch.zeros(n, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[:k]] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x R`` for ``R = diag(blocks)``: ``x: (..., n·b)``, ``blocks: (n, b, b)`` (or ``(1, b, b)``, shared)."""
    b = blocks.shape[-1]
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    if blocks.shape[0] == 1:
        return (xb @ blocks[0]).reshape(x.shape)
    return torch.einsum("...rk,rkc->...rc", xb, blocks).reshape(x.shape)


class OFTRotation(nn.Module):
    """One adapter's rotation: ``weight: (blocks, b(b-1)/2)``, the upper triangles of the ``Q_i``.

    Attributes:
        block_size: ``b``.
        positions: How many ``b``-blocks the rotated dimension has (``weight`` has 1 row when shared).
    """

    def __init__(self, positions: int, block_size: int, block_share: bool, coft: bool, eps: float,
                 use_cayley_neumann: bool, num_cayley_neumann_terms: int) -> None:
        super().__init__()
        self.positions, self.block_size = positions, block_size
        self.coft, self.eps = coft, eps
        self.use_cayley_neumann, self.num_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.weight = nn.Parameter(torch.zeros(1 if block_share else positions, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        """``(n, b(b-1)/2) -> (n, b, b)``: ``Q`` with ``vec`` above the diagonal and ``-vec`` below."""
        return skew_symmetric(vec, self.rows, self.cols, self.block_size)

    @torch.no_grad()
    def _project(self) -> None:
        """COFT: each ``Q_i`` into the Frobenius ball of radius ``eps / sqrt(n)`` (in place, as PEFT)."""
        q = self._skew(self.weight)
        radius = self.eps / math.sqrt(q.shape[0])
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= radius, q, q * (radius / norm))
        self.weight.copy_(q[:, self.rows, self.cols])

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks ``R_i: (n, b, b)`` (``n = 1`` when shared)."""
        if self.coft:
            self._project()
        q = self._skew(self.weight)
        if self.use_cayley_neumann:
            return cayley_neumann(q, self.num_terms)
        # (I - Q)(I + Q)⁻¹ = cayley(-Q), PEFT's exact form for OFT (its series approximates cayley(Q): the two
        # differ by a transpose, and both are kept as PEFT has them so that files give the same rotation)
        return cayley(-q)


class OFTLayer(AdapterLayer):
    """OFT on ``nn.Linear``, ``transformers``' ``Conv1D`` (``W: (in, out)``), ``nn.Conv2d`` and ``nn.Embedding``.

    Attributes:
        oft_R, oft_embedding_R: ``adapter -> OFTRotation`` (the second for embeddings, PEFT's name).
        r, oft_block_size: Per adapter, after fitting to this layer's input size.
        module_dropout: Per adapter, the share of blocks set to ``I`` per training step.
        rotated_features: ``D``, the size being rotated.
    """

    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        shape = dense_weight_shape(base_layer)  # (out, in) for a bitsandbytes layer, not its packed storage
        if self.is_embedding:
            self.rotated_features = base_layer.embedding_dim
        elif self.is_conv:
            if base_layer.groups > 1:
                raise ConfigError(f"OFT cannot adapt a Conv2d with groups={base_layer.groups} (its weight holds "
                                  "in_channels/groups inputs); exclude that layer from target_modules")
            self.rotated_features = math.prod(shape[1:])
        else:
            self.rotated_features = shape[0] if self.fan_in_fan_out else shape[1]

    @property
    def _container(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.is_embedding else self.oft_R

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, oft_block_size: int, module_dropout: float = 0.0,
                     init_weights: bool = True, coft: bool = False, eps: float = 6e-5, block_share: bool = False,
                     use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5) -> None:
        """Create adapter ``adapter_name``; exactly one of ``r``/``oft_block_size`` is non-zero (the other is
        derived from the rotated size ``D``, after moving the given one to the nearest divisor of ``D``)."""
        d = self.rotated_features
        if r == 0 and oft_block_size > 0:
            if d % oft_block_size:
                fitted = nearest_divisor(d, oft_block_size)
                warnings.warn(f"oft_block_size={oft_block_size} does not divide this layer's input size {d}; "
                              f"using oft_block_size={fitted}", stacklevel=3)
                oft_block_size = fitted
            r = d // oft_block_size
        elif r > 0 and oft_block_size == 0:
            if d % r:
                fitted = nearest_divisor(d, r)
                warnings.warn(f"r={r} does not divide this layer's input size {d}; using r={fitted}", stacklevel=3)
                r = fitted
            oft_block_size = d // r
        else:
            raise ConfigError(f"give exactly one of r ({r}) and oft_block_size ({oft_block_size}) as non-zero")
        rotation = OFTRotation(r, oft_block_size, block_share, coft, eps, use_cayley_neumann,
                               num_cayley_neumann_terms)
        if not init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self._container[adapter_name] = rotation
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = oft_block_size
        self.module_dropout[adapter_name] = module_dropout
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _blocks(self, adapter_name: str) -> torch.Tensor:
        """``R_i: (n, b, b)`` with module dropout applied when training."""
        blocks = self._container[adapter_name].blocks()
        p = self.module_dropout[adapter_name]
        if self.training and p > 0:
            blocks = block_dropout(blocks, p)
        return blocks

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x R_1 R_2 ...)`` (linear), ``conv(x, W (R_1 R_2 ...)ᵀ)`` (Conv2d), ``E[ids] R_1 R_2 ...``."""
        names = [n for n in self.active_adapters if n in self._container]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self.is_embedding:
            result = self.base_layer(x, *args, **kwargs)
            out_dtype = result.dtype
            for name in names:
                blocks = self._blocks(name)
                result = rotate_blocks(result.to(blocks.dtype), blocks)
            return result.to(out_dtype)
        if self.is_conv:
            base = self.base_layer
            weight = base.weight.reshape(base.out_channels, -1)
            for name in reversed(names):  # x R_1 R_2 -> W R_2ᵀ R_1ᵀ
                blocks = self._blocks(name)
                weight = self._rotate_weight(weight.to(blocks.dtype), blocks)
            weight = weight.reshape(base.weight.shape).to(x.dtype)
            return base._conv_forward(x, weight, base.bias)
        in_dtype = x.dtype
        for name in names:
            blocks = self._blocks(name)
            x = rotate_blocks(x.to(blocks.dtype), blocks)
        return self.base_layer(x.to(in_dtype), *args, **kwargs)

    @staticmethod
    def _rotate_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``W Rᵀ`` for ``W: (rows, n·b)``: row ``w`` becomes ``(R w)ᵀ``, block by block."""
        return rotate_blocks(weight, blocks.transpose(-1, -2))

    # ---- merging -----------------------------------------------------------------------------
    def _rows_view(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as ``(rows, D)`` whose rows the rotation acts on: ``W`` for Linear/Conv2d (``W Rᵀ``),
        ``E`` for Embedding (``E R``)."""
        if self.fan_in_fan_out:
            return weight.T
        return weight.reshape(weight.shape[0], -1)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = rows.T if self.fan_in_fan_out else rows.reshape(like.shape)
        return out.to(like.dtype)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``W Rᵀ`` (``E R`` for embeddings) in ``weight``'s storage layout."""
        blocks = self._container[adapter_name].blocks().detach()
        rows = self._rows_view(weight).to(blocks.dtype)
        rows = rotate_blocks(rows, blocks) if self.is_embedding else self._rotate_weight(rows, blocks)
        return self._from_rows(rows, weight)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`, by a solve per block (the Neumann ``R`` is only nearly orthogonal)."""
        blocks = self._container[adapter_name].blocks().detach().double()
        rows = self._rows_view(weight).double()
        b = blocks.shape[-1]
        rb = rows.reshape(rows.shape[0], -1, b).transpose(0, 1)            # (n, rows, b)
        blocks = blocks.expand(rb.shape[0], b, b)
        # merged rows: E R (rb @ R) or W Rᵀ (rb @ Rᵀ); undo by solving from the right
        a = blocks if self.is_embedding else blocks.transpose(-1, -2)
        restored = torch.linalg.solve(a, rb, left=False)                    # rb A⁻¹
        return self._from_rows(restored.transpose(0, 1).reshape(rows.shape), weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters in; for input rotations the last applied is folded first (``W R_2ᵀ R_1ᵀ``), so the
        merged layer computes what the unmerged one does."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        super().merge(safe_merge=safe_merge, adapter_names=names if self.is_embedding else names[::-1])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W Rᵀ - W`` (``E R - E``), shaped like ``base_layer.weight``."""
        weight = self.read_base_weight()
        return self.merged_weight(weight, adapter_name) - weight


def make_oft_layer(target: nn.Module) -> OFTLayer | None:
    """The OFT wrapper for ``target``, or ``None`` if OFT cannot adapt its type."""
    return OFTLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear, nn.Conv2d, nn.Embedding) + ((Conv1D,) if Conv1D is not None else ())
