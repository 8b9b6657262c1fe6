"""``VeraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class VeraConfig(PeftConfig):
    """Vector-based random matrix adaptation (VeRA; Kopiczko et al., 2023):
    ``ΔW = diag(λ_b) B diag(λ_d) A`` with ``A: (r, in)``, ``B: (out, r)`` frozen random projections shared by
    every adapted layer (drawn once from ``projection_prng_key``) and only ``λ_d: (r,)``, ``λ_b: (out,)`` trained.

    Args:
        r: Size of the shared projections; larger than a LoRA rank (the paper uses 256-1024), since it
            adds only ``r`` trainable values per layer.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default. Linear layers (and GPT-2's ``Conv1D``) only.
        projection_prng_key: Seed of the projections ``A`` and ``B``.
        save_projection: Save ``A`` and ``B`` in the adapter file (safe everywhere); ``False`` makes the file
            tiny and regenerates them from the seed when loading (same torch version/CPU generator needed).
        vera_dropout: Dropout on the adapter's input.
        d_initial: Initial value of every ``λ_d`` entry (``λ_b`` starts at zero, so the model is unchanged).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"vera_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``λ_b = 0``, ``λ_d = d_initial``; ``False``: ``λ_b = 1``, ``λ_d ~ N(0, 1)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # PEFT's VeraConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain
    # class attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.VERA
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer, got {self.r!r}; try r=256")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise ConfigError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'vera_only'")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "(layers_pattern only names where the layer index is; set both or neither)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer indices "
                "into the regex, or pass target_modules as a list of names"
            )
        if not self.save_projection:
            warnings.warn(
                "VeraConfig(save_projection=False): the adapter file will not hold the projections A and B; loading "
                "regenerates them from projection_prng_key, which needs the same torch CPU generator",
                stacklevel=3,
            )
