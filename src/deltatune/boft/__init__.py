"""BOFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import warnings
from collections import Counter

from torch import nn

from deltatune.boft.config import BOFTConfig
from deltatune.boft.layer import BOFTLayer, make_boft_layer, supported_types
from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.oft import sync_fan_in_fan_out
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: BOFTConfig, module_name: str) -> BOFTLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a BOFT layer already)."""
    layer = target if isinstance(target, BOFTLayer) else make_boft_layer(target)
    if layer is None:
        return None
    sync_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(
        adapter_name,
        boft_block_size=config.boft_block_size,
        boft_block_num=config.boft_block_num,
        boft_n_butterfly_factor=config.boft_n_butterfly_factor,
        boft_dropout=config.boft_dropout,
        init_weights=config.init_weights,
    )
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: block size (or count), butterfly factors, and the shapes in the file."""
    if config.get("boft_block_size"):
        text = f"boft_block_size={config['boft_block_size']}"
    else:
        text = f"boft_block_num={config.get('boft_block_num')}"
    text += f", boft_n_butterfly_factor={config.get('boft_n_butterfly_factor', 1)}"
    found: Counter = Counter()
    for key, shape in shapes.items():
        if key.endswith(".boft_R") and len(shape) == 4:
            found[(shape[0], shape[1], shape[2])] += 1
    if found:
        text += "; in the file: " + ", ".join(f"{m} factor(s) of {d} blocks of {b} x{n}"
                                             for (m, d, b), n in sorted(found.items()))
    return text


def fit_config_to_file(config: BOFTConfig, weights: dict) -> None:
    """PEFT without its compiled CUDA kernel (any CPU run) silently trains one butterfly factor and still writes
    the configured ``boft_n_butterfly_factor``; its files hold ``boft_R: (1, D, b, b)``. Load those as what they
    are, one factor, with a warning."""
    factors = {tuple(v.shape)[0] for k, v in weights.items() if k.endswith(".boft_R") and v.dim() == 4}
    if config.boft_n_butterfly_factor > 1 and factors == {1}:
        warnings.warn(f"adapter_config.json says boft_n_butterfly_factor={config.boft_n_butterfly_factor} but the "
                      "file holds one factor per layer (PEFT trained it without its CUDA kernel, which uses one); "
                      "loading it with boft_n_butterfly_factor=1", stacklevel=4)
        config.boft_n_butterfly_factor = 1


BOFT = Method(
    peft_type=PeftType.BOFT,
    config_cls=BOFTConfig,
    prefix="boft_",
    layer_cls=BOFTLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for BOFT
    cli_names={"boft": {}},
    hooks=Hooks(
        inspect_size=inspect_size,
        fit_config_to_file=fit_config_to_file,
    ),
)
BOFTModel = tuner_class(BOFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["BOFT", "BOFTModel", "BOFTConfig", "BOFTLayer"]
