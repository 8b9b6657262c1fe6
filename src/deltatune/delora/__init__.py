"""DeLoRA: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.delora.config import DeloraConfig
from deltatune.delora.layer import DeloraLayer, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: DeloraConfig,
                     module_name: str) -> DeloraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a DeLoRA layer already), with
    the module's ``r`` and ``λ`` from ``rank_pattern`` / ``lambda_pattern``."""
    if isinstance(target, DeloraLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = DeloraLayer(target)
    else:
        return None
    layer.update_layer(adapter_name, r=config.rank_for(module_name), delora_lambda=config.lambda_for(module_name),
                       module_dropout=config.module_dropout, init_weights=config.init_weights)
    return layer


DELORA = Method(
    peft_type=PeftType.DELORA,
    config_cls=DeloraConfig,
    prefix="delora_",
    layer_cls=DeloraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's DeLoRA table is LoRA's
    cli_names={"delora": {}},
    # lr_scale stays 1: no learning rate tames DeLoRA's first step. B starts at zero and each rank-one term is
    # normalised, so after one step ΔW already has its full size, ‖ΔW‖ ≈ λ/√(r·in)·‖W‖ (0.22‖W‖ for λ = 15, r = 8,
    # in = 576: measured the same at lr 1e-3, 1e-4 and 1e-5); the knob is `delora_lambda` (README, issue 22's table)
    hooks=Hooks(extra_containers=("delora_w_norm",)),  # saved beside the trained tensors (PEFT's file keys)
)
DeloraModel = tuner_class(DELORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["DELORA", "DeloraConfig", "DeloraLayer", "DeloraModel"]
