"""``get_peft_model``: wrap a model with its first adapter, picking the class from ``task_type``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftType, PeftWarning
from deltatune.core.layer import AdapterLayer
from deltatune.core.targeting import modules_named_in
from deltatune.core.tuner import AdapterModel, tuner_class, validate_adapter_name
from deltatune.errors import ConfigError
from deltatune.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel, _model_name_or_path
from deltatune.registry import MethodTable, method_for

# PEFT's tables, as live views of the registry (deltatune.registry.METHODS): every registered method, no list here.
PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[PeftType, type[PeftConfig]] = MethodTable(lambda m: m.config_cls)
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[PeftType, type[nn.Module]] = MethodTable(
    lambda m: m.hooks.peft_table_cls or tuner_class(m),
    include=lambda m: m.layer_cls is not None or m.hooks.peft_table_cls is not None)
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: Mapping[PeftType, type[nn.Module]] = MethodTable(
    tuner_class, include=lambda m: m.mixed)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """PEFT's: the config ``config_dict`` describes (the class its ``peft_type`` names; see
    :meth:`PeftConfig.from_dict`)."""
    return PeftConfig.from_dict(config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Freeze ``model``, add the adapter ``peft_config`` describes, and return the ``PeftModel``.

    Raises:
        ConfigError: ``peft_config`` is not a config.
        TargetModuleError: the targets match nothing (with the closest module names) or an
            unsupported layer type.
    """
    _check_config(peft_config)
    # A model that already holds adapter layers (a PeftModel too, which PEFT then wraps once more): PEFT's warning
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn("You are trying to modify a model with PEFT for a second time: it already holds adapter layers "
                      "from an earlier get_peft_model. To start over with a different config, call .unload() on the "
                      "first PeftModel before.", PeftWarning, stacklevel=2)
    # The config records the model it was made on (PEFT's rule): the model's own name wins, with a warning when
    # the config named another one, since loading the adapter later would fetch that other base model.
    old_name, new_name = peft_config.base_model_name_or_path, _model_name_or_path(model)
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}'. "
                      "Please ensure that the correct base model is loaded when loading this checkpoint.",
                      PeftWarning, stacklevel=2)
    peft_config.base_model_name_or_path = new_name
    if revision is not None:
        peft_config.revision = revision
    if mixed:  # PEFT's: adapters of several methods on one model (LoRA, LoHa, LoKr, AdaLoRA, OFT)
        from deltatune.mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """PEFT's low-level API: put the adapter layers ``peft_config`` describes into ``model`` in place and return
    ``model`` itself (no ``PeftModel`` wrapper; the layers' keys then read ``<module>.lora_A.<adapter>.weight``).

    Everything but the new adapter is frozen, as with ``get_peft_model``. The model gets PEFT's ``peft_config``
    attribute, ``{adapter_name: peft_config}`` (a later injection adds its entry, with PEFT's warning).
    ``low_cpu_mem_usage=True`` (PEFT's): the new adapter's tensors are created empty, on the meta device; load its
    weights with ``set_peft_model_state_dict`` before using the model. ``state_dict``: when given, the layers to
    adapt are those its keys name (only the keys are read, not the values), for checkpoints whose config does not
    say which modules were targeted. Load weights afterwards with ``model.load_state_dict(..., strict=False)``.

    Raises:
        ConfigError: a prompt-learning config (virtual tokens need the ``PeftModel`` wrapper), or a method whose
            tensors are shared model-wide (VeRA: they live on the wrapper), as PEFT refuses both.
        TargetModuleError: the targets match nothing.
    """
    _check_config(peft_config)
    validate_adapter_name(adapter_name)
    if peft_config.is_prompt_learning:
        raise ConfigError(f"inject_adapter_in_model adds adapter layers; {peft_config.peft_type} adapters are virtual "
                          "tokens, which need the wrapper: use get_peft_model")
    method = method_for(peft_config.peft_type)
    if method.uses_shared_state:
        raise ConfigError(f"`inject_adapter_in_model` does not support PeftType.{peft_config.peft_type} because it "
                          "uses shared state stored on the tuner. Please use `get_peft_model` instead. (Its tensors "
                          "are shared by every layer and kept on the wrapper.)")
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):  # PEFT's words: a second injection adds to the model's configs
        warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                      "adapters in the model. Make sure to know what you are doing!", PeftWarning, stacklevel=2)
    else:
        configs = {}
    config = peft_config
    if state_dict is not None:
        config = copy.copy(peft_config)
        config.target_modules = modules_named_in(state_dict, method.containers)
    tuner = AdapterModel(model, config, adapter_name)  # replaces the targets inside ``model``; the wrapper is dropped
    if low_cpu_mem_usage:
        _make_empty(tuner, adapter_name)
    # As PEFT, the model keeps its adapters' configs (the user's config objects): save_and_load's functions and
    # get_model_status read them there.
    configs[adapter_name] = peft_config
    model.peft_config = configs
    return model


def _make_empty(tuner: nn.Module, adapter_name: str) -> None:
    """PEFT's ``low_cpu_mem_usage``: the new adapter's parameters go to the meta device (no memory, no values), to
    be filled by loading its weights (``set_peft_model_state_dict`` puts the file's tensors in their place)."""
    for _, layer in tuner.adapter_layers():
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(item.to("meta"), requires_grad=item.requires_grad)
                continue
            for module in item.modules():  # parameters only: buffers (index tables, ...) are not in the file
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


def _check_config(peft_config: object) -> None:
    """Refuse anything but a deltatune config, naming the fix for a PEFT config passed by mistake."""
    if not isinstance(peft_config, PeftConfig):
        cls = type(peft_config)
        library = cls.__module__.split(".")[0]
        if library != "deltatune" and cls.__name__.endswith("Config"):  # e.g. peft.LoraConfig, half migrated
            raise ConfigError(f"got {library}.{cls.__name__}; use deltatune.{cls.__name__} (same fields)")
        raise ConfigError(f"peft_config must be a deltatune config (e.g. LoraConfig), got {type(peft_config).__name__}")
