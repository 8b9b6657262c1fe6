"""Prefix tuning's way in: ``n`` trained key/value entries at the start of every attention layer's cache.

The model's cache starts with ``n`` trained entries in every layer (the decoder's self-attention for an
encoder-decoder model); the attention mask gains ``n`` leading ones and position ids shift by ``n``, exactly
as if ``n`` tokens had been seen before. The input embeddings are left alone, so a model need not have any.
The encoder's table ``(n, L * 2 * token_dim)`` becomes per layer ``K, V: (B, heads, n, head_dim)``
(:func:`prefix_key_values`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.prompt.config import PromptLearningConfig
from deltatune.prompt.encoders import PromptTable
from deltatune.prompt.inputs import (
    accepts,
    batch_size,
    cache_length,
    call_model,
    extend_mask,
    find_word_embeddings,
    hooked,
    model_dtype,
    new_cache,
    pop_cache,
    prefill_hook,
    self_attention,
)


def check_prefix_support(model: nn.Module, config: PromptLearningConfig, training: bool) -> None:
    """Raise a ConfigError naming the fix if prefix tuning cannot extend ``model``'s key/value cache."""
    name = type(model).__name__
    takes = accepts(model.forward, "cache")
    if takes is None:  # forward(**kwargs) hands them on to the backbone (BertForSequenceClassification...)
        backbone = getattr(model, "base_model", None)
        takes = accepts(backbone.forward, "cache") if isinstance(backbone, nn.Module) and backbone is not model \
            else None
    # A module with no forward of its own (nn.Module's placeholder) cannot be judged until it runs: PEFT checks
    # nothing here, so a prefix can be created, saved and loaded for it
    no_forward = getattr(type(model).forward, "__name__", "") == "_forward_unimplemented"
    if no_forward:
        return
    if not takes:
        raise ConfigError(
            f"prefix tuning needs a model whose forward() takes a key/value `cache` (transformers >= 5), and "
            f"{name} does not: use prompt tuning or P-tuning (PromptTuningConfig / PromptEncoderConfig) instead"
        )
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ConfigError(
            "prefix tuning cannot run with gradient checkpointing: the checkpointed layers drop the key/value cache "
            "that holds the prefix. Call model.gradient_checkpointing_disable(), or use prompt tuning / P-tuning, "
            "which work with it"
        )
    if training:
        return
    model_config = getattr(model, "config", None)
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                          f"{config.num_attention_heads}; fix them in the PrefixTuningConfig")
    head_dim = config.token_dim // config.num_attention_heads
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    model_head_dim = getattr(text, "head_dim", None) if text is not None else None
    if isinstance(model_head_dim, int) and model_head_dim != head_dim:
        raise ConfigError(
            f"the prefix has head_dim {head_dim} (token_dim / num_attention_heads) but {name}'s attention uses "
            f"{model_head_dim}: set token_dim={model_head_dim * config.num_attention_heads} in the PrefixTuningConfig"
        )
    cache = new_cache(model)
    layers = self_attention(cache).layers
    from transformers.cache_utils import DynamicLayer

    if layers and not all(isinstance(layer, DynamicLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, DynamicLayer)})
        raise ConfigError(
            f"prefix tuning cannot extend {name}'s cache: its layers {kinds} keep no plain key/value history. "
            "Use prompt tuning or P-tuning for this architecture"
        )
    if layers and len(layers) != config.num_layers:
        raise ConfigError(f"num_layers={config.num_layers} but {name}'s cache has {len(layers)} attention layers; "
                          f"set num_layers={len(layers)} (or leave it None)")


