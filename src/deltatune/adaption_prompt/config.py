"""``AdaptionPromptConfig``: Hugging Face PEFT's field names, defaults and meaning, and the table of model types the
method knows (which attention module it wraps and how that module computes its queries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


class ModelTypeConfig(NamedTuple):
    """How the method reads one architecture.

    Attributes:
        target_modules: The attention modules' attribute name in each block (``self_attn``, GPT-2's ``attn``).
        layout: ``"qkvo"``: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (Llama, Mistral, Qwen2/3; a
            ``q_norm``/``k_norm`` is applied where the module has one); ``"gpt2"``: one packed ``c_attn`` and the
            prompt's output is added without ``c_proj`` (PEFT's ``AdaptedAttentionGPT``).
        in_peft: Whether peft 0.21.2 knows the model type (files of the others are read by deltatune only).
    """

    target_modules: str
    layout: str
    in_peft: bool


# PEFT's TRANSFORMERS_MODEL_CONFIG (llama, mistral, gpt2), plus Qwen2/Qwen3, whose attention is Llama's (Qwen3 with
# per-head RMS norms of queries and keys, applied to the prompt's keys too).
TRANSFORMERS_MODEL_CONFIG: dict[str, ModelTypeConfig] = {
    "llama": ModelTypeConfig("self_attn", "qkvo", True),
    "mistral": ModelTypeConfig("self_attn", "qkvo", True),
    "gpt2": ModelTypeConfig("attn", "gpt2", True),
    "qwen2": ModelTypeConfig("self_attn", "qkvo", False),
    "qwen3": ModelTypeConfig("self_attn", "qkvo", False),
}


def _positive_int(value: object, name: str, hint: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; {hint}")


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter (Zhang et al., 2023, https://arxiv.org/abs/2303.16199): ``adapter_len`` learned prompt vectors
    per adapted attention layer, read by the layer's own key/value projections and attended to by every token
    through a separate softmax whose output is scaled by a gate that starts at zero (so training starts from the
    base model): ``out = Attn(x) + g · W_o softmax(Q Kₚᵀ / √d_h) Vₚ``.

    Args:
        target_modules: The name of the attention submodules (one per block); ``None``: the architecture's
            (``self_attn``, GPT-2's ``attn``). A module whose name ends in ``"." + target_modules`` is one.
        adapter_len: Number of prompt vectors ``L`` per adapted layer (required; the paper uses 10).
        adapter_layers: Number of adapted layers, counted from the top (required; the paper uses 30 of 32).
    """

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTION_PROMPT
        super().__post_init__()
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules must be one module name (a str such as 'self_attn'), got "
                              f"{self.target_modules!r}: adaption prompts go into the attention module of each block")
        _positive_int(self.adapter_len, "adapter_len", "try adapter_len=10")
        _positive_int(self.adapter_layers, "adapter_layers", "the number of top layers to adapt, e.g. adapter_layers=2")

    @property
    def is_adaption_prompt(self) -> bool:
        """PEFT's flag: this config is an adaption prompt's."""
        return True

    def check_complete(self) -> None:
        """Raise a ConfigError naming the field if ``adapter_len`` or ``adapter_layers`` is unset (PEFT's defaults
        are ``None``, which it cannot run)."""
        for name, hint in (("adapter_len", "e.g. adapter_len=10"), ("adapter_layers", "e.g. adapter_layers=2")):
            if getattr(self, name) is None:
                raise ConfigError(f"AdaptionPromptConfig needs {name} ({hint}); it has no default, as in PEFT")
