"""AdaMSS: the config, the layer, adaptive subspace allocation (ASA), and the registry entry.

With ``use_asa`` training drives the allocation: ``model.update_and_allocate(step)`` after every
``optimizer.step()`` (before ``zero_grad()``): the deltatune trainer does, and
:class:`deltatune.adamss.asa_callback.AdamssAsaCallback` does it for ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.adamss import asa
from deltatune.adamss.config import AdamssConfig
from deltatune.adamss.layer import AdamssLayer, make_adamss_layer, supported_types
from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError
from deltatune.registry import Hooks, Method

DEFAULT_ADAMSS_TARGETS = {**DEFAULT_LORA_TARGETS, "vit": ["query", "value"]}  # PEFT's table


def create_or_update(target: nn.Module, adapter_name: str, config: AdamssConfig,
                     module_name: str) -> AdamssLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is an AdaMSS layer already)."""
    layer = target if isinstance(target, AdamssLayer) else make_adamss_layer(target)
    if layer is None:
        return None
    layer.update_layer(adapter_name, config)
    return layer


def asa_layers(adapter_model: nn.Module, adapter_name: str) -> list[AdamssLayer]:
    """The layers holding ASA statistics for ``adapter_name``, in module order."""
    return [layer for _, layer in adapter_model.adapter_layers()
            if isinstance(layer, AdamssLayer) and adapter_name in layer.exp_avg_ipt_A]


def step_hook(adapter_model: nn.Module, global_step: int) -> None:
    """One ASA step for every active, trainable AdaMSS adapter with ``use_asa`` (PEFT's ``update_and_allocate``:
    ``global_step`` means what it means there; see :mod:`deltatune.adamss.asa`)."""
    if isinstance(global_step, torch.Tensor):
        global_step = int(global_step.item())
    if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
        raise ConfigError(f"update_and_allocate(global_step): global_step must be an integer >= 0, got "
                          f"{global_step!r}")
    for name, config in adapter_model.peft_config.items():
        if (config.peft_type == PeftType.ADAMSS and config.use_asa and not config.inference_mode
                and name in adapter_model.active_adapters):
            asa.allocate(asa_layers(adapter_model, name), name, config, global_step)


_STATS = ("exp_avg_ipt_A", "exp_avg_ipt_B", "exp_avg_unc_A", "exp_avg_unc_B", "asa_active")


def training_state(model: nn.Module) -> dict[str, Any]:
    """ASA's state for an exact resume: per adapter and layer, the EMAs and which subspaces still train
    (``{"adamss_asa": {adapter: {module: {stat: value}}}}``)."""
    state: dict[str, Any] = {}
    for module_name, layer in model.named_modules():
        if isinstance(layer, AdamssLayer):
            for adapter in layer.asa_active:
                state.setdefault(adapter, {})[module_name] = {s: list(getattr(layer, s)[adapter]) for s in _STATS}
    return {"adamss_asa": state} if state else {}


def restore_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`training_state` took, re-freezing the pruned subspaces."""
    saved = state.get("adamss_asa", {})
    for module_name, layer in model.named_modules():
        if not isinstance(layer, AdamssLayer):
            continue
        for adapter, layers in saved.items():
            if adapter in layer.asa_active and module_name in layers:
                for stat in _STATS:
                    getattr(layer, stat)[adapter] = list(layers[module_name][stat])
        layer._apply_asa_masks()


ADAMSS = Method(
    peft_type=PeftType.ADAMSS,
    config_cls=AdamssConfig,
    prefix="adamss_",
    layer_cls=AdamssLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_ADAMSS_TARGETS,
    cli_names={"adamss": {}},
    # measured (deltatune compare, bbc-news / SmolLM2-135M, 12 steps, 2026-12-07): accuracy 0.375 -> 0.30 at 1e-3,
    # 0.525 at 3e-3, 0.80 at 1e-2 (+0.02 nats forgetting): one rank-1 update per subspace moves little per step
    lr_scale=10.0,
    hooks=Hooks(
        extra_containers=("adamss_newB",),  # V, a saved buffer (PEFT's file key <module>.adamss_newB)
        step=step_hook,
        training_state=training_state,
        restore_training_state=restore_training_state,
    ),
)
AdamssModel = tuner_class(ADAMSS)  # PEFT's tuner class (isinstance of base_model)


def __getattr__(name: str):
    # transformers.TrainerCallback takes seconds to import: load the callback only when asked for.
    if name == "AdamssAsaCallback":
        from deltatune.adamss.asa_callback import AdamssAsaCallback

        return AdamssAsaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAMSS", "AdamssAsaCallback", "AdamssConfig", "AdamssLayer", "AdamssModel"]
