"""``FrodConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class FrodConfig(PeftConfig):
    """FRoD (AAAI 2026, https://doi.org/10.1609/aaai.v40i31.39813): every adapted weight is rewritten exactly as
    ``W = U diag(λ) Vᵀ`` over a basis ``V: (in, in)`` shared by the layers of one role (all ``q_proj``...), and the
    adapted weight is ``W' = U (diag(λ) + S) Vᵀ``: only ``λ: (in,)`` and the values of a fixed sparse
    off-diagonal ``S: (in, in)`` train; ``U: (out, in)`` and ``V`` stay frozen.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (VeRA's table in PEFT, i.e. LoRA's with ``q_proj``/``v_proj`` for Phi).
            ``nn.Linear`` and GPT-2's ``Conv1D`` only.
        projection_prng_key: Seed of the generator that draws the positions of ``S``'s non-zeros.
        save_projection: Save the shared ``V``, ``S``'s positions and sizes in the adapter file (PEFT's default);
            ``False`` rebuilds them from the base weights and the seed when loading.
        frod_dropout: Dropout on the adapter's input (training only).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type
            (with PEFT's warning when it disagrees).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"frod_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True``: ``S = 0`` and ``λ`` the column norms of ``W V⁻ᵀ`` (the adapter starts as the
            identity); ``False``: ``S ~ N(0, 0.1²)`` and ``λ`` moved by ``N(0, 0.1²)`` (tests).
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        sparse_rate: Fraction of ``S``'s ``in²`` entries that train: ``min(⌊in² · rate⌋, in² - in)``, at least
            one when positive.
        regularization_alpha: Ridge term ``α`` of the shared basis' inverses (correlated layers of one role).
        progressbar: Show a progress bar while the bases are built (one decomposition per role).
        runtime_offload_base_weight: Keep the adapted layers' base weights on the CPU while the adapter replaces
            them in the forward (one active adapter, no dropout): saves accelerator memory, moves them back for
            any path that needs them.
    """

    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "frod_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    # PEFT's FrodConfig has no exclude_modules; the shared targeting reads it, so it exists as a plain class
    # attribute (not a field: it must not appear in adapter_config.json).
    exclude_modules = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.FROD
        super().__post_init__()
        check_layer_selection(self, pattern_needs_layers=True)
        if self.sparse_rate < 0 or self.sparse_rate > 1:
            raise ConfigError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}. It is the "
                              "fraction of S's entries that train, e.g. 0.01")
        if not 0.0 <= float(self.frod_dropout) < 1.0:
            raise ConfigError(f"frod_dropout must be in [0, 1), got {self.frod_dropout!r}")
        if self.bias not in ("none", "all", "frod_only"):
            raise ConfigError(f"bias={self.bias!r} is not one of 'none', 'all', 'frod_only'")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
