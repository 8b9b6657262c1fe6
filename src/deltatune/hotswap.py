"""Hot-swapping LoRA adapters: replace a loaded adapter's weights in place, so a ``torch.compile``'d model runs the
new adapter without recompiling (PEFT's ``peft.utils.hotswap`` API and semantics).

A compiled graph is specialised on the shapes of the tensors it reads and on Python numbers. Two things therefore
change when an adapter is swapped naively: the rank (the shapes of ``lora_A``/``lora_B``) and the scaling
``alpha / r`` (a Python float per layer). :func:`prepare_model_for_compiled_hotswap`, called once after the first
adapter is loaded and *before* compiling, removes both: every scaling becomes a 0-d tensor (its value can then
change without a guard failing) and, with ``target_rank``, every ``A``/``B`` is zero-padded to that rank (the padded
rows/columns add nothing: ``B[:, r:] A[r:, :] = 0``). :func:`hotswap_adapter` then writes the new adapter's tensors
into the existing ones with ``copy_`` (a smaller rank is zero-padded) and fills the scaling tensors, so the compiled
model's next call reuses its graphs and returns what a fresh load of the new adapter returns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.core.io import load_adapter_weights, resolve_adapter_dir
from deltatune.core.state_dict import _belongs_to, to_model_keys
from deltatune.errors import AdapterLoadError, AdapterNameError, ConfigError
from deltatune.lora.config import LoraConfig
from deltatune.lora.layer import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from deltatune.registry import method_for

# Config fields that change the output besides the tensors and alpha/r (PEFT's CONFIG_KEYS_TO_CHECK for LoRA).
_MUST_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")


class HotswapError(AdapterLoadError, RuntimeError):
    """The new adapter cannot replace the loaded one in place (other target modules, a rank above the prepared
    one, another config that changes the forward). A ``ValueError`` and a ``RuntimeError`` (PEFT raises either)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or any(hasattr(m, "_orig_mod") for m in model.modules())


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _layer_name(name: str) -> str:
    """The module name inside the user's model (what ``rank_pattern`` keys match), from a name in a PeftModel."""
    return name.removeprefix("base_model.model.")


# ---- padding ------------------------------------------------------------------------------------------------
def _rank_axis(container: str) -> int:
    """Which axis of a tensor in ``container`` is the rank (A: rows, B: columns; PEFT's layouts)."""
    return 0 if container in ("lora_A", "lora_embedding_A") else 1


