"""Whole modules trained in full beside the adapters (``modules_to_save``, e.g. a classifier head).

The wrapper keeps the original module frozen and one trainable copy per adapter, so switching or
disabling adapters switches the head too. Files store the copy under the original module's key.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError, MixedBatchTypeError

# the wrapper's own state: never delegated, so a half-built wrapper (deepcopy, unpickling) cannot recurse
_OWN = frozenset({"original_module", "modules_to_save", "active_adapter", "disable_adapters", "row_adapters"})

# What a mixed-adapter batch can split by rows: modules whose input and output both lead with the batch axis (PEFT's
# list; a GRU returns a tuple, attention mixes rows through its masks).
_ROW_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    other_param_names: tuple[str, ...] = ()  # PEFT's: no per-adapter settings beside the copies
    owns_children = True  # the original and its copies are never targets (core.targeting reads this)

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        _check_module(module)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.row_adapters: list[str] | None = None  # set by PeftModel for mixed-adapter batches
        self.original_module.requires_grad_(False)
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Give ``adapter_name`` its own trainable copy of the original module (kept if it has one already)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def check_module(self) -> None:
        """PEFT's check: raise ``TypeError`` if the wrapped module is a container or an adapter layer."""
        _check_module(self.original_module)

    @property
    def merged_adapters(self) -> list[str]:
        """Always empty: a copy replaces the module, there is nothing to merge (PEFT's attribute)."""
        return []

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

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True,
                    inference_mode: bool | None = None) -> None:
        """Run the copy of the one name in ``adapter_names`` that has a copy here (none: the original); it trains
        unless ``trainable=False`` (or PEFT's ``inference_mode=True``), every other copy is frozen."""
        if inference_mode is not None:
            trainable = not inference_mode
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_set_adapter(names)  # before anything changes
        active = [n for n in names if n in self.modules_to_save]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in active)
        self.active_adapter = active[0] if active else None
        self._trainable = trainable

    def enable_adapters(self, enabled: bool) -> None:
        """As PEFT's wrapper: off freezes every copy, on makes the active copy trainable again (unless the last
        ``set_adapter`` froze it: an adapter in inference mode stays frozen)."""
        self.disable_adapters = not enabled
        trainable = enabled and self.__dict__.get("_trainable", True)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        """Drop ``adapter_name``'s copy. If it was the active one, the next copy becomes active, or, when the caller
        chooses (PEFT's ``new_active_adapters``), that adapter's copy (none: the original runs)."""
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        if new_active_adapters is not None:
            chosen = self.check_set_adapter(list(new_active_adapters)) if new_active_adapters else None
            self.set_adapter([chosen] if chosen else [])
        elif self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.modules_to_save.keys()), None)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on (or off) for the copies of ``adapter_names``, leaving the others as they are."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, module in self.modules_to_save.items():
            if name in names:
                module.requires_grad_(requires_grad)

    def unload_and_optionally_merge_module(self, merge: bool = False, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """What unloading leaves in the wrapper's place (PEFT's hook): the active copy, or the original module
        when no copy is active. ``merge``/``safe_merge``/``adapter_names`` have nothing to act on here (a copy
        replaces the module whole), they are PEFT's signature."""
        return self.original_module if self.active_adapter is None else self.modules_to_save[self.active_adapter]

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """``{key in a file: key in this wrapper's state_dict}`` for ``adapter_name``'s copy ({} without one)."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``adapter_name``'s tensors out of this wrapper's ``state_dict``, under the file's keys (the module's own)."""
        return {key: state_dict[ours] for key, ours in self.adapter_state_dict_load_map(adapter_name).items()}

    def _get_available_adapters(self) -> set[str]:
        """The adapters with a copy here (PEFT's name)."""
        return set(self.modules_to_save.keys())

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
        if self.row_adapters is not None and not self.disable_adapters:
            return self._forward_rows(*args, **kwargs)
        return self._current()(*args, **kwargs)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Mixed-adapter batch: row ``i`` of ``x: (batch, ...)`` runs the copy of its adapter ``row_adapters[i]``
        (the original module for ``"__base__"`` or an adapter without a copy here), exactly what that adapter run
        alone gives the row; one call per distinct name, the rows put back in order.

        Raises:
            MixedBatchTypeError: the wrapped module is not one whose rows can be split (PEFT's list, its ``TypeError``).
        """
        from deltatune.core.layer import AdapterLayer

        if not isinstance(self.original_module, _ROW_MODULES):
            supported = ", ".join(t.__name__ for t in _ROW_MODULES)
            raise MixedBatchTypeError(
                f"Mixed batching is only supported for the following modules: {supported}. This modules_to_save "
                f"module is a {type(self.original_module).__name__}: run one adapter per batch (set_adapter), or "
                "leave it out of modules_to_save")
        names = AdapterLayer._row_names(self, x.shape[0])  # the adapter layers' rule (generate() repeats rows)
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module  # noqa: SIM401 (ModuleDict has no .get)
            y = module(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out
