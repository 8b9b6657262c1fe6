"""C3A: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.c3a.config import C3AConfig
from deltatune.c3a.layer import C3ALayer, make_c3a_layer, supported_types
from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.registry import Method

C3ALinear = C3ALayer  # PEFT's name of the Linear layer (isinstance checks written for PEFT)

# PEFT's table: LoRA's, but GPT-2 and GPT-BigCode adapt mlp.c_proj
C3A_TARGETS = {**DEFAULT_LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


def create_or_update(target: nn.Module, adapter_name: str, config: C3AConfig, module_name: str) -> C3ALayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a C3A layer already)."""
    layer = target if isinstance(target, C3ALayer) else make_c3a_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, block_size=config.block_size_for(module_name), init_weights=config.init_weights)
    return layer


C3A = Method(
    peft_type=PeftType.C3A,
    config_cls=C3AConfig,
    prefix="c3a_",
    layer_cls=C3ALayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=C3A_TARGETS,
    cli_names={"c3a": {}},
    # PEFT's C3A page: "use a much larger learning rate ... 1e-1 is a good starting point"; its MetaMathQA run uses
    # 3e-1. Measured (README, issue 22's table), 12 bbc-news steps: 1e-3 gives 0.375 -> 0.325 accuracy, 1e-1 0.675
    # (-0.02 nats forgetting), 3e-1 0.825 (+0.03)
    lr_scale=300.0,
)
C3AModel = tuner_class(C3A)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["C3A", "C3AModel", "C3AConfig", "C3ALayer", "C3ALinear"]
