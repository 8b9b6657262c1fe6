"""Running a model with virtual tokens: ``PeftModel``'s forward, generate, adapters and files for the
prompt-learning family.

``PeftModel`` calls these functions when its adapters are prompt-learning ones. The layout is PEFT's:
``peft_model.base_model`` is the user's model itself (never modified, apart from ``modules_to_save``
wrappers) and ``peft_model.prompt_encoder[adapter]`` holds each adapter's encoder.

With ``n = num_virtual_tokens``, a batch of ``B`` rows of ``T`` tokens becomes:

* soft prompts (prompt tuning, P-tuning, MPT): ``inputs_embeds = [P; E(x)]: (B, n + T, d)``; the
  attention mask gains ``n`` leading ones, position ids become ``[0..n-1, n + pos]``, token-level labels
  gain ``n`` leading ``-100`` (ignored), token type ids ``n`` leading zeros. For an encoder-decoder model
  the prompt goes in front of the encoder's input (and, for MPT, also the decoder's, as PEFT does).
* prefix tuning: the model's key/value cache starts with ``n`` trained entries in every layer (the
  decoder's self-attention for an encoder-decoder model); the mask gains ``n`` leading ones and
  position ids shift by ``n``, exactly as if ``n`` tokens had been seen before.

``generate`` runs the model's own ``generate`` with the extended mask and a forward pre-hook that, at the
prefill step only (empty cache), prepends the prompt or fills the cache. Position ids computed by
``generate`` from the extended mask then put every row's first real token at position ``n``, so a
left-padded row generates what it would alone.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType, TaskType
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.state_dict import adapter_state_dict as _aux_state_dict
from deltatune.core.state_dict import check_and_load, to_model_keys
from deltatune.core.tuner import validate_adapter_name
from deltatune.errors import AdapterLoadError, AdapterNameError, ConfigError, MergeError
from deltatune.prompt.config import PromptLearningConfig, fill_from_model
from deltatune.prompt.encoders import MultitaskPromptEmbedding, PromptTable

_LABELS_PER_TOKEN = (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS)


# ---- setup -------------------------------------------------------------------------------------------
def init_model(peft_model: nn.Module, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
    """Set up ``peft_model`` (a fresh ``PeftModel``) around ``model`` with its first prompt adapter."""
    peft_model._is_prompt_learning = True
    peft_model.base_model = model
    peft_model._peft_config = {}
    peft_model._active_prompt = None
    peft_model._prompt_disabled = False
    peft_model.prompt_encoder = nn.ModuleDict()
    add_adapter(peft_model, adapter_name, config)
    set_adapter(peft_model, adapter_name)


def add_adapter(peft_model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Create ``adapter_name``'s encoder (and ``modules_to_save`` copies); everything of the base is frozen.

    Raises:
        ConfigError: a weight-adapter config, a model this method cannot drive (named in the message).
        AdapterNameError: the name is taken.
    """
    from deltatune.registry import method_for

    if not config.is_prompt_learning:
        raise ConfigError(
            f"this PeftModel holds prompt-learning adapters and cannot also hold a {config.peft_type} adapter "
            "(PEFT has the same rule); wrap a fresh base model for it"
        )
    if not peft_model._is_prompt_learning:
        raise ConfigError(
            f"this PeftModel holds weight adapters (e.g. LoRA) and cannot also hold a {config.peft_type} adapter "
            "(PEFT has the same rule); wrap a fresh base model for it"
        )
    validate_adapter_name(adapter_name)
    if adapter_name in peft_model._peft_config:
        raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name")
    model = peft_model.base_model
    # While loading a file (see no_init) a config that does not fit is a load error.
    fill_from_model(config, getattr(model, "config", None),
                    AdapterLoadError if getattr(config, "_loading", False) else ConfigError)
    method = method_for(config.peft_type)
    if config.peft_type == PeftType.PREFIX_TUNING:
        # prefix tuning feeds the attention cache, never the input embeddings: a model need not have any (PEFT)
        check_prefix_support(model, config, training=False)
        word_embeddings = None
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        word_embeddings = find_word_embeddings(model)
        _check_takes(model, "inputs_embeds", "the virtual tokens are put in front of the input embeddings")
        device = word_embeddings.weight.device
    encoder = method.hooks.make_prompt_encoder(config, word_embeddings)
    encoder.to(device=device)
    model.requires_grad_(False)
    peft_model._peft_config[adapter_name] = config
    try:
        peft_model.prompt_encoder[adapter_name] = encoder
        _wrap_modules_to_save(model, adapter_name, config.modules_to_save or [])
    except BaseException:
        remove_adapter(peft_model, adapter_name)
        raise
    _refresh(peft_model)


