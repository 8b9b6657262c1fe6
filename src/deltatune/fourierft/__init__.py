"""FourierFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.fourierft.config import FourierFTConfig
from deltatune.fourierft.layer import FourierFTLayer, make_fourierft_layer, supported_types
from deltatune.registry import Hooks, Method

FourierFTLinear = FourierFTLayer  # PEFT's name of the Linear layer (isinstance checks written for PEFT)

# PEFT's table: LoRA's, but GPT-2 and GPT-BigCode adapt mlp.c_proj
FOURIERFT_TARGETS = {**DEFAULT_LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


def create_or_update(target: nn.Module, adapter_name: str, config: FourierFTConfig,
                     module_name: str) -> FourierFTLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a FourierFT layer already).

    ``fan_in_fan_out`` follows the layer's type (``Conv1D`` stores ``(in, out)``); where the config says otherwise
    PEFT's warning is given and the config corrected, as PEFT does."""
    layer = target if isinstance(target, FourierFTLayer) else make_fourierft_layer(target)
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
    layer.update_layer(adapter_name, n_frequency=config.n_frequency_for(module_name), scaling=config.scaling,
                       random_loc_seed=config.random_loc_seed, init_weights=config.init_weights)
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: learned frequencies per layer, the scale and the positions' seed."""
    text = f"n_frequency={config.get('n_frequency')} per layer"
    if config.get("n_frequency_pattern"):
        text += f" (pattern: {config['n_frequency_pattern']})"
    return text + f", scaling={config.get('scaling')}, random_loc_seed={config.get('random_loc_seed')}"


FOURIERFT = Method(
    peft_type=PeftType.FOURIERFT,
    config_cls=FourierFTConfig,
    prefix="fourierft_",
    layer_cls=FourierFTLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=FOURIERFT_TARGETS,
    cli_names={"fourierft": {}},
    hooks=Hooks(inspect_size=inspect_size),
)
FourierFTModel = tuner_class(FOURIERFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["FOURIERFT", "FourierFTModel", "FourierFTConfig", "FourierFTLayer", "FourierFTLinear"]
