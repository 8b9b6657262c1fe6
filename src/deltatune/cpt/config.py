"""CPT's config (context-aware prompt tuning, Blau et al. 2024, https://huggingface.co/papers/2410.17222), with
PEFT's field names, defaults and checks.

The virtual tokens are a few-shot context: ``cpt_token_ids`` (its token ids, ``n`` of them, so
``num_virtual_tokens = n``), ``cpt_mask`` (1 where a token is real) and ``cpt_tokens_type_mask`` (each token's type,
read modulo 4: ``1`` input template, ``2`` input, ``3`` output template, ``0`` (and > 0) a label; ``0`` itself
is padding). Each example of the context gets its own group of four type values (``4k + 1 .. 4k + 4``), so the
loss can weight the examples (``opt_weighted_loss_type="decay"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltatune.config import PeftType, TaskType
from deltatune.errors import ConfigError
from deltatune.prompt.config import PromptLearningConfig


@dataclass
class CPTConfig(PromptLearningConfig):
    """Context-aware prompt tuning: ``P = E(cpt_token_ids) + Δ`` in front of the input, ``Δ`` trained and kept
    inside a ball of radius ``ε_t`` per token (``t`` the token's type), the loss weighted per example.

    Args:
        cpt_token_ids: The context's token ids (``None``: ``[0]``); ``num_virtual_tokens`` is their count.
        cpt_mask: 1 for each real token of the context (``None``: all ones). Kept for PEFT's files; PEFT's
            forward does not read it.
        cpt_tokens_type_mask: Each context token's type (``None``: all 1, input template): modulo 4, ``1``/``3``
            input/output template (bound ``opt_projection_format_epsilon``), ``2`` input (bound
            ``opt_projection_epsilon``), ``0`` a label (its row is never trained, as are padding rows, type 0).
        opt_weighted_loss_type: ``"none"`` (or ``None``: every label token weighs 1) or ``"decay"`` (the last
            example weighs 1, the one before ``opt_loss_decay_factor``, then its square, ...).
        opt_loss_decay_factor: The decay factor ``γ`` of ``"decay"``.
        opt_projection_epsilon: ``ε`` of input tokens, scaled by ``sqrt(token_dim / 2048)``.
        opt_projection_format_epsilon: ``ε`` of template tokens, scaled the same way.
        tokenizer_name_or_path: Kept for PEFT's files (PEFT reads it nowhere for CPT).

    Raises:
        ConfigError: a task type other than ``CAUSAL_LM``; masks whose lengths differ from ``cpt_token_ids``'s.
    """

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: Literal["none", "decay"] | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.CPT
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.cpt_token_ids = [int(t) for t in self.cpt_token_ids]
        # PEFT's rule: the context decides the count; the model decides the width (filled from it, as PEFT does)
        self.num_virtual_tokens = len(self.cpt_token_ids)
        super().__post_init__()
        self.num_layers = self.token_dim = self.num_attention_heads = None
        self.num_transformer_submodules = 1
        if self.task_type != TaskType.CAUSAL_LM:
            raise ConfigError(f"{type(self).__name__} only supports task_type = {TaskType.CAUSAL_LM.value}.")
        if self.cpt_mask is None:
            self.cpt_mask = [1] * len(self.cpt_token_ids)
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * len(self.cpt_token_ids)
        if not len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ConfigError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length.")
        if self.opt_weighted_loss_type not in (None, "none", "decay"):
            raise ConfigError(f"opt_weighted_loss_type must be 'none' or 'decay', got {self.opt_weighted_loss_type!r}")
