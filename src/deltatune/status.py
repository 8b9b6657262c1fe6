"""``get_layer_status`` / ``get_model_status``: what every adapter layer of a model holds, PEFT's dataclasses.

The fields and their rules are PEFT's (``peft.peft_model.TunerLayerStatus``/``TunerModelStatus``): a value
that differs between layers where it should agree is ``"irregular"``, the sign of a model left in an
inconsistent state (e.g. one layer disabled by hand). Layer names are those of ``peft_model.base_model``'s
``named_modules()``, as in PEFT, so the same model gives the same names in both libraries.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import ConfigError, DeltatuneError

Irregular = Literal["irregular"]


class NoAdapterLayersError(DeltatuneError, TypeError):
    """The ``PeftModel``'s adapter is a prompt-learning one (virtual tokens), which has no layers to describe
    (PEFT raises ``TypeError`` here too)."""


@dataclass
class TunerLayerStatus:
    """One adapter layer (or ``modules_to_save`` wrapper): its name, type and per-adapter state."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model: the layers' states folded into one value each (``"irregular"`` where they disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _fold(values: list) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _per_adapter_params(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    if isinstance(module, ModulesToSaveWrapper):
        return {name: list(m.parameters()) for name, m in module.modules_to_save.items()}
    out: dict[str, list[nn.Parameter]] = collections.defaultdict(list)
    for attr in module.adapter_layer_names:
        for key, item in getattr(module, attr).items():
            out[key] += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    return out


def _quantization_backend(module: nn.Module) -> str | None:
    if not getattr(module, "quantized", False):
        return None
    name = type(module.base_layer).__name__
    return "bnb 4bit" if "4bit" in name else "bnb 8bit" if "8bit" in name else name  # PEFT's backend names


def _tuner_root(model: nn.Module, caller: str = "get_layer_status") -> nn.Module:
    """What to walk: ``PeftModel.base_model`` (so names match PEFT's) or a model adapted in place."""
    from deltatune.peft_model import PeftModel

    if isinstance(model, PeftModel):
        if model._is_prompt_learning:
            raise NoAdapterLayersError(
                f"{caller}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not supported. "
                "(It describes adapter layers; prompt-learning adapters (prompt/prefix tuning, p-tuning) have none: "
                "read model.peft_config instead.)")
        return model.base_model
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer of ``model`` (a ``PeftModel`` or a model adapted in place
    by :func:`deltatune.inject_adapter_in_model`).

    Raises:
        ConfigError: the model holds no adapter layers (a ``ValueError``, as PEFT's).
        NoAdapterLayersError: its adapters are prompt-learning ones (a ``TypeError``, as PEFT's).
    """
    statuses: list[TunerLayerStatus] = []
    for name, module in _tuner_root(model).named_modules():
        if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        params = _per_adapter_params(module)
        if isinstance(module, ModulesToSaveWrapper):
            active = [module.active_adapter] if module.active_adapter is not None else []
            merged: list[str] = []
            available = sorted(module.modules_to_save.keys())
            devices_of = params
        else:
            active, merged, available = list(module.active_adapters), list(module.merged_adapters), []
            devices_of: dict[str, list] = collections.defaultdict(list)
            for attr in module.adapter_layer_names + module.other_param_names:
                container = getattr(module, attr)
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                    continue  # per-adapter plain dicts (rank, scaling) hold numbers, not tensors
                for key, item in container.items():
                    devices_of[key] += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                    if attr in module.adapter_layer_names and key not in available:
                        available.append(key)
            available.sort()
        statuses.append(TunerLayerStatus(
            name=name,
            module_type=repr(module).partition("(")[0],  # PEFT's: "lora.Linear" (AdapterLayer._get_name)
            enabled=not module.disable_adapters,
            active_adapters=active,
            merged_adapters=merged,
            requires_grad={key: _fold([p.requires_grad for p in ps]) for key, ps in params.items()},
            available_adapters=available,
            devices={key: sorted({p.device.type for p in ps}) for key, ps in devices_of.items()},
            quantization_backend=_quantization_backend(module),
        ))
    if not statuses:
        raise ConfigError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                          "PEFT adapters injected in the model: pass a PeftModel (get_peft_model / "
                          "PeftModel.from_pretrained) or a model adapted by inject_adapter_in_model")
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model's :class:`TunerModelStatus`: PEFT's summary of :func:`get_layer_status` plus parameter counts."""
    from deltatune.peft_model import PeftModel

    _tuner_root(model, caller="get_model_status")  # a prompt-learning PeftModel is refused in this function's name
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
        adapter_model_type = type(model.base_model).__name__
    else:
        from transformers import PreTrainedModel

        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
        peft_types, adapter_model_type = {}, "None"

    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_anywhere = set().union(*(s.merged_adapters for s in layers))
    # An adapter merged in one layer but present unmerged in another: the model is half merged.
    half = any((set(s.available_adapters) - set(s.merged_adapters)) & merged_anywhere for s in layers)
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].update(value)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters="irregular" if half else sorted(merged_anywhere),
        requires_grad={key: _fold(values) for key, values in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(value) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