def _factor_tensors(layer: LoraLayer, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
    """``(container, parameter)`` of the rank-carrying factors of one adapter on one layer."""
    if isinstance(layer, LoraEmbedding):
        return [("lora_embedding_A", layer.lora_embedding_A[adapter_name]),
                ("lora_embedding_B", layer.lora_embedding_B[adapter_name])]
    return [("lora_A", layer.lora_A[adapter_name].weight), ("lora_B", layer.lora_B[adapter_name].weight)]


def _rank_blocks(layer: LoraLayer, container: str) -> int:
    """In how many blocks the rank axis of ``container``'s tensors is laid out: ``groups`` for ``A`` of LoRA on a
    grouped convolution, else 1.

    There ``B`` is a grouped 1x1 conv, so group ``j`` of the output reads ``A``'s rows ``[j r/g, (j+1) r/g)``, and
    ``B``'s weight ``(out, r/g, 1...)`` holds each group's own columns. Padding ``r -> R`` must keep every group's
    ``r/g`` rows of ``A`` at the start of its new block ``[j R/g, (j+1) R/g)`` (PEFT pads the same way); ``B``'s
    columns are local to a group, so padding its axis 1 from ``r/g`` to ``R/g`` at the end is already right.
    """
    base = layer.base_layer
    if isinstance(layer, LoraConv) and base.groups > 1 and container == "lora_A":
        return base.groups
    return 1


def _copy_rank(dst: torch.Tensor, src: torch.Tensor, axis: int, blocks: int = 1) -> None:
    """Zero ``dst`` and copy ``src`` (a smaller or equal size on ``axis``) into the start of each of its ``blocks``
    equal blocks along ``axis``; the padded slots then add nothing (``B[:, pad] A[pad, :] = 0``)."""
    dst.zero_()
    dst_step, src_step = dst.shape[axis] // blocks, src.shape[axis] // blocks
    for j in range(blocks):
        dst.narrow(axis, j * dst_step, src_step).copy_(src.narrow(axis, j * src_step, src_step))


def _pad_rank(param: nn.Parameter, axis: int, rank: int, blocks: int = 1) -> None:
    """Grow ``param``'s rank axis to ``rank`` with zeros, in place (the Parameter object stays the same);
    ``blocks`` as in :func:`_rank_blocks`."""
    shape = list(param.shape)
    if shape[axis] == rank:
        return
    padded = param.data.new_zeros([*shape[:axis], rank, *shape[axis + 1:]])
    _copy_rank(padded, param.data, axis, blocks)
    param.data = padded


def _set_module_rank(layer: LoraLayer, adapter_name: str, rank: int) -> None:
    """Keep ``lora_A``/``lora_B``'s size attributes (``out_features`` ...) in line with their padded weights."""
    if isinstance(layer, LoraLinear):
        layer.lora_A[adapter_name].out_features = rank
        layer.lora_B[adapter_name].in_features = rank
    elif isinstance(layer, LoraConv):
        layer.lora_A[adapter_name].out_channels = rank
        layer.lora_B[adapter_name].in_channels = rank
    layer.r[adapter_name] = rank


def _check_paddable(name: str, layer: LoraLayer, adapter_name: str, rank: int) -> None:
    if isinstance(layer, LoraConv) and rank % layer.base_layer.groups:  # B splits the rank into `groups` blocks
        groups = layer.base_layer.groups
        raise ConfigError(f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {rank}, but the "
                          f"target rank is not divisible by {groups}. Please choose a target rank that is divisible "
                          f"by {groups}. ({name}: LoRA on a grouped convolution splits the rank into {groups} blocks; "
                          f"pass a target_rank divisible by {groups}.)")
    if not isinstance(layer, (LoraLinear, LoraConv, LoraEmbedding)):
        raise ConfigError(f"{name}: {type(layer).__name__} cannot be padded for hot-swapping (Linear, Conv, "
                          "Embedding can)")
    current = layer.r[adapter_name]
    if current > rank:
        raise ConfigError(f"Trying to pad the adapter to the target rank {rank}, but the original rank is larger "
                          f"({current}). This is not possible. "
                          f"{name}: adapter {adapter_name!r} has rank {current}, above target_rank={rank}; "
                          f"target_rank must be the largest rank of all adapters to swap in (>= {current})")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make a model with a LoRA adapter loaded ready for hot-swapping after ``torch.compile`` (as PEFT's).

    Call it after loading the first adapter and before compiling. Every LoRA scaling becomes a 0-d tensor (a new
    alpha then does not recompile) and, with ``target_rank``, every adapter's ``A``/``B`` is zero-padded to that
    rank (the output does not change). Adapters that target other modules still cannot be swapped.

    Args:
        model: The ``PeftModel`` (or any module holding deltatune LoRA layers).
        target_rank: The largest rank among the adapters to be swapped in; ``None`` leaves the ranks.
        config: ``LoraConfig``(s) whose ``r`` (and ``rank_pattern`` values) are set to ``target_rank``, as PEFT does
            (for configs used later to create layers); the model's own configs are not changed.
        check_compiled: What to do when ``model`` is compiled already: ``"error"``, ``"warn"`` or ``"ignore"``.

    Raises:
        ConfigError: an unknown ``check_compiled``, a compiled model with ``"error"``, no LoRA layer, a bad
            ``target_rank`` or an adapter whose rank exceeds it. Nothing is changed then.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        # PEFT's text first (its typo "check_compiles" included), so PEFT's regexes match
        raise ConfigError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                          "instead. Pass check_compiled='error', 'warn' or 'ignore'")
    if _is_compiled(model):
        message = ("prepare_model_for_compiled_hotswap was called on a compiled model; call it before torch.compile "
                   "(compiling afterwards avoids a recompilation)")
        if check_compiled == "error":
            raise ConfigError("Call prepare_model_for_compiled_hotswap *before* compiling the model. " + message
                              + ", or pass check_compiled='warn'/'ignore'")
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    layers = list(_lora_layers(model))
    if not layers:
        raise ConfigError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                          "after loading the first adapter and before loading the second adapter. (No LoRA layers: "
                          "call it after loading the first adapter, and before compiling.)")
    if target_rank is not None:
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
            raise ConfigError(f"target_rank must be a positive integer, got {target_rank!r}")
        for name, layer in layers:  # check everything before changing anything
            for adapter_name in layer.r:
                _check_paddable(name, layer, adapter_name, target_rank)
    for _, layer in layers:
        device = layer.base_layer.weight.device
        for adapter_name, value in list(layer.scaling.items()):
            if not isinstance(value, torch.Tensor):
                # fp32: a 0-d tensor multiplies any dtype without promoting it
                layer.scaling[adapter_name] = torch.tensor(float(value), device=device)
        if target_rank is not None:
            for adapter_name in list(layer.r):
                with torch.no_grad():
                    for container, param in _factor_tensors(layer, adapter_name):
                        axis = _rank_axis(container)
                        # grouped conv: B's weight holds rank/groups columns per group (see _rank_blocks)
                        size = target_rank // layer.base_layer.groups if isinstance(layer, LoraConv) and axis else \
                            target_rank
                        _pad_rank(param, axis, size, _rank_blocks(layer, container))
                _set_module_rank(layer, adapter_name, target_rank)
        layer._clear_row_cache()
    if not config or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        for key in lora_config.rank_pattern:
            lora_config.rank_pattern[key] = target_rank


