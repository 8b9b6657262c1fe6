"""``GraloraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GraloraConfig(PeftConfig):
    """Granular low-rank adaptation (GraLoRA; Jung et al., 2025, arXiv 2505.20355): ``W: (out, in)`` is cut into
    ``k x k`` blocks and each block ``(j, n)`` gets its own rank-``r/k`` pair, ``ΔW_jn = B_jn A_jn``. The values
    trained equal LoRA's of rank ``r`` (``r (in + out)``) while ``rank(ΔW)`` can reach ``k r``. ``hybrid_r > 0``
    adds a plain LoRA of rank ``hybrid_r`` over the whole matrix (Hybrid GraLoRA). The update is scaled by
    ``alpha / (r + hybrid_r)``.

    Args:
        r: The GraLoRA rank; must be divisible by ``gralora_k`` (each block's pair has rank ``r / gralora_k``).
        hybrid_r: Rank of the plain LoRA beside the blocks (``0``: none).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        alpha: The update is scaled by ``alpha / (r + hybrid_r)``.
        gralora_dropout: Dropout probability on the adapter's input ``x`` (training only).
        gralora_k: ``k``, the number of blocks along each side; must divide ``r`` and every adapted layer's input
            and output size. PEFT's advice: 2 up to rank 32, 4 from rank 64.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type
            (with PEFT's warning when it disagrees, and the config corrected as PEFT does).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"gralora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``A`` He-uniform, ``B = 0`` (the adapter starts as the identity); ``False``: ``B``
            He-uniform too (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 32
    hybrid_r: int = 0
    target_modules: list[str] | set[str] | str | None = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.GRALORA
        super().__post_init__()
        check_layer_selection(self)
        # PEFT's two checks first, with its sentences; then what PEFT leaves to the layers (or to a crash)
        if not _is_int(self.gralora_k) or self.gralora_k <= 0:
            raise ConfigError(f"`gralora_k` should be a positive integer value but the value passed is "
                              f"{self.gralora_k}")
        if not _is_int(self.r) or self.r % self.gralora_k != 0:
            raise ConfigError(f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}; each "
                              "block's pair has rank r / gralora_k")
        if self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if not _is_int(self.hybrid_r) or self.hybrid_r < 0:
            raise ConfigError(f"`hybrid_r` should be a non-negative integer value but the value passed is "
                              f"{self.hybrid_r}")
        if not 0.0 <= float(self.gralora_dropout) < 1.0:
            raise ConfigError(f"GraloraConfig.gralora_dropout must be in [0, 1), got {self.gralora_dropout!r}")
        if self.bias not in ("none", "all", "gralora_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'gralora_only'")
