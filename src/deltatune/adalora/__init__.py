"""AdaLoRA: the config, the SVD layer, the rank allocator, and the registry entry.

Training drives the allocation: call ``model.update_and_allocate(step)`` after every ``optimizer.step()``
(before ``zero_grad()``; the deltatune trainer does, and :class:`AdaLoraCallback` does it for
``transformers.Trainer``). ``forward`` adds the orthogonality penalty to ``outputs.loss`` in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.adalora.allocator import (
    RankAllocator,
    normalized_pattern,
    orthogonal_penalty,
)
from deltatune.adalora.config import AdaLoraConfig
from deltatune.adalora.layer import AdaLoraLayer, make_adalora_layer, supported_types
from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError
from deltatune.registry import Hooks, Method

# PEFT's AdaLoRA defaults (they differ from LoRA's for t5, bart, opt, roberta, deberta-v2).
DEFAULT_ADALORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


# ---- finding the adapter's layers -------------------------------------------------------------------
def adalora_layers(adapter_model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    """``(module name, layer)`` of every layer holding ``adapter_name``, in module order."""
    return [(name, layer) for name, layer in adapter_model.adapter_layers()
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_E]


def trainable_adapter(adapter_model: nn.Module) -> str | None:
    """The one AdaLoRA adapter being trained (``inference_mode=False``), if any."""
    for name, config in adapter_model.peft_config.items():
        if config.peft_type == PeftType.ADALORA and not config.inference_mode:
            return name
    return None


# ---- registry hooks --------------------------------------------------------------------------------
def init_shared(adapter_model: nn.Module, adapter_name: str, config: AdaLoraConfig,
                target_names: list[str]) -> dict:
    """Refuse a second trainable AdaLoRA adapter; give a trainable one its allocator."""
    if config.inference_mode:
        return {"allocator": None}
    others = [n for n, c in adapter_model.peft_config.items()
              if n != adapter_name and c.peft_type == PeftType.ADALORA and not c.inference_mode]
    if others:
        raise ConfigError(
            f"AdaLoraModel supports only 1 trainable adapter: {others[0]!r} is already trainable; add {adapter_name!r} "
            "with inference_mode=True (or load it with is_trainable=False), or delete_adapter() the other first"
        )
    return {"allocator": RankAllocator(adapter_name, config)}


def create_or_update(target: nn.Module, adapter_name: str, config: AdaLoraConfig, module_name: str,
                     allocator: RankAllocator | None = None) -> AdaLoraLayer | None:
    """Add ``adapter_name`` to ``target`` with ``init_r`` triplets, or ``sum(keep)`` when the config's
    ``rank_pattern`` names this layer (a saved adapter holds only its kept triplets)."""
    layer = target if isinstance(target, AdaLoraLayer) else make_adalora_layer(target)
    if layer is None:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(
        adapter_name,
        init_r=config.init_r,
        keep=normalized_pattern(config.rank_pattern or {}, adapter_name).get(module_name),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=config.init_lora_weights,
        allocator=allocator,
    )
    return layer


def step_hook(adapter_model: nn.Module, global_step: int) -> None:
    """One allocation step for the trainable AdaLoRA adapter (see :class:`RankAllocator`)."""
    name = trainable_adapter(adapter_model)
    if name is None:
        return
    if isinstance(global_step, torch.Tensor):
        global_step = int(global_step.item())
    if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
        raise ConfigError(f"update_and_allocate(global_step): global_step must be an integer >= 0 (optimizer "
                          f"steps taken so far), got {global_step!r}")
    layers = adalora_layers(adapter_model, name)
    if layers:
        layers[0][1].allocator[name].update_and_allocate(layers, global_step)


def loss_hook(adapter_model: nn.Module) -> torch.Tensor | None:
    """``orth_reg_weight · R`` for the trainable AdaLoRA adapter while it is active (PEFT's ``forward``)."""
    name = trainable_adapter(adapter_model)
    if name is None or name not in adapter_model.active_adapters:
        return None
    weight = adapter_model.peft_config[name].orth_reg_weight
    if weight == 0:
        return None
    penalty = orthogonal_penalty(adalora_layers(adapter_model, name), name)
    return None if penalty is None else weight * penalty


def save_hook(peft_model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice ``P, Λ, Q`` to the kept triplets of ``rank_pattern`` and write the pattern in PEFT's file form
    (``{"<module>.lora_E": [keep, ...]}``, ``init_r`` flags, adapter name dropped), as PEFT does when it saves."""
    config = peft_model.peft_config[adapter_name]
    if not config.rank_pattern:
        return state
    pattern = normalized_pattern(config.rank_pattern, adapter_name)
    config.rank_pattern = {f"{module}.lora_E": keep for module, keep in pattern.items()}
    state = dict(state)
    for module, layer in adalora_layers(peft_model.base_model, adapter_name):
        keep = layer.held_pattern(adapter_name, pattern[module]) if module in pattern else None
        if keep is None or all(keep):
            continue  # no entry, or every triplet this layer holds is kept
        prefix = f"base_model.model.{module}."  # PeftModel -> AdapterModel.model -> the user's model
        index = torch.tensor(keep, dtype=torch.bool, device=state[prefix + "lora_A"].device)
        state[prefix + "lora_A"] = state[prefix + "lora_A"][index]
        state[prefix + "lora_E"] = state[prefix + "lora_E"][index]
        state[prefix + "lora_B"] = state[prefix + "lora_B"][:, index]
    return state


def training_state(model: nn.Module) -> dict[str, Any]:
    """What an exact resume needs beyond the tensors, for AdaLoRA adapters of ``model`` (a ``PeftModel`` or its
    tuner): the ``rank_pattern`` the allocator writes into each config, and each trainable adapter's allocator
    (importance averages, the schedule's step), public attributes only (private ones hold object ids of this
    process's layers). The trainer's checkpoint form: ``{"configs": {name: {"rank_pattern": ...}}, "allocators":
    {name: {...}}}``."""
    state: dict[str, Any] = {"configs": {}, "allocators": {}}
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        if config.peft_type == PeftType.ADALORA and config.rank_pattern is not None:
            state["configs"][name] = {"rank_pattern": config.rank_pattern}
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for adapter, allocator in module.allocator.items():
                if allocator is not None and adapter not in state["allocators"]:
                    state["allocators"][adapter] = {k: v for k, v in vars(allocator).items()
                                                    if k != "config" and not k.startswith("_")}
    return state


def restore_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`training_state` took: the configs' ``rank_pattern`` and the allocators' attributes
    (each shared allocator once)."""
    configs = getattr(model, "peft_config", None) or {}
    for name, values in state.get("configs", {}).items():
        if name in configs:
            for key, value in values.items():
                setattr(configs[name], key, value)
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for adapter, allocator in module.allocator.items():
                if allocator is not None and adapter in state.get("allocators", {}) and id(allocator) not in done:
                    vars(allocator).update(state["allocators"][adapter])
                    done.add(id(allocator))


ADALORA = Method(
    peft_type=PeftType.ADALORA,
    config_cls=AdaLoraConfig,
    prefix="lora_",
    layer_cls=AdaLoraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_ADALORA_TARGETS,
    cli_names={"adalora": {}},
    hooks=Hooks(
        init_shared=init_shared,
        regulariser=loss_hook,
        step=step_hook,
        before_save=save_hook,
        training_state=training_state,  # the trainer's exact resume (was its duck-typed ``allocator`` walk)
        restore_training_state=restore_training_state,
        rank_container="lora_A",
    ),
    mixed=True,  # may share layers with other methods in a PeftMixedModel
)
AdaLoraModel = tuner_class(ADALORA)  # PEFT's tuner class (isinstance of base_model)



def __getattr__(name: str):
    # transformers.TrainerCallback takes seconds to import: load the callback only when asked for.
    if name == "AdaLoraCallback":
        from deltatune.adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADALORA", "AdaLoraModel", "AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "RankAllocator"]
