"""``LilyConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class LilyConfig(PeftConfig):
    """Low-rank interconnected adaptation across layers (Lily; Zhong et al., 2024, arXiv:2407.09946):
    ``y = W x + s · (A x) B̄``, ``B̄ = Σ_e p_e B_e`` with router weights ``p = mean over tokens of softmax(R A x)``.

    Within each target (layers with the same target suffix and weight shape, in model order) every ``stride_A``
    consecutive layers share one ``A: (r, in)`` and all layers share the ``num_B`` experts ``B_e: (r, out)``;
    each layer has its own router ``R: (num_B, r)``.

    Args:
        r: Rank of ``A`` and of each expert ``B_e``; PEFT recommends 2-4x the LoRA rank one would use.
        stride_A: Consecutive layers of one target sharing an ``A`` (1: each layer its own); at least 1.
        num_B: Experts ``B_e`` shared by all layers of one target; at least 2 (the router needs a choice).
        scaling: Plain multiplier ``s`` of the update (no ``alpha / r``).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). A regex string makes one target of every match.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        init_weights: ``True``: the experts start at zero (the model is unchanged), ``A`` and the routers
            Kaiming-uniform; ``False``: the experts Kaiming-uniform too (tests).
    """

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LILY
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        self._validate()

    def _validate(self) -> None:
        # PEFT's sentences first (code written for PEFT matches them), then what to do.
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}; "
                              "try r=32")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        if not isinstance(self.stride_A, int) or isinstance(self.stride_A, bool) or self.stride_A < 1:
            raise ConfigError(f"`stride_A` must be at least 1. Got stride_A={self.stride_A!r}; 1 gives every "
                              "layer its own A")
        if not isinstance(self.num_B, int) or isinstance(self.num_B, bool) or self.num_B < 2:
            raise ConfigError(f"`num_B` must be at least 2 for the router to be trained. Got num_B={self.num_B!r}")
