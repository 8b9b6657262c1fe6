"""Bottleneck adapters (Houlsby / Pfeiffer, sequential or parallel): the config, the layer, the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.bottleneck.config import DEFAULT_BOTTLENECK_TARGETS, BottleneckConfig
from deltatune.bottleneck.layer import BottleneckLayer
from deltatune.config import PeftType
from deltatune.errors import TargetModuleError
from deltatune.registry import Method, register


def prepare_config(model: nn.Module, config: BottleneckConfig) -> None:
    """``target_modules=None``: the architecture's attention output / feed-forward block per ``locations``."""
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_BOTTLENECK_TARGETS:
        raise TargetModuleError(
            f"no default bottleneck placement for model_type={model_type!r}; pass target_modules=[...] (the "
            f"attention output projection and/or the feed-forward block). Defaults exist for: "
            f"{', '.join(sorted(DEFAULT_BOTTLENECK_TARGETS))}")
    table = DEFAULT_BOTTLENECK_TARGETS[model_type]
    config.target_modules = "|".join(f"(?:{table[loc]})" for loc in config.locations)


def init_shared(adapter_model: nn.Module, adapter_name: str, config: BottleneckConfig, targets) -> dict:
    """Pass the model's hidden size to every layer (the width of a block such as Llama's ``mlp``)."""
    model_config = getattr(adapter_model.model, "config", None)
    size = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    return {"hidden_size": size}


def create_or_update(target: nn.Module, adapter_name: str, config: BottleneckConfig, module_name: str,
                     hidden_size: int | None = None) -> BottleneckLayer:
    """Add adapter ``adapter_name`` around ``target`` (wrapping it first unless it is a bottleneck layer)."""
    layer = target if isinstance(target, BottleneckLayer) else BottleneckLayer(target, hidden_size)
    layer.update_layer(adapter_name, config.reduction_factor, config.non_linearity, config.parallel,
                       config.scaling, config.init_weights)
    return layer


BOTTLENECK = register(Method(
    peft_type=PeftType.BOTTLENECK,
    config_cls=BottleneckConfig,
    prefix="bottleneck_",
    layer_cls=BottleneckLayer,
    create_or_update=create_or_update,
    supported_types=lambda: (nn.Module,),
    cli_names={"bottleneck": {}, "houlsby": {"locations": ["attn", "ffn"]},
               "parallel_adapter": {"parallel": True, "scaling": 4.0}},
    prepare_config=prepare_config,
    init_shared=init_shared,
    mergeable=False,
    cli_shared_skip=("target_modules",),  # the recipes' "all-linear" would override --locations
))

__all__ = ["BOTTLENECK", "BottleneckConfig", "BottleneckLayer"]
