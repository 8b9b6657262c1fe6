"""``HRAConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, check_layer_selection


@dataclass
class HRAConfig(PeftConfig):
    """Householder reflection adaptation (HRA; Yuan et al., 2024, https://arxiv.org/abs/2405.17484): the weight
    is multiplied on its input side by ``r`` Householder reflections, ``W' = W · Π_i (I − 2 u_i u_iᵀ / ‖u_i‖²)``.

    Args:
        r: Number of reflections (columns of ``hra_u``). Best even: the default init pairs equal vectors, whose
            two reflections cancel, so the adapter starts as the identity; an odd ``r`` cannot (PEFT warns).
        apply_GS: Orthonormalise the ``u_i`` by Gram-Schmidt first (``Q``), so the product is the single
            reflection ``I − 2 Q Qᵀ``. Use it with ``init_weights=False``: the symmetric init's equal pairs
            leave Gram-Schmidt only rounding noise to normalise (a warning says so).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks
            the architecture's default (LoRA's table, as PEFT). ``nn.Linear``, ``nn.Conv2d`` (groups 1) and
            GPT-2's ``Conv1D``.
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        init_weights: ``True``: symmetric init in pairs (identity at the start); ``False``: all He-uniform.
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"hra_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.HRA
        super().__post_init__()
        check_layer_selection(self, pattern_needs_layers=True)
        if self.apply_GS and self.init_weights is True and isinstance(self.r, int) and self.r % 2 == 0:
            # deltatune's own warning (PEFT runs it silently): the pairs' second vectors are their first, so
            # Gram-Schmidt normalises rounding noise into random directions, and their gradients can blow up
            warnings.warn("HRAConfig(apply_GS=True) with the symmetric init (init_weights=True): each pair's second "
                          "vector equals its first, so Gram-Schmidt turns rounding noise into random reflections (not "
                          "the identity; training can diverge to NaN). Pass init_weights=False with apply_GS",
                          UserWarning, stacklevel=3)
