"""RandLoRA: the config, the layer, the shared random bases, and the registry entry.

The bases are shared, seeded and saved (or not) by the machinery VeRA's projections use
(:mod:`deltatune.core.projections`); what is RandLoRA's own is their shapes and draw, the layer's math, and
PEFT's file layout, which also holds a copy of both bases under every adapted layer.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.features import follow_fan_in_fan_out, in_out_features
from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import ProjectionDict, SharedNames, check_shared_settings, first_sharer, share
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.randlora.config import RandLoraConfig
from deltatune.randlora.layer import RandLoraLayer, draw_bases, supported_types
from deltatune.registry import Hooks, Method

BASES = ("randlora_A", "randlora_B")
_NAMES = SharedNames(peft_seed="RandLora", peft_save="RandLora", method="RandLoRA", tensors="random bases")


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a target, looking through an adapter layer already on it."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    in_features, out_features = in_out_features(base)
    return out_features, in_features


def _check_compatible(adapter_model: nn.Module, adapter_name: str, config: RandLoraConfig,
                      shapes: list[tuple[int, int]]) -> None:
    """PEFT's rules for a further RandLoRA adapter, which shares the first one's bases ``A: (r0, 1, d0)``,
    ``B: (D0, n0, r0)``: the same seed and ``save_projection``, every target's larger side within ``D0`` and
    smaller side within ``d0``, and the same ``r`` (checked in PEFT's order, its sentence first). PEFT refuses
    ``r > r0`` too and accepts ``r < r0``, but such an adapter fails in its forward (``λ: (r, n)`` does not
    broadcast against ``A``'s ``r0`` rows), so deltatune refuses it here. All before anything is built."""
    found = first_sharer(adapter_model, adapter_name, config)
    if found is None:
        return
    check_shared_settings(adapter_model, adapter_name, config, _NAMES)
    first = found[0]
    container = adapter_model._modules.get("randlora_A")
    if container is None or first not in container:
        return
    a, b = container[first], adapter_model.randlora_B[first]
    for name, size, need in (("randlora_B", b.shape[0], max(max(s) for s in shapes)),
                             ("randlora_A", a.shape[-1], max(min(s) for s in shapes))):
        if need > size:
            raise ConfigError(
                f"{name} has a size of {size} but {need} or greater is required; this probably happened because an "
                "additional RandLora adapter was added after the first one with incompatible shapes. RandLoRA "
                f"adapter {adapter_name!r} targets a layer whose {'larger' if name == 'randlora_B' else 'smaller'} "
                f"side is {need} but the bases shared with adapter {first!r} cover {size}: add the adapter with the "
                "largest layers first"
            )
    rank = a.shape[0]
    if config.r > rank:
        raise ConfigError(
            f"randlora_A has a size of {rank} but {config.r} or greater is required; this probably happened because "
            "an additional RandLora adapter with a lower rank was added after the first one; loading the adapters in "
            f"reverse order may solve this. RandLoRA adapter {adapter_name!r} has r={config.r} but the bases it "
            f"shares with adapter {first!r} have rank {rank}: use r={rank}"
        )
    if config.r < rank:
        raise ConfigError(
            f"RandLoRA adapter {adapter_name!r} has r={config.r} but the random bases it shares with adapter "
            f"{first!r} have rank {rank}; every RandLoRA adapter of a model needs the first one's r: use r={rank}"
        )


def init_shared(adapter_model: nn.Module, adapter_name: str, config: RandLoraConfig,
                target_names: list[str]) -> dict[str, ProjectionDict]:
    """Draw ``adapter_name``'s bases over all its targets (or share the first adapter's) into the model's
    ``randlora_A``/``randlora_B``; returns them for the layers."""
    shapes = [_shape(adapter_model.model.get_submodule(n)) for n in target_names]
    if not shapes:
        raise TargetModuleError("No layers types compatible with RandLora were found. Please check "
                                "`peft_config.target_modules`. (RandLoRA adapts linear layers and GPT-2's Conv1D.)")
    _check_compatible(adapter_model, adapter_name, config, shapes)
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    return share(adapter_model, adapter_name, config, BASES,
                 lambda: draw_bases(config.r, out_max, in_max, config.projection_prng_key, config.sparse,
                                    config.very_sparse))


def create_or_update(target: nn.Module, adapter_name: str, config: RandLoraConfig, module_name: str,
                     randlora_A: ProjectionDict, randlora_B: ProjectionDict) -> RandLoraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a RandLoRA layer already)."""
    if isinstance(target, RandLoraLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = RandLoraLayer(target, randlora_A, randlora_B)
    else:
        return None
    follow_fan_in_fan_out(layer, config, module_name)
    layer.update_layer(adapter_name, r=config.r, randlora_alpha=config.randlora_alpha,
                       randlora_dropout=config.randlora_dropout, init_weights=config.init_weights)
    return layer


def _layer_keys(peft_model: nn.Module, adapter_name: str) -> list[str]:
    """File-key prefixes of the layers holding ``adapter_name`` (``base_model.model.<path>``)."""
    return [name for name, module in peft_model.named_modules()
            if isinstance(module, RandLoraLayer) and adapter_name in module.randlora_lambda]


def add_layer_copies(peft_model: nn.Module, adapter_name: str, file_state: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """PEFT's file layout: with ``save_projection`` its files hold both bases under every adapted layer too
    (``<layer>.randlora_A``, its layers own a reference to them) beside ``base_model.randlora_A``; PEFT warns of
    missing keys for a file without them, so deltatune writes them too (copies: safetensors refuses aliases)."""
    if f"base_model.{BASES[0]}" not in file_state:
        return file_state
    for prefix in _layer_keys(peft_model, adapter_name):
        for attr in BASES:
            file_state[f"{prefix}.{attr}"] = file_state[f"base_model.{attr}"].clone()
    return file_state


def drop_layer_copies(config: RandLoraConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Before loading a state dict with file keys: without the per-layer copies of the bases PEFT writes (see
    :func:`add_layer_copies`); the model-level ``base_model.randlora_A/B`` are the ones loaded."""
    return {k: v for k, v in weights.items()
            if k.rsplit(".", 1)[-1] not in BASES or k.startswith("base_model.randlora_")}


RANDLORA = Method(
    peft_type=PeftType.RANDLORA,
    config_cls=RandLoraConfig,
    prefix="randlora_",
    layer_cls=RandLoraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's RandLoRA table is a copy of LoRA's
    cli_names={"randlora": {}},
    hooks=Hooks(
        cli_shared_skip=("r",),  # the recipes' r=8 is a LoRA rank; RandLoRA's r is a basis rank (smaller: more values)
        shared_containers=BASES,
        uses_shared_state=False,  # PEFT's RandLoraModel says False: its layers hold the bases too
        init_shared=init_shared,
        before_save=add_layer_copies,
        from_file=drop_layer_copies,
    ),
)
RandLoraModel = tuner_class(RANDLORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["RANDLORA", "RandLoraConfig", "RandLoraLayer", "RandLoraModel"]
