"""PSOFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.psoft.config import PsoftConfig
from deltatune.psoft.layer import OrthLayer, PsoftLayer, make_psoft_layer, supported_types
from deltatune.registry import Method


def create_or_update(target: nn.Module, adapter_name: str, config: PsoftConfig,
                     module_name: str) -> PsoftLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a PSOFT layer already).

    ``fan_in_fan_out`` follows the layer's type, so the saved adapter_config.json says what the file holds: PEFT's
    warning and correction for an ``nn.Linear`` given ``True``; ``True`` for GPT-2's ``Conv1D`` (which PEFT's PSOFT
    does not adapt)."""
    layer = target if isinstance(target, PsoftLayer) else make_psoft_layer(target)
    if layer is None:
        return None
    if config.fan_in_fan_out and not layer.fan_in_fan_out:
        warnings.warn("fan_in_fan_out=True is not compatible with `torch.nn.Linear`. Setting fan_in_fan_out=False.",
                      stacklevel=4)
        config.fan_in_fan_out = False
    elif layer.fan_in_fan_out and not config.fan_in_fan_out:
        warnings.warn(f"{module_name} is a `Conv1D` (weight stored (in, out)): setting fan_in_fan_out=True",
                      stacklevel=4)
        config.fan_in_fan_out = True
    layer.update_layer(adapter_name, config)
    return layer


PSOFT = Method(
    peft_type=PeftType.PSOFT,
    config_cls=PsoftConfig,
    prefix="psoft_",
    layer_cls=PsoftLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT copies LoRA's table for PSOFT
    cli_names={"psoft": {}},
    # measured (README, issue 22's table), 12 bbc-news steps: R rotates W's top-r singular directions, the ones that
    # matter most, so the step size is a narrow window: 1e-3 gives 0.375 -> 0.375 accuracy, 3e-3 0.725 (+0.14 nats
    # forgetting), 1e-2 0.775 (+2.4), 3e-2 0.675 (+7.5)
    lr_scale=3.0,
)
PsoftModel = tuner_class(PSOFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["PSOFT", "OrthLayer", "PsoftConfig", "PsoftLayer", "PsoftModel"]
