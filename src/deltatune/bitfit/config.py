"""``BitFitConfig``: bias-only tuning (deltatune's own method; PEFT has none, so only deltatune reads its files)."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit (Ben Zaken et al., 2022): train only bias terms, ``y = base(x) + Δb``.

    Each targeted layer gets a trainable bias offset ``Δb: (out,)`` that starts at zero (identity). Layers
    without a bias (Llama's projections) get one this way; merging then creates the bias in the base layer.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` means
            ``"all-linear"``. ``LayerNorm`` layers can be named too (their ``β`` is an output bias).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_weights: ``True`` starts every ``Δb`` at zero; ``False`` draws it at random (for tests).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True

    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BITFIT
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
