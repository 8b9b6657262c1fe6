"""State-dict keys in files versus in the model.

In the model every adapter tensor sits under its adapter's name (``<m>.lora_A.<adapter>.weight``);
in files the name is dropped (``<m>.lora_A.weight``), the adapter's folder says which one it is.
``modules_to_save`` copies are filed under the original module's key. These are PEFT's rules.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.errors import AdapterLoadError


def _wrapper_paths(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def adapter_state_dict(model: nn.Module, adapter_name: str, containers: tuple[str, ...], bias: str = "none",
                       file_suffixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under their file keys (``model`` is the ``PeftModel``)."""
    state = model.state_dict()
    file_suffixes = file_suffixes or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in containers and parts[i + 1] == adapter_name:
                file_key = ".".join(parts[: i + 1] + parts[i + 2 :])
                for internal, external in file_suffixes.items():
                    if file_key.endswith("." + internal):
                        file_key = file_key[: -len(internal)] + external
                out[file_key] = value
                break
            if part == "modules_to_save" and parts[i + 1] == adapter_name:
                out[".".join(parts[:i] + parts[i + 2 :])] = value
                break
    if bias != "none":
        adapted = _wrapper_paths(model, AdapterLayer)
        for key, value in state.items():
            parts = key.split(".")
            if not key.endswith(".bias") or any(c in parts for c in containers):
                continue
            if "modules_to_save" in parts:
                # PEFT's bias="all" also files the copies' biases (adapter name dropped); so do we.
                i = parts.index("modules_to_save")
                if bias != "all" or parts[i + 1] != adapter_name:
                    continue
                out[".".join(parts[: i + 1] + parts[i + 2 :])] = value
                continue
            owner = key[: -len(".bias")]
            if bias == "all" or (owner.endswith(".base_layer") and owner[: -len(".base_layer")] in adapted):
                out[key] = value
    return out


def to_model_keys(model: nn.Module, file_state: dict[str, torch.Tensor], adapter_name: str,
                  containers: tuple[str, ...], file_suffixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename file keys to the model's keys for ``adapter_name`` (inverse of :func:`adapter_state_dict`)."""
    mts = sorted(_wrapper_paths(model, ModulesToSaveWrapper), key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in file_state.items():
        for internal, external in (file_suffixes or {}).items():
            if key.endswith("." + external) and not key.endswith("." + internal):
                key = key[: -len(external)] + internal
        parts = key.split(".")
        hit = next((i for i, p in enumerate(parts) if p in containers), None)
        if hit is not None:
            out[".".join(parts[: hit + 1] + [adapter_name] + parts[hit + 1 :])] = value
            continue
        owner = next((p for p in mts if key.startswith(p + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if rest.startswith("original_module."):
                out[key] = value  # PEFT writes these with bias="all"; they equal the frozen original
            elif rest.startswith("modules_to_save."):
                out[f"{owner}.modules_to_save.{adapter_name}.{rest[len('modules_to_save.'):]}"] = value
            else:
                out[f"{owner}.modules_to_save.{adapter_name}.{rest}"] = value
            continue
        out[key] = value
    return out


def _belongs_to(key: str, adapter_name: str, containers: tuple[str, ...]) -> bool:
    """Whether model key ``key`` is a tensor of ``adapter_name`` (whole key parts, so ``default`` does not
    also claim ``default2``'s tensors)."""
    parts = key.split(".")
    return any((p in containers or p == "modules_to_save") and parts[i + 1] == adapter_name
               for i, p in enumerate(parts[:-1]))


def check_and_load(model: nn.Module, model_state: dict[str, torch.Tensor], adapter_name: str,
                   containers: tuple[str, ...], base_hint: str | None) -> None:
    """Copy ``model_state`` into ``model`` after checking every key and shape; on error nothing changes.

    Raises:
        AdapterLoadError: a tensor names a module the model lacks, has the wrong shape, or the file
            lacks tensors the adapter needs. The message names the module, both shapes and the base
            model the adapter was trained on.
    """
    own = model.state_dict(keep_vars=True)
    trained_on = f" It was trained on {base_hint!r}." if base_hint else ""
    unexpected = [k for k in model_state if k not in own]
    if unexpected:
        modules = sorted({k.rsplit(".", 2)[0] for k in unexpected})
        raise AdapterLoadError(
            f"the adapter has tensors for modules this model does not have: {modules[:5]}"
            f"{' ...' if len(modules) > 5 else ''}.{trained_on} Load it into that base model."
        )
    for key, value in model_state.items():
        if own[key].shape != value.shape:
            module = key.split(f".{adapter_name}.")[0] if f".{adapter_name}." in key else key.rsplit(".", 1)[0]
            raise AdapterLoadError(
                f"shape mismatch at {module.removeprefix('base_model.model.')}: the adapter file has "
                f"{tuple(value.shape)}, this model needs {tuple(own[key].shape)} ({key}).{trained_on} "
                "Load it into the base model it was trained on."
            )
    needed = [k for k in own if _belongs_to(k, adapter_name, containers)]
    missing = [k for k in needed if k not in model_state]
    if missing:
        raise AdapterLoadError(
            f"the adapter file lacks {len(missing)} tensor(s) its config implies, e.g. {missing[:3]}; "
            "the file is incomplete or belongs to another adapter_config.json"
        )
    with torch.no_grad():  # not through `.data`: the copy must bump each tensor's version (adapter slots read it)
        for key, value in model_state.items():
            if own[key].is_meta:  # created empty (inject_adapter_in_model(low_cpu_mem_usage=True)): take the file's
                _assign(model, key, own[key], value.to(own[key].dtype))
            else:
                own[key].copy_(value.to(own[key].dtype))


def _assign(model: nn.Module, key: str, old: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` in place of the (meta) tensor ``key`` of ``model``: a new parameter with the old one's
    ``requires_grad``, or a buffer."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def remap_keys(weights: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """A file's tensors with ``key_mapping`` (``{regex: replacement}``, PEFT's ``key_mapping`` and transformers'
    ``_checkpoint_conversion_mapping``) applied to each key without its ``base_model.model.`` / ``base_model.``
    prefix, the first pattern that matches winning; the prefix is put back. For checkpoints saved before a model's
    modules were renamed (transformers moved vision-language models' language model under ``model.``)."""
    if not key_mapping:
        return weights
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            renamed, hits = re.subn(pattern, replacement, rest)
            if hits:
                rest = renamed
                break
        out[prefix + rest] = value
    return out
