"""TinyLoRA: the config, the layer, the trained vectors shared by weight-tying groups, and the registry entry.

What is shared across layers is trained, not random: each weight-tying group of targets has one vector ``v``, held
once by the model (``base_model.tinylora_v.<adapter>.<group>``, PEFT's file key ``base_model.tinylora_v.<group>``);
the frozen random tensors ``P`` are each layer's own (seeded by its index), kept in
:class:`~deltatune.core.projections.ProjectionDict` containers on the layer and saved by ``save_projection``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.layer import AdapterLayer
from deltatune.core.projections import first_sharer
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import ConfigTypeError, TargetModuleError
from deltatune.registry import Hooks, Method
from deltatune.tinylora.config import TinyLoraConfig
from deltatune.tinylora.layer import TinyLoraLayer, supported_types

VECTORS = "tinylora_v"
FROZEN = ("tinylora_A", "tinylora_B", "tinylora_P")


def _check_save_projection(adapter_model: nn.Module, adapter_name: str, config: TinyLoraConfig) -> None:
    """PEFT's rule for a further TinyLoRA adapter: ``save_projection`` must be the same for all (each layer's ``P``
    of every adapter sit in one container, saved or not as a whole in PEFT). Its seed may differ.

    Raises:
        ConfigTypeError: it differs (a ``TypeError``, as PEFT raises; its sentence first).
    """
    found = first_sharer(adapter_model, adapter_name, config)
    if found is None or found[1].save_projection == config.save_projection:
        return
    first, first_config = found
    values = sorted({config.save_projection, first_config.save_projection})
    raise ConfigTypeError(
        "TinyLoRA projection tensors must be saved for all adapters or none, but got multiple different values: "
        f"{values}. TinyLoRA adapter {adapter_name!r} has save_projection={config.save_projection} but adapter "
        f"{first!r} has {first_config.save_projection}; use save_projection={first_config.save_projection}"
    )


def groups_of(count: int, weight_tying: float) -> list[int]:
    """The weight-tying group of each of ``count`` targets (model order), PEFT's rule: ``g = max(1, round(count (1 -
    weight_tying)))`` groups of ``count // g`` consecutive targets, the remainder in the last group."""
    num_groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // num_groups)
    return [min(k // size, num_groups - 1) for k in range(count)]


def _new_vector(config: TinyLoraConfig, like: torch.Tensor) -> nn.Parameter:
    """``v: (u,)`` drawn in the base weight's dtype (as PEFT, so a uniform draw gives its numbers), kept in float32
    over a half-precision base; zeros for ``init_weights=True``, ``U(-init_v_bound, init_v_bound)`` otherwise."""
    v = torch.empty(config.u, dtype=like.dtype if like.is_floating_point() else None, device=like.device)
    with torch.no_grad():
        if config.init_weights is True:
            v.zero_()
        else:  # "uniform"; False: PEFT leaves memory uninitialised, any values do: the same draw, never NaN
            v.uniform_(-config.init_v_bound, config.init_v_bound)
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    return nn.Parameter(v)


def init_shared(adapter_model: nn.Module, adapter_name: str, config: TinyLoraConfig,
                target_names: list[str]) -> dict[str, object]:
    """Before any layer is wrapped: PEFT's ``save_projection`` rule, then ``adapter_name``'s vectors, one per group of
    its targets, in the model's ``tinylora_v`` (created on first use). Returns, for :func:`create_or_update`, the
    container and each target's ``(index, group)``."""
    if not target_names:
        raise TargetModuleError("TinyLoRA found no layer to adapt; check target_modules")
    _check_save_projection(adapter_model, adapter_name, config)
    container = adapter_model._modules.get(VECTORS)
    if container is None:
        container = nn.ModuleDict()
        setattr(adapter_model, VECTORS, container)
    first = adapter_model.model.get_submodule(target_names[0])
    like = (first.get_base_layer() if isinstance(first, AdapterLayer) else first).weight
    groups = groups_of(len(target_names), config.weight_tying)
    # Drawn in group order, which is the order PEFT meets them in the model: a uniform init gives its numbers.
    container[adapter_name] = nn.ParameterDict({str(g): _new_vector(config, like) for g in dict.fromkeys(groups)})
    placement = {name: (k, str(g)) for k, (name, g) in enumerate(zip(target_names, groups, strict=True))}
    return {"vectors": container, "placement": placement}


def create_or_update(target: nn.Module, adapter_name: str, config: TinyLoraConfig, module_name: str,
                     vectors: nn.ModuleDict, placement: dict[str, tuple[int, str]]) -> TinyLoraLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a TinyLoRA layer already)."""
    index, group = placement[module_name]
    if isinstance(target, TinyLoraLayer):
        layer = target  # keeps the index it was first wrapped with: P's seed (PEFT's)
    elif isinstance(target, supported_types()):
        layer = TinyLoraLayer(target, vectors, index)
    else:
        return None
    if not layer.is_embedding and layer.fan_in_fan_out != config.fan_in_fan_out:
        # PEFT's warnings: the flag follows the layer type, so the saved adapter_config.json says what the file holds
        if layer.fan_in_fan_out:
            message = ("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to "
                       "True.")
        else:
            message = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                       "fan_in_fan_out to False.")
        warnings.warn(f"{message} ({module_name})", stacklevel=4)
        config.fan_in_fan_out = layer.fan_in_fan_out
    layer.update_layer(adapter_name, group, r=config.r, u=config.u, projection_seed=config.projection_seed,
                       save_projection=config.save_projection, tinylora_dropout=config.tinylora_dropout)
    return layer


def projections_from_file(config: TinyLoraConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Before a state dict with file keys is loaded: PEFT's warnings about ``P`` and ``save_projection``; with
    ``save_projection=False`` a file's ``P`` are not loaded (the layers' redrawn ones stay, as PEFT's non-persistent
    buffers ignore them). With ``save_projection=True`` a state dict without ``P`` is refused by the checked load
    (``AdapterLoadError`` naming them), where PEFT warns and keeps the redrawn ones."""
    has_projection = any(k.endswith(".tinylora_P") for k in weights)
    if not config.save_projection and has_projection:
        warnings.warn("Specified to not load tinylora_P from state dictionary however they are present in state"
                      " dictionary! Consider using them to ensure checkpoint loading is correct on all platforms using"
                      " `peft_config.save_projection = True`", stacklevel=4)
        weights = {k: v for k, v in weights.items() if not k.endswith(".tinylora_P")}
    elif not config.save_projection:
        warnings.warn("Specified to not load tinylora_P from state dictionary. This means we will be relying on"
                      " PRNG initialisation to restore these projections using `config.projection_seed`, which may"
                      " not be accurate on all system configurations.", stacklevel=4)
    return weights


TINYLORA = Method(
    peft_type=PeftType.TINYLORA,
    config_cls=TinyLoraConfig,
    prefix="tinylora_",
    layer_cls=TinyLoraLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_LORA_TARGETS,  # PEFT's TinyLoRA table is a copy of LoRA's
    cli_names={"tinylora": {}},
    hooks=Hooks(
        cli_shared_skip=("r",),  # the recipes' r=8 is a LoRA rank; TinyLoRA's r is the frozen SVD rank (paper: 2)
        shared_containers=(VECTORS,),
        init_shared=init_shared,
        # The frozen per-layer buffers, saved beside the vectors (PEFT's file keys <module>.tinylora_A, ...): listed
        # so files carry them, and not among the layer's trainable containers.
        extra_containers=FROZEN,
        from_file=projections_from_file,
        rank_container="tinylora_A",  # A: (r, in)
    ),
)
TinyLoraModel = tuner_class(TINYLORA)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["TINYLORA", "TinyLoraConfig", "TinyLoraLayer", "TinyLoraModel"]
