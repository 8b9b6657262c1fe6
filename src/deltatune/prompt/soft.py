"""Soft prompts' way in (prompt tuning, P-tuning, multitask prompt tuning): ``n`` trained rows in front of the
input embeddings.

A batch of ``B`` rows of ``T`` tokens becomes ``inputs_embeds = [P; E(x)]: (B, n + T, d)``; the attention mask
gains ``n`` leading ones, position ids become ``[0..n-1, n + pos]``, token-level labels gain ``n`` leading
``-100`` (ignored), token type ids ``n`` leading zeros. For an encoder-decoder model the prompt goes in front of
the encoder's input (and, for MPT, also the decoder's, as PEFT does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.config import PeftType, TaskType
from deltatune.errors import ConfigError
from deltatune.prompt.config import PromptLearningConfig
from deltatune.prompt.encoders import PromptTable
from deltatune.prompt.inputs import (
    LABELS_PER_TOKEN,
    batch_size,
    cache_length,
    call_model,
    check_takes,
    check_task_ids,
    extend_mask,
    find_word_embeddings,
    pop_cache,
    prefill_hook,
    prepend,
    prepend_positions,
    soft_prompt,
)


class SoftPrompt:
    """The virtual tokens as input embeddings. Stateless: the tuner passes the active adapter's config and
    encoder to each call."""

    def setup(self, model: nn.Module, config: PromptLearningConfig) -> tuple[nn.Module | None, torch.device]:
        """Check that ``model`` takes ``inputs_embeds``; ``(word_embeddings, device)`` for the new encoder (the
        encoder may start from the embeddings' rows: TEXT / SAMPLE_VOCAB init)."""
        word_embeddings = find_word_embeddings(model)
        check_takes(model, "inputs_embeds", "the virtual tokens are put in front of the input embeddings")
        return word_embeddings, word_embeddings.weight.device

    def check_training(self, model: nn.Module, config: PromptLearningConfig) -> None:
        """Nothing to check: soft prompts train with or without gradient checkpointing."""

    def forward(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable, kwargs: dict[str, Any],
                task_ids: Any) -> Any:
        """A decoder-only (or encoder-only) model: ``[P; E(x)]`` and the bookkeeping of the module docstring."""
        n = config.num_virtual_tokens
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        batch = batch_size(ids, embeds)
        cache = pop_cache(kwargs)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        word_embeddings = find_word_embeddings(model)
        if cache is not None and cache_length(cache) > 0:
            # Incremental decoding by hand: the prompt already sits in the cache; only shift positions.
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            return call_model(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)
        if embeds is None:
            embeds = word_embeddings(ids)
        prompt = soft_prompt(encoder, batch, check_task_ids(task_ids, encoder, batch, embeds.device), embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt[:, :n], embeds], dim=1)
        kwargs["position_ids"] = prepend_positions(kwargs.get("position_ids"), n)
        kwargs["token_type_ids"] = prepend(kwargs.get("token_type_ids"), n, 0)
        if config.task_type in LABELS_PER_TOKEN:
            kwargs["labels"] = prepend(kwargs.get("labels"), n, -100)
        if config.task_type == TaskType.QUESTION_ANS:
            for key in ("start_positions", "end_positions"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + n
        if cache is not None:
            kwargs["cache"] = cache
        return call_model(model, **kwargs)

    def forward_seq2seq(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                        kwargs: dict[str, Any], task_ids: Any) -> Any:
        """An encoder-decoder model: the prompt in front of the encoder's input (MPT: also the decoder's)."""
        n = config.num_virtual_tokens
        cache = pop_cache(kwargs)
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        word_embeddings = find_word_embeddings(model)
        if kwargs.get("encoder_outputs") is not None:
            # The encoder already ran (with the prompt); its mask still needs the prompt's columns.
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
            return call_model(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)
        batch = batch_size(ids, embeds)
        if embeds is None:
            embeds = word_embeddings(ids)
        prompt = soft_prompt(encoder, batch, check_task_ids(task_ids, encoder, batch, embeds.device), embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompt[:, :n], embeds], dim=1)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        if config.peft_type == PeftType.MULTITASK_PROMPT_TUNING and config.num_transformer_submodules == 2:
            # PEFT's MPT also prompts the decoder with the second half of the rows.
            dec = kwargs.pop("decoder_inputs_embeds", None)
            dec_ids = kwargs.pop("decoder_input_ids", None)
            if dec is None:
                if dec_ids is None:
                    if kwargs.get("labels") is None:
                        raise ConfigError("pass decoder_input_ids, decoder_inputs_embeds or labels")
                    dec_ids = model.prepare_decoder_input_ids_from_labels(labels=kwargs["labels"])
                dec = word_embeddings(dec_ids)
            kwargs["decoder_inputs_embeds"] = torch.cat([prompt[:, n:].to(dec.dtype), dec], dim=1)
            kwargs["decoder_attention_mask"] = extend_mask(kwargs.get("decoder_attention_mask"), n)
            kwargs["labels"] = prepend(kwargs.get("labels"), n, -100)
        if cache is not None:
            kwargs["cache"] = cache
        return call_model(model, **kwargs)

    def shift_generate_inputs(self, kwargs: dict[str, Any], n: int) -> None:
        """``generate`` of a decoder-only model: given position ids and token type ids gain the prompt's ``n``
        columns."""
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = prepend_positions(kwargs.pop("position_ids"), n)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)

    def generate_seq2seq(self, model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                         ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any], task_ids: Any,
                         word_embeddings: nn.Module, dtype: torch.dtype) -> Any:
        """``generate`` of an encoder-decoder model: the encoder reads ``[P; E(x)]`` once."""
        n = config.num_virtual_tokens
        embeds = word_embeddings(ids)
        tids = check_task_ids(task_ids, encoder, ids.shape[0], ids.device)
        prompt = soft_prompt(encoder, ids.shape[0], tids, embeds.dtype)
        return model.generate(inputs_embeds=torch.cat([prompt[:, :n], embeds], dim=1),
                              attention_mask=extend_mask(mask, n), **kwargs)

    def prefill_hook(self, config: PromptLearningConfig, encoder: PromptTable, dtype: torch.dtype, seq2seq: bool,
                     word_embeddings: nn.Module | None = None, task_ids: Any = None) -> Any:
        """The ``generate`` pre-hook: a step that starts from an empty cache (or runs without one) reads
        ``[P; E(x)]``; positions already count the prompt (``generate`` derives them from the extended mask)."""
        n = config.num_virtual_tokens

        def prefill(module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
            ids = kwargs.pop("input_ids")
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() != 2:
                raise ConfigError("prompt-learning generate() needs the default dynamic cache; remove "
                                  "cache_implementation='static' (or a compiled cache) from the generation settings")
            embeds = word_embeddings(ids)
            tids = check_task_ids(task_ids, encoder, ids.shape[0], ids.device)
            kwargs["inputs_embeds"] = torch.cat([soft_prompt(encoder, ids.shape[0], tids, embeds.dtype), embeds],
                                                dim=1)
            kwargs["position_ids"] = prepend_positions(kwargs.get("position_ids"), n, shift=False)
            kwargs["token_type_ids"] = prepend(kwargs.get("token_type_ids"), n, 0)
            if cache is not None:
                kwargs["cache"] = cache
            return {k: v for k, v in kwargs.items() if v is not None}

        return prefill_hook(prefill)