# ---- swapping -----------------------------------------------------------------------------------------------
def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Refuse (``HotswapError``) two configs whose adapters cannot be swapped: another method, or LoRA settings that
    change the forward beyond the tensors and ``alpha``/``r`` (``use_rslora``, ``lora_dropout``, ``alpha_pattern``,
    ``use_dora``), as PEFT's check."""
    if config0.peft_type != config1.peft_type:
        raise HotswapError(f"Incompatible PEFT types found: {config0.peft_type} and {config1.peft_type}. Cannot "
                           f"hot-swap a {config1.peft_type} adapter into a {config0.peft_type} one; load it with "
                           "load_adapter instead")
    if str(config0.peft_type) != "LORA":
        raise HotswapError(f"Hotswapping only supports LORA but {config0.peft_type} was passed. (Hot-swapping "
                           "supports LoRA adapters only.)")
    for key in _MUST_MATCH:
        a, b = getattr(config0, key, None), getattr(config1, key, None)
        if a != b:
            raise HotswapError(f"the adapters' configs differ in {key} ({a!r} loaded, {b!r} new), which changes the "
                               "forward; load the new adapter with load_adapter instead")


def _peft_model(model: nn.Module):
    from deltatune.peft_model import PeftModel

    inner = _unwrap(model)
    if not isinstance(inner, PeftModel):
        raise ConfigError(f"hotswap_adapter needs a deltatune PeftModel (optionally compiled), got "
                          f"{type(inner).__name__}")
    return inner


