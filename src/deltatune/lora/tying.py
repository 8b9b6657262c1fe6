"""``LoraConfig.ensure_weight_tying`` (PEFT 0.21): keep an output layer tied to the input embedding when the embedding
is trained through ``modules_to_save``.

With tied word embeddings (``lm_head.weight is embed_tokens.weight``) a ``modules_to_save`` copy of the embedding
breaks the tie: the copy trains, ``lm_head`` keeps the frozen original. With ``ensure_weight_tying=True`` PEFT
instead gives every tied output layer a copy whose weight *is* the embedding copy's weight, so the two stay one
tensor while training, after saving and loading (the file holds it under both keys, as PEFT writes it) and after
``merge_and_unload``. As in PEFT, naming either tied layer in ``modules_to_save`` trains the embedding, and the
config is rewritten to PEFT's form: the embedding's full name added, the tied output layers removed (they follow).

With the embedding (or a tied output layer) in ``target_modules`` instead, PEFT puts the LoRA on the *embedding*
and gives each tied output layer a LoRA whose factors are the embedding's, transposed (see :class:`TiedLoraLinear`):
the two deltas are one matrix, so the layers stay tied while training and after ``merge_and_unload``.

For ``trainable_token_indices`` the tie is kept by :func:`deltatune.trainable_tokens.add_token_adapters`.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import ConfigError
from deltatune.lora.layer import LoraEmbedding, LoraLinear
from deltatune.trainable_tokens.layer import input_embedding_name

# PEFT's EMBEDDING_LAYER_NAMES: a modules_to_save entry ending in one of these asks for the tie.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _tied_outputs(model: nn.Module, weight: nn.Parameter) -> list[str]:
    """Names of the output layers whose weight is ``weight`` (plain, or a ``modules_to_save`` wrapper's original).

    None where the model's config says ``tie_word_embeddings=False`` (PEFT's rule: the checkpoint disabled tying, even
    if the tensors happen to be one)."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:
        return []
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
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model (no "
                          "output layer shares the input embedding's weight, or tie_word_embeddings=False); nothing "
                          "to tie", stacklevel=4)
        return
    if not wants_tie and getattr(config, "target_modules_to_tie", None):
        return  # the LoRA factors were tied by tie_lora_targets
    if not wants_tie:
        if getattr(config, "trainable_token_indices", None) is None:
            warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                          "`modules_to_save` or `target_modules` (nor trainable_token_indices); nothing to tie",
                          stacklevel=4)
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


def _embedding_targeted(config, embed_name: str | None = None) -> bool:
    """Whether ``target_modules`` names ``embed_tokens``/``lm_head`` (PEFT's test) or the input embedding itself.

    The second test is deltatune's: PEFT's name list misses e.g. GPT-2's ``transformer.wte``, which its own rewrite
    puts into the saved config, so PEFT reloads such an adapter without ``lm_head``'s factors (other logits)."""
    targets = getattr(config, "target_modules", None)
    names = (*EMBEDDING_LAYER_NAMES, *([embed_name] if embed_name else []))
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    embed_names = {embed_name, embed_name.split(".")[-1]} if embed_name else set()
    return any(str(t).split(".")[-1] in EMBEDDING_LAYER_NAMES or str(t) in embed_names for t in targets or ())


# ---- ensure_weight_tying with the embedding in target_modules: tied LoRA factors ---------------------------------
_TIE_WARNING = ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                "`ensure_weight_tying` is not set to True. This can lead to complications, for example when merging "
                "the adapter or converting your model to formats other than safetensors. Check the discussion here: "
                "https://github.com/huggingface/peft/issues/2777")


