"""Trainable tokens: the config, the layer, the registry entry, and LoRA's ``trainable_token_indices``."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError
from deltatune.registry import Hooks, Method
from deltatune.trainable_tokens.config import TrainableTokensConfig, check_token_indices
from deltatune.trainable_tokens.layer import (
    TrainableTokensLayer,
    input_embedding_name,
    supported_types,
    tied_output_names,
)


def prepare_config(model: nn.Module, config: TrainableTokensConfig) -> None:
    """``target_modules=None`` means the input embedding, written as its full name (as PEFT writes it).

    An empty ``token_indices`` (the config's default) is refused here, before the model changes."""
    config.check_applicable()
    if config.target_modules is None:
        config.target_modules = input_embedding_name(model) or "embed_tokens"


def create_or_update(target: nn.Module, adapter_name: str, config: TrainableTokensConfig,
                     module_name: str) -> TrainableTokensLayer | None:
    """Add adapter ``adapter_name`` to the embedding ``target`` (wrapping it unless it is wrapped already)."""
    if isinstance(target, TrainableTokensLayer):
        layer = target
    elif isinstance(target, (nn.Embedding, nn.Linear)):
        layer = TrainableTokensLayer(target)
    else:
        return None
    layer.update_layer(adapter_name, config.token_indices, config.init_weights)
    return layer


def _tie_output_layers(model: nn.Module, leader: TrainableTokensLayer, register_tied: bool) -> None:
    """Wrap every output layer sharing ``leader``'s weight so it follows ``leader``'s rows (tied embeddings)."""
    from deltatune.core.tuner import replace_module

    for name in tied_output_names(model, leader.base_layer):
        follower = TrainableTokensLayer(model.get_submodule(name), tied_to=leader, register_tied=register_tied)
        follower.set_adapter(leader.active_adapters)
        replace_module(model, name, follower)


def after_inject(adapter_model: nn.Module, adapter_name: str, config: TrainableTokensConfig) -> None:
    """With tied input/output embeddings, the output layer follows the input embedding's rows (as PEFT)."""
    for _, module in adapter_model.adapter_layers():
        if isinstance(module, TrainableTokensLayer) and not module._tied:
            _tie_output_layers(adapter_model.model, module, register_tied=True)


TRAINABLE_TOKENS = Method(
    peft_type=PeftType.TRAINABLE_TOKENS,
    config_cls=TrainableTokensConfig,
    prefix="trainable_tokens_",
    layer_cls=TrainableTokensLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    cli_names={"trainable_tokens": {}},
    lr_scale=10.0,  # a few embedding rows want larger steps than low-rank weight updates
    hooks=Hooks(
        prepare_config=prepare_config,
        after_inject=after_inject,
        cli_shared_skip=("target_modules",),  # the recipes' "all-linear" names linear layers, not the embedding
    ),
)
TrainableTokensModel = tuner_class(TRAINABLE_TOKENS)  # PEFT's tuner class (isinstance of base_model)


# ---- LoRA's trainable_token_indices: a token adapter beside the LoRA layers ---------------------------
class TokenAdapterWrapper(nn.Module):
    """Holds a :class:`TrainableTokensLayer` as ``token_adapter`` (PEFT's layout, so the keys read
    ``<embedding>.token_adapter.trainable_tokens_delta``) for a LoRA adapter's ``trainable_token_indices``."""

    collapse_into = "token_adapter"  # the tuner puts the child back once it holds no adapter
    # PEFT's TrainableTokensWrapper names (dotted: code reads them with operator.attrgetter)
    adapter_layer_names: tuple[str, ...] = ("token_adapter.trainable_tokens_delta",)
    other_param_names: tuple[str, ...] = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")

    def __init__(self, token_adapter: TrainableTokensLayer) -> None:
        super().__init__()
        self.token_adapter = token_adapter

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.base_layer.weight

    # ---- PEFT's wrapper API: each call is the token layer's ------------------------------------
    @property
    def original_module(self) -> nn.Module:
        """The wrapped embedding (or tied output layer)."""
        return self.token_adapter.base_layer

    @property
    def active_adapters(self) -> list[str]:
        return [a for a in self.token_adapter.active_adapters if a in self.token_adapter.adapter_names()]

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def merged_adapters(self) -> list[str]:
        return self.token_adapter.merged_adapters

    @property
    def disable_adapters(self) -> bool:
        return self.token_adapter.disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        self.token_adapter.enable_adapters(enabled)

    def check_set_adapter(self, adapter_names: str | list[str]) -> str | None:
        """The one adapter of ``adapter_names`` with rows here (``None``: none has), or a ``ValueError`` in PEFT's
        words when two of them have rows here that overlap (both would write the same embedding rows; adapters
        with disjoint rows may be active together, which PEFT does not allow)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ConfigError("Please specify at least one adapter to set")
        here = [n for n in names if n in self.token_adapter.adapter_names()]
        rows = [set(self.token_adapter.leader.token_indices[n]) for n in here]
        if any(rows[i] & rows[j] for i in range(len(rows)) for j in range(i)):
            raise ConfigError(f"Only one adapter can be set at a time for TrainableTokensWrapper, got {len(here)} "
                              f"({here}): their trainable_token_indices overlap; activate one of them, or give them "
                              "disjoint token ids")
        return here[0] if here else None

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True,
                    inference_mode: bool | None = None) -> None:
        """Make ``adapter_names`` active on the token layer; their rows train unless ``trainable=False`` (PEFT:
        ``inference_mode=True``)."""
        self.token_adapter.set_adapter(adapter_names, trainable if inference_mode is None else not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.token_adapter.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        """Drop ``adapter_name``'s rows; with PEFT's ``new_active_adapters``, those become the active ones."""
        self.token_adapter.delete_adapter(adapter_name)
        if new_active_adapters is not None:
            self.token_adapter.set_adapter([n for n in new_active_adapters if n in self.token_adapter.adapter_names()])

    def unload_and_optionally_merge_module(self, merge: bool = False, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """The wrapped layer, with the adapters' rows written in when ``merge`` (PEFT's hook)."""
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.token_adapter.get_base_layer()

    def _get_available_adapters(self) -> set[str]:
        # once its last adapter is deleted the token layer is the plain embedding again: no adapters
        names = getattr(self.token_adapter, "adapter_names", None)
        return set(names()) if callable(names) else set()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)


def token_index_targets(model: nn.Module, indices) -> dict[str, list[int]]:
    """``trainable_token_indices`` as ``{layer name or suffix: [ids]}`` (a bare list means the input embedding)."""
    if isinstance(indices, dict):
        targets = {str(k): v for k, v in indices.items()}
    else:
        name = input_embedding_name(model)
        if name is None:
            raise ConfigError("trainable_token_indices as a list needs a model with get_input_embeddings(); pass "
                              "a dict {embedding layer name: [ids]} instead")
        targets = {name: indices}
    for key, ids in targets.items():
        check_token_indices(ids, f"trainable_token_indices[{key!r}]")
    return targets


def _names(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _tied_keys_that_follow(model: nn.Module, targets: dict[str, list[int]], ensure_tying: bool) -> set[str]:
    """Keys of ``trainable_token_indices`` naming an output layer tied to the input embedding that is listed too
    (PEFT's rules): with the same ids as the embedding they follow its rows (one tensor, no copy of their own);
    with other ids they get rows of their own, unless ``ensure_weight_tying`` asks for the tie, which is refused."""
    embed_name = input_embedding_name(model)
    if len(targets) < 2 or embed_name is None:
        return set()
    embedding = model.get_submodule(embed_name)
    tied = tied_output_names(model, embedding) if isinstance(embedding, nn.Embedding) else []
    if not tied:
        return set()
    embed_keys = [k for k in targets if _names(embed_name, k)]
    tied_keys = [k for k in targets if k not in embed_keys and any(_names(t, k) for t in tied)]
    if not embed_keys or not tied_keys:
        return set()
    first = targets[embed_keys[0]]
    mismatched = [k for k in tied_keys if list(targets[k]) != list(first)]
    if mismatched and ensure_tying:
        layers = ", ".join(f"{k}: {targets[k]}" for k in embed_keys[:1] + tied_keys)
        raise ConfigError(f"ensure_weight_tying=True cannot keep tied layers tied when trainable_token_indices gives "
                          f"them different token ids ({layers}); give them the same ids or set "
                          "ensure_weight_tying=False")
    return set() if mismatched else set(tied_keys)


def _refuse_inside_adapter_layer(model: nn.Module, name: str, adapter_name: str) -> None:
    """A key that matches a module *inside* an adapter layer (``emb.lora_dropout.foobar`` when the adapter is
    named ``foobar``) is a name clash, never a token embedding to adapt: refuse it with PEFT's sentence, which
    names the classes as PEFT calls them."""
    from deltatune.core.layer import AdapterLayer

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, AdapterLayer):
            package, _, cls = parent._get_name().rpartition(".")
            where = f"peft.tuners.{package}.layer.{cls}" if package else f"peft.tuners.{cls}"
            raise ConfigError(
                "You are trying to target a module with <class 'peft.utils.other.TrainableTokensWrapper'> that is "
                f"a child of <class '{where}'>. This is almost certainly not the intended behavior. Please ensure "
                f"that the adapter name, {adapter_name!r}, does not conflict with any of the targeted modules. "
                f"({name!r} is inside the adapter layer {'.'.join(parts[:i])!r}: rename the adapter or the "
                "trainable_token_indices key)"
            )


def add_token_adapters(adapter_model: nn.Module, adapter_name: str, config) -> None:
    """LoRA's ``after_inject``: wrap the layers named by ``config.trainable_token_indices`` (PEFT's rules)."""
    indices = getattr(config, "trainable_token_indices", None)
    if indices is None:
        return
    from deltatune.core.tuner import replace_module

    model = adapter_model.model
    saved = set(getattr(config, "modules_to_save", None) or [])
    targets = token_index_targets(model, indices)
    followers = _tied_keys_that_follow(model, targets, getattr(config, "ensure_weight_tying", False))
    for key, ids in targets.items():
        if key in followers:  # a tied output layer with the embedding's ids: it follows the embedding's rows
            continue
        if key in saved:
            raise ConfigError(f"{key!r} is both in modules_to_save (trained in full) and in trainable_token_indices; "
                              "pick one")
        matches = [n for n, m in model.named_modules() if (n == key or n.endswith("." + key))
                   and ".token_adapter" not in n and not n.endswith(".base_layer")]
        if not matches:
            raise ConfigError(f"trainable_token_indices names {key!r}, which matches no module of the model")
        for name in matches:
            module = model.get_submodule(name)
            _refuse_inside_adapter_layer(model, name, adapter_name)
            if isinstance(module, TokenAdapterWrapper):
                if not module.token_adapter._tied:
                    module.token_adapter.update_layer(adapter_name, list(ids))
                continue
            layer = TrainableTokensLayer(module)
            layer.update_layer(adapter_name, list(ids))
            replace_module(model, name, TokenAdapterWrapper(layer))
            if not isinstance(module, nn.Embedding):
                continue
            named = [k for k in indices if k not in followers] if isinstance(indices, dict) else []
            explicit = [n for n, m in model.named_modules() if any(_names(n, k) for k in named)]
            for tied in tied_output_names(model, module):
                if tied not in explicit:
                    follower = TrainableTokensLayer(model.get_submodule(tied), tied_to=layer, register_tied=False)
                    follower.set_adapter(layer.active_adapters)
                    replace_module(model, tied, TokenAdapterWrapper(follower))


__all__ = ["TRAINABLE_TOKENS", "TrainableTokensModel", "TokenAdapterWrapper", "TrainableTokensConfig",
           "TrainableTokensLayer", "add_token_adapters"]
