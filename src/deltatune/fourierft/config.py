"""``FourierFTConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class FourierFTConfig(PeftConfig):
    """Fourier fine-tuning (FourierFT; Gao et al., ICML 2024, arXiv 2405.03003): ``ΔW`` is the real part of the
    inverse 2-D DFT of a spectrum that is zero except at ``n_frequency`` positions, drawn at random (from
    ``random_loc_seed``) and shared by every layer of the same shape; only those ``n_frequency`` values train.

    Args:
        n_frequency: Learned spectral entries per layer, ``0 < n_frequency <= in · out`` (the trainable values of
            each adapted layer). PEFT's guide: 1000 for RoBERTa-large on GLUE (~ LoRA r=8), 3000 for ViT-large.
        scaling: ``ΔW`` is multiplied by this (like LoRA's ``lora_alpha``). PEFT's guide: 100-150 for RoBERTa,
            300 for LLaMA and ViT.
        random_loc_seed: Seed of the positions of the learned entries (``torch.randperm`` with this seed, as
            PEFT: the positions are not in the file, so both libraries must draw the same ones).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type
            (with PEFT's warning when it disagrees, and the config corrected as PEFT does).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table; GPT-2's and GPT-BigCode's ``mlp.c_proj``, as PEFT).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"fourier_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        n_frequency_pattern: ``{regex: n_frequency}`` overriding ``n_frequency`` for the modules whose name ends in
            ``.<regex>`` (PEFT's rule), or whose full name is the key.
        init_weights: ``False`` (PEFT's default): the spectrum starts ``N(0, 1)``, so the adapter does *not* start as
            the identity; ``True``: zeros (the identity).
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        self.peft_type = PeftType.FOURIERFT
        super().__post_init__()
        check_layer_selection(self)
        if self.layers_pattern and self.layers_to_transform is None:  # PEFT's sentence
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "Pass the block indices to adapt, or drop layers_pattern")
        for name, value in [("n_frequency", self.n_frequency), *(
                (f"n_frequency_pattern[{k!r}]", v) for k, v in (self.n_frequency_pattern or {}).items())]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"`{name}` should be a positive integer value but the value passed is {value}")
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool):
            raise ConfigError(f"random_loc_seed must be an integer (it seeds the positions of the learned "
                              f"frequencies), got {self.random_loc_seed!r}; PEFT's default is 777")
        if self.bias not in ("none", "all") and not str(self.bias).endswith("_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'fourier_only'")

    def n_frequency_for(self, module_name: str) -> int:
        """PEFT's rule: the first key ``k`` of ``n_frequency_pattern`` with ``module_name`` matching ``.*\\.k$``;
        else the entry for the full name; else ``n_frequency``."""
        key = next((k for k in self.n_frequency_pattern if re.match(rf".*\.{k}$", module_name)), module_name)
        return self.n_frequency_pattern.get(key, self.n_frequency)
