"""ShadowPEFT: the config, the block layer, the shadow backbone and runtime, and the registry entry.

The method wraps whole decoder blocks (every block by default) in :class:`ShadowLayer`; the per-adapter backbone,
projection and classifier copy live once per model on the tuner (the ``shared_containers``), and one
:class:`~deltatune.shadow.model.ShadowRuntime` per tuner seeds ``s⁽⁰⁾`` and carries the shadow state through each
forward. Everything else (several named adapters, one active at a time, switching, disabling, mixed-adapter batches,
files) is the weight adapters' shared machinery. Nothing can be merged (``mergeable=False``).

Files are PEFT's: every key keeps the container's adapter slot as ``default`` (PEFT 0.21.2 writes
``...layers.0.shadow_down.default.weight`` and ``base_model.shadow_backbone.default.norm.weight`` whatever the
adapter's name); ``before_save``/``from_file`` translate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError
from deltatune.registry import Hooks, Method
from deltatune.shadow.cache import ShadowCache
from deltatune.shadow.config import ShadowConfig
from deltatune.shadow.detached import DetachedShadowModel, unload_shadow
from deltatune.shadow.layer import MERGE_REFUSAL, OWN_CONTAINERS, SHARED_CONTAINERS, ShadowLayer
from deltatune.shadow.model import (
    ShadowRuntime,
    build_shadow,
    default_targets,
    embedding_parameters,
    hidden_size_of,
    is_diffusion_transformer,
)

_DIFFUSERS_REFUSAL = ("ShadowPEFT on a diffusers transformer (PEFT's Flux2 backend and its token-wise MLP "
                      "fallback) is not supported by deltatune: it needs diffusers, which deltatune does not use. "
                      "Use ShadowPEFT on a transformers decoder-only model (Llama, Qwen2/3, GPT-2, ...), or LoRA for "
                      "diffusion transformers")


def prepare_config(model: nn.Module, config: ShadowConfig) -> None:
    """Refuse a diffusers model; with no ``target_modules``, every decoder block by name (PEFT's default)."""
    if is_diffusion_transformer(model):
        raise ConfigError(_DIFFUSERS_REFUSAL)
    if config.target_modules is None:
        config.target_modules = default_targets(model)


def runtime_of(adapter_model: nn.Module) -> ShadowRuntime:
    """The tuner's :class:`ShadowRuntime` and shared containers (made on first use)."""
    runtime = adapter_model.__dict__.get("shadow_runtime")
    if runtime is None:
        runtime = ShadowRuntime(adapter_model)
        adapter_model.__dict__["shadow_runtime"] = runtime
    for name in SHARED_CONTAINERS:
        if name not in adapter_model._modules:
            setattr(adapter_model, name, nn.ModuleDict())
    return runtime


def init_shared(adapter_model: nn.Module, adapter_name: str, config: ShadowConfig, target_names: list[str]
                ) -> dict[str, Any]:
    """Build ``adapter_name``'s backbone, projection and (sequence classification) head before any block is wrapped
    (PEFT's order: the same draws under one seed); returns what :func:`create_or_update` needs.

    Raises:
        ConfigError: a second adapter where one is for sequence classification (PEFT's refusal).
    """
    others = [c for n, c in adapter_model.peft_config.items() if n != adapter_name]
    if others and any(str(c.task_type) == "SEQ_CLS" for c in [*others, config]):
        raise ConfigError("ShadowPEFT does not support multiple adapters when any adapter uses sequence "
                          "classification because the sequence classification adapter requires both a classifier in "
                          "`modules_to_save` and a separate `shadow_head`.")
    runtime = runtime_of(adapter_model)
    backbone, projection, head, share = build_shadow(adapter_model.model, config)
    adapter_model.shadow_backbone[adapter_name] = backbone
    adapter_model.shadow_projection[adapter_name] = projection
    if head is not None:
        adapter_model.shadow_head[adapter_name] = head
    runtime.share[adapter_name] = share
    if config.shadow_model != "mirror":
        runtime.pretrained[adapter_name] = embedding_parameters(backbone)
    shared = {name: adapter_model._modules[name] for name in SHARED_CONTAINERS}
    return {"runtime": runtime, "shared": shared, "hidden_size": hidden_size_of(adapter_model.model.config)}


def create_or_update(target: nn.Module, adapter_name: str, config: ShadowConfig, module_name: str,
                     runtime: ShadowRuntime, shared: dict[str, nn.ModuleDict], hidden_size: int) -> ShadowLayer:
    """Add adapter ``adapter_name`` to the decoder block ``target`` (wrapping it first unless it is wrapped)."""
    layer = target if isinstance(target, ShadowLayer) else ShadowLayer(target, hidden_size, runtime, shared)
    layer.update_layer(adapter_name, r=config.r, shadow_alpha=config.shadow_alpha,
                       shadow_dropout=config.shadow_dropout, update_hidden_size=config.update_hidden_size,
                       init_weights=config.init_weights)
    return layer


def after_inject(adapter_model: nn.Module, adapter_name: str, config: ShadowConfig) -> None:
    """Hook the model (once): the runtime seeds the shadow state before each forward and packs the caches after."""
    runtime = runtime_of(adapter_model)
    blocks = [layer for layer in runtime.layers() if adapter_name in layer.shadow_down]
    if blocks:
        blocks[-1].make_final(adapter_name)
    runtime.freeze_pretrained_embeddings()
    runtime.attach()


def _with_default_slot(peft_model: nn.Module, adapter_name: str, file_state: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """PEFT's file keys: ``<container>.default.<rest>`` for every shadow tensor, whatever the adapter's name."""
    out = {}
    for key, value in file_state.items():
        parts = key.split(".")
        hit = next((i for i, p in enumerate(parts[:-1]) if p in OWN_CONTAINERS + SHARED_CONTAINERS), None)
        out[key if hit is None else ".".join([*parts[:hit + 1], "default", *parts[hit + 1:]])] = value
    return out


def _without_default_slot(config: ShadowConfig, file_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_with_default_slot` (files written by PEFT or by deltatune)."""
    out = {}
    for key, value in file_state.items():
        parts = key.split(".")
        hit = next((i for i, p in enumerate(parts[:-1]) if p in OWN_CONTAINERS + SHARED_CONTAINERS), None)
        if hit is not None and parts[hit + 1] == "default":
            key = ".".join(parts[:hit + 1] + parts[hit + 2:])
        out[key] = value
    return out


SHADOW = Method(
    peft_type=PeftType.SHADOW,
    config_cls=ShadowConfig,
    prefix="shadow_",
    layer_cls=ShadowLayer,
    create_or_update=create_or_update,
    supported_types=lambda: (nn.Module,),  # whole decoder blocks, of any class
    cli_names={"shadow": {}},
    mergeable=False,  # the injection depends on the input through the shadow state
    hooks=Hooks(
        prepare_config=prepare_config,
        init_shared=init_shared,
        after_inject=after_inject,
        shared_containers=SHARED_CONTAINERS,
        uses_shared_state=False,  # PEFT's ShadowModel does not declare shared state
        # The shadow backbone keeps its own key/value cache (ShadowCache) beside the base's, which the server's
        # batched cache (rows joining, leaving, left-padded merges) does not carry.
        serve_refusal=lambda config: ("its shadow backbone runs beside the base with a key/value cache of its own "
                                      "(ShadowCache), which deltatune serve's batched cache does not carry; use "
                                      "`deltatune generate --adapter` for it"),
        before_save=_with_default_slot,
        from_file=_without_default_slot,
        cli_shared_skip=("target_modules",),  # the recipes' "all-linear" names linear layers, not decoder blocks
    ),
)
ShadowModel = tuner_class(SHADOW)  # PEFT's tuner class (isinstance of base_model)


def _last_shadow_loss(self: nn.Module) -> torch.Tensor | None:
    """PEFT's ``ShadowModel.last_shadow_loss``: the unweighted auxiliary loss of the last forward with labels."""
    return runtime_of(self).last_shadow_loss


ShadowModel.last_shadow_loss = property(_last_shadow_loss)
ShadowModel.shadow_runtime = property(runtime_of)
ShadowModel.unload_shadow = unload_shadow  # PEFT's ShadowModel.unload_shadow(adapter_name=None, copy=False)

__all__ = ["MERGE_REFUSAL", "SHADOW", "DetachedShadowModel", "ShadowCache", "ShadowConfig", "ShadowLayer",
           "ShadowModel"]
