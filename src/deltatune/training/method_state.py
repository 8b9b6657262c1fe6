"""Training state a method keeps outside its parameters, saved in checkpoints for an exact resume.

The trainer knows no method: it calls :func:`method_state` when it writes a checkpoint and :func:`load_method_state`
when it reads one. Today the only such state is AdaLoRA's (its rank allocator's importance averages, and the rank
pattern it writes into the config), found by what it is; a registry hook (``Method.training_state``: get and set)
would let each method say what its state is, and these two functions would ask it instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def method_state(model: nn.Module) -> dict[str, Any]:
    """Training state a method keeps outside its parameters, for exact resume.

    AdaLoRA's rank allocator holds importance averages (``allocator`` on its layers) and writes the
    rank pattern into the adapter's config; both change every step. Other methods keep none.
    """
    state: dict[str, Any] = {"configs": {}, "allocators": {}}
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        if getattr(config, "rank_pattern", None) is not None:
            state["configs"][name] = {"rank_pattern": config.rank_pattern}
    for module in model.modules():
        for adapter, allocator in (getattr(module, "allocator", None) or {}).items():
            if allocator is not None and adapter not in state["allocators"]:
                # Public attributes only: private ones hold object ids of this process's layers.
                state["allocators"][adapter] = {k: v for k, v in vars(allocator).items()
                                                if k != "config" and not k.startswith("_")}
    return state


def load_method_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`method_state` took (a checkpoint's ``method_state``) into ``model``."""
    configs = getattr(model, "peft_config", None) or {}
    for name, values in state.get("configs", {}).items():
        if name in configs:
            for key, value in values.items():
                setattr(configs[name], key, value)
    done = set()
    for module in model.modules():
        for adapter, allocator in (getattr(module, "allocator", None) or {}).items():
            if allocator is not None and adapter in state.get("allocators", {}) and id(allocator) not in done:
                vars(allocator).update(state["allocators"][adapter])
                done.add(id(allocator))


__all__ = ["method_state", "load_method_state"]
