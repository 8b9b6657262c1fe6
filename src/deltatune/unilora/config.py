"""``UniLoraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class UniLoraConfig(PeftConfig):
    """Uni-LoRA ("Uni-LoRA: One Vector Is All You Need", arXiv:2506.00799): every entry of every layer's LoRA
    factors ``A: (r, in)``, ``B: (out, r)`` is one entry of a single trained vector ``θ: (theta_d_length,)`` shared by
    the whole model, picked by a fixed seeded index and scaled by ``1 / √(times that entry is used)``;
    ``ΔW = B A`` (see :mod:`deltatune.unilora.layer`).

    Args:
        r: Rank of the LoRA factors built from ``θ``.
        proj_seed: Seed of the (balanced, shuffled) index assignment.
        theta_d_length: Length of ``θ``, the only trained tensor of the adapter.
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT). Linear layers (and GPT-2's ``Conv1D``) only.
        unilora_dropout: Dropout on the adapter's input.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"unilora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_theta_d_bound: ``θ ~ U(-init_theta_d_bound, init_theta_d_bound)`` (``init_weights=True``). Not zeros
            (``A`` and ``B`` both come from ``θ``: zeros would give no gradient), so a fresh adapter is not the
            identity, as PEFT's.
        init_weights: ``True``: the uniform draw above; ``False``: ``θ ~ N(0, 1)``.
        save_indices: Also save each layer's indices and scales (PEFT's ``unilora_indices_A`` ...); ``False``
            regenerates them from ``proj_seed`` when loading (numpy's seeded generator, deterministic).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: list[str] | set[str] | str | None = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "unilora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # PEFT's UniLoraConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain
    # class attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.UNILORA
        super().__post_init__()
        for name in ("r", "theta_d_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"`{name}` should be a positive integer, got {value}. (UniLoraConfig.{name}: "
                                  f"{'try 4' if name == 'r' else 'try 256'})")
        if not 0.0 <= float(self.unilora_dropout) <= 1.0:
            raise ConfigError(f"`unilora_dropout` should be between 0.0 and 1.0, got {self.unilora_dropout}.")
        if self.init_theta_d_bound <= 0:
            raise ConfigError(f"`init_theta_d_bound` should be a positive float, got {self.init_theta_d_bound}. "
                              "(try 0.02)")
        if self.bias not in ("none", "all", "unilora_only"):
            raise ConfigError(f"`bias` should be 'none', 'all', or 'unilora_only', got {self.bias}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str. Put the layer "
                              "indices into the regex, or pass target_modules as a list of names")
        check_layer_selection(self)
        if not isinstance(self.proj_seed, int) or isinstance(self.proj_seed, bool):
            raise ConfigError(f"proj_seed must be an integer seed, got {self.proj_seed!r}")
