"""FRoD: the config, the layer, the projections shared by the layers of one role, and the registry entry."""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn

from deltatune.config import PeftType
from deltatune.core.buffers import BufferDict
from deltatune.core.targeting import DEFAULT_LORA_TARGETS
from deltatune.core.tuner import tuner_class
from deltatune.errors import AdapterLoadError, ConfigError, TargetModuleError
from deltatune.frod.config import FrodConfig
from deltatune.frod.layer import (
    FrodLayer,
    category_from_key,
    layer_index_from_key,
    shared_basis,
    sparse_positions,
    supported_types,
)
from deltatune.registry import Hooks, Method

SHARED = ("frod_V", "frod_s_indices", "frod_s_size")
# PEFT's table for FRoD is VeRA's (LoRA's, but q_proj/v_proj for Phi) plus ViT's query/value
DEFAULT_TARGETS = {**DEFAULT_LORA_TARGETS, "phi": ["q_proj", "v_proj"], "vit": ["query", "value"]}


def _check_compatible(adapter_model: nn.Module, adapter_name: str, config: FrodConfig) -> None:
    """PEFT's rules for a further FRoD adapter on one model (its sentences first): the same
    ``projection_prng_key`` (so ``S``'s positions are the same), and ``save_projection`` and
    ``runtime_offload_base_weight`` the same for all adapters."""
    others = {n: c for n, c in adapter_model.peft_config.items()
              if n != adapter_name and c.peft_type == config.peft_type}
    for name, other in others.items():
        if other.projection_prng_key != config.projection_prng_key:
            raise ConfigError(
                "FRoD projection initialization key must be the same for all adapters. Got "
                f"config.projection_prng_key={config.projection_prng_key} but previous config had "
                f"{other.projection_prng_key}. (FRoD adapter {adapter_name!r} against {name!r}: use "
                f"projection_prng_key={other.projection_prng_key})"
            )
    for field, what in (("save_projection", "FRoD projection weights must be saved"),
                        ("runtime_offload_base_weight", "FRoD runtime base-weight offloading must be enabled")):
        values = sorted({getattr(c, field) for c in others.values()} | {getattr(config, field)})
        if len(values) > 1:
            raise ConfigError(f"{what} for all adapters or none, but got multiple different values: {values}. "
                              f"(FRoD adapter {adapter_name!r} has {field}={getattr(config, field)}; give every "
                              "FRoD adapter of this model the same value)")


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """``W: (out, in)`` of a linear layer (``Conv1D``'s transposed; a FRoD layer's base), else ``None``."""
    base = module.get_base_layer() if isinstance(module, FrodLayer) else module
    if isinstance(base, nn.Linear):
        return base.weight
    if isinstance(base, supported_types()):  # Conv1D: W stored (in, out)
        return base.weight.T
    return None


def init_shared(adapter_model: nn.Module, adapter_name: str, config: FrodConfig,
                target_names: list[str]) -> dict[str, nn.ModuleDict]:
    """Build ``adapter_name``'s projections before any layer is wrapped: per role (:func:`category_from_key`) the
    basis ``V`` from that role's weights in block order (:func:`shared_basis`) and ``S``'s positions, drawn from one
    generator seeded with ``projection_prng_key`` over the roles in sorted order (PEFT's draws). Stored in the
    model's ``frod_V`` / ``frod_s_indices`` / ``frod_s_size`` (``adapter -> role -> tensor``, filed as
    ``base_model.frod_V.<role>``, PEFT's keys); returns those containers for the layers."""
    _check_compatible(adapter_model, adapter_name, config)
    wanted = set(target_names)
    weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    position = 0
    for key, module in adapter_model.model.named_modules():
        weight = _linear_weight(module) if key in wanted else None
        if weight is None:
            continue
        # one weight per (block, role), the last one found (PEFT's)
        weights[layer_index_from_key(key, position)][category_from_key(key)] = weight
        position += 1
    if not weights:
        raise TargetModuleError("No layer types compatible with FRoD were found. Please check "
                                "`peft_config.target_modules`. (FRoD adapts nn.Linear and transformers' Conv1D)")
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    categories = sorted({c for per_block in weights.values() for c in per_block})
    example = next(iter(next(iter(weights.values())).values()))
    tensors = {attr: BufferDict() for attr in SHARED}
    for category in _progress(categories, config.progressbar):
        matrices = [per_block[category].detach().to(torch.float32).cpu()
                    for _, per_block in sorted(weights.items()) if category in per_block]
        dtype = next(per_block[category] for per_block in weights.values() if category in per_block).dtype
        basis = shared_basis(matrices, config.regularization_alpha).to(dtype)
        in_dim = basis.shape[0]
        values = (basis, sparse_positions(in_dim, config.sparse_rate, generator), torch.tensor([in_dim, in_dim]))
        for attr, value in zip(SHARED, values):
            tensors[attr].add(category, value.to(example.device), persistent=config.save_projection)
    shared = {}
    for attr in SHARED:
        container = adapter_model._modules.get(attr)
        if container is None:
            container = nn.ModuleDict()
            setattr(adapter_model, attr, container)
        container[adapter_name] = tensors[attr]
        shared[attr] = container
    return shared


