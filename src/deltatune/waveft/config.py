"""``WaveFTConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError
from deltatune.waveft.wavelets import SUPPORTED_FAMILIES

# The families PEFT's config accepts: Daubechies 1-38, symlets 2-20, coiflets 1-17 (its filters cover db1-10,
# sym2-10, coif1-5; deltatune computes db1-20, sym2-10, coif1-3, see wavelets.py)
PEFT_FAMILIES = ([f"db{n}" for n in range(1, 39)] + [f"sym{n}" for n in range(2, 21)]
                 + [f"coif{n}" for n in range(1, 18)])


@dataclass
class WaveFTConfig(PeftConfig):
    """Wavelet fine-tuning (WaveFT; Bilican et al., 2025, "Exploring Sparsity for Parameter Efficient Fine
    Tuning Using Wavelets"): ``ΔW = scaling · IDWT(S)``, where ``S`` (the wavelet coefficients of ``ΔW``, padded to
    even sizes) is zero but for ``n_frequency`` trained values at positions drawn from ``random_loc_seed``.

    Args:
        n_frequency: Trained coefficients per adapted layer, ``0 < n_frequency <= out · in``.
        scaling: Factor on the reconstructed ``ΔW`` (PEFT's default 25, its SDXL setting; like LoRA's alpha).
        wavelet_family: ``"db1"`` (Haar, default) ... ``"db20"``, ``"sym2"`` ... ``"sym10"``, ``"coif1"`` ...
            ``"coif3"``; longer filters cost more per step.
        use_idwt: ``True``: ``ΔW`` is the inverse transform of the coefficients; ``False``: the coefficients are
            ``ΔW``'s entries themselves (a sparse ``ΔW``, cheaper).
        random_loc_seed: Seed of the coefficients' positions (a ``torch.randperm`` of ``out · in``).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (PEFT's WaveFT table).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"waveft_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        n_frequency_pattern: ``{regex: n_frequency}`` overriding ``n_frequency`` for the modules whose name ends in
            ``.<regex>`` (PEFT's rule).
        proportional_parameters: Share the budget ``n_frequency · (number of adapted layers)`` among the layers in
            proportion to ``in · out`` (at least 1 each); wins over ``n_frequency_pattern``.
        init_weights: ``True``: zero coefficients (the adapter starts as the identity); ``False``: ``N(0, 0.01²)``.
    """

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.WAVEFT
        super().__post_init__()
        check_layer_selection(self)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "Give the block indices to adapt, or drop layers_pattern")
        if self.wavelet_family not in PEFT_FAMILIES:
            raise ConfigError(f"Wavelet family {self.wavelet_family} not supported. Supported wavelet families are: "
                              f"{PEFT_FAMILIES}")
        if self.use_idwt and self.wavelet_family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"Wavelet family {self.wavelet_family} not supported. deltatune computes the filters "
                              f"of {list(SUPPORTED_FAMILIES)}; pick one of these, or use_idwt=False (no transform)")

    def n_frequency_for(self, module_name: str) -> int:
        """PEFT's rule: the first key ``k`` of ``n_frequency_pattern`` with ``module_name`` matching
        ``(.*\\.)?k$``; else ``n_frequency``."""
        for key, value in self.n_frequency_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        # PEFT then looks the full name up as a key, which the regex may not match literally
        return self.n_frequency_pattern.get(module_name, self.n_frequency)


__all__ = ["PEFT_FAMILIES", "WaveFTConfig"]
