"""Lily: the config, the layer, the sharing across layers, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.lily.config import LilyConfig
from deltatune.lily.layer import LilyLayer, share_across_layers, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: LilyConfig, module_name: str) -> LilyLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a Lily layer already), with its
    own tensors; :func:`after_inject` then shares them across layers."""
    if isinstance(target, LilyLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = LilyLayer(target)
    else:
        return None
    layer.update_layer(adapter_name, r=config.r, scaling=config.scaling, stride_A=config.stride_A,
                       num_B=config.num_B, init_weights=config.init_weights)
    return layer


def after_inject(adapter_model: nn.Module, adapter_name: str, config: LilyConfig) -> None:
    """Share ``A`` across ``stride_A`` neighbours and the experts across each target (PEFT's post-injection)."""
    share_across_layers(adapter_model.model, adapter_name, config.target_modules, config.stride_A)


LILY = Method(
    peft_type=PeftType.LILY,
    config_cls=LilyConfig,
    prefix="lily_",
    layer_cls=LilyLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's Lily table is a copy of LoRA's
    cli_names={"lily": {}},
    mergeable=False,  # the routed experts depend on the batch: no fixed ΔW (PEFT refuses too)
    hooks=Hooks(
        after_inject=after_inject,
        rank_container="lily_A",  # A: (r, in)
        # The router averages over every token of the batch: a served row would depend on the requests beside it.
        serve_refusal=lambda config: ("its router averages over every token of the batch, so a completion would "
                                      "depend on the other requests batched with it (and on their padding); use "
                                      "`deltatune generate --adapter` for it"),
    ),
)
LilyModel = tuner_class(LILY)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["LILY", "LilyModel", "LilyConfig", "LilyLayer"]
