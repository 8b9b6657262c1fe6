"""PEANuT: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.peanut.config import PeanutConfig
from deltatune.peanut.layer import PeanutLayer, make_peanut_layer, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: PeanutConfig,
                     module_name: str) -> PeanutLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a PEANuT layer already)."""
    layer = target if isinstance(target, PeanutLayer) else make_peanut_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, r=config.r, depth=config.depth, act_fn=config.act_fn, scaling=config.scaling,
                       init_weights=config.init_weights)
    return layer


PEANUT = Method(
    peft_type=PeftType.PEANUT,
    config_cls=PeanutConfig,
    prefix="peanut_",
    layer_cls=PeanutLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for PEANuT
    cli_names={"peanut": {}},
    hooks=Hooks(rank_container="peanut_A"),  # A: (r, out): `deltatune inspect` counts the ranks in a file
)
PeanutModel = tuner_class(PEANUT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["PEANUT", "PeanutModel", "PeanutConfig", "PeanutLayer"]
