"""SHiRA: the config, the masks, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.registry import Hooks, Method
from deltatune.shira.config import ShiraConfig
from deltatune.shira.layer import ShiraLayer, make_shira_layer, supported_types
from deltatune.shira.mask_functions import indices_from_mask, random_indices, random_mask


def _indices(layer: ShiraLayer, config: ShiraConfig):
    """The positions of a new adapter on ``layer``: drawn directly for the random mask (no ``(out, in)`` mask is
    built; the same positions as ``random_mask``), from ``config.mask_fn``'s mask otherwise, ``None`` without
    a mask function (a loaded adapter: the file holds them)."""
    if config.mask_fn is random_mask:
        return random_indices(layer.out_features, layer.in_features, config.r, config.random_seed)
    if config.mask_fn is None:
        return None
    # PEFT passes the seed only for mask_type="random"; a custom function gets the layer and r
    kwargs = {"random_seed": config.random_seed} if config.mask_type == "random" else {}
    return indices_from_mask(config.mask_fn(layer.base_layer, config.r, **kwargs))


def create_or_update(target: nn.Module, adapter_name: str, config: ShiraConfig, module_name: str) -> ShiraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a SHiRA layer already)."""
    layer = target if isinstance(target, ShiraLayer) else make_shira_layer(target)
    if layer is None:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(adapter_name, r=config.r, indices=_indices(layer, config), init_weights=config.init_weights)
    return layer


SHIRA = Method(
    peft_type=PeftType.SHIRA,
    config_cls=ShiraConfig,
    prefix="shira_",
    layer_cls=ShiraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's SHiRA table is LoRA's (phi: q_proj, v_proj, as ours)
    cli_names={"shira": {}},
    # The positions are per-adapter buffers saved beside the values (PEFT's file key <module>.shira_indices), not
    # trained: listed here so files carry them, and not among the layer's trainable containers.
    hooks=Hooks(extra_containers=("shira_indices",)),
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
ShiraModel = tuner_class(SHIRA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["SHIRA", "ShiraConfig", "ShiraLayer", "ShiraModel", "random_mask"]
