"""``CartridgeConfig``: Hugging Face PEFT's field names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltatune.config import PeftType
from deltatune.errors import ConfigError
from deltatune.prompt.config import PromptLearningConfig


@dataclass
class CartridgeConfig(PromptLearningConfig):
    """Cartridges (Eyuboglu et al., 2025, https://arxiv.org/abs/2506.06266): a trained key/value cache prefix.

    Served exactly as prefix tuning's (``n = num_virtual_tokens`` entries at the start of every attention layer's
    cache, ``K_l, V_l: (heads_kv, n, head_dim)``), but the keys and values are the parameters themselves, one
    ``(n, num_layers * 2 * token_dim)`` table, with no reparameterisation network. Initialise them at random (the
    default, N(0, 1)) or from the cache of a prefill on real text: :func:`deltatune.initialize_kv_prefix_from_text`,
    :func:`deltatune.initialize_kv_prefix_from_past_key_values` (the paper's recommended option).

    Args:
        num_virtual_tokens: Cache entries ``n`` per layer (required).
        num_frozen_tokens: The first entries kept frozen (no gradients); the paper freezes the first one, an
            attention sink many models lean on (PEFT's default 1).
        token_dim, num_attention_heads, num_layers: Filled from the model as for prefix tuning (key/value heads
            on a grouped-query-attention model).
    """

    num_frozen_tokens: int = 1

    feeds_kv_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.CARTRIDGE
        super().__post_init__()
        if not isinstance(self.num_frozen_tokens, int) or isinstance(self.num_frozen_tokens, bool) \
                or self.num_frozen_tokens < 0:
            raise ConfigError(f"`num_frozen_tokens` must be >= 0, got {self.num_frozen_tokens}. (0 trains every "
                              "cache entry; the paper freezes 1)")
        if self.num_virtual_tokens is not None and self.num_frozen_tokens > self.num_virtual_tokens:
            raise ConfigError(
                f"`num_frozen_tokens` must be <= `num_virtual_tokens`, got num_frozen_tokens={self.num_frozen_tokens} "
                f"and num_virtual_tokens={self.num_virtual_tokens}. (lower num_frozen_tokens)")