def _wrap_modules_to_save(model: nn.Module, adapter_name: str, names: list[str]) -> None:
    def matches(key: str) -> bool:
        return any(key == n or key.endswith("." + n) for n in names)

    for key, module in list(model.named_modules()):
        if not key or ".modules_to_save." in f".{key}." or ".original_module" in f".{key}.":
            continue
        if isinstance(module, ModulesToSaveWrapper):
            if matches(key):
                module.update(adapter_name)
        elif matches(key):
            parent_name, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def _refresh(peft_model: nn.Module) -> None:
    """Only the active adapter trains (unless loaded for inference); heads follow the active adapter."""
    active = peft_model._active_prompt
    config = peft_model._peft_config.get(active)
    trainable = config is not None and not config.inference_mode
    for name, encoder in peft_model.prompt_encoder.items():
        encoder.requires_grad_(trainable and name == active)
    for _, wrapper in _wrappers(peft_model.base_model):
        wrapper.set_adapter([active] if active else [], trainable=trainable)
        wrapper.enable_adapters(not peft_model._prompt_disabled)


def set_adapter(peft_model: nn.Module, adapter_name: str | list[str]) -> None:
    if not isinstance(adapter_name, str):
        if len(adapter_name) != 1:
            raise ConfigError("prompt-learning adapters cannot be active together; set_adapter() takes one name")
        adapter_name = adapter_name[0]
    if adapter_name not in peft_model._peft_config:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(peft_model._peft_config)}")
    peft_model._active_prompt = adapter_name
    _refresh(peft_model)


def set_enabled(peft_model: nn.Module, enabled: bool) -> None:
    """``disable_adapter()``: with ``enabled=False`` forward/generate run the plain base model."""
    peft_model._prompt_disabled = not enabled
    _refresh(peft_model)


def remove_adapter(peft_model: nn.Module, adapter_name: str) -> None:
    """Drop ``adapter_name`` everywhere (also used to roll back a failed add/load)."""
    peft_model._peft_config.pop(adapter_name, None)
    if adapter_name in peft_model.prompt_encoder:
        del peft_model.prompt_encoder[adapter_name]
    for name, wrapper in list(_wrappers(peft_model.base_model)):
        wrapper.delete_adapter(adapter_name)
        if not wrapper.adapter_names():
            _replace(peft_model.base_model, name, wrapper.original_module)


def delete_adapter(peft_model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in peft_model._peft_config:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(peft_model._peft_config)}")
    remove_adapter(peft_model, adapter_name)
    if peft_model._active_prompt == adapter_name:
        peft_model._active_prompt = next(iter(peft_model._peft_config), None)
    _refresh(peft_model)


def unload(peft_model: nn.Module) -> nn.Module:
    """The base model as it was: ``modules_to_save`` wrappers replaced by their original modules."""
    for name, wrapper in list(_wrappers(peft_model.base_model)):
        _replace(peft_model.base_model, name, wrapper.original_module)
    peft_model._peft_config.clear()
    return peft_model.base_model


