"""``PeftMixedModel``: adapters of different methods on one model (PEFT's ``get_peft_model(..., mixed=True)``).

A layer targeted by adapters of two methods holds a chain of adapter layers: the first method's layer wraps a
second method's layer, which wraps the original ``nn.Linear`` (``q_proj.base_layer`` is the LoHa layer when LoRA
came first). Every layer runs ``base_layer(x)`` and adds its own update, so the chain computes
``W x + ΔW_lora x + ΔW_loha x`` with both active; ``set_adapter([a, b])`` activates adapters of different methods
at once. Merging folds the innermost layer's adapters in first (a layer's update is defined on top of the ones
below it) and ``unload``/``merge_and_unload`` take the chain apart from the inside out.

As PEFT: the methods are LoRA, LoHa, LoKr, AdaLoRA, OFT and SHiRA (``Method.mixed``: the ones whose layers
compose this way); no prompt-learning adapters. Beyond PEFT, which refuses to save a mixed model:
``save_pretrained`` writes each adapter as a normal directory (the chain's ``base_layer`` steps are not part of
the file keys), which ``PeftModel.from_pretrained`` or ``PeftMixedModel.load_adapter`` reads back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.core import targeting
from deltatune.core.features import Conv1D
from deltatune.core.layer import AdapterLayer
from deltatune.core.state_dict import check_and_load, to_model_keys
from deltatune.core.tuner import AdapterModel, _matches_name, replace_module, validate_adapter_name
from deltatune.errors import AdapterNameError, ConfigError, TargetModuleError
from deltatune.peft_model import PeftModel
from deltatune.registry import METHODS, Method, method_for


def compatible_peft_types() -> list[str]:
    """The methods a mixed model holds (``Method.mixed``), in registration order."""
    return [str(m.peft_type) for m in METHODS.values() if m.mixed]


def check_mixed_config(config: PeftConfig) -> None:
    """Refuse a config a mixed model cannot hold, naming the methods it can."""
    if not isinstance(config, PeftConfig):
        raise ConfigError(f"peft_config must be a deltatune config (e.g. LoraConfig), got {type(config).__name__}")
    if str(config.peft_type) not in compatible_peft_types():
        raise ConfigError(f"The provided `peft_type` '{config.peft_type}' is not compatible with the "
                          f"`PeftMixedModel`. A mixed model (mixed=True) holds {', '.join(compatible_peft_types())} "
                          "adapters: use get_peft_model without mixed=True for it")
    if getattr(config, "use_dora", False):
        # DoRA rescales by the norm of the layer's own base weight, which in a chain leaves out the other
        # methods' updates: the result would depend on the order the adapters were added.
        raise ConfigError("DoRA (use_dora=True) is not supported in a mixed model; use a plain PeftModel for it")


def _dense_base(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, Conv1D)  # Conv1D: None without transformers


class MixedAdapterModel(AdapterModel):
    """``AdapterModel`` whose layers may hold a chain of different methods' adapter layers."""

    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        check_mixed_config(config)
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"Adapter with name '{adapter_name}' already exists. Pick another name or delete_adapter() it first"
            )
        method = method_for(config.peft_type)
        if method.hooks.prepare_config is not None:
            method.hooks.prepare_config(self.model, config)
        targeting.resolve_target_modules(self.model, config, method.default_targets)
        saved = getattr(config, "modules_to_save", None) or []
        # Another method's layer is a valid target here: the new adapter goes into its chain.
        found = targeting.find_targets(self.model, config, (*method.supported_types(), AdapterLayer))
        found = [n for n in found if not _matches_name(n, saved)]
        if not found:
            raise TargetModuleError(
                "No modules were targeted for adaptation. This might be caused by a combination of mismatched target "
                "modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                "configuration. You may also have only targeted modules that are marked to be saved "
                f"(`modules_to_save`). Every module matched by target_modules is also in modules_to_save {saved}; "
                "nothing to adapt"
            )
        self.peft_config[adapter_name] = config
        try:
            for name in found:
                self._add_to_chain(name, adapter_name, config, method)
            self._wrap_modules_to_save(adapter_name, saved)
            if method.hooks.after_inject is not None:
                method.hooks.after_inject(self, adapter_name, config)
        except BaseException:
            self._remove_adapter(adapter_name)
            raise
        self._mark_trainable(adapter_name, config)

    def _add_to_chain(self, name: str, adapter_name: str, config: PeftConfig, method: Method) -> None:
        """Add the adapter to this method's layer in the chain at ``name``, or wrap the chain's innermost module."""
        module, path, holder = self.model.get_submodule(name), name, None
        while isinstance(module, AdapterLayer):
            if isinstance(module, method.layer_cls):
                method.create_or_update(module, adapter_name, config, name)
                return
            holder, path, module = module, f"{path}.base_layer", module.base_layer
        if holder is not None and not _dense_base(module):
            raise TargetModuleError(f"{name} ({type(module).__name__}) already holds a {type(holder).__name__}: "
                                    "adapters of different methods share Linear layers only; narrow target_modules")
        wrapped = method.create_or_update(module, adapter_name, config, name)
        if wrapped is None:
            raise TargetModuleError(f"{name} ({type(module).__name__}) cannot be adapted by {config.peft_type}")
        if wrapped is not module:
            replace_module(self.model, path, wrapped)

    def _mark_trainable(self, adapter_name: str, config: PeftConfig) -> None:
        """As one method's (which freezes every other method's tensors too), then the active adapters of every
        method are made trainable again by ``set_adapter``."""
        super()._mark_trainable(adapter_name, config)
        self.set_adapter(self.active_adapter)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """As ``AdapterModel.merge_adapter``, innermost layer of each chain first."""
        self.check_mergeable(adapter_names)
        layers = list(self.adapter_layers())
        if safe_merge:
            for name, layer in layers:
                layer.check_merge(adapter_names, where=name)
        for _, layer in reversed(layers):  # named_modules lists a chain outside-in
            layer.merge(safe_merge=False, adapter_names=adapter_names)

    def _unload_order(self) -> list[tuple[str, nn.Module]]:
        """Inside out: the innermost layer of a chain becomes its plain module first, so each outer layer then merges
        into and hands back a plain module."""
        return list(reversed(list(self._wrappers())))


