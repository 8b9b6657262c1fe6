"""``HiraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError
from deltatune.lora.config import pattern_value


@dataclass
class HiraConfig(PeftConfig):
    """High-rank adaptation (HiRA; Huang et al., ICLR 2025): ``ΔW = W0 ⊙ (B A)`` with ``B: (out, r)``,
    ``A: (r, in)`` trained and ``W0`` frozen. The Hadamard product with the full-rank ``W0`` lets ``ΔW`` reach a
    rank far above ``r``; there is no ``alpha``: the update is not scaled (PEFT's).

    Args:
        r: Rank of the factors ``A`` and ``B``; must be positive.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default (LoRA's table, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        hira_dropout: Dropout probability on the adapter's input ``x`` (training only).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type
            (with PEFT's warning when it disagrees).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``A`` He-uniform, ``B = 0`` (the adapter starts as identity); ``"gaussian"``:
            ``A ~ N(0, 1/r²)``, ``B = 0``; ``False``: both ``N(0, 1)`` (tests). Embeddings always start with
            ``A = 0``, ``B ~ N(0, 1)`` unless ``False``.
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        rank_pattern: ``{regex: r}`` overriding ``r`` per module.
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_weights: bool | str = field(default=True, repr=False)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.HIRA
        super().__post_init__()
        check_layer_selection(self)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"HiraConfig.r must be a positive integer, got {self.r!r}; try r=32")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}]={value!r}: every rank must be a positive integer")
        if not 0.0 <= float(self.hira_dropout) < 1.0:
            raise ConfigError(f"HiraConfig.hira_dropout must be in [0, 1), got {self.hira_dropout!r}")
        if not (isinstance(self.init_weights, bool) or str(self.init_weights).lower() == "gaussian"):
            raise ConfigError(f"Unknown initialization init_weights={self.init_weights!r}: use True, False or "
                              "'gaussian'")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)
