"""``AdaLoraConfig``: Hugging Face PEFT's AdaLoRA fields, defaults and meaning.

AdaLoRA (Zhang et al., 2023, arXiv 2303.10512) writes each update as an SVD-like triplet
``ΔW = P Λ Q`` and, during training, moves a shrinking total rank budget to the layers whose triplets
matter most. The schedule has three phases over ``total_step`` optimizer steps::

    steps 1 .. tinit                      warm-up: every layer keeps init_r triplets
    tinit .. total_step - tfinal          budget falls cubically from n·init_r to n·target_r;
                                          every deltaT steps the least important triplets are masked
    total_step - tfinal .. total_step     the rank pattern is fixed; training goes on with it
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from deltatune.config import PeftType
from deltatune.errors import ConfigError
from deltatune.lora.config import LoraConfig
from deltatune.lora.variants import variants_of


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AdaLoraConfig(LoraConfig):
    """Adaptive-budget LoRA. Takes every :class:`~deltatune.LoraConfig` targeting field
    (``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``modules_to_save``...) plus:

    Args:
        init_r: Triplets per adapted layer at the start (``r`` is not used; PEFT warns the same).
        target_r: Average triplets per layer at the end; the final total budget is ``target_r · n_layers``.
        tinit: Warm-up steps before any triplet is masked.
        tfinal: Steps at the end trained with the final, fixed rank pattern.
        deltaT: During the budget phase, re-mask every ``deltaT`` steps.
        beta1: EMA factor of the sensitivity ``|w · ∂L/∂w|``.
        beta2: EMA factor of its uncertainty ``|I - Ī|``.
        orth_reg_weight: Weight of ``mean(||P^T P - I||_F, ||Q Q^T - I||_F)`` added to a training loss.
        total_step: Optimizer steps the run will take (the trainer's max steps); required.
        rank_pattern: Written by training: ``{"<module>.lora_E": [keep, ...]}`` with one boolean per triplet.
            Saved files hold only the kept triplets; loading builds each layer at ``sum(keep)`` triplets.
        lora_alpha: The update is scaled by ``lora_alpha / init_r`` (PEFT: ``scaling / ranknum``).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's field name (camelCase), kept for the file format
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    # The rank allocator prunes from importance scores of one process's gradients; ranks would drift apart.
    distributed_refusal = "AdaLoRA's rank allocation runs in one process only; train it without torchrun"

    def __post_init__(self) -> None:
        super().__post_init__()  # LoraConfig's checks, then ours (see _validate)
        self.peft_type = PeftType.ADALORA

    def _validate(self) -> None:
        # LoraConfig's checks read rank_pattern as {regex: int}; AdaLoRA's is {module: [bool]}, checked below.
        pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            super()._validate()
        finally:
            self.rank_pattern = pattern
        self._validate_schedule()
        self._validate_layer_options()
        self._validate_rank_pattern()

    def _validate_schedule(self) -> None:
        if self.total_step is None:
            raise ConfigError(
                "AdaLoRA does not work when `total_step` is None, supply a value > 0. "
                "AdaLoraConfig.total_step is the number of optimizer steps you will train "
                "(e.g. len(train_dataloader) * epochs // grad_accum, or the trainer's max_steps); the rank "
                "budget schedule runs from tinit to total_step - tfinal"
            )
        if not _is_int(self.total_step) or self.total_step <= 0:
            # PEFT's sentence for total_step <= 0; a non-integer is refused too (PEFT would fail later)
            raise ConfigError("AdaLoRA does not work when `total_step` is None, supply a value > 0. "
                              f"AdaLoraConfig.total_step must be a positive integer, got {self.total_step!r}")
        if not _is_int(self.init_r) or self.init_r <= 0:
            raise ConfigError(f"AdaLoraConfig.init_r must be a positive integer, got {self.init_r!r}; 12 is usual")
        if not _is_int(self.target_r) or self.target_r < 0:
            raise ConfigError(f"AdaLoraConfig.target_r must be an integer >= 0, got {self.target_r!r}")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoraConfig.target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only "
                "removes rank; raise init_r or lower target_r"
            )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"AdaLoraConfig.{name} must be an integer >= 0, got {value!r}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                f"increase `total_step`. (AdaLoraConfig: tinit={self.tinit} + tfinal={self.tfinal} >= "
                f"total_step={self.total_step})"
            )
        if not _is_int(self.deltaT) or self.deltaT < 1:
            raise ConfigError(f"AdaLoraConfig.deltaT must be a positive integer (steps between re-masking), "
                              f"got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
                raise ConfigError(f"AdaLoraConfig.{name} must lie strictly between 0 and 1, got {value!r}; "
                                  "0.85 is usual")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ConfigError("`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                              f"{self.orth_reg_weight}")

    def _validate_layer_options(self) -> None:
        for variant in variants_of(self):
            if not variant.adalora:
                raise ConfigError(f"PeftType.ADALORA does not support {variant.label}. Set {variant.flag}=False, or "
                                  f"use LoraConfig({variant.flag}=True)")
        if self.loftq_config and self.init_lora_weights == "loftq":  # otherwise loftq_config is ignored, as in PEFT
            raise ConfigError("PeftType.ADALORA does not support LOFTQ. Drop loftq_config (and "
                              "init_lora_weights='loftq'), or use LoraConfig for LoftQ")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"AdaLoraConfig.init_lora_weights={self.init_lora_weights!r}: AdaLoRA starts from Λ = 0 with "
                "small random P, Q (True), or all random for tests (False)"
            )
        if self.r != 8:  # LoraConfig's default
            # PEFT's text, so filters and tests written for PEFT's warning catch this one
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.", stacklevel=6)
        ignored = [name for name, default in (("use_rslora", False), ("lora_bias", False))
                   if getattr(self, name) != default]
        if self.alpha_pattern:
            ignored.append("alpha_pattern")
        if ignored:
            warnings.warn(f"AdaLoraConfig ignores {ignored} (as PEFT does): every layer is scaled by "
                          "lora_alpha / init_r", stacklevel=6)

    def _validate_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"AdaLoraConfig.rank_pattern must be a dict {{module.lora_E: [bool, ...]}} or None, "
                              f"got {type(self.rank_pattern).__name__}")
        for key, keep in self.rank_pattern.items():
            if not isinstance(keep, (list, tuple)) or not all(isinstance(k, bool) or k in (0, 1) for k in keep):
                raise ConfigError(
                    f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of booleans (one per triplet, True = "
                    f"kept), got {keep!r}; it is written by training, not set by hand"
                )
