"""``WeightTuner``: what a ``PeftModel`` does with weight adapters (LoRA and kin), around the method's ``AdapterModel``.

It names no method: what a method adds (skipping initialisations while loading, aLoRA's offsets around a call,
combining adapters, slicing tensors before a save) comes from its registry hooks (:mod:`deltatune.registry`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.config import PeftConfig, PeftRuntimeWarning, PeftWarning
from deltatune.core.layer import AdapterLayer
from deltatune.core.state_dict import adapter_state_dict, check_and_load, to_model_keys
from deltatune.core.tuner import AdapterModel, tuner_class
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.registry import hook_for, method_for

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel


class WeightTuner:
    """What ``PeftModel`` does with weight adapters (LoRA and kin): the method's ``AdapterModel`` (PEFT's
    ``LoraModel``, ``IA3Model``..., which is ``peft_model.base_model``) plus the per-call work a ``PeftModel``
    adds around it: mixed-adapter batches, the methods' ``activate`` hooks (LoRA's aLoRA offsets), the
    ``autocast_adapter_dtype`` cast, PEFT's warnings, and the file keys (which are ``PeftModel``'s state-dict keys,
    so it keeps the ``PeftModel`` it serves).

    Its interface is :class:`deltatune.prompt.tuner.PromptTuner`'s: ``PeftModel`` calls one of the two and never
    asks which.
    """

    def __init__(self, peft_model: PeftModel, adapter_model: AdapterModel) -> None:
        self.peft_model = peft_model
        self.adapter_model = adapter_model

    @staticmethod
    def build(peft_model: PeftModel, model: nn.Module, config: PeftConfig, adapter_name: str,
              autocast_adapter_dtype: bool = True) -> WeightTuner:
        """Inject ``config``'s adapter into ``model`` as ``adapter_name`` (active) with PEFT's per-method tuner class
        (``LoraModel``, ``IA3Model``...: isinstance checks hold), from the registry."""
        tuner = WeightTuner(peft_model, tuner_class(method_for(config.peft_type))(model, config, adapter_name))
        tuner.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        _warn_unmatched_patterns(tuner.adapter_model, adapter_name, config)
        return tuner

    def peft_modules(self) -> dict[str, nn.Module]:
        """The modules ``PeftModel`` shows as attributes: ``base_model``, the ``AdapterModel`` (PEFT's layout)."""
        return {"base_model": self.adapter_model}

    # ---- what it holds -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.adapter_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.adapter_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.adapter_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.adapter_model.active_adapters

    @property
    def targeted_module_names(self) -> list[str]:
        return self.adapter_model.targeted_module_names

    @property
    def adapters_enabled(self) -> bool:
        """Whether any adapter layer (or ``modules_to_save`` copy) is on, i.e. not inside ``disable_adapter()``."""
        return any(not m.disable_adapters for _, m in self.adapter_model._wrappers())

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.adapter_model.supports_lora_conversion(adapter_name)

    # ---- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Inject ``adapter_name`` (not made active).

        Raises:
            ConfigError: a prompt-learning config (PEFT keeps the two families apart too).
        """
        if config.is_prompt_learning:
            raise ConfigError(
                f"this PeftModel holds weight adapters (e.g. LoRA) and cannot also hold a {config.peft_type} adapter "
                "(PEFT has the same rule); wrap a fresh base model for it"
            )
        # As PEFT: adding an adapter leaves every existing tensor's requires_grad as it was (a base weight the user
        # unfroze, an adapter tensor they froze); the new, inactive adapter starts frozen.
        existing = [(p, p.requires_grad) for p in self.peft_model.parameters()]
        self.adapter_model.inject_adapter(adapter_name, config)
        self.cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        _warn_unmatched_patterns(self.adapter_model, adapter_name, config)
        self.adapter_model.set_adapter(self.active_adapter)
        for p, flag in existing:
            p.requires_grad_(flag)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """With ``autocast_adapter_dtype=False`` put ``adapter_name``'s layer tensors in their base layer's dtype.

        The layers create adapters in float32 over a half-precision base (``AdapterLayer._place_adapter``), which
        is PEFT's ``True``; PEFT's ``False`` leaves them in the base weight's dtype, so this casts them down.
        """
        if autocast_adapter_dtype:
            return
        for module in self.adapter_model.model.modules():
            if not isinstance(module, AdapterLayer) or module.quantized:  # a 4/8-bit base has no float dtype
                continue
            weight = getattr(module.base_layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                continue
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(item.data.to(weight.dtype), requires_grad=item.requires_grad)
                else:
                    item.to(weight.dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.adapter_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.adapter_model.set_requires_grad(adapter_names, requires_grad)

    def mark_trainable(self, adapter_name: str) -> None:
        """A loaded (not active) adapter asked to be trainable: its tensors get gradients now."""
        self.set_requires_grad(adapter_name, True)

    def delete_adapter(self, adapter_name: str) -> None:
        self.adapter_model.delete_adapter(adapter_name)

    def _remove_adapter(self, adapter_name: str) -> None:
        self.adapter_model._remove_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], *args: Any, **kwargs: Any) -> None:
        """See ``PeftModel.add_weighted_adapter``: the ``add_weighted_adapter`` hook of the adapters' method (LoRA's
        :mod:`deltatune.lora.arithmetic` does the math; for adapters of a method without one, LoRA's refuses them
        by name, see :func:`deltatune.registry.hook_for`).

        Raises:
            ConfigError: no registered method combines adapters.
        """
        combine = hook_for("add_weighted_adapter",
                           [self.peft_config[n].peft_type for n in adapters if n in self.peft_config])
        if combine is None:
            raise ConfigError("add_weighted_adapter: no registered method combines adapters")
        combine(self.peft_model, adapters, *args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Every adapter layer off: the model computes exactly the base model's output."""
        adapter_model = self.adapter_model
        # As PEFT: the disabled adapters get no gradients inside the block (an optimizer step there must not move
        # them, e.g. a reference pass in DPO); each tensor's own flag comes back on exit, so a frozen
        # (inference-mode) adapter stays frozen.
        if len({layer.disable_adapters for _, layer in adapter_model.adapter_layers()}) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all adapters "
                          "will be enabled", PeftWarning, stacklevel=5)  # the caller of PeftModel.disable_adapter
        if not self.adapters_enabled and self.active_adapters:  # nested: the outer block re-enables
            yield
            return
        flags = [(p, p.requires_grad) for p in adapter_model.adapter_parameters()]
        adapter_model.enable_adapter_layers(False)  # freezes the adapter tensors
        try:
            yield
        finally:
            adapter_model.enable_adapter_layers(True)
            for p, flag in flags:
                p.requires_grad_(flag)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        _warn_already_merged(self.adapter_model, adapter_names)
        self.adapter_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.adapter_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        _warn_already_merged(self.adapter_model, adapter_names)
        return self.adapter_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.adapter_model.unload()

    def update_and_allocate(self, global_step: int) -> None:
        self.adapter_model.update_and_allocate(global_step)

    def regularization_loss(self) -> torch.Tensor | None:
        return self.adapter_model.regularization_loss()

    # ---- running the model --------------------------------------------------------------------
    def forward(self, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None = None,
                adapter_names: list[str] | None = None) -> Any:
        """The model's forward through its adapter layers. ``task_ids`` (one per row) reach every adapter layer for
        this call (``AdapterModel.row_inputs``); methods that do not route by task ignore them (as PEFT)."""
        with self._mixed_batch(adapter_names), self.adapter_model.row_inputs(task_ids), \
                self._activated(args, kwargs, adapter_names):
            outputs = self.adapter_model.model(*args, **kwargs)
        return self.adapter_model.add_regularization(outputs)  # e.g. AdaLoRA's penalty, when a loss is returned

    def generate(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None = None) -> Any:
        """The model's ``generate``; ``task_ids`` in ``kwargs`` (one per input row) go to the adapter layers, as in
        :meth:`forward`, not to ``generate``."""
        with self._mixed_batch(adapter_names), self.adapter_model.row_inputs(kwargs.pop("task_ids", None)), \
                self._activated(args, kwargs, adapter_names):
            return self.adapter_model.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _activated(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None) -> Iterator[None]:
        """Every distinct ``activate`` hook of the methods this model holds, held for one call (LoRA's: aLoRA's
        invocation offsets, which may pop ``alora_offsets`` from ``kwargs`` before the model sees them)."""
        types = dict.fromkeys(c.peft_type for c in self.peft_config.values())
        hooks = dict.fromkeys(h for h in (method_for(t).hooks.activate for t in types) if h is not None)
        with ExitStack() as stack:
            for activate in hooks:
                stack.enter_context(activate(self.peft_model, args, kwargs, adapter_names))
            yield

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if self.peft_model.training:
            raise ConfigError("Cannot pass `adapter_names` when the model is in training mode. (mixed-adapter "
                              "batches are for inference: call model.eval() first.)")
        unknown = sorted({n for n in adapter_names if n != "__base__" and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. This model "
                                   f"has {sorted(self.peft_config)}; use '__base__' for rows without an adapter")
        layers = [m for m in self.peft_model.modules() if hasattr(m, "row_adapters")]
        for layer in layers:
            layer.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            # LoRA layers keep their adapter slots across calls (refilled when an adapter's tensors change, freed
            # by delete_adapter), so repeated calls -- every decoding step of `deltatune serve` -- do not restack.
            for layer in layers:
                layer.row_adapters = None

    # ---- files -----------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, save_embedding_layers: bool | str = "auto"
                           ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys, with the embedding layers when asked (see
        ``PeftModel.get_adapter_state_dict``) and the method's ``before_save`` hook applied."""
        config = self.peft_config[adapter_name]
        method = method_for(config.peft_type)
        state = adapter_state_dict(self.peft_model, adapter_name, method.containers, getattr(config, "bias", "none"),
                                   method.file_suffixes)
        state.update(self._embedding_state(config, save_embedding_layers))
        return method.hooks.before_save(self.peft_model, adapter_name, state) if method.hooks.before_save else state

    def _embedding_state(self, config: PeftConfig, save_embedding_layers: bool | str) -> dict[str, torch.Tensor]:
        targets = getattr(config, "target_modules", None) or ()
        targeted = any(k in targets for k in ("embed_tokens", "lm_head"))
        if save_embedding_layers == "auto":
            # Trainable tokens exist to avoid filing the whole embedding (PEFT's rule too).
            tokens = config.peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None)
            save_embedding_layers = targeted and not tokens
        base = self.model
        if save_embedding_layers and not hasattr(base, "get_input_embeddings"):  # PEFT's warning, verbatim
            warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                          stacklevel=4)
        if not save_embedding_layers or not hasattr(base, "get_input_embeddings"):
            return {}
        out: dict[str, torch.Tensor] = {}
        state = self.peft_model.state_dict()
        layers = [base.get_input_embeddings(), getattr(base, "get_output_embeddings", lambda: None)()]
        for layer in [m for m in layers if m is not None]:
            module_name = next((n for n, m in self.peft_model.named_modules() if m is layer), None)
            if module_name is None:
                continue
            # Within an adapted layer, the frozen weight is ``<name>.base_layer.weight``.
            adapted = isinstance(layer, AdapterLayer) or module_name.endswith(".base_layer")
            if targeted and not adapted:
                continue  # with embeddings among the targets, PEFT files only the adapted ones
            prefix = module_name.removesuffix(".base_layer")
            out.update({k: v for k, v in state.items() if k.startswith(prefix + ".base_layer.")
                        or k == prefix + ".weight"})
        return out

    def load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load a file's tensors (PEFT's keys) into ``adapter_name``; every key and shape is checked first."""
        config = self.peft_config[adapter_name]
        method = method_for(config.peft_type)
        containers = method.containers
        if method.hooks.from_file is not None:  # e.g. RandLoRA: PEFT's per-layer copies of the shared bases
            weights = method.hooks.from_file(config, dict(weights))
        model_state = to_model_keys(self.peft_model, weights, adapter_name, containers, method.file_suffixes)
        check_and_load(self.peft_model, model_state, adapter_name, containers, config.base_model_name_or_path)

    @staticmethod
    def loading(config: PeftConfig) -> AbstractContextManager:
        """Held while a saved adapter is built from ``config``, before its tensors are loaded: the method's ``loading``
        hook (LoRA: skip initialisations the file overwrites, so nothing of the base changes before the file is
        checked), else nothing. Returned as is, not wrapped, so the hook's warnings point at the loader's caller."""
        hook = method_for(config.peft_type).hooks.loading
        return hook(config) if hook is not None else nullcontext()


def _adapted_module_names(adapter_model: AdapterModel, adapter_name: str | None = None) -> list[str]:
    """Names (within the user's model) of the layers holding ``adapter_name`` (any adapter when ``None``)."""
    return [name for name, layer in adapter_model.adapter_layers()
            if adapter_name is None or adapter_name in layer.adapter_names()]


def _warn_unmatched_patterns(adapter_model: AdapterModel, adapter_name: str, config: PeftConfig) -> None:
    """PEFT's warning for ``rank_pattern``/``alpha_pattern`` keys that match none of the adapted layers (a typo
    there silently trains every layer with the default ``r``/``alpha``). Keys match as PEFT's: the end of a name."""
    if config.peft_type == "ADALORA":  # its rank_pattern is written by training ({module.lora_E: [bool]})
        return
    names = _adapted_module_names(adapter_model, adapter_name)
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None) or {}
        unmatched = sorted(k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n in names))
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", PeftRuntimeWarning, stacklevel=5)


def _warn_already_merged(adapter_model: AdapterModel, adapter_names: list[str] | None) -> None:
    """PEFT's warning when merging adapters that are already merged (they are skipped, not added twice)."""
    merged: list[str] = []
    for _, layer in adapter_model.adapter_layers():
        merged += [n for n in layer.merged_adapters if n not in merged]
    if not merged:
        return
    wanted = adapter_model.active_adapters if adapter_names is None else list(adapter_names)
    todo = [n for n in wanted if n not in merged]
    if todo:
        warnings.warn(f"Already following adapters were merged {','.join(merged)}. You are now additionally "
                      f"merging {','.join(todo)}.", PeftWarning, stacklevel=4)
    else:
        warnings.warn("All adapters are already merged, nothing to do.", PeftWarning, stacklevel=4)


__all__ = ["WeightTuner"]
