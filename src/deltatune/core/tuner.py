"""The model-level loops every weight adapter shares: inject, switch, merge, unload.

:class:`AdapterModel` wraps the user's model as ``.model`` (so state-dict keys read
``base_model.model.<path>`` inside a ``PeftModel``, as in PEFT) and keeps one config per adapter name.
Everything method-specific comes from the :class:`~deltatune.registry.Method` entry.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftRuntimeWarning, PeftType, PeftWarning
from deltatune.core import targeting
from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import AdapterNameError, ConfigError, MergeError, TargetModuleError
from deltatune.registry import Method, hook_for, method_for

RESERVED_NAMES = ("__base__",)  # "__base__" means "no adapter" in a mixed-adapter batch (adapter_names)


def validate_adapter_name(name: str) -> None:
    """Refuse an adapter name that cannot work, with one line saying why (every entry point calls this).

    A name becomes a directory (``save_pretrained`` writes a non-default adapter to ``<dir>/<name>``), so no
    path separators and no ``..`` (an absolute name would make ``os.path.join`` write outside the directory);
    a key of torch's module dicts, so no ``.``; and it must not be ``"__base__"``, which mixed-adapter batches
    read as "no adapter".

    Raises:
        AdapterNameError: (a ``ValueError``) the name is empty, not a string, or breaks one of the rules above.
    """
    fix = "pick a plain name such as 'task_a'"
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter name must be a string, got {type(name).__name__} {name!r}; {fix}")
    if not name:
        raise AdapterNameError(f"adapter name {name!r} is empty; {fix}")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name) or os.path.isabs(name):
        raise AdapterNameError(f"adapter name {name!r} contains a path separator (it becomes a directory name "
                               f"when saved); {fix}")
    if "." in name:
        what = "is a path component" if set(name) == {"."} else "contains '.' (torch module names cannot)"
        raise AdapterNameError(f"adapter name {name!r} {what}; {fix}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise AdapterNameError(f"adapter name {name!r} contains a control character; {fix}")
    if name in RESERVED_NAMES:
        raise AdapterNameError(f"adapter name {name!r} is reserved (it means 'no adapter' in mixed-adapter "
                               f"batches); {fix}")


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def _holds(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether ``module`` is still at ``name`` (a wrapper inside another one, such as the LoRA layer on an
    ``nn.MultiheadAttention``'s ``out_proj``, goes away with its parent, which unloads or deletes it)."""
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def _matches_name(key: str, names) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _check_same_target_parameters(configs: dict[str, PeftConfig], config: PeftConfig) -> None:
    """PEFT's rule: adapters with ``target_parameters`` on one model all target the same parameters, because which
    parameter a nested ``ParamWrapper`` adapts is encoded by its nesting depth, not by its state-dict key.

    Raises:
        ConfigError: (a ``ValueError``) another adapter targets a different set of parameters.
    """
    new = getattr(config, "target_parameters", None)
    if not new:
        return
    for name, other in configs.items():
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != set(new):
            raise ConfigError(f"When using multiple adapters with `target_parameters`, all adapters must target the "
                              f"same set of parameters, but got {sorted(set(new))} for the new adapter and "
                              f"{sorted(set(theirs))} for adapter '{name}'. Give this adapter the same "
                              "target_parameters, or put it on a fresh copy of the model")


def _nothing_to_adapt(saved: list[str]) -> TargetModuleError:
    """PEFT's error when every module ``target_modules`` matched is excluded or in ``modules_to_save``."""
    return TargetModuleError(
        "No modules were targeted for adaptation. This might be caused by a combination of mismatched target "
        "modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
        "configuration. You may also have only targeted modules that are marked to be saved "
        f"(`modules_to_save`). Every module matched by target_modules is also in modules_to_save {saved}; "
        "nothing to adapt"
    )


# PEFT's EMBEDDING_LAYER_NAMES: a target_modules/modules_to_save entry ending in one of these is a tied layer.
_TIED_LAYER_NAMES = ("embed_tokens", "lm_head")


