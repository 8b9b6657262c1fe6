"""``ShadowCache``: the base model's key/value cache and the shadow backbone's, as one transformers ``Cache``.

Incremental decoding advances two models: the base decoder (its cache holds keys/values computed on the injected
inputs) and the shadow backbone (its cache lets ``s⁽⁰⁾`` of a new token attend to the earlier ones). ``generate()``
threads one cache object from step to step, so the model returns both as one :class:`ShadowCache`; the runtime's
model hook splits it again before the next step (the base model only ever sees its own cache).

Every ``Cache`` method reads the base cache (``layers`` is the base's list, attributes the base lacks here are looked
up on it); what changes the batch or sequence layout (reset, reorder, crop, repeat, select) is done to both.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache


class ShadowCache(Cache):
    """The base model's cache (``base``) and the shadow backbone's (``shadow``: one cache, or, for a mixed-adapter
    batch, ``{adapter: cache of its rows}``)."""

    def __init__(self, base: Any = None, shadow: Any = None) -> None:
        # Cache.__init__ is not called: the storage stays in the two wrapped caches.
        self.__dict__["base"] = base
        self.__dict__["shadow"] = shadow

    @property
    def layers(self) -> list:
        return self.base.layers if self.base is not None else []

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def _shadows(self) -> list[Any]:
        if self.shadow is None:
            return []
        return list(self.shadow.values()) if isinstance(self.shadow, dict) else [self.shadow]

    def _both(self, method: str, *args: Any) -> None:
        for cache in [self.base, *self._shadows()]:
            if cache is not None:
                getattr(cache, method)(*args)

    def _layout_change(self, method: str, *args: Any) -> None:
        if isinstance(self.shadow, dict):  # each adapter's cache holds its own rows: batch indices mean nothing there
            raise NotImplementedError(f"{method} is not supported for a mixed-adapter ShadowPEFT batch (each "
                                      "adapter's shadow cache holds only its rows); decode greedily or by sampling")
        self._both(method, *args)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.base.get_seq_length(*args, **kwargs) if self.base is not None else 0

    @property
    def is_compileable(self) -> bool:
        return False  # two caches of different layouts

    @property
    def is_initialized(self) -> bool:
        return self.base is not None and bool(getattr(self.base, "is_initialized", True))

    def reset(self) -> None:
        self._both("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._layout_change("reorder_cache", beam_idx)

    def crop(self, max_length: int) -> None:
        self._layout_change("crop", max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._layout_change("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._layout_change("batch_select_indices", indices)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else 0

    def __repr__(self) -> str:
        return f"ShadowCache(base={self.base!r}, shadow={self.shadow!r})"


__all__ = ["ShadowCache"]
