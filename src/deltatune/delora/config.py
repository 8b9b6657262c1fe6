"""``DeloraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Value of the first key of ``patterns`` that matches the end of ``module_name`` (PEFT's rule; LoRA's
    ``rank_pattern`` reads the same way, written here too so DeLoRA's room imports no other method)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


@dataclass
class DeloraConfig(PeftConfig):
    """Decoupled low-rank adaptation (DeLoRA; Bini et al., ICLR 2025, https://huggingface.co/papers/2503.18225):
    ``ΔW = (λ / r) · B diag(1 / (‖a_i‖ ‖b_i‖)) A · diag(‖W[:, j]‖)`` with ``A: (r, in)``, ``B: (out, r)`` and the
    scalar ``λ`` trained. Each rank-one term is normalised, so ``‖ΔW‖_F <= λ · max_j ‖W[:, j]‖``: the boundary
    ``λ`` is decoupled from the direction ``B A``.

    Args:
        r: Rank of ``B A``; must be positive.
        delora_lambda: Initial boundary ``λ`` (trained afterwards).
        module_dropout: Dropout probability on the adapter's input (training only; PEFT's name, PEFT's behaviour:
            an ``nn.Dropout`` on ``x``, not a whole-module skip).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"delora_only"`` (biases of adapted layers).
        init_weights: ``True``: ``A`` He-uniform, ``B = 0`` (the adapter starts as the identity); ``False``: both
            He-uniform (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        rank_pattern: ``{regex: r}`` overriding ``r`` per module.
        lambda_pattern: ``{regex: λ}`` overriding ``delora_lambda`` per module.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = 8
    delora_lambda: int = 15
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: Literal["none", "all", "delora_only"] = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.DELORA
        super().__post_init__()
        check_layer_selection(self, pattern_needs_layers=True)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` must be a positive integer; got {self.r}. Try r=8")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}]={value!r}: every rank must be a positive integer")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ConfigError(f"module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if self.bias not in ("none", "all", "delora_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'delora_only'")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def lambda_for(self, module_name: str) -> float:
        return pattern_value(self.lambda_pattern, module_name, self.delora_lambda)