def prepare_tied_targets(model: nn.Module, config) -> None:
    """Before injection, PEFT's rewrite of ``target_modules`` for tied LoRA targets.

    With ``ensure_weight_tying`` and the embedding (or a layer tied to it, e.g. ``lm_head``) in ``target_modules``:
    the embedding's full name is added, the tied output layers are taken out (they get the embedding's factors in
    :func:`tie_lora_targets`) and remembered in ``config.target_modules_to_tie`` (not a saved field, as in PEFT). A
    regex ``target_modules`` becomes ``(?:regex|^embed$)``. Without ``ensure_weight_tying`` a tied layer in
    ``target_modules`` or ``modules_to_save`` gets PEFT's warning: the layers will drift apart.

    Raises:
        ConfigError: an option the tie cannot keep (DoRA, a data-driven or base-rewriting ``init_lora_weights``).
    """
    saved = getattr(config, "modules_to_save", None) or []
    in_saved = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved)
    embed_name = input_embedding_name(model)
    in_targets = _embedding_targeted(config, embed_name)
    if not (in_saved or in_targets):
        return
    embed = _unwrapped(model.get_submodule(embed_name)) if embed_name is not None else None
    tied = _tied_outputs(model, embed.weight) if isinstance(embed, nn.Embedding) else []
    if not tied:
        return  # tie_modules_to_save warns for ensure_weight_tying; untied models need no warning
    if not getattr(config, "ensure_weight_tying", False):
        warnings.warn(_TIE_WARNING, stacklevel=4)
        return
    if in_saved or not in_targets:
        return  # modules_to_save wins (PEFT's order): tie_modules_to_save
    init = config.init_lora_weights
    if config.use_dora or not (isinstance(init, bool) or str(init).lower() == "gaussian"):
        raise ConfigError("ensure_weight_tying=True with the embedding in target_modules ties plain LoRA factors only "
                          f"(got use_dora={config.use_dora}, init_lora_weights={init!r}); use init_lora_weights=True, "
                          "'gaussian' or False without DoRA, or set ensure_weight_tying=False")
    config.target_modules_to_tie = set(tied)
    targets = config.target_modules
    if isinstance(targets, str):
        config.target_modules = rf"(?:{targets}|^{re.escape(embed_name)}$)"
        return
    kind = type(targets) if isinstance(targets, (set, list)) else set
    targets = list(targets) + ([] if embed_name in targets else [embed_name])
    for key in tied:  # each tied layer takes out the first entry that names it (PEFT's rule)
        for m in targets:
            if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key):
                targets.remove(m)
                break
    config.target_modules = kind(targets)


def tie_lora_targets(adapter_model: nn.Module, adapter_name: str, config) -> None:
    """After injection: give every layer in ``config.target_modules_to_tie`` a LoRA adapter whose factors are the
    embedding's (``A_head = B_emb^T``, ``B_head = A_emb^T``), as PEFT does.

    Raises:
        ConfigError: the embedding got no LoRA (``exclude_modules``?) or a tied layer is not Linear.
    """
    tied = sorted(getattr(config, "target_modules_to_tie", None) or ())
    if not tied:
        return
    from deltatune.core.tuner import replace_module

    model = adapter_model.model
    embed_name = input_embedding_name(model)
    embed = model.get_submodule(embed_name)
    if not isinstance(embed, LoraEmbedding) or adapter_name not in embed.lora_embedding_A:
        raise ConfigError(f"ensure_weight_tying=True ties {tied} to the input embedding {embed_name}'s LoRA, but "
                          f"{embed_name} got none (excluded?); let target_modules reach it or set "
                          "ensure_weight_tying=False")
    for name in tied:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            module.__class__ = TiedLoraLinear  # a regex target_modules matched it too: same layer, tied merge rules
        elif isinstance(module, nn.Linear):
            module = TiedLoraLinear(module)
            replace_module(model, name, module)
        else:
            raise ConfigError(f"ensure_weight_tying=True: {name} ({type(module).__name__}) is tied to {embed_name} but "
                              "only Linear output layers can share its LoRA factors; set ensure_weight_tying=False")
        module.tie_to(embed, adapter_name, config)


