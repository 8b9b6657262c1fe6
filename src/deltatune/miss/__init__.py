"""MiSS (matrix shard sharing, formerly Bone): the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.miss.config import MissConfig
from deltatune.miss.layer import MissLayer, make_miss_layer, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: MissConfig, module_name: str) -> MissLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a MiSS layer already)."""
    layer = target if isinstance(target, MissLayer) else make_miss_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, r=config.r, mini_r=config.mini_r, miss_dropout=config.miss_dropout,
                       init_weights=config.init_weights)
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: the variant, its shard width ``r`` (not a rank) and the blocks in the file."""
    r, init = config.get("r"), config.get("init_weights", True)
    if init == "bat":
        text = f"bat, shard width r={r}: an r x r block per r output rows"
    elif init == "mini":
        text = f"mini, shard width r={r}: an (r, mini_r={config.get('mini_r')}) block per layer"
    else:
        text = f"balance, shard width r={r}: an (r, out) block per layer"
    blocks = [shape for key, shape in shapes.items() if key.endswith(".miss_block")]
    if blocks:
        kinds = sorted({"x".join(map(str, shape)) for shape in blocks})
        text += f"; in the file: {len(blocks)} blocks ({', '.join(kinds)})"
    return text


MISS = Method(
    peft_type=PeftType.MISS,
    config_cls=MissConfig,
    prefix="miss_",
    layer_cls=MissLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for MiSS
    cli_names={"miss": {}},
    hooks=Hooks(inspect_size=inspect_size),
)
MissModel = tuner_class(MISS)  # PEFT's tuner class (isinstance of base_model)
MissLinear = MissLayer  # PEFT's name for the layer over a linear base

__all__ = ["MISS", "MissConfig", "MissLayer", "MissLinear", "MissModel"]
