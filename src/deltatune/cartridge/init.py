"""Cartridges from real text, and composition: PEFT's helpers (``peft.tuners.cartridge.utils``) with its names.

A cartridge initialised from a prefill holds what the base model's cache holds after reading the text's first
``n`` tokens: for every layer ``l`` the keys ``K_l: (heads_kv, n, head_dim)`` and values, laid out as the
cartridge's table ``(n, num_layers * 2 * heads_kv * head_dim)``. The paper recommends this over a random start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


def _layers(past_key_values: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(K_l, V_l)]``, each ``(B, heads_kv, T, head_dim)``, from a transformers ``Cache`` (its ``layers``) or a
    legacy tuple of pairs."""
    if isinstance(past_key_values, (tuple, list)):
        return [(layer[0], layer[1]) for layer in past_key_values]
    cache = getattr(past_key_values, "self_attention_cache", past_key_values)  # an encoder-decoder cache
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    raise ConfigError(f"Unsupported `past_key_values` type {type(past_key_values).__name__}. Expected a legacy "
                      "tuple/list of (key, value) pairs or a transformers Cache (DynamicCache)")


def prompt_embeddings_from_past_key_values(past_key_values: Any, *, num_virtual_tokens: int) -> torch.Tensor:
    """The first ``num_virtual_tokens`` entries of a one-row cache as a cartridge table ``(n, L * 2 * heads_kv *
    head_dim)`` (row ``i``: ``[K_0[i], V_0[i], K_1[i], ...]``, heads flattened).

    Raises:
        ConfigError: an empty cache, a batch of more than one row, fewer cached tokens than ``num_virtual_tokens``,
            or layers of different shapes (PEFT's sentences first).
    """
    layers = _layers(past_key_values)
    if not layers:
        raise ConfigError("Empty `past_key_values`. (run a prefill with use_cache=True first)")
    key0 = layers[0][0]
    if key0.ndim != 4:
        raise ConfigError(f"Expected key/value tensors with rank 4, got key.ndim={key0.ndim}.")
    if key0.shape[0] != 1:
        raise ConfigError("This helper expects `past_key_values` from a single-sequence prefill (batch=1). "
                          f"Got batch={key0.shape[0]}.")
    heads, head_dim = key0.shape[1], key0.shape[3]
    rows = []
    for k, v in layers:
        if k.shape[1] != heads or v.shape[1] != heads or k.shape[3] != head_dim or v.shape[3] != head_dim:
            raise ConfigError("Inconsistent head shapes across layers in `past_key_values`.")
        if k.shape[2] < num_virtual_tokens or v.shape[2] < num_virtual_tokens:
            raise ConfigError(f"Need at least {num_virtual_tokens} cached tokens, got {min(k.shape[2], v.shape[2])}. "
                              "(use a longer text or fewer num_virtual_tokens)")
        for t in (k, v):  # (1, heads, T, d_h) -> (n, heads * d_h)
            rows.append(t[0, :, :num_virtual_tokens].transpose(0, 1).reshape(num_virtual_tokens, heads * head_dim))
    return torch.cat(rows, dim=1)


def _cache_adapter(model: Any, adapter_name: str | None) -> tuple[str, Any]:
    name = adapter_name or model.active_adapter
    config = model.peft_config[name]
    if config.peft_type not in (PeftType.CARTRIDGE, PeftType.PREFIX_TUNING):
        raise ConfigError(f"Adapter '{name}' must be a CARTRIDGE or PREFIX_TUNING adapter (got {config.peft_type}).")
    if getattr(config, "prefix_projection", False):
        raise ConfigError("Initialization from KV cache is not supported for prefix tuning with "
                          "`prefix_projection=True`. (its keys and values come out of an MLP)")
    return name, config


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(model: Any, *, adapter_name: str | None = None, past_key_values: Any,
                                              num_virtual_tokens: int | None = None) -> torch.Tensor:
    """Load the first entries of ``past_key_values`` (a one-row prefill's cache) into the cartridge (or prefix
    tuning adapter without projection) ``adapter_name`` of the ``PeftModel`` ``model``; returns the table loaded."""
    name, config = _cache_adapter(model, adapter_name)
    table = prompt_embeddings_from_past_key_values(past_key_values,
                                                   num_virtual_tokens=num_virtual_tokens or config.num_virtual_tokens)
    model.prompt_encoder[name].load_prompt_embeddings(table)
    return table


@torch.no_grad()
def initialize_kv_prefix_from_text(model: Any, tokenizer: Any, *, text: str, adapter_name: str | None = None,
                                   num_virtual_tokens: int | None = None, use_chat_template: bool = True,
                                   max_length: int | None = None) -> torch.Tensor:
    """Prefill the base model (adapters disabled) on ``text`` (as a system message of the chat template when the
    tokenizer has one and ``use_chat_template``) and load the first entries of its cache into the adapter."""
    name, config = _cache_adapter(model, adapter_name)
    input_ids = None
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        try:
            input_ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                                      add_generation_prompt=False, return_dict=False,
                                                      return_tensors="pt")
        except (TypeError, ValueError):
            input_ids = None
        if input_ids is not None and max_length is not None:
            input_ids = input_ids[:, :max_length]
    if input_ids is None:
        input_ids = tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                              max_length=max_length)["input_ids"]
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with model.disable_adapter():
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    cache = getattr(outputs, "past_key_values", None)
    return initialize_kv_prefix_from_past_key_values(model, adapter_name=name, past_key_values=cache,
                                                     num_virtual_tokens=num_virtual_tokens)


def compose_cartridge_adapters(adapter_paths: Sequence[str | os.PathLike], *, output_path: str | os.PathLike,
                               safe_serialization: bool = True) -> None:
    """Write one cartridge whose cache is the concatenation of the saved cartridges ``adapter_paths`` (the paper's
    composition), its ``num_frozen_tokens`` the first one's.

    Raises:
        ConfigError: fewer than two paths, a non-cartridge adapter, or cartridges of different models (PEFT's
            sentences first).
    """
    from deltatune.core.io import load_adapter_weights, save_adapter_files

    paths = [Path(p) for p in adapter_paths]
    if len(paths) < 2:
        raise ConfigError("Need at least 2 adapters to compose.")
    configs = [PeftConfig.from_pretrained(str(p)) for p in paths]
    for path, config in zip(paths, configs):
        if config.peft_type != PeftType.CARTRIDGE:
            raise ConfigError(f"Adapter at '{path}' is not a CARTRIDGE adapter (got {config.peft_type}).")
    first = configs[0]
    for config in configs[1:]:
        for attr in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            if getattr(config, attr, None) != getattr(first, attr, None):
                raise ConfigError(f"Incompatible CARTRIDGE configs for attribute '{attr}'. (compose cartridges of "
                                  "one base model)")
    composed = torch.cat([load_adapter_weights(str(p))["prompt_embeddings"] for p in paths], dim=0)
    out = replace(first, num_virtual_tokens=composed.shape[0])
    os.makedirs(output_path, exist_ok=True)
    save_adapter_files(os.fspath(output_path), {"prompt_embeddings": composed.contiguous()}, out.to_dict(),
                       safe_serialization=safe_serialization)
