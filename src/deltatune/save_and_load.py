"""PEFT's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` for deltatune models.

Code written for PEFT (training loops, FSDP/accelerate helpers, weight-sync callbacks) moves an adapter with these
two functions. ``peft``'s own versions do not see a deltatune adapter: PEFT finds the adapter's tensors by walking
the model for instances of its own layer classes (``peft.tuners.tuners_utils.BaseTunerLayer``), and deltatune's
layers are not those classes (deltatune never imports ``peft``), so ``peft.get_peft_model_state_dict(model)``
returns ``{}`` for a deltatune model. Import these instead::

    from deltatune import get_peft_model_state_dict, set_peft_model_state_dict

They take PEFT's arguments and return / accept the keys of PEFT's ``adapter_model.safetensors`` (adapter name
removed), so a state dict moves between the two libraries unchanged. As PEFT's, they work on any model that holds
deltatune's adapter layers: a ``PeftModel``, a plain model after ``inject_adapter_in_model`` (keys without the
``base_model.model.`` prefix, as that model names its tensors), and either inside a DDP / FSDP(1) wrapper.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from deltatune.config import PeftConfig
from deltatune.core.io import infer_device, load_adapter_weights, resolve_adapter_dir
from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.state_dict import adapter_state_dict, check_and_load, remap_keys, to_model_keys
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.peft_model import PeftModel
from deltatune.registry import METHODS, Method, method_for

_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def _is_fsdp1(model: nn.Module) -> bool:
    """A ``FullyShardedDataParallel`` wrapper (FSDP1). FSDP2's ``fully_shard`` keeps the model's own class, so a
    ``PeftModel`` sharded that way is still a ``PeftModel`` and needs nothing here."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FullyShardedDataParallel)


def _unwrap(model: Any) -> tuple[nn.Module, nn.Module | None]:
    """``(the model that holds the adapters, the FSDP1 wrapper around it or None)``: DDP, ``DataParallel`` and
    DeepSpeed wrappers are looked through (``.module``), as many as there are."""
    fsdp = None
    while not isinstance(model, PeftModel):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        if _is_fsdp1(model):
            fsdp = fsdp or model  # the outermost one gathers every shard
        elif type(model).__name__ not in _PARALLEL_WRAPPERS:
            break
        model = inner
    return model, fsdp