def _warn_untied_adapter(model: nn.Module, config: PeftConfig) -> None:
    """PEFT's warning for a method that cannot tie adapters (every method without LoRA's ``ensure_weight_tying``,
    which :mod:`deltatune.lora.tying` handles): an adapter on ``embed_tokens`` or ``lm_head`` of a model whose output
    layer shares the input embedding's weight trains one side only, so the two layers drift apart."""
    if hasattr(config, "ensure_weight_tying"):
        return
    if getattr(getattr(model, "config", None), "tie_word_embeddings", None) is False:  # the checkpoint unties them
        return
    targets = config.target_modules
    saved = getattr(config, "modules_to_save", None) or []
    if isinstance(targets, str):
        named = any(re.fullmatch(targets, n) for n in _TIED_LAYER_NAMES)
    else:
        named = any(str(m).split(".")[-1] in _TIED_LAYER_NAMES for m in (targets or ()))
    named = named or any(str(m).split(".")[-1] in _TIED_LAYER_NAMES for m in saved)
    if not named:
        return
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = any(not isinstance(m, nn.Embedding) and id(getattr(m, "weight", None)) in embedding_weights
               for m in model.modules())
    if tied:
        warnings.warn("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but no "
                      "implementation exists to tie the adapters. This can lead to complications, for example when "
                      "merging the adapter or converting your model to formats other than safetensors. Check the "
                      f"discussion here: https://github.com/huggingface/peft/issues/2777 ({config.peft_type} trains "
                      "its own copy of each layer; use LoRA with ensure_weight_tying=True to keep them tied)",
                      PeftWarning, stacklevel=4)


def _check_single_bias_adapter(configs: dict[str, PeftConfig], adapter_name: str, config: PeftConfig,
                               owner: str = "AdapterModel") -> None:
    """Refuse a second adapter with ``bias != "none"`` (PEFT's rule): the biases are base parameters, so two such
    adapters would silently train (and save) the same tensors."""
    with_bias = [n for n, c in configs.items() if getattr(c, "bias", "none") != "none"]
    if with_bias and getattr(config, "bias", "none") != "none":
        raise ConfigError(  # PEFT's sentence first (owner: PEFT's class name, LoraModel...)
            f"{owner} supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for all "
            f"adapters. Adapter {adapter_name!r} has bias={config.bias!r} but adapter {with_bias[0]!r} already trains "
            "biases "
            f"(bias={configs[with_bias[0]].bias!r}); only one adapter per model may train biases: set bias='none' "
            "for the others"
        )


