"""``DeftConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError

DECOMPOSITION_METHODS = ("qr", "relu")  # sorted, as PEFT's refusal lists them


@dataclass
class DeftConfig(PeftConfig):
    """DEFT (Decompositional Efficient Fine-Tuning): for a frozen ``W: (out, in)``, a learned projection direction
    ``P: (out, r)`` and injection ``R: (r, in)``::

        W' = (I - P_proj) W + Q_P (s R),    s = alpha / r (1 when alpha is None)

    with ``decomposition_method`` ``"relu"``: ``Q_P = P``, ``P_proj = P relu(P)ᵀ`` (not orthogonal), or ``"qr"``:
    ``Q_P = qr(P).Q``, ``P_proj = Q_P Q_Pᵀ`` (orthogonal). ``para=True`` is PaRa: ``W' = (I - P_proj) W``, no ``R``.

    Args:
        r: Rank of ``P`` and ``R`` (capped at the layer's ``out``).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (LoRA's table, as PEFT).
        exclude_modules: Names/suffixes or a regex of modules never adapted.
        decomposition_method: ``"relu"`` (default) or ``"qr"``: how ``P_proj`` and ``Q_P`` come from ``P``.
        init_scale: Multiplies the std (0.02) of ``R``'s random draw when ``init_weights=False``.
        alpha: Injection scaling ``s = alpha / r``; ``None``: ``s = 1``. The removal term is not scaled.
        para: PaRa: pure subspace removal ``ΔW = -P_proj W``; only ``P`` trains; not the identity at init.
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set from the layer's type.
        deft_dropout: Dropout on the injection term's input.
        init_weights: ``True``: ``R = right(P)ᵀ W / s``, so ``W' = W`` at init; ``False``: ``R ~ N(0, (0.02
            init_scale)²)`` (the original DEFT: a subspace of ``W`` is replaced from the start).
        layers_to_transform, layers_pattern: Restrict the targets to these layer indices.
        bias: ``"none"``, ``"all"`` or ``"deft_only"`` (biases of adapted layers train).
        modules_to_save: Modules trained in full and saved with the adapter.
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: int | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.DEFT
        super().__post_init__()
        # target/exclude lists become sets; PEFT's refusals of a regex with layers, and of a pattern without them
        check_layer_selection(self, pattern_needs_layers=True)
        if self.decomposition_method not in DECOMPOSITION_METHODS:  # PEFT's sentence
            raise ConfigError(f"Unknown decomposition_method '{self.decomposition_method}', must be one of "
                              f"{list(DECOMPOSITION_METHODS)}.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:  # PEFT refuses it in the layer
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if not 0.0 <= float(self.deft_dropout) < 1.0:
            raise ConfigError(f"DeftConfig.deft_dropout must be in [0, 1), got {self.deft_dropout!r}")