def prefix_key_values(config: PromptLearningConfig, encoder: PromptTable, batch: int, dtype: torch.dtype,
                      decoder_of_seq2seq: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(K, V)``, each ``(B, heads_kv, n, head_dim)``, from the ``(n, L * 2 * token_dim)`` table.

    Column block ``2l`` of the table is layer ``l``'s keys and ``2l + 1`` its values. For an encoder-decoder
    model PEFT's files give decoder layer ``l`` the blocks of slot ``2l mod L`` (its layout stacks the table
    twice and reads it four blocks per layer); reproducing that keeps its adapters' meaning.
    """
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    table = encoder()                                                   # (n, 2 L heads head_dim)
    kv = table.view(n, 2 * layers, heads, -1).permute(1, 2, 0, 3)       # (2L, heads, n, head_dim)
    kv = kv.to(dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)        # (2L, B, heads, n, head_dim)
    slots = [(2 * i) % layers if decoder_of_seq2seq else i for i in range(layers)]
    return [(kv[2 * s], kv[2 * s + 1]) for s in slots]


def fill_prefix(cache: Any, config: PromptLearningConfig, encoder: PromptTable, batch: int, dtype: torch.dtype,
                 seq2seq: bool) -> Any:
    target = self_attention(cache)
    for layer_idx, (k, v) in enumerate(prefix_key_values(config, encoder, batch, dtype, seq2seq)):
        target.update(k, v, layer_idx)
    return cache


class Prefix:
    """The virtual tokens as key/value cache entries (prefix tuning). Stateless: the tuner passes the active
    adapter's config and encoder to each call."""

    def setup(self, model: nn.Module, config: PromptLearningConfig) -> tuple[nn.Module | None, torch.device]:
        """Check that ``model`` can take a prefix; ``(word_embeddings, device)`` for the new encoder: no word
        embeddings (the prefix feeds the attention cache, never the input embeddings, so a model need not have
        any, as in PEFT), the device of the model's first parameter."""
        check_prefix_support(model, config, training=False)
        param = next(model.parameters(), None)
        return None, param.device if param is not None else torch.device("cpu")

    def check_training(self, model: nn.Module, config: PromptLearningConfig) -> None:
        """Before a training forward: gradient checkpointing (turned on after the adapter was added) would drop
        the cache that holds the prefix."""
        check_prefix_support(model, config, training=True)

    def forward(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable, kwargs: dict[str, Any],
                task_ids: Any) -> Any:
        """A decoder-only (or encoder-only) model: the prefix fills an empty cache; positions shift by ``n``."""
        n = config.num_virtual_tokens
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        batch = batch_size(ids, embeds)
        cache = pop_cache(kwargs)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        word_embeddings = find_word_embeddings(model)
        dtype = embeds.dtype if embeds is not None else model_dtype(model, word_embeddings)
        if cache is None:
            cache = new_cache(model)
        if cache_length(cache) == 0:
            fill_prefix(cache, config, encoder, batch, dtype, seq2seq=False)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return call_model(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)

    def forward_seq2seq(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                        kwargs: dict[str, Any], task_ids: Any) -> Any:
        """An encoder-decoder model: the prefix goes into the decoder's self-attention cache."""
        n = config.num_virtual_tokens
        cache = pop_cache(kwargs)
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        word_embeddings = find_word_embeddings(model)
        dtype = embeds.dtype if embeds is not None else model_dtype(model, word_embeddings)
        batch = batch_size(ids, embeds, kwargs.get("decoder_input_ids"), kwargs.get("labels"))
        if cache is None:
            cache = new_cache(model)
        if cache_length(cache) == 0:
            fill_prefix(cache, config, encoder, batch, dtype, seq2seq=True)
        kwargs["decoder_attention_mask"] = extend_mask(kwargs.get("decoder_attention_mask"), n)
        return call_model(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)

    def shift_generate_inputs(self, kwargs: dict[str, Any], n: int) -> None:
        """``generate`` of a decoder-only model: given position ids count the ``n`` cached entries."""
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs.pop("position_ids") + n

    def generate_seq2seq(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                         ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any], task_ids: Any,
                         word_embeddings: nn.Module, dtype: torch.dtype) -> Any:
        """``generate`` of an encoder-decoder model: the decoder's cache gets the prefix at the first step."""
        kwargs["decoder_attention_mask"] = extend_mask(kwargs.get("decoder_attention_mask"), config.num_virtual_tokens)
        with hooked(model, self.prefill_hook(config, encoder, dtype, seq2seq=True)):
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    def prefill_hook(self, config: PromptLearningConfig, encoder: PromptTable, dtype: torch.dtype, seq2seq: bool,
                     word_embeddings: nn.Module | None = None, task_ids: Any = None) -> Any:
        """The ``generate`` pre-hook: a step that starts from an empty cache (or runs without one) gets a fresh
        cache holding the prefix."""

        def prefill(module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
            batch = batch_size(kwargs.get("decoder_input_ids"), kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
            if cache is None or kwargs.get("use_cache") is False:
                cache = new_cache(module)
            kwargs["cache"] = fill_prefix(cache, config, encoder, batch, dtype, seq2seq)
            return kwargs

        return prefill_hook(prefill)