def refuse_merge() -> None:
    raise MergeError(
        "prompt-learning adapters have no weights to merge: their virtual tokens are extra inputs (or cache "
        "entries) of every forward. Keep the PeftModel for inference, or call unload() for the base model"
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---- what the model must offer -----------------------------------------------------------------------
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


def _accepts(fn: Any, name: str) -> bool | None:
    """True/False if ``fn`` names parameter ``name``; None if it only has ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if name in params:
        return True
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else False


def _check_takes(model: nn.Module, name: str, why: str) -> None:
    if _accepts(model.forward, name) is False:
        raise ConfigError(
            f"{type(model).__name__}.forward() takes no {name!r} argument, but {why}; this method cannot drive "
            "it. Use a transformers model, or a weight adapter such as LoRA"
        )


def check_prefix_support(model: nn.Module, config: PromptLearningConfig, training: bool) -> None:
    """Raise a ConfigError naming the fix if prefix tuning cannot extend ``model``'s key/value cache."""
    name = type(model).__name__
    takes = _accepts(model.forward, "cache")
    if takes is None:  # forward(**kwargs) hands them on to the backbone (BertForSequenceClassification...)
        backbone = getattr(model, "base_model", None)
        takes = _accepts(backbone.forward, "cache") if isinstance(backbone, nn.Module) and backbone is not model \
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
    cache = _new_cache(model)
    layers = _self_attention(cache).layers
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


# ---- the prompt ------------------------------------------------------------------------------------
def _active(peft_model: nn.Module) -> tuple[PromptLearningConfig, PromptTable]:
    name = peft_model._active_prompt
    if name is None:
        raise AdapterNameError("this PeftModel has no active adapter; add one and call set_adapter()")
    return peft_model._peft_config[name], peft_model.prompt_encoder[name]


def _task_ids(task_ids: Any, encoder: PromptTable, batch: int, device: torch.device) -> torch.Tensor | None:
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


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(config=model_config), DynamicCache(config=model_config))
    return DynamicCache(config=model_config)


def _self_attention(cache: Any) -> Any:
    return getattr(cache, "self_attention_cache", cache)


def _fill_prefix(cache: Any, config: PromptLearningConfig, encoder: PromptTable, batch: int, dtype: torch.dtype,
                 seq2seq: bool) -> Any:
    target = _self_attention(cache)
    for layer_idx, (k, v) in enumerate(prefix_key_values(config, encoder, batch, dtype, seq2seq)):
        target.update(k, v, layer_idx)
    return cache


def _cache_length(cache: Any) -> int:
    return 0 if cache is None else int(_self_attention(cache).get_seq_length())


def _model_dtype(model: nn.Module, word_embeddings: nn.Module) -> torch.dtype:
    return word_embeddings.weight.dtype if word_embeddings.weight.is_floating_point() else torch.float32


# ---- input bookkeeping -----------------------------------------------------------------------------
def _extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``(B, T) -> (B, n + T)`` with ``n`` leading ones (the virtual tokens are always visible)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError(f"prompt-learning adapters need a 2-D attention mask (batch, seq), got shape "
                          f"{tuple(mask.shape)}; pass the tokenizer's attention_mask")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _prepend_positions(pos: torch.Tensor | None, n: int, shift: bool = True) -> torch.Tensor | None:
    """Soft prompts: ``pos: (B, T) -> [0..n-1, n + pos]: (B, n + T)``. ``shift=False`` for positions that
    already count the prompt (``generate`` derives them from the extended mask)."""
    if pos is None:
        return None
    pos = pos if pos.dim() > 1 else pos.unsqueeze(0)
    head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
    return torch.cat([head, pos + n if shift else pos], dim=-1)


def _prepend(x: torch.Tensor | None, n: int, value: int) -> torch.Tensor | None:
    if x is None:
        return None
    return torch.cat([x.new_full((x.shape[0], n), value), x], dim=1)


