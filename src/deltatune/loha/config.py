"""``LoHaConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError
from deltatune.lora.config import pattern_value


def check_lycoris_fields(config: PeftConfig, cls_name: str) -> None:
    """Checks LoHa and LoKr share: rank, dropouts and layer selection."""
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r <= 0:
        raise ConfigError(f"{cls_name}.r must be a positive integer, got {config.r!r}; try r=8")
    for key, value in config.rank_pattern.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"rank_pattern[{key!r}]={value!r}: every rank must be a positive integer")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{cls_name}.{name} must be in [0, 1), got {value!r}")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                          "(layers_pattern only names where the layer index is; set both or neither)")
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ConfigError(
            "`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer indices "
            "into the regex, or pass target_modules as a list of names"
        )


@dataclass
class LoHaConfig(PeftConfig):
    """Low-rank Hadamard product (LoHa; Hyeon-Woo et al., 2022, FedPara):
    ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)``, whose rank can reach ``r²`` with ``4 r (out + in)`` values.

    Args:
        r: Rank of each of the two factors; must be positive.
        alpha: Numerator of the scaling ``alpha / r``.
        rank_dropout: Probability of zeroing an output row of ``ΔW`` per training step.
        module_dropout: Probability of skipping the whole adapter per training step.
        use_effective_conv2d: For convolutions with a kernel larger than 1, factor the kernel with a small
            core tensor per factor (FedPara's "Proposition 3", CP-like) instead of flattening it.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        init_weights: ``True``: ``W2b = 0`` (the adapter starts as identity); ``False``: all random (tests).
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
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOHA
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        check_lycoris_fields(self, "LoHaConfig")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)
