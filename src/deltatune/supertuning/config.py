"""``SupertuningConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass
class SupertuningConfig(PeftConfig):
    """Super-Tuning (arXiv:2607.09287): the base weight stays frozen; ``K = int(out · in · (1 - sparsity))`` of its
    entries, chosen by magnitude (the largest, or the smallest with ``select_top=False``), get a trained value added::

        W' = W + S + (lora_alpha / r) B A,   S = scatter(values at indices) (out, in),  A: (r, in), B: (out, r)

    The LoRA term ("Supra") exists only when ``r`` is set.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        modules_to_save: Modules trained in full and saved with the adapter.
        sparsity: In ``[0, 1)``: the share of entries left frozen (0.99: 1% train).
        select_top: ``True``: the largest-magnitude entries train; ``False``: the smallest.
        r: LoRA rank of the Supra hybrid; ``None``: the sparse values alone.
        lora_alpha: LoRA scaling numerator; ``None`` with ``r`` set becomes ``2 r``; must be ``None`` without ``r``.
        lora_dropout: Dropout on the LoRA term's input.
        init_weights: ``True``: values and ``B`` zero (the identity); ``False``: values ``N(0, 1)``, ``B``
            Kaiming-uniform (tests).
        save_precomputed_indices: Write the positions into the file; ``False``: they are recomputed from the base
            weight's magnitudes when the adapter is loaded (the same base gives the same positions).
    """

    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.SUPERTUNING
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if not 0.0 <= self.sparsity < 1.0:  # PEFT's sentences
            raise ConfigError(f"sparsity must be in [0.0, 1.0), got {self.sparsity}")
        if self.r is not None:
            if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
                raise ConfigError(f"r must be a positive integer or None, got {self.r!r}")
            if self.lora_alpha is None:
                self.lora_alpha = 2 * self.r
        elif self.lora_alpha is not None:
            raise ConfigError("lora_alpha is set but r is None — Supra mode requires an explicit r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0.0, 1.0), got {self.lora_dropout}")
        if not self.save_precomputed_indices:
            warnings.warn("save_precomputed_indices=False: sparse-support indices will be recomputed from base weight "
                          "magnitudes at load time. This assumes the base model is identical to training time; "
                          "numerical drift can cause topk tie-breaks to differ.", stacklevel=3)
