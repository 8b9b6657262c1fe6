"""RoAd (2D rotary adaptation): the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.registry import Method
from deltatune.road.config import RoadConfig
from deltatune.road.layer import RoadLayer, make_road_layer, supported_types


def create_or_update(target: nn.Module, adapter_name: str, config: RoadConfig, module_name: str) -> RoadLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a RoAd layer already)."""
    layer = target if isinstance(target, RoadLayer) else make_road_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, variant=config.variant, group_size=config.group_size,
                       init_weights=config.init_weights)
    return layer


ROAD = Method(
    peft_type=PeftType.ROAD,
    config_cls=RoadConfig,
    prefix="road_",
    layer_cls=RoadLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's RoAd table is LoRA's
    cli_names={"road": {}},
    lr_scale=3.0,  # as (IA)³: one or two vectors per output feature train, a step of 1e-3 moves them little
    # mixed=False: PEFT 0.21.2's PeftMixedModel refuses RoAd ("not compatible"), though its registry marks it so
)
RoadModel = tuner_class(ROAD)  # PEFT's tuner class (isinstance of base_model)
Linear = RoadLayer  # PEFT's name of its layer over nn.Linear (peft.tuners.road.Linear)

__all__ = ["ROAD", "Linear", "RoadConfig", "RoadLayer", "RoadModel"]
