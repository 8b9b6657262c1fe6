"""PSOFT layers: an orthogonal ``r × r`` transform inside the frozen principal subspace of a weight ("Efficient
Orthogonal Fine-Tuning with Principal Subspace Adaptation", https://openreview.net/forum?id=FSHrinMArK).

For ``W: (out, in)``, ``W = U S Vᵀ`` (thin SVD, singular values descending), rank ``r`` and ``s = psoft_alpha / r``::

    A = V_rᵀ                 (r, in)     "psoft_init": orthonormal rows        (frozen, rebuilt from W, never saved)
    B = U_r S_r / s          (out, r)
        or A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s)          "pissa_init"
    Q = skew(q)              (r, r)      q: (r(r-1)/2,) trained
    R = diag(b) · cayley(Q) · diag(a)   cayley(Q) = (I + Q)(I - Q)⁻¹ or its Neumann series; a, b: (r,) trained
                                         (psoft_orth=False: R = diag(b) · M · diag(a), M: (r, r) free)
    ΔW = s · B (R − I) A     (out, in)
    y  = base(x) + s · ((h Rᵀ − h) Bᵀ),   h = dropout(x) Aᵀ: (..., r)

``R = I`` at init (``q = 0``, ``a = b = 1``), so the adapter starts as the identity; ``s B A = U_r S_r V_rᵀ`` is the
rank-``r`` part of ``W``, which the trained ``R`` rotates. Merging adds ``ΔW`` (unmerging subtracts it).

Files hold ``R``'s parameters only, under PEFT's names: ``psoft_R.<adapter>.weight: (r(r-1)/2,)`` (``(r, r)``
without ``psoft_orth``), ``psoft_R.<adapter>.vector_b``, ``.vector_a: (r,)``. ``A`` and ``B`` are recomputed from
the base weight when the adapter is created (as PEFT does), so an adapter must be loaded onto the base it was
trained on: the same SVD call on the same weight gives the same singular vectors (signs included).

Layers: ``nn.Linear`` (PEFT's only one) and, beyond PEFT, transformers' ``Conv1D`` (``W`` stored ``(in, out)``:
the SVD is of ``Wᵀ`` and ``ΔW`` is transposed to merge; PEFT cannot load such a file). A 4/8-bit bitsandbytes
base is read dequantised for the SVD.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.orthogonal import cayley, cayley_neumann, skew_symmetric
from deltatune.errors import ConfigError
from deltatune.psoft.config import PsoftConfig
from deltatune.quantization import dense_weight_shape

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency; guard anyway so plain-torch models still work
    Conv1D = None


class OrthLayer(nn.Module):
    """One adapter's ``R: (r, r)`` (PEFT's class name): ``weight`` (the upper triangle ``q`` of the skew ``Q``, or
    the free matrix), and the magnitude vectors ``vector_b`` (output side) and ``vector_a`` (input side), each
    ``None`` when switched off.

    Attributes:
        size: ``r``.
        orth: ``R`` from the Cayley transform (else ``weight`` is ``R`` itself).
        use_cayley_neumann, num_cayley_neumann_terms, cayley_neumann_eps: The series instead of the solve, its
            length, and the Frobenius bound on ``Q`` before it.
    """

    def __init__(self, size: int, orth: bool = True, mag_b: bool = True, mag_a: bool = True,
                 use_cayley_neumann: bool = False, num_cayley_neumann_terms: int = 5,
                 cayley_neumann_eps: float | None = None) -> None:
        super().__init__()
        self.size, self.orth, self.mag_b, self.mag_a = size, orth, mag_b, mag_a
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.cayley_neumann_eps = cayley_neumann_eps
        if orth:
            self.weight = nn.Parameter(torch.zeros(size * (size - 1) // 2))
            rows, cols = torch.triu_indices(size, size, 1)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
        else:
            self.weight = nn.Parameter(torch.eye(size))
        self.vector_b = nn.Parameter(torch.ones(size)) if mag_b else None
        self.vector_a = nn.Parameter(torch.ones(size)) if mag_a else None

    def reset_parameters(self, init_weights: bool = True) -> None:
        """``R = I`` (``init_weights``), else ``q ~ N(0, 0.1²)`` (``I + N(0, 0.1²)`` for a free ``R``), PEFT's draws;
        the magnitudes start at 1 either way."""
        with torch.no_grad():
            if self.orth:
                self.weight.zero_()
                if not init_weights:
                    nn.init.normal_(self.weight, mean=0.0, std=0.1)
            else:
                nn.init.eye_(self.weight)
                if not init_weights:
                    self.weight.add_(torch.randn_like(self.weight) * 0.1)
            for vector in (self.vector_b, self.vector_a):
                if vector is not None:
                    vector.fill_(1.0)

    def _generator(self) -> torch.Tensor:
        """The skew ``Q: (r, r)``, scaled into the Frobenius ball of radius ``cayley_neumann_eps`` for the series
        when it lies outside (the series diverges for ``‖Q‖ ≥ 1``)."""
        q = skew_symmetric(self.weight, self.rows, self.cols, self.size)
        eps = self.cayley_neumann_eps
        if self.use_cayley_neumann and eps is not None:
            norm = torch.linalg.norm(q, ord="fro")
            if torch.isfinite(norm) and norm > eps:
                q = q * (eps / (norm + 1e-12))
        return q

    def get_matrix(self) -> torch.Tensor:
        """``R = diag(b) · C · diag(a): (r, r)``, ``C`` the Cayley transform (or its series, or the free matrix)."""
        if not self.orth:
            r = self.weight
        elif self.use_cayley_neumann:
            r = cayley_neumann(self._generator(), self.num_cayley_neumann_terms)
        else:
            r = cayley(self._generator())
        if self.vector_b is not None:
            r = self.vector_b[:, None] * r
        if self.vector_a is not None:
            r = r * self.vector_a[None, :]
        return r

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h Rᵀ`` for ``h: (..., r)``, in ``h``'s dtype (fp32 for a half-precision ``h`` on the CPU, as PEFT)."""
        dtype = torch.float32 if h.device.type == "cpu" and h.dtype in (torch.float16, torch.bfloat16) else h.dtype
        return (h.to(dtype) @ self.get_matrix().to(dtype).T).to(h.dtype)

    def extra_repr(self) -> str:
        return (f"size={self.size}, orth={self.orth}, use_cayley_neumann={self.use_cayley_neumann}, "
                f"num_cayley_neumann_terms={int(self.num_cayley_neumann_terms)}, "
                f"cayley_neumann_eps={self.cayley_neumann_eps}, mag_a={self.mag_a}, mag_b={self.mag_b}")


