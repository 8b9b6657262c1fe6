"""``MissConfig``: Hugging Face PEFT's field names, defaults and meaning (PEFT's ``MissConfig``, formerly Bone)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError

# The values ``init_weights`` may take, each a MiSS variant (see ``deltatune.miss.layer``).
MISS_VARIANTS = (True, False, "bat", "mini")


@dataclass
class MissConfig(PeftConfig):
    """Matrix shard sharing (MiSS; Kang & Yin, 2024, https://arxiv.org/abs/2409.15371): one small trainable block
    is shared by every ``r``-wide shard of the weight's input dimension.

    For ``W: (out, in)``: balance (``init_weights=True``) trains ``D: (r, out)`` with ``ΔW[o, i] = D[i mod r, o]``;
    ``"mini"`` trains ``D: (r, mini_r)`` repeated ``out / mini_r`` times along ``out``; ``"bat"`` trains
    ``D: (out / r, r, r)`` and updates each ``r×r`` block of ``W`` as ``W_ac ← W_ac + W_ac D_a + D_a``.

    Args:
        r: Shard width along ``in_features`` (``1 <= r <= in_features``; ``"bat"`` needs ``in`` and ``out``
            divisible by it). Best even.
        miss_dropout: Dropout on the adapter's input (balance and mini; ``"bat"`` has no input path).
        mini_r: Width of the ``"mini"`` block along ``out_features`` (``out_features % mini_r == 0``).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default (LoRA's table, as PEFT). Linear layers (and GPT-2's ``Conv1D``) only.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        init_weights: The variant: ``True`` balance (zeros: starts as the identity), ``False`` balance with a
            He-uniform block (tests), ``"bat"`` block-wise linear update (zeros), ``"mini"`` (zeros).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"MiSS_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | Literal["bat", "mini"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.MISS
        super().__post_init__()
        check_layer_selection(self)
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in MISS_VARIANTS):
            raise ConfigError(f"MissConfig.init_weights must be True, False, 'bat' or 'mini', got "
                              f"{self.init_weights!r}")
        if not 0.0 <= float(self.miss_dropout) < 1.0:
            raise ConfigError(f"MissConfig.miss_dropout must be in [0, 1), got {self.miss_dropout!r}")

    @property
    def variant(self) -> str:
        """``"balance"``, ``"bat"`` or ``"mini"`` (``init_weights`` True and False are both balance)."""
        return self.init_weights if isinstance(self.init_weights, str) else "balance"
