"""``PsoftConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError

_LOWRANK_NITER = 10
_NEUMANN_TERMS = 5


@dataclass
class PsoftConfig(PeftConfig):
    """PSOFT (efficient orthogonal fine-tuning with principal subspace adaptation; https://openreview.net/forum?id=
    FSHrinMArK): an ``r × r`` orthogonal ``R`` between the frozen top-``r`` singular factors of ``W``,
    ``ΔW = s · B (R − I) A`` with ``A: (r, in)``, ``B: (out, r)`` from an SVD of ``W`` and ``s = psoft_alpha / r``.
    Only ``R`` (and the optional magnitude vectors) trains; ``R = I`` at init, so the adapter starts as the identity.

    Args:
        r: Size of ``R`` (the principal subspace's rank); ``1 ≤ r ≤ min(in, out)`` of every adapted layer.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). ``nn.Linear`` (and, beyond PEFT, GPT-2's ``Conv1D``).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        psoft_alpha: ``s = psoft_alpha / r`` (LoRA's alpha). ``B`` is divided by ``s`` at init, so ``s`` scales the
            training dynamics, not the initial update.
        psoft_dropout: Dropout probability on the adapter's input ``x`` (training only).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type.
        ab_svd_init: ``"psoft_init"``: ``A = V_rᵀ`` (orthonormal rows), ``B = U_r S_r / s``; ``"pissa_init"``:
            ``A = √(S_r / s) V_rᵀ``, ``B = U_r √(S_r / s)`` (PiSSA's symmetric split).
        psoft_svd: ``"full"`` (``torch.linalg.svd``) or ``"lowrank"`` (``torch.svd_lowrank``, seeded by
            ``random_seed`` so a loaded adapter rebuilds the same ``A``, ``B``).
        psoft_svd_lowrank_niter: Power iterations of ``torch.svd_lowrank`` (``"lowrank"`` only).
        random_seed: Seed of the low-rank SVD's random projection (``"lowrank"`` only).
        psoft_orth: ``True``: ``R`` is the Cayley transform of a skew matrix (orthogonal); ``False``: ``R`` is a free
            ``r × r`` matrix starting at ``I``.
        psoft_mag_b, psoft_mag_a: Learn a diagonal scale on ``R``'s output side (``diag(b) R``) / input side
            (``R diag(a)``), both starting at 1.
        use_cayley_neumann: Replace the exact Cayley solve by its truncated Neumann series (cheaper, nearly
            orthogonal).
        num_cayley_neumann_terms: Terms of that series (``use_cayley_neumann`` only).
        cayley_neumann_eps: When set (in ``(0, 1)``), ``Q`` is scaled down to Frobenius norm ``eps`` before the series
            whenever it is larger (``use_cayley_neumann`` only).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``R = I`` (identity adapter); ``False``: ``R`` perturbed by ``N(0, 0.1²)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: Literal["psoft_init", "pissa_init"] = "psoft_init"
    psoft_svd: Literal["full", "lowrank"] = "full"
    psoft_svd_lowrank_niter: int = _LOWRANK_NITER
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = _NEUMANN_TERMS
    cayley_neumann_eps: float | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = field(default=True, repr=False)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PSOFT
        super().__post_init__()
        check_layer_selection(self, pattern_needs_layers=True)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` must be a positive integer; got {self.r}.")
        if self.ab_svd_init not in ("psoft_init", "pissa_init"):
            raise ConfigError(f"`ab_svd_init` must be one of ['pissa_init', 'psoft_init']; got {self.ab_svd_init!r}.")
        if self.psoft_svd not in ("full", "lowrank"):
            raise ConfigError(f"`psoft_svd` must be one of ['full', 'lowrank']; got {self.psoft_svd!r}.")
        if not 0.0 <= float(self.psoft_dropout) < 1.0:
            raise ConfigError(f"PsoftConfig.psoft_dropout must be in [0, 1), got {self.psoft_dropout!r}")
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != _LOWRANK_NITER:
            warnings.warn("`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`. "
                          f"Got psoft_svd={self.psoft_svd!r}, so psoft_svd_lowrank_niter="
                          f"{self.psoft_svd_lowrank_niter} will be ignored.", UserWarning, stacklevel=3)
        if self.use_cayley_neumann:
            if self.num_cayley_neumann_terms <= 0:
                raise ConfigError("`num_cayley_neumann_terms` must be a positive integer; got "
                                  f"{self.num_cayley_neumann_terms}.")
            if self.cayley_neumann_eps is not None and not 0.0 < self.cayley_neumann_eps < 1.0:
                raise ConfigError(f"`cayley_neumann_eps` must be in (0, 1) when set; got {self.cayley_neumann_eps}.")
        else:
            if self.num_cayley_neumann_terms != _NEUMANN_TERMS:
                warnings.warn("`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`. Since "
                              "`use_cayley_neumann=False`, `num_cayley_neumann_terms="
                              f"{self.num_cayley_neumann_terms}` will be ignored.", UserWarning, stacklevel=3)
            if self.cayley_neumann_eps is not None:
                warnings.warn("`cayley_neumann_eps` is only used when `use_cayley_neumann=True`. Since "
                              f"`use_cayley_neumann=False`, `cayley_neumann_eps={self.cayley_neumann_eps}` will be "
                              "ignored.", UserWarning, stacklevel=3)
