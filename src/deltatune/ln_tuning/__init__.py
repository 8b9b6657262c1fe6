"""LN tuning: the config, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.tuner import tuner_class
from deltatune.ln_tuning.config import DEFAULT_LN_TUNING_TARGETS, LNTuningConfig
from deltatune.ln_tuning.layer import LNTuningLayer, supported_types
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: LNTuningConfig,
                     module_name: str) -> LNTuningLayer:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an LN tuning layer already)."""
    layer = target if isinstance(target, LNTuningLayer) else LNTuningLayer(target)
    layer.update_layer(adapter_name)
    return layer


def prepare_config(model: nn.Module, config: LNTuningConfig) -> None:
    """No ``target_modules`` and no entry for this architecture in the default table: every normalisation
    layer with weights, named by its last name component (``LayerNorm`` in BERT)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is not None or model_type in DEFAULT_LN_TUNING_TARGETS:
        return
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and _is_norm(module) and any(True for _ in module.parameters(recurse=False))}
    if names:
        config.target_modules = sorted(names)


def _is_norm(module: nn.Module) -> bool:
    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or kind.endswith(("LayerNorm", "RMSNorm"))


LN_TUNING = Method(
    peft_type=PeftType.LN_TUNING,
    config_cls=LNTuningConfig,
    prefix="ln_tuning_",
    layer_cls=LNTuningLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LN_TUNING_TARGETS,
    cli_names={"ln_tuning": {}},
    lr_scale=1.0,
    hooks=Hooks(
        prepare_config=prepare_config,
        cli_shared_skip=("target_modules",),  # the recipes' "all-linear" would copy linear layers, not norms
    ),
)
LNTuningModel = tuner_class(LN_TUNING)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["LN_TUNING", "LNTuningModel", "LNTuningConfig", "LNTuningLayer"]