class PrincipalSubspace(nn.Module):
    """The frozen factors of one adapter, as buffers that follow the layer's device and are never saved (PEFT's
    ``_psoft_A_cache``/``_psoft_B_cache``): ``A: (r, in)``, ``B: (out, r)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


def principal_factors(weight: torch.Tensor, r: int, scaling: float, init: str, svd: str = "full", niter: int = 10,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r))`` from the top-``r`` SVD of ``weight: (out, in)`` (fp32), with ``s B A =
    U_r S_r V_rᵀ``; see the module docstring for ``init``. ``svd="lowrank"`` runs ``torch.svd_lowrank`` under a
    forked RNG seeded with ``seed`` (it has no generator argument), leaving the global RNG as it was."""
    weight = weight.to(torch.float32)
    if svd == "full":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    elif svd == "lowrank":
        devices = {"devices": []} if weight.device.type == "cpu" else \
            {"devices": [weight.device], "device_type": weight.device.type}
        with torch.random.fork_rng(**devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        raise ConfigError(f"Unknown svd_mode: {svd}")
    s = s / scaling
    if init == "psoft_init":
        a, b = vh, u @ torch.diag(s)
    elif init == "pissa_init":
        root = torch.sqrt(s)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    else:
        raise ConfigError(f"Unknown ab_svd_init: {init}")
    return a.contiguous(), b.contiguous()


class PsoftLayer(AdapterLayer):
    """PSOFT on ``nn.Linear`` and ``transformers``' ``Conv1D``.

    Attributes:
        psoft_R: ``adapter -> OrthLayer`` (trained, saved).
        psoft_subspace: ``adapter -> PrincipalSubspace`` (frozen ``A``, ``B``; rebuilt, not saved).
        r, psoft_alpha, scaling: Per adapter; ``scaling = psoft_alpha / r``.
        psoft_dropout: Per adapter, dropout on the adapter's input (``nn.Identity`` at 0).
        ab_svd_init, psoft_svd, psoft_svd_lowrank_niter, random_seed: Per adapter, how ``A``, ``B`` were built.
    """

    adapter_layer_names = ("psoft_R",)
    other_param_names = ("r", "psoft_alpha", "scaling", "psoft_dropout", "psoft_subspace", "ab_svd_init", "psoft_svd",
                         "psoft_svd_lowrank_niter", "random_seed")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.psoft_R = nn.ModuleDict()
        self.psoft_subspace = nn.ModuleDict()
        self.psoft_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.psoft_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ab_svd_init: dict[str, str] = {}
        self.psoft_svd: dict[str, str] = {}
        self.psoft_svd_lowrank_niter: dict[str, int] = {}
        self.random_seed: dict[str, int] = {}
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        shape = tuple(dense_weight_shape(base_layer))  # (out, in) for a bitsandbytes layer, not its packed storage
        self.out_features, self.in_features = (shape[1], shape[0]) if self.fan_in_fan_out else shape

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``ΔW = s B (R − I) A`` is an additive update of rank ≤ r, so LoRA holds it (PEFT's)."""
        return True

    # ---- creating an adapter -----------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PsoftConfig) -> None:
        """Create adapter ``adapter_name`` from ``config``: ``R = I`` (or PEFT's test draw), and ``A``, ``B`` from the
        SVD of the current base weight.

        Raises:
            ConfigError: ``r`` exceeds ``min(in, out)`` (PEFT's sentence).
        """
        r = int(config.r)
        if r > min(self.in_features, self.out_features):
            raise ConfigError(f"`r` ({r}) must be less than or equal to min(in_features, out_features) "
                              f"({self.in_features}, {self.out_features})")
        self.r[adapter_name] = r
        self.psoft_alpha[adapter_name] = config.psoft_alpha
        self.scaling[adapter_name] = config.psoft_alpha / r
        self.psoft_dropout[adapter_name] = nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else \
            nn.Identity()
        self.ab_svd_init[adapter_name] = config.ab_svd_init
        self.psoft_svd[adapter_name] = config.psoft_svd
        self.psoft_svd_lowrank_niter[adapter_name] = config.psoft_svd_lowrank_niter
        self.random_seed[adapter_name] = config.random_seed
        rotation = OrthLayer(r, orth=config.psoft_orth, mag_b=config.psoft_mag_b, mag_a=config.psoft_mag_a,
                             use_cayley_neumann=config.use_cayley_neumann,
                             num_cayley_neumann_terms=config.num_cayley_neumann_terms,
                             cayley_neumann_eps=config.cayley_neumann_eps)
        rotation.reset_parameters(config.init_weights)
        self.psoft_R[adapter_name] = rotation
        self._place_adapter(adapter_name)
        with torch.no_grad():
            weight = self.read_base_weight()
            a, b = principal_factors(weight.T if self.fan_in_fan_out else weight, r, self.scaling[adapter_name],
                                     config.ab_svd_init, config.psoft_svd, config.psoft_svd_lowrank_niter,
                                     config.random_seed)
        self.psoft_subspace[adapter_name] = PrincipalSubspace(a, b)
        self.set_adapter(self.active_adapters or [adapter_name])

    # ---- forward -----------------------------------------------------------------------------
    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ_active s · ((h Rᵀ − h) Bᵀ)``, ``h = dropout(x) Aᵀ``; ``x: (..., in)``."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.psoft_R:
                continue
            sub = self.psoft_subspace[name]
            h = x.to(sub.A.dtype) if self.cast_input_dtype_enabled else x
            h = self.psoft_dropout[name](h) @ sub.A.to(h.dtype).T         # (..., r)
            rotated = self.psoft_R[name](h)                                # h Rᵀ
            result = result + ((rotated - h) @ sub.B.to(h.dtype).T) * self.scaling[name]
        return result.to(out_dtype)

    # ---- merging -----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s B (R − I) A``, shaped like ``base_layer.weight`` (``(in, out)`` for ``Conv1D``), in fp32 at least
        (``merged_weight`` casts it to the weight's dtype)."""
        sub = self.psoft_subspace[adapter_name]
        rotation = self.psoft_R[adapter_name].get_matrix()
        dtype = torch.promote_types(rotation.dtype, torch.float32)
        eye = torch.eye(self.r[adapter_name], device=rotation.device, dtype=dtype)
        delta = sub.B.to(dtype) @ (rotation.to(dtype) - eye) @ sub.A.to(dtype) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta


def make_psoft_layer(target: nn.Module) -> PsoftLayer | None:
    """The PSOFT wrapper for ``target``, or ``None`` if PSOFT cannot adapt its type."""
    return PsoftLayer(target) if isinstance(target, supported_types()) else None


def supported_types() -> tuple[type, ...]:
    return (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
