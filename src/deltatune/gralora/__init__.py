"""GraLoRA: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.gralora.config import GraloraConfig
from deltatune.gralora.layer import GraloraLayer, make_gralora_layer, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: GraloraConfig,
                     module_name: str) -> GraloraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a GraLoRA layer already).

    ``fan_in_fan_out`` follows the layer's type (``Conv1D`` stores ``(in, out)``); where the config says otherwise
    PEFT's warning is given and the config corrected, as PEFT does, so ``adapter_config.json`` says what the file
    holds."""
    layer = target if isinstance(target, GraloraLayer) else make_gralora_layer(target)
    if layer is None:
        return None
    if target is not layer and layer.fan_in_fan_out != config.fan_in_fan_out:
        if config.fan_in_fan_out:
            message = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                       f"fan_in_fan_out to False. ({module_name})")
        else:
            message = ("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                       f"to True. ({module_name})")
        warnings.warn(message, stacklevel=4)
        config.fan_in_fan_out = layer.fan_in_fan_out
    layer.update_layer(adapter_name, r=config.r, alpha=config.alpha, gralora_k=config.gralora_k,
                       hybrid_r=config.hybrid_r, gralora_dropout=config.gralora_dropout,
                       init_weights=config.init_weights)
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: the rank, how it is split into blocks, the hybrid rank and the scale."""
    r, k, hybrid = config.get("r"), config.get("gralora_k"), config.get("hybrid_r") or 0
    alpha = config.get("alpha")
    text = f"r={r} as {k}x{k} blocks of rank {r // k}" if isinstance(r, int) and isinstance(k, int) and k else f"r={r}"
    if hybrid:
        text += f", hybrid_r={hybrid}"
    if isinstance(alpha, (int, float)) and isinstance(r, int):
        text += f", scaling alpha/(r+hybrid_r)={alpha / (r + hybrid):g}"
    return text


GRALORA = Method(
    peft_type=PeftType.GRALORA,
    config_cls=GraloraConfig,
    prefix="gralora_",
    layer_cls=GraloraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's GraLoRA table is a copy of LoRA's
    cli_names={"gralora": {}},
    hooks=Hooks(inspect_size=inspect_size),
)
GraloraModel = tuner_class(GRALORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["GRALORA", "GraloraModel", "GraloraConfig", "GraloraLayer"]