def _scaling(config: LoraConfig, layer_name: str) -> float:
    rank, alpha = config.rank_for(layer_name), config.alpha_for(layer_name)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: LoraConfig) -> None:
    """Write ``state_dict`` (the new adapter's tensors under the model's keys, i.e. with ``adapter_name`` in them)
    into adapter ``adapter_name`` in place, and set its layers' scalings from ``config``.

    Every check runs before anything changes. A layer the new adapter does not target gets zeros (it then adds
    nothing, as in PEFT); a smaller rank is zero-padded; a larger one is refused when the model is prepared for
    compiled hot-swapping or compiled (the tensors would have to change shape), and otherwise replaces the tensors.

    Raises:
        HotswapError: the adapter is merged, the new one targets modules the loaded one does not, a shape differs
            elsewhere than the rank, or the rank is above the prepared one.
    """
    inner = _peft_model(model)
    layers = {name: layer for name, layer in _lora_layers(inner)}
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise HotswapError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() "
                           "before hot-swapping it")
    containers = method_for(config.peft_type).containers
    own = inner.state_dict(keep_vars=True)
    unexpected = sorted(k for k in state_dict if k not in own)
    if unexpected:
        modules = sorted({k.split(f".{adapter_name}.")[0].rsplit(".", 1)[0].removeprefix("base_model.model.")
                          for k in unexpected})
        raise HotswapError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}. "
                           f"The new adapter targets modules the loaded adapter {adapter_name!r} does not: "
                           f"{modules[:5]}{' ...' if len(modules) > 5 else ''}; hot-swapping needs the same (or "
                           "fewer) target modules: load it with load_adapter instead")
    prepared = _is_compiled(model) or any(isinstance(s, torch.Tensor)
                                          for layer in layers.values() for s in layer.scaling.values())
    # key, target, value, rank axis, rank blocks (_rank_blocks)
    plan: list[tuple[str, torch.Tensor, torch.Tensor, int | None, int]] = []
    for key, value in state_dict.items():
        old = own[key]
        container = next((p for p in key.split(".") if p in containers), None)
        axis = _rank_axis(container) if container in ("lora_A", "lora_B", "lora_embedding_A",
                                                      "lora_embedding_B") and old.dim() >= 2 else None
        blocks = 1
        if old.shape != value.shape:
            other_dims_equal = axis is not None and old.dim() == value.dim() and all(
                o == n for i, (o, n) in enumerate(zip(old.shape, value.shape)) if i != axis)
            module = key.split(f".{adapter_name}.")[0].removeprefix("base_model.model.").rsplit(".", 1)[0]
            if not other_dims_equal:
                raise HotswapError(f"shape mismatch at {module}: the new adapter has {tuple(value.shape)}, the loaded "
                                   f"one {tuple(old.shape)}; the adapters belong to different base models")
            if value.shape[axis] > old.shape[axis] and prepared:
                raise HotswapError(
                    f"{module}: the new adapter's rank {value.shape[axis]} is above the loaded (prepared) rank "
                    f"{old.shape[axis]}; call prepare_model_for_compiled_hotswap(model, target_rank=<largest rank, "
                    f">= {value.shape[axis]}>) before compiling")
            layer = layers.get(f"base_model.model.{module}")
            if not isinstance(layer, (LoraLinear, LoraConv, LoraEmbedding)):  # e.g. target_parameters' experts
                raise HotswapError(f"{module}: ranks differ on a {type(layer).__name__}, whose factors cannot be "
                                   "zero-padded; hot-swap adapters of the same rank there")
            blocks = _rank_blocks(layer, container)
        plan.append((key, old, value, axis, blocks))
    new_keys = set(state_dict)
    stale = [k for k in own if _belongs_to(k, adapter_name, containers) and k not in new_keys]
    for key in stale:
        if not any(f".{c}." in key for c in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            raise HotswapError(f"the new adapter has no tensor for {key.removeprefix('base_model.model.')}, which the "
                               "loaded one has and which cannot be zeroed without changing the output; load it "
                               "with load_adapter instead")
    # ---- write (nothing below raises on a checked input) ----
    with torch.no_grad():
        for key in stale:  # the new adapter leaves this layer alone: zero factors add nothing
            own[key].zero_()
        for _key, old, value, axis, blocks in plan:
            value = value.to(device=old.device, dtype=old.dtype)
            if old.shape == value.shape:
                old.copy_(value)
            elif value.shape[axis] < old.shape[axis]:
                _copy_rank(old, value, axis, blocks)
            else:  # a larger rank on an unprepared, uncompiled model: the tensor changes shape
                old.data = value.clone()
        for name, layer in layers.items():
            if adapter_name not in layer.scaling:
                continue
            new = _scaling(config, _layer_name(name))
            if isinstance(layer.scaling[adapter_name], torch.Tensor):
                layer.scaling[adapter_name].fill_(new)
            else:
                layer.scaling[adapter_name] = new
            layer.lora_alpha[adapter_name] = config.alpha_for(_layer_name(name))
            factor = _factor_tensors(layer, adapter_name)[0]
            _set_module_rank(layer, adapter_name, factor[1].shape[_rank_axis(factor[0])])
            layer._clear_row_cache()


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str,
                    torch_device: str | torch.device | None = None, **kwargs: Any) -> None:
    """Replace the weights (and alpha) of the loaded LoRA adapter ``adapter_name`` by those of another adapter
    directory, in place; the name stays. With :func:`prepare_model_for_compiled_hotswap` called before
    ``torch.compile``, the compiled model does not recompile. Reads directories written by deltatune or PEFT.

    The model's ``peft_config[adapter_name]`` stays the first adapter's (as in PEFT); save the new adapter from
    its own directory, not from the swapped model.

    Args:
        model: A deltatune ``PeftModel`` holding ``adapter_name``, compiled or not.
        model_name_or_path: The new adapter's directory.
        adapter_name: The adapter to overwrite, e.g. ``"default"``.
        torch_device: Where to load the new tensors (default: the model's device).
        **kwargs: ``subfolder`` is honoured; PEFT's Hub arguments are accepted and ignored (local directories).

    Raises:
        AdapterNameError: no adapter named ``adapter_name``.
        HotswapError: the adapters cannot be swapped (see :func:`hotswap_adapter_from_state_dict`,
            :func:`check_hotswap_configs_compatible`); the model is unchanged.
        AdapterLoadError: the directory is missing or its files are unreadable.
    """
    inner = _peft_model(model)
    if adapter_name not in inner.peft_config:
        raise AdapterNameError(f"no adapter named {adapter_name!r}; this model has {sorted(inner.peft_config)}")
    directory = resolve_adapter_dir(model_name_or_path, kwargs.get("subfolder"))
    config = PeftConfig.from_pretrained(directory)
    check_hotswap_configs_compatible(inner.peft_config[adapter_name], config)
    if torch_device is None:
        first = next(iter(inner.parameters()), None)
        torch_device = first.device if first is not None else "cpu"
    weights = load_adapter_weights(directory, device=torch_device)
    method = method_for(config.peft_type)
    model_state = to_model_keys(inner, weights, adapter_name, method.containers, method.file_suffixes)
    hotswap_adapter_from_state_dict(model, model_state, adapter_name, config)


__all__ = ["HotswapError", "check_hotswap_configs_compatible", "hotswap_adapter", "hotswap_adapter_from_state_dict",
           "prepare_model_for_compiled_hotswap"]