class AdapterModel(nn.Module):
    """Holds ``model`` with adapter layers injected, and the adapters' configs by name (PEFT's ``BaseTuner``).

    ``PeftModel.base_model`` is an instance of the method's own subclass (:func:`tuner_class`: ``LoraModel``,
    ``IA3Model``...), which only adds PEFT's class attributes; every method shares the code here.
    """

    def __init__(self, model: nn.Module, config: PeftConfig | dict[str, PeftConfig], adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Inject ``config``'s adapter into ``model`` (in place) as ``adapter_name`` and make it active.

        Args:
            config: The adapter's config, or PEFT's ``{adapter_name: config}`` form.
            low_cpu_mem_usage: PEFT's flag, accepted for its signature: the adapter is created on the base
                layers' devices either way (a load then overwrites it).
            state_dict: When given, the layers to adapt are those its keys name (only the keys are read), as in
                ``inject_adapter_in_model``.
        """
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        # PEFT's bookkeeping: each name once, in the order the adapters first adapted it (never shrinks)
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        if isinstance(config, dict):  # PEFT's BaseTuner also takes {adapter_name: config}
            config = config[adapter_name]
        if state_dict is not None:
            config = copy.copy(config)
            config.target_modules = targeting.modules_named_in(state_dict, method_for(config.peft_type).containers)
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def forward(self, *args, task_ids: Any = None, **kwargs):
        """The model's forward; ``task_ids`` (one per row) go to the adapter layers (:meth:`row_inputs`), not to the
        model (PEFT's ``PolyModel.forward``)."""
        with self.row_inputs(task_ids):
            return self.add_regularization(self.model(*args, **kwargs))

    def generate(self, *args, task_ids: Any = None, **kwargs):
        """The model's ``generate``, ``task_ids`` as in :meth:`forward` (PEFT's ``PolyModel.generate``)."""
        with self.row_inputs(task_ids):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def row_inputs(self, task_ids: Any) -> Iterator[None]:
        """Give every adapter layer the call's per-row inputs for one call, as a mixed-adapter batch gives them
        ``adapter_names``: ``task_ids`` (one per input row) become ``layer.row_inputs["task_ids"]``, read by the
        layers whose method routes by task (Poly, through ``AdapterLayer.row_input``) and sliced with the rows of a
        mixed batch; other methods ignore them. Nothing is set when the call gives none."""
        if task_ids is None:
            yield
            return
        ids = torch.as_tensor(task_ids).long().reshape(-1)  # PEFT takes a tensor; a list of ints works too
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.row_inputs = {"task_ids": ids}
        try:
            yield
        finally:
            for layer in layers:
                layer.row_inputs = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """``model.config`` as a dict (PEFT's ``BaseTuner.get_model_config``); ``{"model_type": "custom"}`` for a
        model without one (a plain torch module)."""
        config = getattr(model, "config", None)
        if config is None:
            return {"model_type": "custom"}  # a fresh dict each call: callers may edit it
        if hasattr(config, "to_dict"):
            return config.to_dict()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return dataclasses.asdict(config)
        return config

    # ---- where adapters live -----------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    def method(self, adapter_name: str | None = None) -> Method:
        name = adapter_name or self.active_adapters[0]
        return method_for(self.peft_config[name].peft_type)

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    # ---- PEFT's BaseTuner attributes -----------------------------------------------------------
    # The per-method subclasses (tuner_class: LoraModel, ...) override these four with class attributes, as PEFT's
    # tuner classes define them; on a bare AdapterModel (mixed models) they follow the active adapter's method.
    @property
    def prefix(self) -> str:
        """The method's adapter-parameter name prefix (``"lora_"``)."""
        return self.method().prefix

    @property
    def tuner_layer_cls(self) -> type[nn.Module]:
        """The base class of the method's adapter layers (``LoraLayer``)."""
        return self.method().layer_cls

    @property
    def target_module_mapping(self) -> dict[str, list[str]]:
        """``model_type -> target_modules`` used when a config names no targets."""
        return self.method().default_targets

    @property
    def uses_shared_state(self) -> bool:
        """Whether the method keeps tensors shared by every layer on this object (VeRA's projections), which
        ``inject_adapter_in_model`` cannot return."""
        return self.method().uses_shared_state

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer can write ``adapter_name`` as a plain LoRA update (PEFT's check before
        ``convert_to_lora``; deltatune's converter is :func:`deltatune.export_to_lora`)."""
        return all(layer.supports_lora_conversion(adapter_name) for _, layer in self.adapter_layers())

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on (or off) for exactly the tensors of ``adapter_names``: their layer tensors and their
        ``modules_to_save`` copies; other adapters and the base stay as they are (PEFT's ``set_requires_grad``).
        Tensors an adapter keeps frozen by design (MiCA's ``B``) stay frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for _, module in self._wrappers():
            if isinstance(module, AdapterLayer):
                module.set_requires_grad(names, requires_grad)
            else:
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """PEFT's ``LoraModel.add_weighted_adapter`` on the tuner: the same as ``PeftModel.add_weighted_adapter``,
        done by the sources' method's ``add_weighted_adapter`` hook (LoRA's: :mod:`deltatune.lora.arithmetic` has
        the combination types and keyword arguments).

        Raises:
            ConfigError: no registered method combines adapters.
        """
        combine = hook_for("add_weighted_adapter",
                           [self.peft_config[n].peft_type for n in adapters if n in self.peft_config])
        if combine is None:
            raise ConfigError("add_weighted_adapter: no registered method combines adapters")
        combine(_TunerAsPeftModel(self), adapters, weights, adapter_name, combination_type, **kwargs)

    # ---- training hooks (methods that regularise or schedule, e.g. AdaLoRA) --------------------
    def _trainable_methods(self) -> list[Method]:
        """The methods of the adapters being trained (``inference_mode=False``), each once."""
        methods: dict = {}
        for config in self.peft_config.values():
            if not config.inference_mode:
                methods.setdefault(config.peft_type, method_for(config.peft_type))
        return list(methods.values())

    def regularization_loss(self) -> torch.Tensor | None:
        """The sum of the trained methods' ``loss_hook`` terms; ``None`` when no method has one."""
        total = None
        for method in self._trainable_methods():
            term = method.hooks.regulariser(self) if method.hooks.regulariser is not None else None
            if term is not None:
                total = term if total is None else total + term
        return total

    def add_regularization(self, outputs: Any) -> Any:
        """In training mode, add :meth:`regularization_loss` to ``outputs.loss`` when the model returned one."""
        loss = getattr(outputs, "loss", None)
        if self.training and isinstance(loss, torch.Tensor):
            extra = self.regularization_loss()
            if extra is not None:
                outputs.loss = loss + extra
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Run the trained methods' ``step_hook`` (AdaLoRA's rank allocation); a no-op for the others."""
        for method in self._trainable_methods():
            if method.hooks.step is not None:
                method.hooks.step(self, global_step)

    # ---- injection ---------------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Wrap every targeted module and add ``adapter_name`` to it; on any error, undo and re-raise."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"Adapter with name '{adapter_name}' already exists. Pick another name or delete_adapter() it first"
            )
        _check_single_bias_adapter(self.peft_config, adapter_name, config, type(self).__name__)
        method = method_for(config.peft_type)
        if method.hooks.prepare_config is not None:
            method.hooks.prepare_config(self.model, config)
        _check_same_target_parameters(self.peft_config, config)
        _warn_untied_adapter(self.model, config)
        targeting.resolve_target_modules(self.model, config, method.default_targets)
        saved = getattr(config, "modules_to_save", None) or []
        # LoRA's target_parameters alone (target_modules empty) adapts parameters, in hooks.after_inject; with
        # both, either one may match nothing (PEFT warns then, below), but not both.
        target_parameters = getattr(config, "target_parameters", None) or []
        params_only = bool(target_parameters) and not config.target_modules
        if method.hooks.find_targets is not None:  # the method's own rule (adaption prompts' top layers)
            found = method.hooks.find_targets(self.model, config)
        else:
            found = [] if params_only else targeting.find_targets(self.model, config,
                                                                  (*method.supported_types(), method.layer_cls),
                                                                  allow_none=bool(target_parameters))
        found = [n for n in found if not _matches_name(n, saved)]
        if not found and not target_parameters:
            raise _nothing_to_adapt(saved)
        self.peft_config[adapter_name] = config
        try:
            # Model-wide tensors (e.g. VeRA's shared projections) exist before the layers that use them.
            shared = method.hooks.init_shared(self, adapter_name, config, found) if method.hooks.init_shared else {}
            for name in found:
                target = self.model.get_submodule(name)
                wrapped = method.create_or_update(target, adapter_name, config, name, **shared)
                if wrapped is None:
                    raise TargetModuleError(f"{name} ({type(target).__name__}) cannot be adapted by {config.peft_type}")
                if wrapped is not target:
                    replace_module(self.model, name, wrapped)
            self._wrap_modules_to_save(adapter_name, saved)
            if method.hooks.after_inject is not None:  # e.g. the output layer tied to a wrapped input embedding
                method.hooks.after_inject(self, adapter_name, config)
            params = self._parameter_targets(adapter_name)
            if target_parameters and not found and not params:  # neither matched: the modules' error
                targeting.find_targets(self.model, config)  # raises when no module name matched at all
                raise _nothing_to_adapt(saved)
        except BaseException:
            self._remove_adapter(adapter_name)
            raise
        if target_parameters and config.target_modules and not found:
            warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.",
                          PeftRuntimeWarning, stacklevel=3)
        elif target_parameters and not params and found:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                          PeftRuntimeWarning, stacklevel=3)
        self.targeted_module_names += [n for n in found if n not in self.targeted_module_names]
        self.targeted_parameter_names += [n for n in params if n not in self.targeted_parameter_names]
        self._mark_trainable(adapter_name, config)

    def _parameter_targets(self, adapter_name: str) -> list[str]:
        """``<module>.<parameter>`` for each parameter (not module) that ``adapter_name`` adapts, in model order;
        the layers that adapt a single parameter say which by ``parameter_name`` (LoRA's ``target_parameters``)."""
        names = []
        for name, layer in self.adapter_layers():
            parameter = getattr(layer, "parameter_name", None)
            if parameter is not None and adapter_name in layer.adapter_names():
                names.append(f"{name.replace('.base_layer', '')}.{parameter}")
        return names

    def _wrap_modules_to_save(self, adapter_name: str, names) -> None:
        if not names:
            return
        internal = targeting.adapter_internal_names(self.model)  # by structure: a base "lora_head" is the model's
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                if _matches_name(key, names):
                    module.update(adapter_name)
                continue
            if key and _matches_name(key, names) and key not in internal:
                replace_module(self.model, key, ModulesToSaveWrapper(module, adapter_name))

    def _mark_trainable(self, adapter_name: str, config: PeftConfig) -> None:
        """Freeze everything but the adapters' tensors (and biases, per ``config.bias``).

        What is an adapter tensor is decided by identity, not by name: the parameters in the adapter layers' own
        containers (``adapter_layer_names``) and the ``modules_to_save`` copies; their ``requires_grad`` stays as
        ``set_adapter`` left it (the active adapters train). A base module merely *named* like an adapter
        (``lora_foobar``) is frozen like any other base weight (it is never saved with the adapter either).
        """
        adapter_params = self._adapter_param_ids()
        for p in self.model.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if name.endswith("bias") and ".original_module." not in name:
                    p.requires_grad_(True)
        elif bias.endswith("_only"):  # "lora_only", "vera_only": the biases of the adapted layers
            for _, layer in self.adapter_layers():
                b = getattr(layer.base_layer, "bias", None)
                if b is not None:
                    b.requires_grad_(True)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter-owned parameter: the adapter layers' per-adapter containers and the trained copies of
        ``modules_to_save`` (see :meth:`_mark_trainable`); each once."""
        params: dict[int, nn.Parameter] = {}
        for _, module in self._wrappers():
            if isinstance(module, AdapterLayer):
                for attr in module.adapter_layer_names:
                    container = getattr(module, attr, None)  # a tied layer may hold none of its own
                    if container is not None:
                        params.update((id(p), p) for p in container.parameters())
            else:
                params.update((id(p), p) for p in module.modules_to_save.parameters())
        return list(params.values())

    def _adapter_param_ids(self) -> set[int]:
        return {id(p) for p in self.adapter_parameters()}

    # ---- switching ---------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Make ``adapter_name`` (one name or several) the active adapter(s); only they can get gradients.

        ``inference_mode`` (PEFT's flag): ``True`` freezes them, ``False`` makes them trainable (what PEFT's
        ``set_adapter`` does, whatever their configs say); ``None`` (the internal switches: adding, deleting,
        re-enabling) leaves adapters whose config is in ``inference_mode`` frozen.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise AdapterNameError(f"Adapter {n} does not exist; this model has {sorted(self.peft_config)}")
        if inference_mode is None:
            inference_mode = any(self.peft_config[n].inference_mode for n in names)
        trainable = not inference_mode
        wrappers = [module for _, module in self._wrappers()]
        for module in wrappers:  # every refusal before any wrapper switches: no half-switched model
            if isinstance(module, ModulesToSaveWrapper):
                module.check_set_adapter(names)
        for module in wrappers:
            module.set_adapter(names, trainable=trainable)
        self.active_adapter = adapter_name

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        """Switch every adapter layer on (or off, when ``enabled=False``), in place.

        As PEFT: disabled adapters get no gradients (their tensors are frozen: an optimizer step meanwhile must not
        move them), and enabling makes the active adapters trainable again unless their config is in
        ``inference_mode``. Merged adapters are unmerged when disabled, so the output is the base model's.
        """
        for _, module in self._wrappers():
            module.enable_adapters(enabled)
        if enabled:
            if self.active_adapters:
                self.set_adapter(self.active_adapter)
        else:
            for p in self.adapter_parameters():
                p.requires_grad_(False)

    def disable_adapter_layers(self) -> None:
        """PEFT's name for ``enable_adapter_layers(False)``: the output becomes the base model's.

        Warns, as PEFT does, when an active adapter trains biases (``bias != "none"``): those are the base's own
        tensors, changed in place, so disabling the adapter layers does not give the original model back."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", PeftWarning,
                              stacklevel=2)
        self.enable_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere; layers left with no adapter return to the plain base layer."""
        if adapter_name not in self.peft_config:
            raise AdapterNameError(f"Adapter {adapter_name} does not exist; this model has {sorted(self.peft_config)}")
        merged = [name for name, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged:  # PEFT refuses too (same words): its update is inside the base weights, which deletion would keep
            raise MergeError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             f"first. (It is merged into {merged[0]}...: call unmerge_adapter(), or merge_and_unload() "
                             "to keep it in the weights.)")
        self._remove_adapter(adapter_name)
        remaining = list(self.peft_config)
        if adapter_name in self.active_adapters:
            self.active_adapter = [a for a in self.active_adapters if a != adapter_name] or (remaining[:1] or [])
            if isinstance(self.active_adapter, list) and len(self.active_adapter) == 1:
                self.active_adapter = self.active_adapter[0]
            if self.active_adapter:
                self.set_adapter(self.active_adapter)

    def _remove_adapter(self, adapter_name: str) -> None:
        config = self.peft_config.pop(adapter_name, None)
        for attr in method_for(config.peft_type).hooks.shared_containers if config is not None else ():
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for name, module in list(self._wrappers()):
            if not _holds(self.model, name, module):  # nested in a wrapper already handled (MHA's out_proj)
                continue
            module.delete_adapter(adapter_name)
            if not module.adapter_names():
                original = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
                replace_module(self.model, name, original)
        self._collapse_wrappers()

    def _collapse_wrappers(self) -> None:
        """Replace companion wrappers (``collapse_into`` names their child, e.g. LoRA's ``token_adapter``) whose
        child is no longer an adapter layer by that child, so the plain module is back in its place."""
        for name, module in list(self.model.named_modules()):
            attr = getattr(module, "collapse_into", None)
            if attr is not None and not isinstance(getattr(module, attr), AdapterLayer):
                replace_module(self.model, name, getattr(module, attr))

    # ---- merging -----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (keeps them separable: see :meth:`unmerge_adapter`).

        With ``safe_merge`` every layer's merged weight is checked for NaN/Inf before any layer changes.
        """
        self.check_mergeable(adapter_names)
        layers = list(self.adapter_layers())
        if safe_merge:  # dry run over every layer first, so a bad adapter leaves the whole model unchanged
            for name, layer in layers:
                layer.check_merge(adapter_names, where=name)
        for _, layer in layers:
            layer.merge(safe_merge=False, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` (changing nothing) if any adapter to merge belongs to a method whose update is
        not a change of the weights (``Method.mergeable=False``, e.g. bottleneck adapters)."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            config = self.peft_config.get(name)
            if config is not None and (not method_for(config.peft_type).mergeable
                                       or getattr(config, "merge_refusal", None)):  # e.g. an aLoRA adapter
                reason = getattr(config, "merge_refusal", None) or "its update is not a change of the base weights"
                raise MergeError(
                    f"adapter {name!r} ({config.peft_type}) cannot be merged: {reason}. Keep it unmerged, or use "
                    "unload() to get the base model back without it"
                )

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.check_mergeable(adapter_names)
        if merge and safe_merge:
            for name, layer in self.adapter_layers():
                layer.check_merge(adapter_names, where=name)
        for name, module in self._unload_order():
            if not _holds(self.model, name, module):  # nested in a wrapper already unloaded (MHA's out_proj)
                continue
            if isinstance(module, AdapterLayer):
                replace_module(self.model, name, module.unloaded(merge, adapter_names))
            else:
                active = module.active_adapter
                replace_module(self.model, name, module.modules_to_save[active] if active else module.original_module)
        self._collapse_wrappers()
        self.peft_config.clear()
        return self.model

    def _unload_order(self) -> list[tuple[str, nn.Module]]:
        """The wrappers in the order :meth:`_unload` hands them back (outside-in: a wrapper nested in another one
        goes with its parent)."""
        return list(self._wrappers())

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """The base model with every adapter layer removed and nothing merged."""
        return self._unload(merge=False)



class _TunerAsPeftModel:
    """What an ``add_weighted_adapter`` hook (LoRA's :mod:`deltatune.lora.arithmetic`) reads of a ``PeftModel``,
    over a bare tuner (for PEFT's ``base_model.add_weighted_adapter``): the configs, the modules, adding and
    removing an adapter."""

    def __init__(self, tuner: AdapterModel) -> None:
        self.base_model = tuner
        self.peft_config = tuner.peft_config

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return self.base_model.named_modules()

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        self.base_model.inject_adapter(adapter_name, config)
        self.base_model.set_adapter(self.base_model.active_adapter)  # the new adapter is not made active

    def _remove_adapter(self, adapter_name: str) -> None:
        self.base_model._remove_adapter(adapter_name)


_TUNER_CLASSES: dict[PeftType, type[AdapterModel]] = {}


def tuner_class(method: Method) -> type[AdapterModel]:
    """PEFT's per-method tuner class for a registered weight method (``LoraModel`` for LoRA, ``IA3Model``...).

    Made once per method from its registry entry: an :class:`AdapterModel` subclass named after the config class
    (``LoraConfig`` -> ``LoraModel``), living in the method's package (so it pickles by name), whose class
    attributes are PEFT's (``prefix``, ``tuner_layer_cls``, ``target_module_mapping``, ``uses_shared_state``).
    It adds no behaviour: ``LoraModel(model, config, "default")`` is PEFT's constructor, and
    ``isinstance(peft_model.base_model, LoraModel)`` holds for a LoRA ``PeftModel``.

    Raises:
        ConfigError: ``method`` is a virtual-token method (it has no tuner: ``PeftModel`` feeds its prompts).
    """
    if method.layer_cls is None:
        raise ConfigError(f"{method.peft_type} adapters are virtual tokens: they have no tuner class (PeftModel "
                          "handles them itself)")
    cls = _TUNER_CLASSES.get(method.peft_type)
    if cls is None:
        name = method.config_cls.__name__.removesuffix("Config") + "Model"
        package = method.config_cls.__module__.removesuffix(".config")
        cls = type(name, (AdapterModel,), {
            "__module__": package,
            "__qualname__": name,
            "__doc__": f"PEFT's ``{name}``: an :class:`~deltatune.core.tuner.AdapterModel` holding "
                       f"{method.peft_type} adapters (see :func:`~deltatune.core.tuner.tuner_class`).",
            "prefix": method.prefix,
            "tuner_layer_cls": method.layer_cls,
            "target_module_mapping": method.default_targets,
            "uses_shared_state": method.uses_shared_state,
        })
        _TUNER_CLASSES[method.peft_type] = cls
    return cls
