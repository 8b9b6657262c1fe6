"""DEFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.deft.config import DeftConfig
from deltatune.deft.layer import DeftLayer, make_deft_layer, supported_types
from deltatune.registry import Method

DeftLinear = DeftLayer  # PEFT's name of the Linear layer (isinstance checks written for PEFT)


def create_or_update(target: nn.Module, adapter_name: str, config: DeftConfig, module_name: str) -> DeftLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a DEFT layer already).

    ``fan_in_fan_out`` follows the layer's type (``Conv1D`` stores ``(in, out)``); where the config says otherwise
    PEFT's warning is given and the config is corrected (as PEFT)."""
    layer = target if isinstance(target, DeftLayer) else make_deft_layer(target)
    if layer is None:
        return None
    if target is not layer and layer.fan_in_fan_out != config.fan_in_fan_out:
        if layer.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=4)
        else:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", stacklevel=4)
        config.fan_in_fan_out = layer.fan_in_fan_out
    layer.update_layer(adapter_name, r=config.r, decomposition_method=config.decomposition_method,
                       init_scale=config.init_scale, alpha=config.alpha, para=config.para,
                       deft_dropout=config.deft_dropout, init_weights=config.init_weights)
    return layer


DEFT = Method(
    peft_type=PeftType.DEFT,
    config_cls=DeftConfig,
    prefix="deft_",
    layer_cls=DeftLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's DEFT table is LoRA's
    cli_names={"deft": {}},
)
DeftModel = tuner_class(DEFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["DEFT", "DeftModel", "DeftConfig", "DeftLayer", "DeftLinear"]
