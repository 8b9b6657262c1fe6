"""``XLoraTuner``: what a ``PeftModel`` does with X-LoRA adapters (the registry's ``peft_tuner`` hook).

It has :class:`deltatune.core.weight_tuner.WeightTuner`'s interface (``PeftModel`` never asks which tuner it holds)
around one :class:`deltatune.xlora.model.XLoraModel` (``peft_model.base_model``, PEFT's layout). One X-LoRA adapter
is active at a time; mixed-adapter batches (``adapter_names``) are refused, as the classifier weighs whole
sequences of one adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.core.state_dict import adapter_state_dict, check_and_load, to_model_keys
from deltatune.errors import ConfigError, MergeError
from deltatune.xlora.layer import _MERGE_REFUSAL
from deltatune.xlora.model import XLoraModel

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

CONTAINERS = ("internal_xlora_classifier",)  # the per-adapter tensors filed (the experts stay in their folders)


class XLoraTuner:
    """``PeftModel``'s side of X-LoRA adapters: delegates to the ``XLoraModel`` and runs each call through its two
    passes."""

    def __init__(self, peft_model: PeftModel, xlora_model: XLoraModel) -> None:
        self.peft_model = peft_model
        self.xlora_model = xlora_model

    @staticmethod
    def build(peft_model: PeftModel, model: nn.Module, config: PeftConfig, adapter_name: str,
              autocast_adapter_dtype: bool = True) -> XLoraTuner:
        """Load the experts of ``config`` into ``model`` and create the classifier (``WeightTuner.build``'s
        signature; ``autocast_adapter_dtype`` applies to the experts as LoRA's loader does: float32 over a
        half-precision base)."""
        return XLoraTuner(peft_model, XLoraModel(model, config, adapter_name))

    def peft_modules(self) -> dict[str, nn.Module]:
        return {"base_model": self.xlora_model}

    # ---- what it holds -------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.xlora_model.model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.xlora_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.xlora_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.xlora_model.active_adapters

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules the experts adapt."""
        lora = self.xlora_model.lora_model
        return list(lora.targeted_module_names) if lora is not None else []

    @property
    def adapters_enabled(self) -> bool:
        return not self.xlora_model.disabled

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """No: the update depends on the input."""
        return False

    # ---- adapters ------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Another X-LoRA adapter (its own experts and classifier), not made active; what trains stays as it was."""
        flags = [(p, p.requires_grad) for p in self.peft_model.parameters()]
        self.xlora_model.add_adapter(adapter_name, config)
        for p, flag in flags:
            p.requires_grad_(flag)

    def cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """The classifier is in the model's dtype already (PEFT's); the experts are LoRA's (float32 over half)."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.xlora_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Gradients on (or off) for the classifiers of ``adapter_names`` (and their experts with
        ``use_trainable_adapters``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if requires_grad:
                self.xlora_model.mark_trainable(name)
            else:
                self.xlora_model.internal_xlora_classifier[name].requires_grad_(False)
                self.xlora_model.lora_model.set_requires_grad(self.xlora_model.experts[name], False)

    def mark_trainable(self, adapter_name: str) -> None:
        self.xlora_model.mark_trainable(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.xlora_model.delete_adapter(adapter_name)

    def _remove_adapter(self, adapter_name: str) -> None:
        self.xlora_model._remove_adapter(adapter_name)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Raises ConfigError: only LoRA adapters combine."""
        raise ConfigError("add_weighted_adapter combines LoRA adapters; an X-LoRA adapter weighs its experts per "
                          "token. Combine the experts' own LoRA folders instead")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model (no scaling pass, the experts off, nothing trains)."""
        if self.xlora_model.disabled:  # nested: the outer block re-enables
            yield
            return
        flags = [(p, p.requires_grad) for p in self.xlora_model.parameters()]
        self.xlora_model.disabled = True
        self.xlora_model.refresh()
        try:
            yield
        finally:
            self.xlora_model.disabled = False
            self.xlora_model.refresh()
            for p, flag in flags:
                p.requires_grad_(flag)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise MergeError(_MERGE_REFUSAL)

    def unmerge_adapter(self) -> None:
        """Nothing to do: X-LoRA is never merged."""

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        raise MergeError(_MERGE_REFUSAL)

    def unload(self) -> nn.Module:
        return self.xlora_model.unload()

    def update_and_allocate(self, global_step: int) -> None:
        """No per-step work."""

    def regularization_loss(self) -> torch.Tensor | None:
        return None

    # ---- running the model --------------------------------------------------------------------------------
    @staticmethod
    def _no_mixed_batch(adapter_names: list[str] | None) -> None:
        if adapter_names is not None:
            raise ConfigError("adapter_names (mixed-adapter batches) is not supported for X-LoRA adapters: the "
                              "classifier weighs the experts of one adapter; run one adapter per batch (set_adapter)")

    def forward(self, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None = None,
                adapter_names: list[str] | None = None) -> Any:
        """The scaling pass, then the model with the experts weighted per token; ``task_ids`` are ignored."""
        self._no_mixed_batch(adapter_names)
        with self.xlora_model.mixing():
            return self.model(*args, **kwargs)

    def generate(self, args: tuple, kwargs: dict[str, Any], adapter_names: list[str] | None = None) -> Any:
        """The model's ``generate`` without the key/value cache (both passes read the whole sequence at each step,
        as PEFT's)."""
        self._no_mixed_batch(adapter_names)
        kwargs = {**kwargs, "use_cache": False}
        with self.xlora_model.mixing():
            return self.model.generate(*args, **kwargs)

    # ---- files ---------------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, save_embedding_layers: bool | str = "auto"
                           ) -> dict[str, torch.Tensor]:
        """The classifier's tensors under PEFT's keys (``base_model.internal_xlora_classifier.layers.0.weight``);
        the experts stay in the folders the config names. ``save_embedding_layers`` is accepted for the common
        signature (nothing of the embeddings is trained)."""
        return adapter_state_dict(self.peft_model, adapter_name, CONTAINERS)

    def load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Load the classifier's tensors; every key and shape is checked first.

        PEFT 0.21.2 leaves out of its files every classifier tensor whose key contains an expert's name as a key
        part (``layers.0.weight`` contains ``.0.``, the first expert's name): such a file loads with those tensors
        as created (PEFT does the same, silently), with a :class:`PeftWarning` naming them.

        Raises:
            AdapterLoadError: a tensor that does not fit, or one missing that PEFT does write.
        """
        import warnings

        from deltatune.config import PeftWarning

        config = self.peft_config[adapter_name]
        model_state = to_model_keys(self.peft_model, weights, adapter_name, CONTAINERS)
        own = self.peft_model.state_dict()
        prefix = f"base_model.internal_xlora_classifier.{adapter_name}."
        experts = [str(i) for i in range(len(config.adapters))]
        dropped = [k for k in own if k.startswith(prefix) and k not in model_state
                   and any(f".{e}." in k.replace(prefix, "base_model.internal_xlora_classifier.") for e in experts)]
        if dropped:
            warnings.warn(f"the adapter file has no {[k.replace(prefix, '') for k in dropped]} of the X-LoRA "
                          "classifier (peft 0.21.2 leaves out keys that contain an expert's name, such as '.0.'): "
                          "they keep their initial values, as in peft. Re-save the adapter with deltatune to keep "
                          "them", PeftWarning, stacklevel=4)
            model_state.update({k: own[k] for k in dropped})
        check_and_load(self.peft_model, model_state, adapter_name, CONTAINERS, config.base_model_name_or_path)

    @staticmethod
    def loading(config: PeftConfig) -> AbstractContextManager:
        """Nothing to hold while an X-LoRA adapter is built for loading (its experts load from their folders)."""
        return nullcontext()


__all__ = ["XLoraTuner"]