class PeftMixedModel(PeftModel):
    """Adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA, OFT) on one model; ``get_peft_model(model, config,
    mixed=True)`` returns it. The API is ``PeftModel``'s: ``add_adapter``, ``set_adapter([a, b])`` (adapters of
    different methods active together), ``merge_and_unload``, ``unload``, ``disable_adapter``, ``load_adapter``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        validate_adapter_name(adapter_name)
        check_mixed_config(peft_config)
        self.base_model = MixedAdapterModel(model, peft_config, adapter_name)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        check_mixed_config(peft_config)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)

    def get_adapter_state_dict(self, adapter_name: str | None = None,
                               save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        """PEFT's file keys: a chain's ``base_layer`` steps are how this model nests methods, not part of them."""
        state = super().get_adapter_state_dict(adapter_name, save_embedding_layers)
        containers = method_for(self.peft_config[adapter_name or self.active_adapters[0]].peft_type).containers
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            hit = next((i for i, p in enumerate(parts) if p in containers), None)
            if hit is not None:
                parts = [p for p in parts[:hit] if p != "base_layer"] + parts[hit:]
            out[".".join(parts)] = value
        return out

    def _load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        method = method_for(config.peft_type)
        containers = method.containers
        model_state = to_model_keys(self, weights, adapter_name, containers, method.file_suffixes)
        state = {self._in_chain(k, containers, method.layer_cls): v for k, v in model_state.items()}
        check_and_load(self, state, adapter_name, containers, config.base_model_name_or_path)

    def _in_chain(self, key: str, containers: tuple[str, ...], layer_cls: type) -> str:
        """The model key of a file tensor: down the chain at its module to the method's layer (LoRA and AdaLoRA
        layers both have ``lora_A``, so the container's name alone does not say which)."""
        parts = key.split(".")
        hit = next((i for i, p in enumerate(parts) if p in containers), None)
        if hit is None:
            return key
        path, container = parts[:hit], parts[hit]
        try:
            module = self.get_submodule(".".join(path))
        except AttributeError:
            return key  # check_and_load names the module the model lacks
        while isinstance(module, AdapterLayer) and not (isinstance(module, layer_cls) and hasattr(module, container)):
            path, module = [*path, "base_layer"], module.base_layer
        return ".".join(path + parts[hit:])
