"""``RandLoraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class RandLoraConfig(PeftConfig):
    """RandLoRA (Albert et al., ICLR 2025, https://huggingface.co/papers/2502.00987): a full-rank update from
    ``n = ceil(min(out, in) / r)`` frozen random bases of rank ``r`` shared by every adapted layer, each scaled by
    two trained diagonal matrices, ``ΔW = (α / r) Σ_b B_b Λ_b A Γ_b`` (see :mod:`deltatune.randlora.layer`).

    Args:
        r: Rank of each random basis. Unlike LoRA's, a smaller ``r`` means more bases, hence more trained values
            (``r · n + n · min(out, in)`` per layer) and a larger shared ``B``.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). Linear layers (and GPT-2's ``Conv1D``) only.
        projection_prng_key: Seed of the shared bases ``A`` and ``B``.
        save_projection: Save ``A`` and ``B`` in the adapter file (safe everywhere); ``False`` makes the file small
            and redraws them from the seed when loading (same torch version/CPU generator needed).
        sparse: Ternary bases (``-1, 0, 1`` with probabilities ``1/6, 2/3, 1/6``, scaled to unit std) instead of
            He-uniform ones; computed densely (a proof of concept, as PEFT's).
        very_sparse: Ternary bases with ``P(±1) = 1 / (2 sqrt(D))``, ``D`` the smaller side of the largest target;
            wins over ``sparse``.
        randlora_dropout: Dropout on the adapter's input.
        randlora_alpha: The update is scaled by ``randlora_alpha / r`` (typically ``20 r``; large, so lower it or
            the learning rate if training is unstable).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"randlora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``Λ = 0`` (the model is unchanged), ``Γ = 1 / max(n, min(out, in))``; ``False``:
            ``Λ ~ N(0, 1)``, ``Γ = 1 / max(out, in)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: Literal["none", "all", "randlora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # PEFT's RandLoraConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain
    # class attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.RANDLORA
        super().__post_init__()
        check_layer_selection(self)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}. "
                              "(RandLoraConfig.r is each random basis' rank; try r=32)")
        if not 0.0 <= float(self.randlora_dropout) < 1.0:
            raise ConfigError(f"randlora_dropout must be in [0, 1), got {self.randlora_dropout!r}")
        if self.bias not in ("none", "all", "randlora_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'randlora_only'")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save basis_A and basis_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
