"""``PeanutConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.activations import ACT2FN

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class PeanutConfig(PeftConfig):
    """PEANuT (Zhong et al., 2024, https://arxiv.org/abs/2410.01870): the weight update is a small non-linear
    network *of the frozen weight*, ``ΔW = scaling · f(W0)``; with ``W0: (out, in)`` read as ``in`` column vectors
    of length ``out``, ``f`` maps each through ``A: out -> r``, ``depth`` encoder and ``depth`` decoder layers
    ``r -> r`` (with U-Net-like residuals) and ``B: r -> out``. Only ``A``, ``B`` and the ``2 · depth`` hidden
    layers train: ``r · (2 · out + 2 · depth · r)`` values per adapted layer.

    Args:
        r: Hidden width of the network (the rank of ``ΔW`` is at most ``r``); must be positive.
        depth: Hidden layers per side (encoders, then as many decoders); ``0``: ``A`` then ``B``; must be ``>= 0``.
        act_fn: The non-linearity ``σ`` after ``A`` and every hidden layer, a key of transformers' ``ACT2FN``
            (``"relu"``, ``"gelu"``, ``"silu"``...).
        scaling: The factor on ``f(W0)``; the adapter adds ``scaling · x f(W0)ᵀ``.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name);
            ``layers_pattern`` needs ``layers_to_transform`` (PEFT's refusal).
        init_weights: ``True``: ``B = 0`` (the adapter starts as the identity), the others He-uniform (PEFT's
            ``kaiming_uniform_(a=√5)``, as ``nn.Linear``); ``False``: ``B`` He-uniform too (tests).
    """

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PEANUT
        super().__post_init__()
        # PEFT's checks only (its PeanutConfig does not refuse layers_to_transform beside a regex target)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` must be a positive integer. Got r={self.r!r}; try r=32")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ConfigError(f"`depth` can only be a non-negative integer. Got depth={self.depth!r}; 0 is A then B")
        if self.act_fn not in ACT2FN:
            raise ConfigError(f"Unsupported `act_fn`: {self.act_fn}. Must be one of {sorted(ACT2FN.keys())}.")
