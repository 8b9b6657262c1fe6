"""``LNTuningConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from deltatune.config import PeftConfig, PeftType

# PEFT's defaults by ``model.config.model_type``: every normalisation layer of the architecture.
DEFAULT_LN_TUNING_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@dataclass
class LNTuningConfig(PeftConfig):
    """LayerNorm tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"): each targeted normalisation layer
    gets a trainable copy per adapter; the frozen original stays for ``disable_adapter`` and other adapters.

    Args:
        target_modules: Names/suffixes or a regex string (full match) of the norm layers; ``None`` picks the
            architecture's default (PEFT's table) and, for an architecture not in it (BERT, ...), every
            normalisation layer with weights (``LayerNorm``, ``RMSNorm``, ``GroupNorm`` ... by class name), where
            PEFT asks for ``target_modules``. Any module with parameters can be targeted (PEFT's LLaVA default also
            tunes ``embed_tokens``/``lm_head`` this way).
        exclude_modules: Same forms as ``target_modules``; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier head).
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None

    # Not fields of PEFT's LNTuningConfig; the shared targeting reads them.
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LN_TUNING
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