def _adapter_source(model: Any, adapter_name: str) -> tuple[nn.Module, PeftConfig | None, Method]:
    """``(module, config, method)`` for ``adapter_name`` in ``model``.

    ``module`` is the model whose ``state_dict()`` keys the result uses (a ``PeftModel``: ``base_model.model.*``;
    a model that ``inject_adapter_in_model`` changed: its own keys). ``config`` is ``None`` for such a model when
    it carries no ``peft_config`` dict (PEFT's attribute): the method is then told by its layers' classes, and
    ``bias`` counts as ``"none"``.

    Raises:
        ConfigError: a PEFT model, or a model without deltatune adapter layers.
        AdapterNameError: no adapter of that name.
    """
    if isinstance(model, PeftModel):
        if adapter_name not in model.peft_config:
            raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}")
        config = model.peft_config[adapter_name]
        return model, config, (None if model._is_prompt_learning else method_for(config.peft_type))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch model holding deltatune adapters, got {type(model).__name__}")
    if type(model).__module__.split(".")[0] == "peft":
        raise ConfigError(f"got a peft.{type(model).__name__}; use peft.get_peft_model_state_dict for peft's models "
                          "(deltatune's functions read deltatune models)")
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if isinstance(config, PeftConfig):
        return model, config, method_for(config.peft_type)
    layers = [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    if not layers:
        raise ConfigError(f"{type(model).__name__} holds no deltatune adapter layers; add an adapter with "
                          "deltatune.get_peft_model or inject_adapter_in_model first")
    holding = [m for m in layers if adapter_name in m.adapter_names()]
    if not holding:
        names = sorted({n for m in layers for n in m.adapter_names()})
        raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {names}")
    methods = [m for m in METHODS.values() if m.layer_cls is not None and any(isinstance(layer, m.layer_cls)
                                                                           for layer in holding)]
    # A layer of a companion method (trainable tokens beside LoRA) belongs to the method that lists it as extra.
    main = [m for m in methods
            if not any(set(m.containers) <= set(o.hooks.extra_containers) for o in methods if o is not m)]
    if len(main) != 1:
        found = sorted(m.peft_type.value for m in (main or methods)) or ["none (only modules_to_save)"]
        raise ConfigError(f"cannot tell which method adapter {adapter_name!r} uses (layers of: {', '.join(found)}); "
                          "pass the PeftModel, or set model.peft_config = {name: config}")
    return model, None, main[0]


@contextlib.contextmanager
def _state_dict_is(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> Iterator[None]:
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
        model: A deltatune ``PeftModel``, or any model ``inject_adapter_in_model`` put adapters into; either may
            be wrapped in DDP or FSDP(1) (an FSDP wrapper's full state dict is gathered: call it on every rank).
        state_dict: Take the tensors from this state dict of ``model`` (keys as ``model.state_dict()``'s) instead
            of from the model, e.g. a full state dict gathered from FSDP shards.
        adapter_name: Which adapter.
        unwrap_compiled: Look through ``torch.compile``'s wrapper (``_orig_mod``).
        save_embedding_layers: Also return the full input/output embeddings; ``"auto"`` when ``target_modules``
            names them, as PEFT (a ``PeftModel`` only).

    Returns:
        ``{file key: tensor}``; keys as ``model.state_dict()``'s with the adapter name taken out (a ``PeftModel``'s
        start with ``base_model.model.``, an injected model's do not), ``modules_to_save`` copies under the
        original module's key.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    model, fsdp = _unwrap(model)
    if fsdp is not None and state_dict is None:
        state_dict = fsdp.state_dict()  # FSDP's full state dict: every shard gathered, the wrapper's prefix removed
    model, config, method = _adapter_source(model, adapter_name)
    if isinstance(model, PeftModel):
        with _state_dict_is(model, state_dict):
            return model.get_adapter_state_dict(adapter_name, save_embedding_layers)
    with _state_dict_is(model, state_dict):
        return adapter_state_dict(model, adapter_name, method.containers, getattr(config, "bias", "none"),
                                  method.file_suffixes)


def set_peft_model_state_dict(model: Any, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> _IncompatibleKeys:
    """Load a state dict with PEFT's file keys into ``adapter_name``, as ``peft.set_peft_model_state_dict``.

    ``model`` as for :func:`get_peft_model_state_dict` (a ``PeftModel`` or an injected model, maybe in DDP / FSDP(1):
    an FSDP wrapper's parameters are gathered, written and re-sharded; call it on every rank).

    Unlike PEFT's version the load is checked: a tensor for a module the model lacks, a shape that does not fit,
    or a missing adapter tensor raises ``AdapterLoadError`` and leaves the model unchanged; so the returned
    ``missing_keys`` / ``unexpected_keys`` (PEFT returns ``load_state_dict(strict=False)``'s) are always empty.
    ``ignore_mismatched_sizes=True`` is refused (the checked load is the point); ``low_cpu_mem_usage`` changes
    nothing here (the adapter exists already, its tensors are copied in place).
    """
    del low_cpu_mem_usage
    model, fsdp = _unwrap(model)
    model, config, method = _adapter_source(model, adapter_name)
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True is not supported: deltatune refuses a tensor whose shape "
                          "does not fit; load the adapter into the base model it was trained on")
    gathered = contextlib.nullcontext()
    if fsdp is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        gathered = FullyShardedDataParallel.summon_full_params(fsdp, writeback=True)
    with gathered:
        if isinstance(model, PeftModel):
            model._load_weights(dict(peft_model_state_dict), adapter_name)
        else:
            weights = {k.removeprefix("base_model.model."): v for k, v in peft_model_state_dict.items()}
            model_state = to_model_keys(model, weights, adapter_name, method.containers, method.file_suffixes)
            base_hint = getattr(config, "base_model_name_or_path", None)
            check_and_load(model, model_state, adapter_name, method.containers, base_hint)
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


def _base_root(model: Any) -> nn.Module:
    """The module whose tensors are the base model's: a ``PeftModel``'s base, or an injected model itself."""
    model, _ = _unwrap(model)
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch model holding deltatune adapters, got {type(model).__name__}")
    return model


def get_base_model_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors under the names the model had before adapters were added (PEFT's
    ``get_base_model_state_dict``): adapter tensors and the trained ``modules_to_save`` copies are left out, and
    ``base_layer`` / ``original_module`` are taken out of the names, so the dict loads into the plain model.

    ``model``: a ``PeftModel`` or a model ``inject_adapter_in_model`` changed. Merged adapters are in the base
    weights and so in this dict; unmerge first for the pre-training weights.
    """
    root = _base_root(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in root.state_dict().items():
        base = _base_key(root, key)
        if base is not None:
            out[base] = value
    return out


def set_base_model_state_dict(model: Any, state_dict: dict[str, torch.Tensor],
                              strict: bool = True) -> _IncompatibleKeys:
    """Load base-model tensors named as in the plain model (PEFT's ``set_base_model_state_dict``, the inverse of
    :func:`get_base_model_state_dict`): each key is found under the adapter wrappers (``base_layer``,
    ``original_module``); adapter tensors and ``modules_to_save`` copies are not touched.

    Args:
        model: A ``PeftModel`` or a model ``inject_adapter_in_model`` changed.
        state_dict: ``{plain model key: tensor}``, e.g. a checkpoint of the base model.
        strict: Refuse keys the base does not have, or base keys ``state_dict`` lacks (nothing is loaded then).

    Returns:
        ``(missing_keys, unexpected_keys)`` in the plain model's names.

    Raises:
        RuntimeError: ``strict`` and the keys differ (``torch``'s ``load_state_dict`` raises the same type).
    """
    root = _base_root(model)
    own_key = {base: key for key in root.state_dict() if (base := _base_key(root, key)) is not None}
    unexpected = [k for k in state_dict if k not in own_key]
    missing = [k for k in own_key if k not in state_dict]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading the base model's state_dict: missing keys {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}; pass the plain model's state dict (as "
                           "get_base_model_state_dict names it), or strict=False to load the keys that match")
    root.load_state_dict({own_key[k]: v for k, v in state_dict.items() if k in own_key}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None,
                      key_mapping: dict[str, str] | None = None,
                      **hf_hub_download_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (``adapter_model.safetensors``, else ``adapter_model.bin`` read as plain
    tensors), with the file's keys, as PEFT's ``load_peft_weights``.

    Args:
        model_id: The adapter directory (or a hub id, downloaded when online).
        device: Where the tensors go; ``None``: the accelerator if there is one (``deltatune.core.io.infer_device``).
        key_mapping: ``{regex: replacement}`` applied to each key without its ``base_model.model.`` prefix (the
            first pattern that matches wins; the prefix is put back), for checkpoints whose module names changed.
        hf_hub_download_kwargs: ``subfolder`` is used; the other download options are accepted and ignored.

    Raises:
        AdapterFileNotFoundError: no such directory, or it has no adapter weights.
        AdapterLoadError: a corrupt file.
    """
    directory = resolve_adapter_dir(model_id, hf_hub_download_kwargs.get("subfolder"))
    return remap_keys(load_adapter_weights(directory, device or infer_device()), key_mapping)


__all__ = ["get_base_model_state_dict", "get_peft_model_state_dict", "load_peft_weights", "set_base_model_state_dict",
           "set_peft_model_state_dict"]
