"""The shadow network on its own: ``head(P(B(x)))`` without the base model (PEFT's ``unload_shadow``).

The per-block updates need the base model's hidden states, so they do not exist standalone; what is left is the
shadow path the auxiliary loss trained (Eq. 8): the backbone, the projection and the task head (the base's output
layer for a causal LM, the trained classifier copy for sequence classification).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from deltatune.errors import ConfigError
from deltatune.shadow.model import classification_loss, last_token, shifted_cross_entropy


class DetachedShadowModel(PreTrainedModel, GenerationMixin):
    """A standalone shadow network: ``backbone``, ``shadow_hidden_projection`` and ``head`` (PEFT's class and
    attribute names). A causal-LM head gives a causal LM (``generate()`` with the backbone's cache); a classifier
    pools the last non-padding token. ``input_embeddings``: the base model's embedding table for a backbone that
    shared it (a reference, not a submodule: not saved; ``unload_shadow(copy=True)`` attaches a copy instead)."""

    main_input_name = "input_ids"
    base_model_prefix = "backbone"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _causal_lm_only_kwargs = ("logits_to_keep", "num_logits_to_keep")

    def __init__(self, backbone: PreTrainedModel, projection: nn.Module | None = None, head: nn.Module | None = None,
                 is_classification: bool = False, input_embeddings: nn.Module | None = None) -> None:
        super().__init__(backbone.config)
        self.backbone = backbone
        self.shadow_hidden_projection = projection if projection is not None else nn.Identity()
        self.head = head
        self.is_classification = is_classification
        self._shared_input_embeddings: list[nn.Module | None] = [input_embeddings]  # a list: not registered
        generation_config = getattr(backbone, "generation_config", None)
        self.generation_config = generation_config or GenerationConfig.from_model_config(self.config)

    def can_generate(self) -> bool:
        return getattr(self, "head", None) is not None and not getattr(self, "is_classification", False)

    def get_input_embeddings(self) -> nn.Module:
        shared = self._shared_input_embeddings[0]
        return shared if shared is not None else self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self._shared_input_embeddings[0] is not None:
            self._shared_input_embeddings[0] = value
        else:
            self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.is_classification else self.head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``head(P(B(x)))``: causal-LM logits ``(B, T, V)`` or class logits ``(B, C)``; the projected hidden states
        ``(B, T, d)`` without a head."""
        for key in self._causal_lm_only_kwargs:
            kwargs.pop(key, None)
        kwargs["return_dict"] = True
        if self._shared_input_embeddings[0] is not None and kwargs.get("inputs_embeds") is None:
            if input_ids is None:
                raise ConfigError("Either `input_ids` or `inputs_embeds` must be provided.")
            kwargs["inputs_embeds"], input_ids = self.get_input_embeddings()(input_ids), None
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.shadow_hidden_projection(out.last_hidden_state)
        if self.head is None:
            return hidden
        if self.is_classification:
            logits = self.head(last_token(hidden, attention_mask))
            loss = classification_loss(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.head(hidden)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=getattr(out, "cache", None))


def unload_shadow(tuner: nn.Module, adapter_name: str | None = None, copy: bool = False) -> DetachedShadowModel:
    """``adapter_name``'s (default: the active adapter's) shadow network as a :class:`DetachedShadowModel`; with
    ``copy`` its modules are deep copies (and a shared embedding table is attached as the backbone's own, so
    ``save_pretrained`` writes a complete checkpoint), else they are shared with ``tuner``'s model.

    Raises:
        ConfigError: no such adapter.
    """
    name = adapter_name or tuner.active_adapters[0]
    if name not in tuner.shadow_backbone:
        raise ConfigError(f"No shadow backbone found for adapter '{name}'.")
    take = deepcopy if copy else (lambda module: module)
    backbone, projection = take(tuner.shadow_backbone[name]), take(tuner.shadow_projection[name])
    config = tuner.peft_config[name]
    if name in tuner.shadow_head:
        head = take(tuner.shadow_head[name])
    elif str(config.task_type) == "CAUSAL_LM":
        head = take(tuner.model.get_output_embeddings())
    else:
        head = None
    shared = None
    if tuner.shadow_runtime.share.get(name, False):
        if copy:
            backbone.embed_tokens = deepcopy(tuner.model.get_input_embeddings())
        else:
            shared = tuner.model.get_input_embeddings()
    return DetachedShadowModel(backbone, projection, head, is_classification=str(config.task_type) == "SEQ_CLS",
                               input_embeddings=shared)


__all__ = ["DetachedShadowModel", "unload_shadow"]