def _as_kwargs(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _batch_size(*tensors: torch.Tensor | None) -> int:
    for t in tensors:
        if t is not None:
            return t.shape[0]
    raise ConfigError("pass input_ids or inputs_embeds")


# ---- forward -----------------------------------------------------------------------------------------
def _call(model: nn.Module, **kwargs: Any) -> Any:
    """``model(**kwargs)`` without the ``None`` entries (the bookkeeping above sets absent inputs to ``None``;
    a model need not accept every name)."""
    return model(**{k: v for k, v in kwargs.items() if v is not None})


def forward(peft_model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``PeftModel.forward`` for a prompt-learning adapter (see the module docstring for the layout)."""
    model = peft_model.base_model
    kwargs = _as_kwargs(model.forward, args, kwargs)
    task_ids = kwargs.pop("task_ids", None)
    if peft_model._prompt_disabled:
        return model(**kwargs)
    config, encoder = _active(peft_model)
    if config.peft_type == PeftType.PREFIX_TUNING and model.training:
        check_prefix_support(model, config, training=True)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return _forward_seq2seq(model, config, encoder, kwargs, task_ids)
    return _forward_single_stack(model, config, encoder, kwargs, task_ids)


def _forward_single_stack(model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                          kwargs: dict[str, Any], task_ids: Any) -> Any:
    n = config.num_virtual_tokens
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    batch = _batch_size(ids, embeds)
    cache = _pop_cache(kwargs)
    kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n)
    word_embeddings = find_word_embeddings(model)
    dtype = embeds.dtype if embeds is not None else _model_dtype(model, word_embeddings)

    if config.peft_type == PeftType.PREFIX_TUNING:
        if cache is None:
            cache = _new_cache(model)
        if _cache_length(cache) == 0:
            _fill_prefix(cache, config, encoder, batch, dtype, seq2seq=False)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return _call(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)

    if cache is not None and _cache_length(cache) > 0:
        # Incremental decoding by hand: the prompt already sits in the cache; only shift positions.
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return _call(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)
    if embeds is None:
        embeds = word_embeddings(ids)
    prompt = soft_prompt(encoder, batch, _task_ids(task_ids, encoder, batch, embeds.device), embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt[:, :n], embeds], dim=1)
    kwargs["position_ids"] = _prepend_positions(kwargs.get("position_ids"), n)
    kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), n, 0)
    if config.task_type in _LABELS_PER_TOKEN:
        kwargs["labels"] = _prepend(kwargs.get("labels"), n, -100)
    if config.task_type == TaskType.QUESTION_ANS:
        for key in ("start_positions", "end_positions"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n
    if cache is not None:
        kwargs["cache"] = cache
    return _call(model, **kwargs)


def _forward_seq2seq(model: nn.Module, config: PromptLearningConfig, encoder: PromptTable,
                     kwargs: dict[str, Any], task_ids: Any) -> Any:
    n = config.num_virtual_tokens
    cache = _pop_cache(kwargs)
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    word_embeddings = find_word_embeddings(model)
    dtype = embeds.dtype if embeds is not None else _model_dtype(model, word_embeddings)

    if config.peft_type == PeftType.PREFIX_TUNING:
        batch = _batch_size(ids, embeds, kwargs.get("decoder_input_ids"), kwargs.get("labels"))
        if cache is None:
            cache = _new_cache(model)
        if _cache_length(cache) == 0:
            _fill_prefix(cache, config, encoder, batch, dtype, seq2seq=True)
        kwargs["decoder_attention_mask"] = _extend_mask(kwargs.get("decoder_attention_mask"), n)
        return _call(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)

    if kwargs.get("encoder_outputs") is not None:
        # The encoder already ran (with the prompt); its mask still needs the prompt's columns.
        kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n)
        return _call(model, input_ids=ids, inputs_embeds=embeds, cache=cache, **kwargs)
    batch = _batch_size(ids, embeds)
    if embeds is None:
        embeds = word_embeddings(ids)
    prompt = soft_prompt(encoder, batch, _task_ids(task_ids, encoder, batch, embeds.device), embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt[:, :n], embeds], dim=1)
    kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), n)
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
        kwargs["decoder_attention_mask"] = _extend_mask(kwargs.get("decoder_attention_mask"), n)
        kwargs["labels"] = _prepend(kwargs.get("labels"), n, -100)
    if cache is not None:
        kwargs["cache"] = cache
    return _call(model, **kwargs)


# ---- generate ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(peft_model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``PeftModel.generate`` for a prompt-learning adapter: greedy, sampling, beams, padded batches."""
    model = peft_model.base_model
    kwargs = dict(kwargs)
    task_ids = kwargs.pop("task_ids", None)
    if peft_model._prompt_disabled:
        return model.generate(*args, **kwargs)
    config, encoder = _active(peft_model)
    ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if len(args) > 1:
        raise TypeError("generate() takes input_ids as its only positional argument; pass the rest by keyword")
    if ids is None or "inputs_embeds" in kwargs:
        raise ConfigError("generate() with a prompt-learning adapter needs input_ids (not inputs_embeds): the "
                          "adapter builds the embeddings itself")
    n = config.num_virtual_tokens
    word_embeddings = find_word_embeddings(model)
    dtype = _model_dtype(model, word_embeddings)
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(ids) if mask is None else mask

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["decoder_attention_mask"] = _extend_mask(kwargs.get("decoder_attention_mask"), n)
            hook = _prefill_hook(config, encoder, dtype, seq2seq=True)
            with _hooked(model, hook):
                return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        embeds = word_embeddings(ids)
        tids = _task_ids(task_ids, encoder, ids.shape[0], ids.device)
        prompt = soft_prompt(encoder, ids.shape[0], tids, embeds.dtype)
        return model.generate(inputs_embeds=torch.cat([prompt[:, :n], embeds], dim=1),
                              attention_mask=_extend_mask(mask, n), **kwargs)

    if kwargs.get("position_ids") is not None:
        pos = kwargs.pop("position_ids")
        kwargs["position_ids"] = pos + n if config.peft_type == PeftType.PREFIX_TUNING else _prepend_positions(pos, n)
    if kwargs.get("token_type_ids") is not None and config.peft_type != PeftType.PREFIX_TUNING:
        kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], n, 0)
    if task_ids is not None:
        _task_ids(task_ids, encoder, ids.shape[0], ids.device)  # fail before generating, not inside the loop
    hook = _prefill_hook(config, encoder, dtype, seq2seq=False, word_embeddings=word_embeddings, task_ids=task_ids)
    with _hooked(model, hook):
        return model.generate(ids, attention_mask=_extend_mask(mask, n), **kwargs)