def _progress(categories: list[str], show: bool):
    if not show:
        return categories
    from tqdm.auto import tqdm

    return tqdm(categories, desc="FRoD hierarchical joint decomposition", unit="category")


def create_or_update(target: nn.Module, adapter_name: str, config: FrodConfig, module_name: str,
                     frod_V: nn.ModuleDict, frod_s_indices: nn.ModuleDict,
                     frod_s_size: nn.ModuleDict) -> FrodLayer | None:
    """Add adapter ``adapter_name`` to ``target`` (wrapping it first unless it is a FRoD layer already).

    ``fan_in_fan_out`` follows the layer's type; where the config says otherwise PEFT's warning is given and the
    config is corrected (as PEFT), so the saved ``adapter_config.json`` says what the file holds."""
    if isinstance(target, FrodLayer):
        layer = target
    elif isinstance(target, supported_types()):
        layer = FrodLayer(target, frod_V, frod_s_indices, frod_s_size, category_from_key(module_name))
        if layer.fan_in_fan_out and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out "
                          "to True.", stacklevel=4)
        elif not layer.fan_in_fan_out and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", stacklevel=4)
        config.fan_in_fan_out = layer.fan_in_fan_out
    else:
        return None
    layer.update_layer(adapter_name, frod_dropout=config.frod_dropout, init_weights=config.init_weights,
                       runtime_offload_base_weight=config.runtime_offload_base_weight)
    return layer


def fit_config_to_file(config: FrodConfig, weights: dict[str, torch.Tensor]) -> None:
    """PEFT's checks of the projections in a file against ``save_projection`` (its sentences first): refuse a file
    without them when the config says they were saved; ignore them, with PEFT's warning, when it says not (the
    layers rebuild them from the base weights and the seed)."""
    prefixes = tuple(f"base_model.{attr}." for attr in SHARED)
    found = [k for k in weights if k.startswith(prefixes)]
    if config.save_projection and not found:
        raise AdapterLoadError(
            "Specified to load FRoD projection tensors from state dictionary however they were not present. If this "
            "checkpoint was saved with `save_projection=False`, set `peft_config.save_projection` to `False` before "
            "loading so the projections are regenerated from the base model weights. Otherwise, re-save the adapter "
            "with `save_projection=True` to include these tensors."
        )
    if not config.save_projection and found:
        warnings.warn("Specified to not load FRoD projection tensors from state dictionary however they are present. "
                      "Consider using them to ensure checkpoint loading is correct by setting "
                      "`peft_config.save_projection = True`.", stacklevel=4)
        for key in found:
            del weights[key]


def after_load(model: nn.Module, adapter_name: str) -> None:
    """Rebuild each layer's ``U`` from the ``V`` just loaded (built on another machine, a basis may differ from the
    one built here by signs or rounding; ``U`` must match the ``V`` it is used with)."""
    for module in model.modules():
        if isinstance(module, FrodLayer) and adapter_name in module.frod_lambda_l:
            module.refactor(adapter_name)


FROD = Method(
    peft_type=PeftType.FROD,
    config_cls=FrodConfig,
    prefix="frod_",
    layer_cls=FrodLayer,
    create_or_update=create_or_update,
    supported_types=supported_types,
    default_targets=DEFAULT_TARGETS,
    cli_names={"frod": {}},
    # measured (README, issue 22's table): λ and the sparse S act in full rank on each weight's whole basis, so
    # Adam's step of ~lr on every one of them moves the weight much more than a LoRA step: 12 bbc-news steps at
    # 1e-3 give 0.375 -> 0.775 accuracy but +10.6 nats forgetting, at 3e-4 0.80 and +0.88, at 1e-4 0.80 and
    # +0.11; the same losses as PEFT's at 1e-3 (tests/frod/test_train_parity.py), so this is the method, not a bug
    lr_scale=0.1,
    hooks=Hooks(
        shared_containers=SHARED,
        init_shared=init_shared,
        fit_config_to_file=fit_config_to_file,
        after_load=after_load,
    ),
)
FrodModel = tuner_class(FROD)  # PEFT's tuner class (isinstance of base_model)

__all__ = ["FROD", "FrodConfig", "FrodLayer", "FrodModel"]
