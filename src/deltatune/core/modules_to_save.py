"""Whole modules trained in full beside the adapters (``modules_to_save``, e.g. a classifier head).

The wrapper keeps the original module frozen and one trainable copy per adapter, so switching or
disabling adapters switches the head too. Files store the copy under the original module's key.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# the wrapper's own state: never delegated, so a half-built wrapper (deepcopy, unpickling) cannot recurse
_OWN = frozenset({"original_module", "modules_to_save", "active_adapter", "disable_adapters"})


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` (frozen) and ``modules_to_save[adapter]`` copies; forward uses the active copy.

    Attributes the wrapper lacks (``bias``, ``in_features``, ...) are read from the module forward would run (the
    active copy, or the original when adapters are disabled), as PEFT's wrapper does, so code that inspects a
    ``Linear`` head keeps working after the head is wrapped.
    """

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.original_module.requires_grad_(False)
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        active = [n for n in names if n in self.modules_to_save]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in active)
        self.active_adapter = active[0] if active else None

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.modules_to_save.keys()), None)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of ``active_adapter`` (the wrapper runs one copy at a time)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def get_base_layer(self) -> nn.Module:
        return self.original_module

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def _current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            if "_modules" not in self.__dict__ or name in _OWN:
                raise
        return getattr(self._current(), name)

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)
