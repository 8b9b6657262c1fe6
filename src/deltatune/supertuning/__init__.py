"""Super-Tuning: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError
from deltatune.registry import Hooks, Method
from deltatune.supertuning.config import SupertuningConfig
from deltatune.supertuning.layer import SupertuningLayer, make_supertuning_layer, supported_types

SupertuningLinear = SupertuningLayer  # PEFT's Linear layer of this method (isinstance checks written for PEFT)


def create_or_update(target: nn.Module, adapter_name: str, config: SupertuningConfig,
                     module_name: str) -> SupertuningLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a Super-Tuning layer already).

    Raises:
        ConfigError: The layer's adapters save their positions and this one does not, or the other way round
            (PEFT's sentence first).
    """
    save = config.save_precomputed_indices
    if isinstance(target, SupertuningLayer):
        layer = target
        if layer.supertuning_indices.persistent != save and len(layer.supertuning_indices):
            raise ConfigError("Super-Tuning indices must be saved for all adapters or none, but got multiple different "
                              f"values: {sorted({save, layer.supertuning_indices.persistent})}")
    else:
        layer = make_supertuning_layer(target, save_precomputed_indices=save)
    if layer is None:
        return None
    layer.update_layer(adapter_name, sparsity=config.sparsity, select_top=config.select_top, r=config.r,
                       lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       init_weights=config.init_weights)
    return layer


SUPERTUNING = Method(
    peft_type=PeftType.SUPERTUNING,
    config_cls=SupertuningConfig,
    prefix="supertuning_",
    layer_cls=SupertuningLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's Super-Tuning table is LoRA's
    cli_names={"supertuning": {}},
    # The positions are per-adapter buffers saved beside the values (PEFT's file key <module>.supertuning_indices.
    # <adapter>), not trained: listed so files carry them (unless save_precomputed_indices=False).
    hooks=Hooks(extra_containers=("supertuning_indices",)),
)
SupertuningModel = tuner_class(SUPERTUNING)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["SUPERTUNING", "SupertuningModel", "SupertuningConfig", "SupertuningLayer", "SupertuningLinear"]
