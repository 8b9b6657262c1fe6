"""Whole modules trained in full beside the adapters (``modules_to_save``, e.g. a classifier head).

The wrapper keeps the original module frozen and one trainable copy per adapter, so switching or
disabling adapters switches the head too. Files store the copy under the original module's key.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

# the wrapper's own state: never delegated, so a half-built wrapper (deepcopy, unpickling) cannot recurse
_OWN = frozenset({"original_module", "modules_to_save", "active_adapter", "disable_adapters"})


class ModulesToSaveTypeError(DeltatuneError, TypeError):
    """``modules_to_save`` named a module it cannot train as a whole (a container, or an adapter layer)."""


def _check_module(module: nn.Module) -> None:
    """Refuse what a trained copy cannot stand in for, as PEFT does (``TypeError``): containers have no ``forward``
    to run (``ModuleDict``/``ModuleList``/``ParameterDict``/``ParameterList``), and an adapter layer's copy would
    train the frozen base weight beside the adapter."""
    from deltatune.core.layer import AdapterLayer

    containers = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
    if isinstance(module, (*containers, AdapterLayer)):
        raise ModulesToSaveTypeError(
            f"modules_to_save cannot be applied to modules of type {type(module)}: name the modules inside it "
            "(e.g. 'layers.0'), or leave an adapted layer to its adapter")


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` (frozen) and ``modules_to_save[adapter]`` copies; forward uses the active copy.

    Attributes the wrapper lacks (``bias``, ``in_features``, ...) are read from the module forward would run (the
    active copy, or the original when adapters are disabled), as PEFT's wrapper does, so code that inspects a
    ``Linear`` head keeps working after the head is wrapped.
    """

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        _check_module(module)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.original_module.requires_grad_(False)
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def check_set_adapter(self, adapter_names: str | list[str]) -> str | None:
        """The copy ``set_adapter(adapter_names)`` would run (``None``: the original), or a ``ValueError`` (PEFT's
        text) when two of the names have a copy here: copies replace the module, they do not add up, so two
        adapters cannot be active on one module at once."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        here = [n for n in names if n in self.modules_to_save]
        if len(here) > 1:
            raise ConfigError(
                f"Only one adapter can be set at a time for {type(self).__name__}, got {len(here)} ({here}): their "
                "modules_to_save copies of the same module cannot run together; activate one of them, or give the "
                "adapters different modules_to_save")
        return here[0] if here else None

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_set_adapter(names)  # before anything changes
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
