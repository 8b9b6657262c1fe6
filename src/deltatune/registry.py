"""The table of methods: adding a method means adding one :class:`Method` entry here (from its module).

The rest of the library (``get_peft_model``, loading files, the CLI, ``compare``) looks methods up here
and knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
