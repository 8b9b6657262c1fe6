"""BitFit (bias-only tuning): the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.bitfit.config import BitFitConfig
from deltatune.bitfit.layer import BitFitLayer, supported_types
from deltatune.config import PeftType
from deltatune.core.targeting import ALL_LINEAR
from deltatune.core.tuner import tuner_class
from deltatune.registry import Hooks, Method


def prepare_config(model: nn.Module, config: BitFitConfig) -> None:
    """``target_modules=None`` means every linear layer but the output head."""
    if config.target_modules is None:
        config.target_modules = ALL_LINEAR


def create_or_update(target: nn.Module, adapter_name: str, config: BitFitConfig,
                     module_name: str) -> BitFitLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a BitFit layer already)."""
    if isinstance(target, BitFitLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = BitFitLayer(target)
    else:
        return None
    layer.update_layer(adapter_name, config.init_weights)
    return layer


BITFIT = Method(
    peft_type=PeftType.BITFIT,
    config_cls=BitFitConfig,
    prefix="bitfit_",
    layer_cls=BitFitLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    cli_names={"bitfit": {}},
    lr_scale=10.0,  # a few bias vectors, like prompt vectors, want larger steps than low-rank weight updates
    hooks=Hooks(
        prepare_config=prepare_config,
    ),
)
BitFitModel = tuner_class(BITFIT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["BITFIT", "BitFitModel", "BitFitConfig", "BitFitLayer"]