@contextlib.contextmanager
def _hooked(model: nn.Module, hook: Any) -> Iterator[None]:
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _prefill_hook(config: PromptLearningConfig, encoder: PromptTable, dtype: torch.dtype, seq2seq: bool,
                  word_embeddings: nn.Module | None = None, task_ids: Any = None) -> Any:
    """A forward pre-hook for ``generate``: on a step that starts from an empty cache (the prefill, or every
    step with ``use_cache=False``) put the prompt in front of the input or the prefix into the cache."""
    n = config.num_virtual_tokens

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        kwargs = _as_kwargs(module.forward, args, kwargs)
        cache = _pop_cache(kwargs)
        fresh = kwargs.get("use_cache") is False or _cache_length(cache) == 0
        if not fresh:
            kwargs["cache"] = cache
            return (), kwargs
        if config.peft_type == PeftType.PREFIX_TUNING:
            batch = _batch_size(kwargs.get("decoder_input_ids"), kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
            if cache is None or kwargs.get("use_cache") is False:
                cache = _new_cache(module)
            kwargs["cache"] = _fill_prefix(cache, config, encoder, batch, dtype, seq2seq)
            return (), kwargs
        ids = kwargs.pop("input_ids")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ConfigError("prompt-learning generate() needs the default dynamic cache; remove "
                              "cache_implementation='static' (or a compiled cache) from the generation settings")
        embeds = word_embeddings(ids)
        tids = _task_ids(task_ids, encoder, ids.shape[0], ids.device)
        kwargs["inputs_embeds"] = torch.cat([soft_prompt(encoder, ids.shape[0], tids, embeds.dtype), embeds], dim=1)
        kwargs["position_ids"] = _prepend_positions(kwargs.get("position_ids"), n, shift=False)
        kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), n, 0)
        if cache is not None:
            kwargs["cache"] = cache
        return (), {k: v for k, v in kwargs.items() if v is not None}

    return hook


