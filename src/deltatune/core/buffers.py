"""``BufferDict``: tensors that are not trained, keyed by adapter (or role) name, held as a module's buffers.

As buffers they follow ``.to(device)`` and appear in ``state_dict`` under ``<container>.<key>`` (PEFT's file keys
for VeRA's projections, SHiRA's indices, DeLoRA's weight norms, ...), but are never returned by ``parameters()``,
so nothing trains them. Integer tensors keep their dtype under ``.to(dtype)``, as torch casts floating buffers only.
Whether a key is saved is chosen per key (``add(..., persistent=False)``: rebuilt on load instead) or once for the
container (``BufferDict(persistent=False)``).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView

import torch
from torch import nn


class BufferDict(nn.Module):
    """A mapping ``key -> tensor`` whose values are this module's buffers (``persistent``: saved by default)."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.add(key, value, persistent=self.persistent)

    def add(self, key: str, value: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(key, value, persistent=persistent)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> KeysView[str]:
        return self._buffers.keys()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._buffers.items()
