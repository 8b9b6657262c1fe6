"""LoKr: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.lokr.config import LoKrConfig
from deltatune.lokr.layer import (
    LoKrLayer,
    factorization,
    make_lokr_layer,
    supported_types,
)
from deltatune.registry import Method


def create_or_update(target: nn.Module, adapter_name: str, config: LoKrConfig, module_name: str) -> LoKrLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a LoKr layer already)."""
    layer = target if isinstance(target, LoKrLayer) else make_lokr_layer(target)
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
        decompose_both=config.decompose_both,
        decompose_factor=config.decompose_factor,
        rank_dropout_scale=config.rank_dropout_scale,
    )
    return layer


LOKR = Method(
    peft_type=PeftType.LOKR,
    config_cls=LoKrConfig,
    prefix="lokr_",
    layer_cls=LoKrLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for LoKr
    cli_names={"lokr": {}},
    lr_scale=10.0,  # as LoHa: one Kronecker factor starts at zero (measured, see README)
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
LoKrModel = tuner_class(LOKR)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["LOKR", "LoKrModel", "LoKrConfig", "LoKrLayer", "factorization"]
