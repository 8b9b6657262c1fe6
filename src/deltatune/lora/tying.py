"""``LoraConfig.ensure_weight_tying`` (PEFT 0.21): keep an output layer tied to the input embedding when the embedding
is trained through ``modules_to_save``.

With tied word embeddings (``lm_head.weight is embed_tokens.weight``) a ``modules_to_save`` copy of the embedding
breaks the tie: the copy trains, ``lm_head`` keeps the frozen original. With ``ensure_weight_tying=True`` PEFT
instead gives every tied output layer a copy whose weight *is* the embedding copy's weight, so the two stay one
tensor while training, after saving and loading (the file holds it under both keys, as PEFT writes it) and after
``merge_and_unload``. As in PEFT, naming either tied layer in ``modules_to_save`` trains the embedding, and the
config is rewritten to PEFT's form: the embedding's full name added, the tied output layers removed (they follow).

For ``trainable_token_indices`` the tie is kept by :func:`deltatune.trainable_tokens.add_token_adapters`.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import ConfigError
from deltatune.trainable_tokens.layer import input_embedding_name

# PEFT's EMBEDDING_LAYER_NAMES: a modules_to_save entry ending in one of these asks for the tie.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _tied_outputs(model: nn.Module, weight: nn.Parameter) -> list[str]:
    """Names of the output layers whose weight is ``weight`` (plain, or a ``modules_to_save`` wrapper's original)."""
    out = []
    for name, module in model.named_modules():
        if ".original_module" in name or ".modules_to_save." in name or ".base_layer" in name:
            continue
        inner = _unwrapped(module)
        if isinstance(inner, nn.Linear) and inner.weight is weight:
            out.append(name)
    return out


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base module under a ``modules_to_save`` or adapter-layer wrapper."""
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _tied_copy(original: nn.Module, weight: nn.Parameter) -> nn.Linear:
    """A Linear like ``original`` whose weight is ``weight`` itself (the embedding copy's: one tensor)."""
    bias = getattr(original, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def tie_modules_to_save(adapter_model: nn.Module, adapter_name: str, config) -> None:
    """With ``ensure_weight_tying`` and the embedding (or a tied output layer) in ``modules_to_save``: train the
    embedding's copy and make every tied output layer use that very weight (PEFT's rules and warnings)."""
    if not getattr(config, "ensure_weight_tying", False):
        return
    model = adapter_model.model
    embed_name = input_embedding_name(model)
    saved = list(getattr(config, "modules_to_save", None) or [])
    wants_tie = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved)
    embed = model.get_submodule(embed_name) if embed_name is not None else None
    original = _unwrapped(embed) if embed is not None else None
    tied = _tied_outputs(model, original.weight) if isinstance(original, nn.Embedding) else []
    if not tied:
        if getattr(config, "trainable_token_indices", None) is None:
            warnings.warn("ensure_weight_tying=True, but no output layer of this model shares the input embedding's "
                          "weight (tie_word_embeddings=False?); nothing to tie", stacklevel=4)
        return
    if not wants_tie and _embedding_targeted(config):
        # PEFT ties lm_head's lora_A/B to the embedding's lora_embedding_B/A (and then merges the delta twice into the
        # shared weight); not implemented here: refused rather than left silently untied.
        raise ConfigError("ensure_weight_tying=True with the embedding in target_modules (LoRA factors shared by tied "
                          "embeddings) is not supported by deltatune yet; train the embedding through modules_to_save "
                          "or trainable_token_indices instead, or set ensure_weight_tying=False")
    if not wants_tie:
        if getattr(config, "trainable_token_indices", None) is None:
            warnings.warn("ensure_weight_tying=True, but neither the embedding nor a layer tied to it is in "
                          "modules_to_save or trainable_token_indices; nothing to tie", stacklevel=4)
        return
    if not isinstance(embed, ModulesToSaveWrapper):  # only the tied output layer was named: train the embedding
        adapter_model._wrap_modules_to_save(adapter_name, [embed_name])
        embed = model.get_submodule(embed_name)
    embed_copy = embed.modules_to_save[adapter_name]
    for name in tied:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module, adapter_name)
            from deltatune.core.tuner import replace_module

            replace_module(model, name, module)
        module.modules_to_save[adapter_name] = _tied_copy(module.original_module, embed_copy.weight)
        module.set_adapter(embed.active_adapter or adapter_name)
    # PEFT's config after _add_modules_to_save_to_tie: the embedding's full name in, the tied layers out.
    if embed_name not in saved:
        saved.append(embed_name)
    for key in tied:
        for m in saved:
            if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key):
                saved.remove(m)
                break
    config.modules_to_save = saved


def _embedding_targeted(config) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in EMBEDDING_LAYER_NAMES)
    return any(str(t).split(".")[-1] in EMBEDDING_LAYER_NAMES for t in targets or ())
