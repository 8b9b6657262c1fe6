"""``SharedParameterView``: one layer's window onto trained tensors that the model registers once.

Methods whose trained tensors are shared by many layers (Uni-LoRA's one vector ``θ``, TinyLoRA's vector per
weight-tying group) keep them in one model-level container, so ``state_dict``, ``named_parameters`` and the
optimiser see each tensor once. Each layer still needs ``layer.<name>[adapter]`` to reach its tensor, as every
other layer does; this view answers that by looking the tensor up in the model's container on every access, so a
tensor replaced there (a dtype cast, a load onto the meta device, ``load_state_dict(assign=True)``) is what every
layer sees at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


class SharedParameterView(nn.ModuleDict):
    """``adapter -> container[adapter]`` (or ``container[adapter][key]`` with a per-adapter key), unregistered.

    A ``ModuleDict`` only so generic code that walks adapter containers (status, trainability, deletion) treats it
    as one; it has no submodules, parameters or buffers of its own. ``parameters()`` yields the viewed tensors, so
    the layer's own accounting (e.g. which adapters train) sees them.

    Args:
        container: The model's container, ``adapter -> Parameter`` or ``adapter -> (key -> Parameter)``.
    """

    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        self.__dict__["container"] = container  # the model's (not a submodule here: registered there once)
        self.keys_of: dict[str, str | None] = {}

    def bind(self, adapter_name: str, key: str | None = None) -> None:
        """Let ``adapter_name`` see ``container[adapter_name]``, or ``container[adapter_name][key]``."""
        self.keys_of[adapter_name] = key

    def __getitem__(self, adapter_name: str) -> nn.Parameter:
        key = self.keys_of[adapter_name]  # KeyError for an adapter this layer does not have
        tensors = self.container[adapter_name]
        return tensors if key is None else tensors[key]

    def __setitem__(self, adapter_name: str, value: nn.Parameter) -> None:
        key = self.keys_of.get(adapter_name)
        if key is None:
            self.container[adapter_name] = value
        else:
            self.container[adapter_name][key] = value

    def __delitem__(self, adapter_name: str) -> None:
        del self.keys_of[adapter_name]  # the model deletes the tensor itself (its shared container)

    def __contains__(self, adapter_name: object) -> bool:
        return adapter_name in self.keys_of

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.keys_of))

    def __len__(self) -> int:
        return len(self.keys_of)

    def keys(self):
        return list(self.keys_of)

    def items(self):
        return [(name, self[name]) for name in self.keys_of]

    def values(self):
        return [self[name] for name in self.keys_of]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        yield from self.values()

    def extra_repr(self) -> str:
        return ", ".join(name if key is None else f"{name}: {key}" for name, key in self.keys_of.items())
