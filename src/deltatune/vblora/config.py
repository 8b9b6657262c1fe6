"""``VBLoRAConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, check_layer_selection
from deltatune.errors import ConfigError


@dataclass
class VBLoRAConfig(PeftConfig):
    """VB-LoRA (Li et al., NeurIPS 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks"):
    LoRA's ``A: (r, in)`` and ``B: (out, r)`` are cut into sub-vectors of length ``vector_length``, each a softmax
    mix of the ``topk`` highest-scoring vectors of one bank of ``num_vectors`` vectors shared by all the adapter's
    layers; the logits and the bank train. ``ΔW = B A``, not scaled.

    Args:
        r: Rank of ``B A``; must be positive.
        num_vectors: Vectors in the bank (more for larger models).
        vector_length: Length of the bank's vectors; must divide every adapted layer's input and output size.
        topk: Bank vectors mixed per sub-vector (PEFT's advice: 2).
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``; ``None`` picks the
            architecture's default (PEFT's VB-LoRA table).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        save_only_topk_weights: Files hold, per sub-vector, the ``topk`` indices and the first ``topk - 1`` mixing
            weights instead of all ``num_vectors`` logits (much smaller); such an adapter serves and merges but
            cannot resume training (its other logits are ``-inf``).
        vblora_dropout: Dropout probability on the adapter's input ``x`` (training only).
        fan_in_fan_out: The base stores ``W`` as ``(in, out)`` (GPT-2's ``Conv1D``); set per layer from its type.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"vblora_only"`` (biases of adapted layers).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
        init_vector_bank_bound: The bank starts ``U(-bound, bound)`` (not zero: the logits would get no gradient).
        init_logits_std: The logits start ``N(0, std²)``.
        layers_to_transform, layers_pattern: Keep only these block indices (``<pattern>.<i>.`` in the name).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.VBLORA
        super().__post_init__()
        check_layer_selection(self)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                              "Give the block indices to adapt, or drop layers_pattern")
        if not 0.0 <= float(self.vblora_dropout) < 1.0:
            raise ConfigError(f"VBLoRAConfig.vblora_dropout must be in [0, 1), got {self.vblora_dropout!r}")
