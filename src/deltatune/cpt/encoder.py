"""CPT's prompt: the context's embeddings plus a bounded trained delta (PEFT's ``CPTEmbedding``).

``P = E(cpt_token_ids) + Π(Δ): (n, d)``. ``embedding.weight = E(cpt_token_ids)`` is frozen (a buffer);
``delta_embedding.weight = Δ`` starts at zero and is trained. ``Π`` projects each row onto the ball of its token
type's radius ``ε_t``:

    Π(Δ)_i = Δ_i · ε_i / max(‖Δ_i‖₂, ε_i),   ε_i = ε_type(i) · sqrt(d / 2048)

(``ε_type`` is ``opt_projection_format_epsilon`` for template tokens, types 1/3 mod 4, ``opt_projection_epsilon``
for input tokens, type 2, and ``1e-10`` for labels and padding, whose rows also get no gradient). As in PEFT,
the projection is written back into ``Δ`` at every forward, so ``Δ`` itself stays in the ball; the tuner also
projects after every optimizer step (``update_and_allocate``), so a saved or inspected ``Δ`` is always bounded.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.cpt.config import CPTConfig
from deltatune.prompt.encoders import PromptTable

# The radius of label/padding rows (PEFT's MIN_VALUE): they stay (numerically) at the context's embedding.
MIN_EPSILON = 1e-10


def token_types(config: CPTConfig) -> torch.Tensor:
    """``cpt_tokens_type_mask`` as a ``(n,)`` long tensor."""
    return torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)


def trained_rows(config: CPTConfig) -> torch.Tensor:
    """``(n, 1)`` bool: rows of template and input tokens (types 1, 2, 3 mod 4), the ones ``Δ`` may move."""
    kind = torch.remainder(token_types(config), 4)
    return ((kind == 1) | (kind == 2) | (kind == 3)).view(-1, 1)


def epsilon(config: CPTConfig, dim: int) -> torch.Tensor:
    """``ε_i: (n,)``, float32: each row's radius (module docstring)."""
    types = token_types(config)
    kind = torch.remainder(types, 4)
    scale = (dim / 2048) ** 0.5
    eps = torch.full((len(types),), MIN_EPSILON, dtype=torch.float32)
    positive = types > 0
    eps[positive & ((kind == 1) | (kind == 3))] = torch.tensor(config.opt_projection_format_epsilon * scale,
                                                               dtype=torch.float32)
    eps[positive & (kind == 2)] = torch.tensor(config.opt_projection_epsilon * scale, dtype=torch.float32)
    return eps


class CPTEmbedding(PromptTable):
    """``P = E(cpt_token_ids) + Π(Δ)``; PEFT's parameter names (``embedding``, ``delta_embedding``).

    Args:
        config: A :class:`CPTConfig` with ``token_dim`` set.
        word_embeddings: The model's input embedding ``E: (vocab, d)``; its rows at ``cpt_token_ids`` start the
            prompt (skipped when ``config.inference_mode``, as in PEFT: a file gives the prompt).
    """

    def __init__(self, config: CPTConfig, word_embeddings: nn.Module) -> None:
        n, dim = config.num_virtual_tokens, config.token_dim
        super().__init__(n, dim)
        rows = self.embedding.weight.detach()
        if not config.inference_mode:
            ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                rows = word_embeddings(ids).detach().float()
        # E(cpt_token_ids) never trains: a buffer under PEFT's key ``embedding.weight`` (PEFT: a frozen
        # parameter), so no tuner's requires_grad_ can unfreeze it
        del self.embedding.weight
        self.embedding.register_buffer("weight", rows)
        self.delta_embedding = nn.Embedding(n, dim)
        with torch.no_grad():
            self.delta_embedding.weight.data = torch.zeros(n, dim, dtype=torch.float32,
                                                           device=self.embedding.weight.device)
        self.register_buffer("epsilon", epsilon(config, dim), persistent=False)
        self.register_buffer("trained_rows", trained_rows(config), persistent=False)

    @torch.no_grad()
    def project_(self) -> None:
        """``Δ <- Π(Δ)`` in place (module docstring)."""
        delta = self.delta_embedding.weight.data  # .data: no version bump for graphs that used Δ
        norm = delta.norm(p=2, dim=1)
        moved = norm > 0
        if bool(moved.any()):
            eps = self.epsilon.to(delta.device)
            delta[moved] *= (eps[moved] / norm[moved].clamp(min=eps[moved])).view(-1, 1).to(delta.dtype)

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``indices: (B, n)``/``(n,)`` -> ``P[indices]``; ``None``: ``P: (n, d)``. Projects ``Δ`` first (PEFT's
        forward does); gradients reach only the template/input rows of ``Δ``."""
        self.project_()
        weight = self.delta_embedding.weight
        mask = self.trained_rows.to(weight.device)
        # the masked rows keep their value but pass no gradient (PEFT masks it with a backward hook)
        delta = torch.where(mask, weight, weight.detach())
        base = self.embedding.weight.detach()
        table = base + delta
        return table if indices is None else nn.functional.embedding(indices, table)

    def load_prompt_embeddings(self, table: torch.Tensor) -> None:
        """A file's ``prompt_embeddings`` (``E + Π(Δ)`` as saved) becomes ``embedding``; ``Δ`` restarts at zero
        (PEFT loads the same way)."""
        super().load_prompt_embeddings(table)
        with torch.no_grad():
            self.delta_embedding.weight.zero_()

