"""OFT: the config, the layer, and the registry entry."""

from __future__ import annotations

import math
import re
from collections import Counter

from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.oft.config import OFTConfig
from deltatune.oft.layer import OFTLayer, make_oft_layer, supported_types
from deltatune.registry import Hooks, Method


def sync_fan_in_fan_out(layer: nn.Module, config, module_name: str) -> None:
    """As PEFT: the flag follows the layer type, so the saved adapter_config.json says what the file holds."""
    if not layer.is_conv and not getattr(layer, "is_embedding", False):  # convolutions and embeddings have no flag
        follow_fan_in_fan_out(layer, config, module_name, stacklevel=6)


def create_or_update(target: nn.Module, adapter_name: str, config: OFTConfig, module_name: str) -> OFTLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an OFT layer already)."""
    layer = target if isinstance(target, OFTLayer) else make_oft_layer(target)
    if layer is None:
        return None
    sync_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(
        adapter_name,
        r=config.r,
        oft_block_size=config.oft_block_size,
        module_dropout=config.module_dropout,
        init_weights=config.init_weights,
        coft=config.coft,
        eps=config.eps,
        block_share=config.block_share,
        use_cayley_neumann=config.use_cayley_neumann,
        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
    )
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: the configured block size (or count) and the sizes in the file."""
    if config.get("r"):
        text = f"r={config['r']} blocks per layer"
    else:
        text = f"oft_block_size={config.get('oft_block_size')}"
    if config.get("block_share"):
        text += ", one block shared per layer"
    found: Counter = Counter()
    for key, shape in shapes.items():
        if re.search(r"\.oft_(embedding_)?R\.weight$", key) and len(shape) == 2:
            found[round((1 + math.sqrt(1 + 8 * shape[1])) / 2)] += 1  # shape[1] = b(b-1)/2
    if found:
        text += "; in the file: " + ", ".join(f"b={b} x{n}" for b, n in sorted(found.items()))
    return text


OFT = Method(
    peft_type=PeftType.OFT,
    config_cls=OFTConfig,
    prefix="oft_",
    layer_cls=OFTLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT uses LoRA's table for OFT
    cli_names={"oft": {}},
    # OFT's r counts blocks, not a rank: a LoRA-style r from a recipe or `compare` must not reach it.
    hooks=Hooks(
        cli_shared_skip=("r",),
        inspect_size=inspect_size,
    ),
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
OFTModel = tuner_class(OFT)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["OFT", "OFTModel", "OFTConfig", "OFTLayer"]
