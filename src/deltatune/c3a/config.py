"""``C3AConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError

INIT_CHOICES = ("gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(PeftConfig):
    """Circular convolution adaptation (C3A; Chen et al., 2024, arXiv 2407.19342): ``ΔW`` is a block-circulant
    matrix, ``(out/b) x (in/b)`` blocks of size ``b x b``, each defined by one length-``b`` kernel; applied with
    FFTs, so ``out · in / b`` values train.

    Args:
        block_size: ``b``; must divide both the input and the output size of every target layer (PEFT's advice:
            the greatest common divisor of them). Larger: fewer values.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, GPT-2's ``mlp.c_proj``, as PEFT).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"c3a_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        block_size_pattern: ``{regex: block_size}`` overriding ``block_size`` for the modules whose name ends in
            ``.<regex>`` (PEFT's rule), or whose full name is the key.
        init_weights: ``"xavier_uniform"`` (default; also ``False``): ``U(-a, a)``, ``a = sqrt(6 / (in + out))``;
            ``"kaiming_uniform"``: ``a = 1 / sqrt(in)``; ``"gaussian"``: ``N(0, 1)``; ``True``: zeros (the adapter
            starts as the identity).
    """

    block_size: int = 256
    target_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str | None = "xavier_uniform"

    def __post_init__(self) -> None:
        self.peft_type = PeftType.C3A
        super().__post_init__()
        check_layer_selection(self)
        if not (isinstance(self.init_weights, bool) or self.init_weights in INIT_CHOICES):
            raise ConfigError(f"Unknown init_weights: {self.init_weights}. Use True (zeros), False, "
                              f"{', '.join(repr(c) for c in INIT_CHOICES)}")

    def block_size_for(self, module_name: str) -> int:
        """PEFT's rule: the first key ``k`` of ``block_size_pattern`` with ``module_name`` matching ``.*\\.k$``;
        else the entry for the full name; else ``block_size``."""
        key = next((k for k in self.block_size_pattern if re.match(rf".*\.{k}$", module_name)), module_name)
        return self.block_size_pattern.get(key, self.block_size)
