"""``OSFConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class OSFConfig(PeftConfig):
    """Orthogonal subspace fine-tuning (OSF; continual learning): ``W = U S Vᵀ`` (thin SVD) is split at
    ``k = effective_rank`` into a frozen "high" part (the top-``k`` singular directions, kept for earlier tasks)
    and a trainable "low" part ``U_low diag(S_low) V_low`` (the rest), whose gradients are projected orthogonal to
    the high subspace; ``ΔW = U_low S_low V_low − (the same at init)``, so the adapter starts as the identity.

    Args:
        effective_rank: ``k``, per target: an int, a float in ``(0, 1]`` (a fraction of ``min(out, in)``), or
            ``None`` (half of ``min(out, in)``). The trainable rank is ``min(out, in) − k``.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (PEFT's OSF table: every attention and MLP projection), else ``"all-linear"``.
        rank_pattern: ``{regex: effective_rank}`` overriding ``effective_rank`` for modules whose name the regex
            finds (``re.search``, first match wins), same value forms.
        init_weights: ``True``: the trainable factors start at the SVD's (identity adapter); ``False``: ``N(0, 1)``
            draws (tests).
        modules_to_save: Modules trained in full and saved with the adapter.
        target_svd_config: Accepted and ignored (as PEFT).
    """

    effective_rank: int | float | None = None
    target_modules: list[str] | set[str] | str | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool | None = field(default=True, repr=False)
    modules_to_save: list[str] | None = None
    target_svd_config: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.OSF
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)  # PEFT keeps OSF's list as given
        for name, value in [("effective_rank", self.effective_rank), *(self.rank_pattern or {}).items()]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"OSFConfig: {name}={value!r} must be an int, a fraction in (0, 1] or None (half "
                                  "of each layer's smaller dimension)")

    def effective_rank_for(self, module_name: str, min_dim: int) -> int:
        """``k`` for ``module_name`` whose weight's smaller dimension is ``min_dim`` (PEFT's rule), in
        ``[0, min_dim]``: the first ``rank_pattern`` regex found in the name, else ``effective_rank``."""
        value = self.effective_rank
        for pattern, rank in (self.rank_pattern or {}).items():
            if re.search(pattern, module_name):
                value = rank
                break
        if value is None:
            return min_dim // 2
        k = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
        return max(min(min_dim, k), 0)