# PEFT's merge of a tied pair writes the delta twice into the shared weight (W + 2ΔW, outputs change); deltatune
# writes it once, so merged equals unmerged and the layers stay one tensor.
class TiedLoraLinear(LoraLinear):
    """LoRA on an output layer whose weight *is* the input embedding's (``W: (vocab, dim)``).

    For a tied adapter the factors are views of the embedding's, transposed::

        A_head = B_emb^T: (r, dim),   B_head = A_emb^T: (vocab, r),   ΔW_head = s B_head A_head = s (B_emb A_emb)^T

    which is the embedding's ``ΔW`` exactly, so ``W + ΔW`` stays one matrix for both layers. As in PEFT they are
    separate ``nn.Parameter`` objects over the embedding's storage (an optimizer sees both; with SGD the shared
    storage moves by the sum of both gradients, as one tied parameter would). The shared base weight carries the
    delta once: merging here merges the embedding's adapter (once) and writes nothing itself.
    """

    def tie_to(self, embedding: nn.Module, adapter_name: str, config) -> None:
        """Create ``adapter_name`` here with ``embedding``'s rank and alpha and tie its factors to the
        embedding's; then initialise them as a Linear LoRA (``A`` Kaiming or Gaussian, ``B = 0``: the
        embedding's ``A`` becomes 0 too, as in PEFT)."""
        self.__dict__["tied_embedding"] = embedding  # not a submodule: its tensors are saved under its own name
        self.__dict__.setdefault("tied_adapters", set()).add(adapter_name)
        self.update_layer(adapter_name, r=embedding.r[adapter_name], lora_alpha=embedding.lora_alpha[adapter_name],
                          lora_dropout=config.lora_dropout, init_lora_weights=False,
                          use_rslora=config.use_rslora)
        a_emb, b_emb = embedding.lora_embedding_A[adapter_name], embedding.lora_embedding_B[adapter_name]
        self.lora_A[adapter_name].weight = nn.Parameter(b_emb.data.t(), requires_grad=b_emb.requires_grad)
        self.lora_B[adapter_name].weight = nn.Parameter(a_emb.data.t(), requires_grad=a_emb.requires_grad)
        with torch.no_grad():
            self._init_weights(adapter_name, config.init_lora_weights)

    def _tied(self, adapter_name: str) -> bool:
        return adapter_name in self.__dict__.get("tied_adapters", ())

    def _keep_tied(self) -> None:
        """Re-point the tied factors at the embedding's storage where a copy split them (``copy.deepcopy``,
        ``model.to(dtype)`` and ``half()`` give every parameter its own tensor; the values are still equal). The
        ``nn.Parameter`` objects stay, so an optimizer holding them keeps working."""
        embedding = self.__dict__.get("tied_embedding")
        for name in self.__dict__.get("tied_adapters", ()):
            if embedding is None or name not in self.lora_A or name not in embedding.lora_embedding_A:
                continue
            for factor, source in ((self.lora_A[name].weight, embedding.lora_embedding_B[name]),
                                   (self.lora_B[name].weight, embedding.lora_embedding_A[name])):
                if factor.data_ptr() != source.data_ptr():
                    factor.data = source.data.t()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._keep_tied()
        return super().forward(x, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.get("tied_adapters", set()).discard(adapter_name)

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._tied(adapter_name):
            return weight  # the embedding's merge wrote the one shared delta
        return super().merged_weight(weight, adapter_name)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self._tied(adapter_name):
            return weight
        return super().unmerged_weight(weight, adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._keep_tied()
        names = self.active_adapters if adapter_names is None else adapter_names
        tied = [n for n in names if self._tied(n) and n in self.adapter_names()]
        if tied:  # the shared weight must hold the delta before this layer stops adding it
            self.tied_embedding.merge(safe_merge, adapter_names=tied)
        super().merge(safe_merge, adapter_names)

    def unmerge(self) -> None:
        super().unmerge()
        embedding = self.__dict__.get("tied_embedding")
        if embedding is not None and any(self._tied(n) for n in embedding.merged_adapters):
            embedding.unmerge()  # the shared weight must lose the delta now that this layer adds it again
