"""Poly (Polytropon) and MHR: the config, the router, the layer, and the registry entry."""

from __future__ import annotations

from torch import nn

from deltatune.config import PeftType
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.poly.config import PolyConfig
from deltatune.poly.layer import PolyLayer, supported_types
from deltatune.poly.router import PolyRouter
from deltatune.registry import Hooks, Method


def create_or_update(target: nn.Module, adapter_name: str, config: PolyConfig, module_name: str) -> PolyLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a Poly layer already)."""
    if isinstance(target, PolyLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = PolyLayer(target)
    else:
        return None
    layer.update_layer(adapter_name, r=config.r, n_tasks=config.n_tasks, n_skills=config.n_skills,
                       n_splits=config.n_splits, poly_type=config.poly_type, init_weights=config.init_weights)
    return layer


def inspect_size(config: dict, shapes: dict[str, list[int]]) -> str:
    """``deltatune inspect``'s size line: the skill inventory per layer and the tasks routed over it."""
    return (f"r={config.get('r')}, n_skills={config.get('n_skills')}, n_splits={config.get('n_splits')} per layer; "
            f"n_tasks={config.get('n_tasks')} (calls need task_ids)")


POLY = Method(
    peft_type=PeftType.POLY,
    config_cls=PolyConfig,
    prefix="poly_",
    layer_cls=PolyLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's Poly table is a copy of LoRA's
    cli_names={"poly": {}},
    # measured (deltatune compare, bbc-news / SmolLM2-135M, 12 steps, 2026-12-07): accuracy 0.375 -> 0.275 at 1e-3,
    # 0.625 at 3e-3, 0.775 at 1e-2 (+0.05 nats forgetting): the skills start mixed in equal parts, so each one's
    # step moves the output by about 1/n_skills of a LoRA's
    lr_scale=10.0,
    mergeable=False,  # the skills' mixture depends on each row's task: no fixed ΔW (PEFT cannot merge it either)
    hooks=Hooks(task_count=lambda config: config.n_tasks, inspect_size=inspect_size),  # every call needs task_ids
)
PolyModel = tuner_class(POLY)  # PEFT's tuner class (isinstance of base_model)
Linear = PolyLayer  # PEFT's layer class name (peft.tuners.poly.Linear)

__all__ = ["POLY", "Linear", "PolyConfig", "PolyLayer", "PolyModel", "PolyRouter"]
