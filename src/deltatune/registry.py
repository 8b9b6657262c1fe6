"""The table of methods: adding a method means adding one :class:`Method` entry here (from its module).

The rest of the library (``get_peft_model``, loading files, the CLI, ``compare``) looks methods up here
and knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.config import PeftConfig, PeftType
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """How one weight-adapter method plugs into the shared machinery.

    Attributes:
        peft_type: The name in ``adapter_config.json``.
        config_cls: Its config dataclass.
        prefix: Substring of every trainable adapter parameter name (``"lora_"``).
        layer_cls: Base class of its wrapper layers (to find them in a model).
        create_or_update: ``(target, adapter_name, config, module_name) -> wrapper``: wrap ``target`` (or
            add an adapter to an existing wrapper of this method). Returns ``None`` if the type is unsupported.
        supported_types: Layer types the method can adapt (for error messages and target checks).
        default_targets: ``model_type -> target_modules`` used when the config gives none.
        file_suffixes: ``{internal suffix: file suffix}`` for keys PEFT renames in files.
        cli_names: Names the CLI accepts for ``--method``, with fixed config overrides.
        prepare_config: ``(model, config) -> None``: fill config defaults that depend on the model (run
            before targeting), e.g. IA3's ``feedforward_modules`` per architecture.
        shared_containers: Attribute names of per-adapter containers held once per model (on the
            ``AdapterModel``, so their keys read ``base_model.<name>.<adapter>``), e.g. VeRA's frozen shared
            projections. Saved and loaded like layer tensors; deleted with the adapter.
        init_shared: ``(adapter_model, adapter_name, config, target_names) -> kwargs``: create the adapter's
            entries in ``shared_containers`` before any layer is wrapped; the returned keyword arguments are
            passed on to every ``create_or_update`` call of that injection.
    """

    peft_type: PeftType
    config_cls: type[PeftConfig]
    prefix: str
    layer_cls: type[nn.Module]
    create_or_update: Callable[..., nn.Module | None]
    supported_types: Callable[[], tuple[type, ...]]
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    file_suffixes: dict[str, str] = field(default_factory=dict)
    cli_names: dict[str, dict] = field(default_factory=dict)
    prepare_config: Callable[[nn.Module, PeftConfig], None] | None = None
    shared_containers: tuple[str, ...] = ()
    init_shared: Callable[..., dict[str, Any]] | None = None

    @property
    def containers(self) -> tuple[str, ...]:
        """Every attribute name whose per-adapter entries are saved (layer tensors, then model-wide ones)."""
        return tuple(self.layer_cls.adapter_layer_names) + self.shared_containers


METHODS: dict[PeftType, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.peft_type] = method
    return method


def method_for(peft_type: PeftType | str | None) -> Method:
    try:
        key = PeftType(str(peft_type).upper())
    except ValueError:
        key = None
    if key not in METHODS:
        known = ", ".join(sorted(m.value for m in METHODS))
        raise ConfigError(f"peft_type={peft_type!r} is not a method deltatune implements; known: {known}")
    return METHODS[key]


def config_class_for(peft_type: PeftType | str | None) -> type[PeftConfig]:
    return method_for(peft_type).config_cls
