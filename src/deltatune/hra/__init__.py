"""HRA (Householder reflection adaptation): the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.hra.config import HRAConfig
from deltatune.hra.layer import HRALayer, make_hra_layer, supported_types
from deltatune.registry import Method


def create_or_update(target: nn.Module, adapter_name: str, config: HRAConfig, module_name: str) -> HRALayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an HRA layer already)."""
    layer = target if isinstance(target, HRALayer) else make_hra_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, r=config.r, apply_GS=config.apply_GS, init_weights=config.init_weights)
    return layer


HRA = Method(
    peft_type=PeftType.HRA,
    config_cls=HRAConfig,
    prefix="hra_",
    layer_cls=HRALayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for HRA
    cli_names={"hra": {}},
)
HRAModel = tuner_class(HRA)  # PEFT's tuner class (isinstance of base_model)
HRALinear = HRALayer  # PEFT's names for the layers over a linear and a Conv2d base
HRAConv2d = HRALayer

__all__ = ["HRA", "HRAConfig", "HRAConv2d", "HRALayer", "HRALinear", "HRAModel"]
