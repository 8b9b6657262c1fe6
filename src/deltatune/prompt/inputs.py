"""What every virtual-token method does to a model's inputs, whichever way the tokens go in.

The soft prompt (:mod:`deltatune.prompt.soft`) and the prefix (:mod:`deltatune.prompt.prefix`) share this
bookkeeping: finding the word embeddings ``E: (vocab, d)``, extending a ``(B, T)`` attention mask to
``(B, n + T)``, shifting position ids, naming positional arguments, and the key/value cache helpers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import TaskType
from deltatune.errors import ConfigError
from deltatune.prompt.encoders import MultitaskPromptEmbedding, PromptTable

# Task types whose labels are per token: they gain ``n`` leading ``-100`` (ignored) for the virtual tokens.
LABELS_PER_TOKEN = (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS)


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding ``E: (vocab, d)``: ``get_input_embeddings()``, else its ``nn.Embedding``
    with ``config.vocab_size`` rows (PEFT's fallback).

    Raises:
        ConfigError: no such module.
    """
    embeddings = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            embeddings = getter()
    if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding)
                           and (vocab is None or m.num_embeddings == vocab)), None)
    if embeddings is None:
        raise ConfigError(
            f"{type(model).__name__} has no word embeddings deltatune can find (get_input_embeddings() returns "
            "nothing and no nn.Embedding has config.vocab_size rows): give the model a get_input_embeddings() "
            "method that returns its token embedding"
        )
    return embeddings


def accepts(fn: Any, name: str) -> bool | None:
    """True/False if ``fn`` names parameter ``name``; None if it only has ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if name in params:
        return True
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else False


def check_takes(model: nn.Module, name: str, why: str) -> None:
    if accepts(model.forward, name) is False:
        raise ConfigError(
            f"{type(model).__name__}.forward() takes no {name!r} argument, but {why}; this method cannot drive "
            "it. Use a transformers model, or a weight adapter such as LoRA"
        )


def check_task_ids(task_ids: Any, encoder: PromptTable, batch: int, device: torch.device) -> torch.Tensor | None:
    """Validate MPT's ``task_ids`` (one per row; a row count that divides ``batch`` is repeated, as
    ``generate`` repeats rows for ``num_return_sequences`` / beams)."""
    if not isinstance(encoder, MultitaskPromptEmbedding):
        return None
    if task_ids is None:
        return encoder(task_ids=None)  # raises the "needs task_ids" error
    ids = torch.as_tensor(task_ids, device=device).long().reshape(-1)
    if ids.numel() == 0 or batch % ids.numel():
        raise ConfigError(f"task_ids has {ids.numel()} entries for a batch of {batch} rows; give one task id per row")
    bad = ids[(ids < 0) | (ids >= encoder.num_tasks)]
    if bad.numel():
        raise ConfigError(f"task_ids {sorted(set(bad.tolist()))} out of range: this adapter has num_tasks="
                          f"{encoder.num_tasks} (ids 0..{encoder.num_tasks - 1}); raise num_tasks or fix the ids")
    return ids.repeat_interleave(batch // ids.numel())


def soft_prompt(encoder: PromptTable, batch: int, task_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The prompt rows for a batch, ``(B, total_virtual_tokens, d)``, in the model's dtype."""
    if isinstance(encoder, MultitaskPromptEmbedding):
        return encoder(task_ids=task_ids).to(dtype)
    return encoder().to(dtype).unsqueeze(0).expand(batch, -1, -1)


def model_dtype(model: nn.Module, word_embeddings: nn.Module) -> torch.dtype:
    return word_embeddings.weight.dtype if word_embeddings.weight.is_floating_point() else torch.float32


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(config=model_config), DynamicCache(config=model_config))
    return DynamicCache(config=model_config)


def self_attention(cache: Any) -> Any:
    return getattr(cache, "self_attention_cache", cache)


def cache_length(cache: Any) -> int:
    return 0 if cache is None else int(self_attention(cache).get_seq_length())


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``(B, T) -> (B, n + T)`` with ``n`` leading ones (the virtual tokens are always visible)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError(f"prompt-learning adapters need a 2-D attention mask (batch, seq), got shape "
                          f"{tuple(mask.shape)}; pass the tokenizer's attention_mask")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prepend_positions(pos: torch.Tensor | None, n: int, shift: bool = True) -> torch.Tensor | None:
    """Soft prompts: ``pos: (B, T) -> [0..n-1, n + pos]: (B, n + T)``. ``shift=False`` for positions that
    already count the prompt (``generate`` derives them from the extended mask)."""
    if pos is None:
        return None
    pos = pos if pos.dim() > 1 else pos.unsqueeze(0)
    head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
    return torch.cat([head, pos + n if shift else pos], dim=-1)


def prepend(x: torch.Tensor | None, n: int, value: int) -> torch.Tensor | None:
    if x is None:
        return None
    return torch.cat([x.new_full((x.shape[0], n), value), x], dim=1)


def as_kwargs(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the positional arguments of a call to ``fn``."""
    out = dict(kwargs)
    if not args:
        return out
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"forward() takes at most {len(names)} positional arguments ({len(args)} given)")
    for name, value in zip(names, args):
        if name in out:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        out[name] = value
    return out


def pop_cache(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def batch_size(*tensors: torch.Tensor | None) -> int:
    for t in tensors:
        if t is not None:
            return t.shape[0]
    raise ConfigError("pass input_ids or inputs_embeds")


def call_model(model: nn.Module, **kwargs: Any) -> Any:
    """``model(**kwargs)`` without the ``None`` entries (the bookkeeping above sets absent inputs to ``None``;
    a model need not accept every name)."""
    return model(**{k: v for k, v in kwargs.items() if v is not None})


@contextlib.contextmanager
def hooked(model: nn.Module, hook: Any) -> Iterator[None]:
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def prefill_hook(prefill: Callable[[nn.Module, dict[str, Any], Any], dict[str, Any]]) -> Callable[..., Any]:
    """A forward pre-hook for ``generate``: on a step that starts from an empty cache (the prefill, or every
    step with ``use_cache=False``) ``prefill(module, kwargs, cache)`` puts the virtual tokens in (in front of
    the input, or into the cache); later steps pass through with their cache."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = as_kwargs(module.forward, args, kwargs)
        cache = pop_cache(kwargs)
        if kwargs.get("use_cache") is not False and cache_length(cache) > 0:
            kwargs["cache"] = cache
            return (), kwargs
        return (), prefill(module, kwargs, cache)

    return hook
