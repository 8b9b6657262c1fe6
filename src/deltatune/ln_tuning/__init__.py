"""LN tuning: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.ln_tuning.config import DEFAULT_LN_TUNING_TARGETS, LNTuningConfig
from deltatune.ln_tuning.layer import LNTuningLayer, supported_types
from deltatune.registry import Method, register


def create_or_update(target: nn.Module, adapter_name: str, config: LNTuningConfig,
                     module_name: str) -> LNTuningLayer:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an LN tuning layer already)."""
    layer = target if isinstance(target, LNTuningLayer) else LNTuningLayer(target)
    layer.update_layer(adapter_name)
    return layer


LN_TUNING = register(Method(
    peft_type=PeftType.LN_TUNING,
    config_cls=LNTuningConfig,
    prefix="ln_tuning_",
    layer_cls=LNTuningLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LN_TUNING_TARGETS,
    cli_names={"ln_tuning": {}},
    lr_scale=1.0,
    cli_shared_skip=("target_modules",),  # the recipes' "all-linear" would copy linear layers, not norms
))

__all__ = ["LN_TUNING", "LNTuningConfig", "LNTuningLayer"]