# ---- files -------------------------------------------------------------------------------------------
def adapter_state_dict(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's file content: ``prompt_embeddings`` (the encoder's output; MPT: its shared prompt, plus
    ``prefix_task_cols``/``prefix_task_rows``) and any ``modules_to_save`` copies under their module's key."""
    out = _aux_state_dict(peft_model, adapter_name, containers=())
    encoder = peft_model.prompt_encoder[adapter_name]
    out["prompt_embeddings"] = encoder.prompt_embeddings()
    if isinstance(encoder, MultitaskPromptEmbedding):
        out["prefix_task_cols"] = encoder.prefix_task_cols.detach().cpu()
        out["prefix_task_rows"] = encoder.prefix_task_rows.detach().cpu()
    return out


def load_weights(peft_model: nn.Module, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Load a file's tensors into ``adapter_name``: every shape is checked before anything changes.

    Raises:
        AdapterLoadError: a missing ``prompt_embeddings``/task factor, or a shape that does not fit.
    """
    config = peft_model._peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    weights = dict(weights)
    is_mpt = isinstance(encoder, MultitaskPromptEmbedding)
    needed = ["prompt_embeddings"] + (["prefix_task_cols", "prefix_task_rows"] if is_mpt else [])
    missing = [k for k in needed if k not in weights]
    if missing:
        raise AdapterLoadError(f"the adapter file lacks {missing}; it is not a {config.peft_type} adapter file")
    prompt = [weights.pop(k) for k in needed]
    expected = tuple(encoder.prompt_embeddings().shape)
    if tuple(prompt[0].shape) != expected:
        raise AdapterLoadError(
            f"prompt_embeddings in the file has shape {tuple(prompt[0].shape)}, this model needs {expected}: "
            f"the adapter was trained on another model ({config.base_model_name_or_path!r}?) or its "
            "num_virtual_tokens/token_dim/num_layers do not match; load it into the model it was trained on"
        )
    if is_mpt:
        for key, value in zip(needed[1:], prompt[1:]):
            own = getattr(encoder, key)
            if tuple(value.shape) != tuple(own.shape):
                raise AdapterLoadError(f"{key} in the file has shape {tuple(value.shape)}, this adapter needs "
                                       f"{tuple(own.shape)}: num_tasks/num_ranks in adapter_config.json do not match")
    model_state = to_model_keys(peft_model, weights, adapter_name, containers=())
    check_and_load(peft_model, model_state, adapter_name, (), config.base_model_name_or_path)
    encoder.load_prompt_embeddings(prompt[0])
    if is_mpt:
        encoder.load_task_factors(prompt[1], prompt[2])
    _refresh(peft_model)


@contextlib.contextmanager
def no_init(config: PeftConfig) -> Iterator[None]:
    """While loading a file: skip TEXT / SAMPLE_VOCAB / source-task initialisation (the file replaces it,
    and TEXT would need the tokenizer)."""
    init = getattr(config, "prompt_tuning_init", None)
    if init is not None:
        config.prompt_tuning_init = type(init)("RANDOM")
    config._loading = True
    try:
        yield
    finally:
        del config._loading
        if init is not None:
            config.prompt_tuning_init = init
