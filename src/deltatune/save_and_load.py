"""PEFT's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` for deltatune models.

Code written for PEFT (training loops, FSDP/accelerate helpers, weight-sync callbacks) moves an adapter with these
two functions. ``peft``'s own versions do not see a deltatune adapter: PEFT finds the adapter's tensors by walking
the model for instances of its own layer classes (``peft.tuners.tuners_utils.BaseTunerLayer``), and deltatune's
layers are not those classes (deltatune never imports ``peft``), so ``peft.get_peft_model_state_dict(model)``
returns ``{}`` for a deltatune model. Import these instead::

    from deltatune import get_peft_model_state_dict, set_peft_model_state_dict

They take PEFT's arguments and return / accept the keys of PEFT's ``adapter_model.safetensors`` (adapter name
removed), so a state dict moves between the two libraries unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules.module import _IncompatibleKeys

from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.peft_model import PeftModel


def _peft_model(model: Any) -> PeftModel:
    if isinstance(model, PeftModel):
        return model
    if type(model).__module__.split(".")[0] == "peft":
        raise ConfigError(f"got a peft.{type(model).__name__}; use peft.get_peft_model_state_dict for peft's models "
                          "(deltatune's functions read deltatune models)")
    raise ConfigError(f"expected a deltatune PeftModel, got {type(model).__name__}; wrap it with "
                      "deltatune.get_peft_model first (or unwrap DDP/FSDP/compile: pass model.module)")


def _known_adapter(model: PeftModel, adapter_name: str) -> None:
    if adapter_name not in model.peft_config:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}")


@contextlib.contextmanager
def _state_dict_is(model: PeftModel, state_dict: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block ``model.state_dict()`` returns ``state_dict`` (a caller's, e.g. gathered from FSDP shards)."""
    if state_dict is None:
        yield
        return
    model.__dict__["state_dict"] = lambda *args, **kwargs: state_dict  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.__dict__["state_dict"]


def get_peft_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys of PEFT's adapter files, as ``peft.get_peft_model_state_dict``.

    Args:
        model: A deltatune ``PeftModel`` (unwrapped from DDP/FSDP: ``model.module``).
        state_dict: Take the tensors from this state dict of ``model`` (keys as ``model.state_dict()``'s) instead
            of from the model, e.g. a full state dict gathered from FSDP shards.
        adapter_name: Which adapter.
        unwrap_compiled: Look through ``torch.compile``'s wrapper (``_orig_mod``).
        save_embedding_layers: Also return the full input/output embeddings; ``"auto"`` when ``target_modules``
            names them, as PEFT.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    model = _peft_model(model)
    _known_adapter(model, adapter_name)
    with _state_dict_is(model, state_dict):
        return model.get_adapter_state_dict(adapter_name, save_embedding_layers)


def set_peft_model_state_dict(model: Any, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load a state dict with PEFT's file keys into ``adapter_name``, as ``peft.set_peft_model_state_dict``.

    Unlike PEFT's version the load is checked: a tensor for a module the model lacks, a shape that does not fit,
    or a missing adapter tensor raises ``AdapterLoadError`` and leaves the model unchanged; so the returned
    ``missing_keys`` / ``unexpected_keys`` (PEFT returns ``load_state_dict(strict=False)``'s) are always empty.
    ``ignore_mismatched_sizes=True`` is refused (the checked load is the point); ``low_cpu_mem_usage`` changes
    nothing here (the adapter exists already, its tensors are copied in place).
    """
    del low_cpu_mem_usage
    model = _peft_model(model)
    _known_adapter(model, adapter_name)
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True is not supported: deltatune refuses a tensor whose shape "
                          "does not fit; load the adapter into the base model it was trained on")
    model._load_weights(dict(peft_model_state_dict), adapter_name)
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _base_key(root: torch.nn.Module, key: str) -> str | None:
    """``key`` of ``root.state_dict()`` as the unadapted model names it, or ``None`` for an adapter's tensor.

    Walks the key's path: inside an adapter layer only ``base_layer`` leads to the base model (and is dropped from
    the name); inside a ``modules_to_save`` wrapper only ``original_module`` does; a wrapper that only holds an
    adapter layer (``collapse_into``, e.g. trainable tokens beside LoRA) is dropped from the name too.
    """
    module = root
    kept: list[str] = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i == len(parts) - 1:  # the tensor's own name
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                return None  # a tensor the adapter layer itself holds
            kept.append(part)
            break
        if isinstance(module, AdapterLayer):
            if part != "base_layer":
                return None
        elif isinstance(module, ModulesToSaveWrapper):
            if part != "original_module":
                return None
        elif part != getattr(module, "collapse_into", None):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors under the names the model had before adapters were added (PEFT's
    ``get_base_model_state_dict``): adapter tensors and the trained ``modules_to_save`` copies are left out, and
    ``base_layer`` / ``original_module`` are taken out of the names, so the dict loads into the plain model.

    Merged adapters are in the base weights and so in this dict; unmerge first for the pre-training weights.
    """
    model = _peft_model(model)
    root = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for key, value in root.state_dict().items():
        base = _base_key(root, key)
        if base is not None:
            out[base] = value
    return out


__all__ = ["get_base_model_state_dict", "get_peft_model_state_dict", "set_peft_model_state_dict"]
