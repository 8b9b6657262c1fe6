"""GLoRA: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.glora.config import GloraConfig
from deltatune.glora.layer import GloraLayer, make_glora_layer, supported_types
from deltatune.registry import Method

GloraLinear = GloraLayer  # PEFT's name of the Linear layer (isinstance checks written for PEFT)


def create_or_update(target: nn.Module, adapter_name: str, config: GloraConfig,
                     module_name: str) -> GloraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a GLoRA layer already)."""
    layer = target if isinstance(target, GloraLayer) else make_glora_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, r=config.r, config_A_B=config.config_A_B, config_C=config.config_C,
                       config_D_E=config.config_D_E, init_weights=config.init_weights)
    return layer


GLORA = Method(
    peft_type=PeftType.GLORA,
    config_cls=GloraConfig,
    prefix="glora_",
    layer_cls=GloraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for GLoRA
    cli_names={"glora": {}},  # no rank_container: glora_A's "lora" pair is Xd (out, r), Xu (r, in)
)
GloraModel = tuner_class(GLORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["GLORA", "GloraModel", "GloraConfig", "GloraLayer", "GloraLinear"]
