"""``LoKrConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError
from deltatune.loha.config import check_lycoris_fields
from deltatune.lora.config import pattern_value


@dataclass
class LoKrConfig(PeftConfig):
    """Low-rank Kronecker product (LoKr; Yeh et al., 2023, LyCORIS): ``ΔW = (alpha / r) · W1 ⊗ W2`` with
    ``out = a·b`` and ``in = c·d`` split by :func:`~deltatune.lokr.layer.factorization`, ``W1: (a, c)``,
    ``W2: (b, d)``; a factor is itself stored as a rank-``r`` product when that is smaller.

    Args:
        r: Rank of the factored Kronecker factors; must be positive.
        alpha: Numerator of the scaling ``alpha / r``.
        rank_dropout: Probability of zeroing an output row of ``ΔW`` per training step.
        module_dropout: Probability of skipping the whole adapter per training step.
        use_effective_conv2d: For convolutions with a kernel larger than 1, factor ``W2``'s kernel with a
            core tensor (FedPara's "Proposition 3") instead of flattening it.
        decompose_both: Also store ``W1`` as a rank-``r`` product (when ``r < max(a, c) / 2``).
        decompose_factor: Split sizes near this factor (``-1``: near the square root).
        rank_dropout_scale: Rescale the kept rows by ``1 / mean(mask)`` under rank dropout.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        init_weights: ``True``: ``W1 = 0`` (identity at the start); ``"lycoris"``: ``W2 = 0`` instead
            (LyCORIS' choice); ``False``: all random (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        rank_pattern, alpha_pattern: ``{regex: value}`` overriding ``r``/``alpha`` per module.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOKR
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        check_lycoris_fields(self, "LoKrConfig")
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool):
            raise ConfigError(f"decompose_factor must be an integer (-1 for 'near the square root'), "
                              f"got {self.decompose_factor!r}")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)
