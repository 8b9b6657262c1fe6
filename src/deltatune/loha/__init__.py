"""LoHa: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.loha.config import LoHaConfig
from deltatune.loha.layer import LoHaLayer, make_loha_layer, supported_types
from deltatune.registry import Method


def create_or_update(target: nn.Module, adapter_name: str, config: LoHaConfig, module_name: str) -> LoHaLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a LoHa layer already)."""
    layer = target if isinstance(target, LoHaLayer) else make_loha_layer(target)
    if layer is None:
        return None
    layer.update_layer(
        adapter_name,
        r=config.rank_for(module_name),
        alpha=config.alpha_for(module_name),
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        init_weights=config.init_weights,
        use_effective_conv2d=config.use_effective_conv2d,
    )
    return layer


LOHA = Method(
    peft_type=PeftType.LOHA,
    config_cls=LoHaConfig,
    prefix="hada_",
    layer_cls=LoHaLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for LoHa
    cli_names={"loha": {}},
    lr_scale=10.0,  # a product of two factors, one zero at init: small early gradients (measured, see README)
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
LoHaModel = tuner_class(LOHA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["LOHA", "LoHaModel", "LoHaConfig", "LoHaLayer"]
