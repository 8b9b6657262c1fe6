"""BEFT (bias-efficient fine-tuning): the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.beft.config import BeftConfig
from deltatune.beft.layer import BeftLayer, make_beft_layer, supported_types
from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.registry import Method

# PEFT's table: the attention's value projection
BEFT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["t5", "mt5"], ["v"]),
    **dict.fromkeys(["roberta", "bert"], ["value"]),
    "deberta-v2": ["value_proj"],
    **dict.fromkeys(["opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma",
                     "gemma2", "gemma3_text", "qwen2", "qwen3"], ["v_proj"]),
}


def create_or_update(target: nn.Module, adapter_name: str, config: BeftConfig, module_name: str) -> BeftLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a BEFT layer already)."""
    layer = target if isinstance(target, BeftLayer) else make_beft_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, init_weights=config.init_weights)
    return layer


BEFT = Method(
    peft_type=PeftType.BEFT,
    config_cls=BeftConfig,
    prefix="beft_",
    layer_cls=BeftLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=BEFT_TARGETS,
    cli_names={"beft": {}},
    lr_scale=10.0,  # as BitFit: a few bias vectors want larger steps than low-rank weight updates
    # mixed=False: PEFT 0.21.2's PeftMixedModel refuses BEFT ("not compatible"), though its registry marks it so
)
BeftModel = tuner_class(BEFT)  # PEFT's tuner class (isinstance of base_model)
Linear = BeftLayer  # PEFT's name of its layer over nn.Linear (peft.tuners.beft.Linear)

__all__ = ["BEFT", "BeftConfig", "BeftLayer", "BeftModel", "Linear"]
