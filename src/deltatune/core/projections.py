"""Frozen random tensors shared by every layer of one method's adapters (VeRA's projections, RandLoRA's bases).

They are drawn once per model from the config's ``projection_prng_key``, sized for all the adapter's targets, and
kept on the adapter model in one :class:`ProjectionDict` per name (model key ``base_model.<name>.<adapter>``,
PEFT's file key ``base_model.<name>``); every layer holds an unregistered reference, so they exist once in memory
and once in the state dict. ``config.save_projection`` decides whether files hold them (else loading redraws them
from the seed). A further adapter of the same method on the model shares the first one's tensors, the very
objects, which is PEFT's rule too: hence one seed and one ``save_projection`` for all of them
(:func:`check_shared_settings`); the method checks that its layers fit the shared sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.core.buffers import BufferDict
from deltatune.errors import ConfigError


class ProjectionDict(BufferDict):
    """Frozen tensors keyed by adapter name (a :class:`BufferDict`; saved only when ``persistent``)."""


def kaiming_uniform_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(-bound, bound)`` with ``bound = sqrt(3) · sqrt(2) / sqrt(fan_in)`` (He init for ReLU), ``fan_in =
    shape[1]``, drawn from ``generator`` so the same seed gives the same projection (as PEFT draws it)."""
    std = math.sqrt(2.0) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class SharedNames:
    """How a method's messages name things.

    Attributes:
        peft_seed: PEFT's word opening its seed-mismatch message (``"Vera"``, ``"RandLora"``).
        peft_save: PEFT's word opening its ``save_projection``-mismatch message (``"VeRA"``, ``"RandLora"``).
        method: The method's name in deltatune's hints (``"VeRA"``, ``"RandLoRA"``).
        tensors: What the shared tensors are called (``"projections"``, ``"random bases"``).
        values_as_set: PEFT's ``save_projection`` message prints the values as a set (PVeRA's), not a sorted list.
    """

    peft_seed: str
    peft_save: str
    method: str
    tensors: str
    values_as_set: bool = False


def first_sharer(adapter_model: nn.Module, adapter_name: str, config: PeftConfig) -> tuple[str, PeftConfig] | None:
    """The first other adapter of ``config``'s method on ``adapter_model`` (whose tensors a new one shares), with
    its config; ``None`` for the first adapter."""
    others = ((n, c) for n, c in adapter_model.peft_config.items()
              if n != adapter_name and c.peft_type == config.peft_type)
    return next(others, None)


def check_shared_settings(adapter_model: nn.Module, adapter_name: str, config: PeftConfig,
                          names: SharedNames) -> None:
    """PEFT's two rules for a further adapter sharing the tensors: the same ``projection_prng_key`` and the same
    ``save_projection`` as the first (checked in that order, as PEFT does; its sentence first in each message).

    Raises:
        ConfigError: either differs.
    """
    found = first_sharer(adapter_model, adapter_name, config)
    if found is None:
        return
    first, first_config = found
    key, first_key = config.projection_prng_key, first_config.projection_prng_key
    if key != first_key:
        raise ConfigError(
            f"{names.peft_seed} PRNG initialisation key must be the same for all adapters. Got "
            f"config.projection_prng_key={key} but previous config had {first_key}. "
            f"{names.method} adapter {adapter_name!r} has projection_prng_key={key} but adapter {first!r} has "
            f"{first_key}; all {names.method} adapters of a model share one pair of {names.tensors}: use "
            f"projection_prng_key={first_key}"
        )
    if first_config.save_projection != config.save_projection:
        both = {config.save_projection, first_config.save_projection}
        values = both if names.values_as_set else sorted(both)
        raise ConfigError(
            f"{names.peft_save} projection weights must be saved for all adapters or none, but got multiple different "
            f"values: {values}. {names.method} adapter {adapter_name!r} has save_projection={config.save_projection} "
            f"but adapter {first!r} has {first_config.save_projection}; the shared {names.tensors} are saved for all "
            "adapters or none"
        )


def shared_tensors(adapter_model: nn.Module, adapter_name: str, container_names: tuple[str, ...]
                   ) -> tuple[torch.Tensor, ...] | None:
    """The tensors another adapter already holds in ``container_names`` (one per name), else ``None``."""
    existing = adapter_model._modules.get(container_names[0])
    first = next((n for n in existing if n != adapter_name), None) if existing is not None else None
    if first is None:
        return None
    return tuple(adapter_model._modules[c][first] for c in container_names)


def share(adapter_model: nn.Module, adapter_name: str, config: PeftConfig, container_names: tuple[str, ...],
          draw: Callable[[], tuple[torch.Tensor, ...]]) -> dict[str, ProjectionDict]:
    """Give ``adapter_name`` its entries in the model's containers ``container_names`` (created on first use):
    another adapter's tensors where there is one (the same objects, as PEFT), else ``draw()``'s, moved to the
    model's device. Saved in files only with ``config.save_projection``. Returns ``{name: container}`` for the
    layers."""
    tensors = shared_tensors(adapter_model, adapter_name, container_names)
    if tensors is None:
        param = next(adapter_model.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        tensors = tuple(t.to(device) for t in draw())
    out: dict[str, ProjectionDict] = {}
    for attr, tensor in zip(container_names, tensors, strict=True):
        container = adapter_model._modules.get(attr)
        if container is None:
            container = ProjectionDict()
            setattr(adapter_model, attr, container)
        container.add(adapter_name, tensor, persistent=config.save_projection)
        out[attr] = container
    return out
