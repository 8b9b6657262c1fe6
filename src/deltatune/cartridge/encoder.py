"""``CartridgeEncoder``: the cartridge's key/value table as parameters, in prefix tuning's layout."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.cartridge.config import CartridgeConfig
from deltatune.errors import AdapterLoadError, ConfigError


class CartridgeEncoder(nn.Module):
    """The table ``(n, num_layers * 2 * token_dim)`` of a cartridge (row ``i``: entry ``i``'s key and value of every
    layer, ``[K_0, V_0, K_1, V_1, ...]``, as :class:`~deltatune.prompt.encoders.PrefixEncoder`'s output), held as
    ``frozen_embedding: (num_frozen_tokens, width)`` (no gradients; absent when 0) stacked over
    ``trainable_embedding: (n - num_frozen_tokens, width)``, both N(0, 1) at creation (PEFT's names and init).

    ``forward()`` returns the whole table, ``forward(indices)`` its rows ``indices``; files hold the table as
    ``prompt_embeddings``.

    Args:
        config: A :class:`CartridgeConfig` with ``token_dim`` and ``num_layers`` set (``get_peft_model`` fills them).
        word_embeddings: Unused (deltatune's encoders share one signature; PEFT's takes only ``config``).
    """

    def __init__(self, config: CartridgeConfig, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        missing = [n for n in ("num_virtual_tokens", "token_dim", "num_layers") if getattr(config, n) is None]
        if missing:
            raise ConfigError(f"CartridgeConfig has {missing} unset; pass them, or let get_peft_model() fill them "
                              "from the model")
        width = config.num_layers * 2 * config.token_dim
        self.num_frozen_tokens = int(config.num_frozen_tokens)
        self.num_trainable_tokens = config.num_virtual_tokens - self.num_frozen_tokens
        frozen = nn.Parameter(torch.randn(self.num_frozen_tokens, width), requires_grad=False) \
            if self.num_frozen_tokens else None
        self.register_parameter("frozen_embedding", frozen)
        self.trainable_embedding = nn.Parameter(torch.randn(self.num_trainable_tokens, width),
                                                requires_grad=not config.inference_mode)

    @property
    def weight(self) -> torch.Tensor:
        """The table ``(n, width)``: frozen rows first."""
        if self.frozen_embedding is None:
            return self.trainable_embedding
        return torch.cat([self.frozen_embedding, self.trainable_embedding], dim=0)

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        table = self.weight
        return table if indices is None else table[indices]

    def requires_grad_(self, requires_grad: bool = True) -> CartridgeEncoder:
        """Switch the trainable rows; the frozen ones never get gradients."""
        self.trainable_embedding.requires_grad_(requires_grad)
        return self

    def prompt_embeddings(self) -> torch.Tensor:
        """What a file holds: the table, detached on the CPU."""
        return self.weight.detach().cpu()

    def load_prompt_embeddings(self, table: torch.Tensor) -> None:
        """Put a file's (or a prefill's) table ``(n, width)`` into the frozen and trainable rows.

        Raises:
            AdapterLoadError: the table has another shape.
        """
        want = (self.num_frozen_tokens + self.num_trainable_tokens, self.trainable_embedding.shape[1])
        if tuple(table.shape) != want:
            raise AdapterLoadError(f"Invalid `prompt_embeddings` shape. Expected {want}, got {tuple(table.shape)}. "
                                   "(num_virtual_tokens and the model's layers/key-value width must match)")
        with torch.no_grad():
            if self.frozen_embedding is not None:
                self.frozen_embedding.copy_(table[: self.num_frozen_tokens].to(self.frozen_embedding))
            self.trainable_embedding.copy_(table[self.num_frozen_tokens :].to(self.trainable_embedding))
