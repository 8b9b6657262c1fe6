"""Which modules of a model an adapter goes into.

``target_modules`` follows Hugging Face PEFT's rules:

- a list of names: a module matches when its full name equals an entry or ends with ``"." + entry``;
- a string: a regular expression that must match the whole module name (``re.fullmatch``);
- ``"all-linear"``: every ``nn.Linear`` / ``transformers`` ``Conv1D`` except the output head.

``exclude_modules`` uses the same rules; ``layers_to_transform`` keeps only the listed block indices,
found in the name as ``<layers_pattern>.<index>.`` (any ``<name>.<index>.`` when no pattern is given).
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from deltatune.errors import ConfigError, TargetModuleError

ALL_LINEAR = "all-linear"

# Default targets when a config gives none, by ``model.config.model_type`` (PEFT's choices for LoRA).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (nn.Linear, Conv1D)
    except ImportError:  # transformers is a dependency, but the targeting works on any nn.Module
        return (nn.Linear,)


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the model's output projection (``lm_head``), excluded from ``all-linear``."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def expand_all_linear(model: nn.Module, task_type=None) -> set[str]:
    """Full names of every linear layer but the output head (what ``"all-linear"`` means, as in PEFT).

    The head is the model's output embedding; a sequence classifier without one keeps its ``score`` /
    ``classifier`` head out too (``modules_to_save`` trains it in full instead).
    """
    linear = _linear_types()
    # A layer that already carries an adapter counts by its base layer, so a second adapter finds it.
    internal = adapter_internal_names(model)
    names = {n for n, m in model.named_modules()
             if isinstance(getattr(m, "base_layer", m), linear) and n not in internal}
    head = output_head_name(model)
    if head is None and str(task_type) == "SEQ_CLS":
        for attr in ("score", "classifier"):
            module = getattr(model, attr, None)
            if isinstance(module, nn.Module):
                head = next((n for n, m in model.named_modules() if m is module), None)
                break
    names.discard(head)
    return names


def adapter_internal_names(model: nn.Module) -> set[str]:
    """Names of the modules inside adapter layers and ``modules_to_save`` wrappers (their base layer, the
    containers of their tensors, dropout, copies...): never targets of a further adapter, whatever its regex or
    ``all-linear`` matches, as in PEFT. Found by the wrappers' types, so every method's internals count, whatever
    their names (``vera_lambda_b``, ``boft_R``, ``hada_w1_a``, ...), and a base module whose name merely looks like
    an adapter's (``lora_head``) stays the model's, as in PEFT. A companion wrapper (``collapse_into``: LoRA's
    trainable-token ``token_adapter``) owns its child too. Wrappers are told by their ``owns_children`` class
    attribute (``AdapterLayer``, ``ModulesToSaveWrapper``), so this module stays below the layers."""
    owners: set[str] = set()
    internal: set[str] = set()
    for name, module in model.named_modules():  # parents come before their children
        parts = name.split(".")
        if any(".".join(parts[:i]) in owners for i in range(1, len(parts))):
            internal.add(name)
        if name and (getattr(module, "owns_children", False) or hasattr(module, "collapse_into")):
            owners.add(name)
    return internal


def _is_adapter_internal(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith(("lora_", "base_layer", "modules_to_save", "original_module", "ln_tuning_layers",
                             "token_adapter", "trainable_tokens_", "bitfit_", "bottleneck_")) for p in parts)


def _matches(key: str, pattern: str | Iterable[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return any(key == t or key.endswith("." + t) for t in pattern)


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if layers_pattern is None or len(layers_pattern) == 0:
        # lazy: the first numbered segment is the layer; a greedy match would take a nested index instead
        # (the expert in "layers.1.experts.0.w1")
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        # Each pattern is a regex (as in PEFT, e.g. r"\d+\.layers"), matched at the start of the name or after a
        # dot; lazily, so "layers.1.layers.0.up_proj" is in layer 1 (the outer index), not 0.
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key)
            if m:
                break
    return int(m.group(1)) if m else None


def is_target(key: str, config) -> bool:
    """Whether the module named ``key`` gets the adapter that ``config`` describes."""
    target = config.target_modules
    if target is None or not _matches(key, target):
        return False
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(key, exclude):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None and layers != []:
        layers = [layers] if isinstance(layers, int) else list(layers)
        index = _layer_index(key, getattr(config, "layers_pattern", None))
        if index is None or index not in layers:
            return False
    return True


def check_target_module_exists(config, key: str) -> bool:
    """PEFT's name for :func:`is_target`: whether the module named ``key`` gets ``config``'s adapter.

    As in PEFT, a module inside ``modules_to_save`` is never a target (it is trained in full already), and an
    empty ``target_modules`` (prompt methods, ``target_parameters``) targets nothing.
    """
    keep = getattr(config, "modules_to_save", None)
    if keep and any(f".{m}." in f".{key}." for m in keep):  # m names the module or one of its parents
        return False
    return getattr(config, "target_modules", None) is not None and is_target(key, config)


def resolve_target_modules(model: nn.Module, config, defaults: dict[str, list[str]] | None = None) -> None:
    """Fill ``config.target_modules`` in place: the architecture default, or ``all-linear`` expanded."""
    target = config.target_modules
    if target is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if defaults is None or model_type not in defaults:
            known = ", ".join(sorted(defaults or {}))
            raise TargetModuleError(
                "Please specify `target_modules` in `peft_config`: there is no default target_modules for "
                f"model_type={model_type!r}; pass target_modules=[...] "
                f"(module names or suffixes), a regex string, or 'all-linear'. Defaults exist for: {known}"
            )
        config.target_modules = set(defaults[model_type])
    elif isinstance(target, str) and target == ALL_LINEAR:
        config.target_modules = expand_all_linear(model, config.task_type)
    elif not isinstance(target, str):
        config.target_modules = set(target)


def find_targets(model: nn.Module, config, supported: tuple[type, ...] | None = None,
                 allow_none: bool = False) -> list[str]:
    """Module names that ``config`` targets, checked against what the method supports.

    ``allow_none``: return ``[]`` when nothing matched (LoRA's ``target_parameters`` may still match; the caller
    decides) instead of raising.

    Raises:
        TargetModuleError: nothing matched (the message lists the closest real module names), or a
            matched module is of a type the method cannot adapt.
    """
    internal = adapter_internal_names(model)
    names = [n for n, _ in model.named_modules() if n and n not in internal]
    modules = dict(model.named_modules())
    found = [n for n in names if is_target(n, config)]
    target = config.target_modules
    if not found:
        if allow_none:
            return []
        raise TargetModuleError(_no_match_message(names, config))
    exclude = getattr(config, "exclude_modules", None)
    if exclude and not any(_matches(n, exclude) for n in names):  # likely a typo; PEFT's words
        warnings.warn(f"You have passed exclude_modules={exclude} but no modules were excluded. Please check that "
                      "exclude_modules was set correctly.", stacklevel=3)
    if not isinstance(target, str):
        unmatched = [t for t in sorted(target) if not any(n == t or n.endswith("." + t) for n in found)]
        if unmatched:
            warnings.warn(f"target_modules {unmatched} matched no module; check the names", stacklevel=3)
    if supported is not None:
        bad = [(n, type(modules[n]).__name__) for n in found if not isinstance(modules[n], supported)]
        if bad:
            # A regex or suffix may catch a container (e.g. "mlp"); say which and what is supported.
            kinds = ", ".join(sorted({t.__name__ for t in supported if not t.__name__.endswith("Layer")}))
            shown = ", ".join(f"{n} ({t})" for n, t in bad[:5])
            raise TargetModuleError(
                f"target_modules matched modules of an unsupported type: {shown}"
                f"{' ...' if len(bad) > 5 else ''}. This method adapts: {kinds}. "
                "Narrow target_modules to those layers (e.g. their full names)."
            )
    return found


def _no_match_message(names: list[str], config) -> str:
    """Why nothing matched: PEFT's sentence for its case (code written for PEFT matches it), then our hint.

    PEFT tells four cases apart by the modules ``exclude_modules`` or ``modules_to_save`` took out
    ("excluded") and the ones no pattern matched ("unmatched").
    """
    target = config.target_modules
    exclude, keep = getattr(config, "exclude_modules", None), getattr(config, "modules_to_save", None) or []
    excluded = [n for n in names if (exclude and _matches(n, exclude)) or any(f".{m}." in f".{n}." for m in keep)]
    if excluded and len(excluded) == len(names):
        peft = ("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                "`exclude_modules` and `modules_to_save` configuration.")
    elif excluded:
        peft = ("No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                "configuration. You may also have only targeted modules that are marked to be saved "
                "(`modules_to_save`).")
    elif not target:
        peft = ("No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                "these arguments.")
    else:
        # a long list (PEFT saves "all-linear" as every module path) is shortened here, as in our hint below
        listed = target if isinstance(target, str) or len(target) <= 8 else "{...}"
        peft = f"Target modules {listed} not found in the base model. Please check the target modules and try again."
    if not target:
        return peft
    if excluded:
        return f"{peft} Excluded: {excluded[:8]}{' ...' if len(excluded) > 8 else ''}"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [target] if isinstance(target, str) else sorted(target)
    close: list[str] = []
    for t in wanted:
        close += difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.5)
    close = sorted(set(close))
    extra = ""
    layers = getattr(config, "layers_to_transform", None)  # configs without the field: RoAd's, BEFT's (as PEFT's)
    if layers is not None:
        extra = f" with layers_to_transform={layers} (layers_pattern={getattr(config, 'layers_pattern', None)})"
    hint = f"closest module names: {close}" if close else f"module names in this model: {suffixes[:30]}"
    shown = wanted if len(wanted) <= 8 else [*wanted[:5], f"... {len(wanted)} names in all"]
    return f"{peft} target_modules={shown}{extra} matched no module in the model; {hint}"


def modules_named_in(state_dict: dict[str, torch.Tensor], containers: tuple[str, ...]) -> list[str]:
    """The module names in an adapter state dict's keys (``<module>.lora_A[.<adapter>].weight``), without PEFT's
    ``base_model.model.`` prefix."""
    names: list[str] = []
    for key in state_dict:
        parts = key.removeprefix("base_model.model.").split(".")
        hit = next((i for i, part in enumerate(parts) if part in containers), None)
        if hit:
            name = ".".join(parts[:hit])
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"state_dict has no adapter tensors ({', '.join(containers)}) to say which layers to adapt")
    return names
