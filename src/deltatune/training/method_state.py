"""Training state a method keeps outside its parameters, saved in checkpoints for an exact resume.

The trainer knows no method: it calls :func:`method_state` when it writes a checkpoint and :func:`load_method_state`
when it reads one, and both ask the registry's ``training_state`` / ``restore_training_state`` hooks of the methods
the model's adapters use (today only AdaLoRA has them: its rank allocator's importance averages and the rank
pattern it writes into the config).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.registry import Method, method_for


def _methods(model: nn.Module) -> list[Method]:
    """The distinct methods of ``model``'s adapters, in adapter order."""
    configs = getattr(model, "peft_config", None) or {}
    return list({m.peft_type: m for m in (method_for(c.peft_type) for c in configs.values())}.values())


def method_state(model: nn.Module) -> dict[str, Any]:
    """Each method's ``training_state`` of ``model``, merged into one dict (``{section: {adapter: state}}``)."""
    state: dict[str, Any] = {}
    for method in _methods(model):
        if method.hooks.training_state is not None:
            for section, values in method.hooks.training_state(model).items():
                state.setdefault(section, {}).update(values)
    return state


def load_method_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`method_state` took (a checkpoint's ``method_state``) into ``model``."""
    for method in _methods(model):
        if method.hooks.restore_training_state is not None:
            method.hooks.restore_training_state(model, state)


__all__ = ["method_state", "load_method_state"]
