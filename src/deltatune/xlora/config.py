"""``XLoraConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType, PeftWarning
from deltatune.errors import ConfigError


@dataclass
class XLoraConfig(PeftConfig):
    """X-LoRA (Buehler & Buehler, 2024, arXiv:2402.07148): a learned, per-token mixture of frozen LoRA experts.

    For every token the model first runs once with the experts at a fixed weight (the "scaling pass"); a small
    classifier reads that pass's last hidden state ``h: (batch, seq, hidden_size)`` and predicts the weights
    ``g: (batch, seq, n_layers, n_experts)``; the model then runs again with each LoRA layer ``l`` adding
    ``Σ_e w · s_e B_e A_e (g[..., l, e] · x)`` (``w``: ``global_scaling_weight``, ``s_e``: the expert's own
    ``lora_alpha / r``).

    Args:
        hidden_size: The base model's hidden size (the classifier's input width). ``None``: 4096, with PEFT's
            warning.
        adapters: ``{name: directory}`` of the LoRA experts (folders written by ``save_pretrained``, deltatune's or
            PEFT's), in order: expert ``i`` is the ``i``-th entry and its LoRA adapter is named ``str(i)``, as in
            PEFT. PEFT itself needs the keys to be ``"0"``, ``"1"``, ... (it activates the experts by these
            names), so use those where PEFT is to read the adapter.
        enable_softmax: Softmax over the experts of the classifier's logits (divided by ``softmax_temperature``).
        enable_softmax_topk: Softmax over the ``top_k_lora`` weights kept (the others stay 0); only with
            ``top_k_lora``.
        softmax_temperature: Temperature of the softmax (lower: sharper).
        layerwise_scalings: One weight per expert and LoRA layer (the classifier's output is ``n_experts *
            n_layers`` wide); ``False``: the same weights in every layer.
        top_k_lora: Keep only the ``k`` largest weights per token and layer (the others become 0); ``None``: dense.
        xlora_depth: Linear layers of the classifier (1: a single ``hidden_size -> n_experts`` layer).
        xlora_size: Width of the classifier's hidden layers (when ``xlora_depth > 1``).
        xlora_dropout_p: Dropout after each hidden layer of the classifier (when ``xlora_depth > 1``).
        use_trainable_adapters: Train the experts too (by default only the classifier trains).
        scaling_pass_value: The weight of every expert in the scaling pass (0: that pass is the base model).
        global_scaling_weight: ``w``, a factor on every expert's output.
    """

    hidden_size: int = None  # type: ignore[assignment]  (PEFT's: None becomes 4096 in __post_init__)
    adapters: dict[str, str] = None  # type: ignore[assignment]  (None becomes {})
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.XLORA
        super().__post_init__()
        # PEFT's warnings, in its words (stacklevel: the caller of XLoraConfig(...))
        if self.hidden_size is None:
            warnings.warn("No value was provided for `hidden_size`. This will be set to 4096 by default, please "
                          "ensure that this is correct.", PeftWarning, stacklevel=3)
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn("No value was provided for `adapters`. This will be set to empty, please ensure that this "
                          "is correct.", PeftWarning, stacklevel=3)
            self.adapters = {}
        self.adapters = dict(self.adapters)
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set", PeftWarning, stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse "
                          "performance.", PeftWarning, stacklevel=3)
        if self.top_k_lora is not None and self.top_k_lora < 1:
            warnings.warn("`top_k_lora` value must be at least 1.", PeftWarning, stacklevel=3)
        if self.xlora_depth <= 0:  # PEFT refuses this when it builds the classifier; here before anything is built
            raise ConfigError(f"X-LoRA depth must be strictly positive. (xlora_depth={self.xlora_depth}; 1 is a "
                              "single linear layer)")
        if self.softmax_temperature <= 0:
            raise ConfigError(f"softmax_temperature must be positive, got {self.softmax_temperature}")
