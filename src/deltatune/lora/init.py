"""LoRA initialisations beyond Kaiming/Gaussian, and the dispatch to the data-driven ones.

Loading never depends on the initialisation: once trained, every LoRA adapter is ``A`` and ``B`` on top of the
base, so a saved adapter loads whatever ``init_lora_weights`` it names (LoRA's ``hooks.loading``, which the weight
tuner holds while a saved adapter is built, skips the initialisation the file overwrites). Only creating a new
adapter needs the initialisation itself. The data-driven ones each live in their own module
``deltatune.lora.<init>`` (EVA: activations of a calibration set; CorDA: their covariances; LoRA-GA: gradients;
LoftQ: quantising the base), which provides

* ``check_creatable(model, config)``: raise ``ConfigError`` (before the model changes) if the adapter cannot be
  created as asked, e.g. CorDA without ``preprocess_corda`` having run;
* ``init_layer(layer, adapter_name)``: initialise one ``LoraLayer``'s new adapter (called by
  ``LoraLayer.update_layer``), from what the module's PEFT-named preprocessing stored;
* ``get_peft_model_with_data(model, config, batches, adapter_name, create)``: the whole creation from an
  iterable of batches (dicts of tensors, as the model's forward takes them), for the CLI and for users without
  PEFT's preprocessing idioms; ``create`` is ``get_peft_model`` (passed in by :func:`get_peft_model_with_data`
  below, the one place of ``lora/`` that imports ``mapping``).

and, where PEFT's load re-runs the init's change of the base (LoftQ: the quantised base ``Q``, computed from the
base weights alone),

* ``rebuild_base(model, adapter_name, config)``: after the adapter's tensors are loaded, rewrite its layers' base
  as PEFT's load does (:func:`rebuild_base` below; on any error the base is restored).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

# Initialisations computed from data (or, for LoftQ, from quantising the base): each in deltatune.lora.<init>.
DATA_DRIVEN_INITS = ("eva", "corda", "loftq", "lora_ga")
# Of those, the ones whose creation rewrote the base weights (a residual, or LoftQ's quantised base): an adapter
# saved without path_initial_model_for_weight_conversion expects that rewritten base, as PiSSA/OLoRA do.
RESIDUAL_BASE_INITS = ("corda", "loftq", "lora_ga")


def is_data_driven(config: object) -> bool:
    """Whether ``config`` is a LoRA config whose ``init_lora_weights`` is computed from data (or the base's
    quantisation) by its own module."""
    return getattr(config, "init_lora_weights", True) in DATA_DRIVEN_INITS


def rewrites_base(config: object) -> bool:
    """Whether creating ``config``'s adapter rewrote the base weights (CorDA, LoftQ, LoRA-GA)."""
    return getattr(config, "init_lora_weights", True) in RESIDUAL_BASE_INITS


def init_module(init: object) -> ModuleType | None:
    """``deltatune.lora.<init>`` for a data-driven ``init_lora_weights``, None for any other (imported on first use:
    CorDA, LoRA-GA and LoftQ pull in machinery plain LoRA never needs)."""
    return importlib.import_module(f"deltatune.lora.{init}") if init in DATA_DRIVEN_INITS else None


def as_init_config(value: object, init_lora_weights: object, init: str, config_cls: type, label: str) -> object:
    """A LoRA init's sub-config (``eva_config``, ``corda_config``, ...) as ``config_cls``, as PEFT converts it: a dict
    (as ``adapter_config.json`` holds it; keys ``config_cls`` does not take are dropped, as PEFT does), a dataclass
    (ours, or PEFT's own class), or ``None`` (the default config, with PEFT's warning, when ``init_lora_weights`` is
    ``init``; else ``None``). A sub-config given with another init is kept, with PEFT's "will be ignored" warning.

    Raises:
        ConfigError: a value that is none of these (or one ``config_cls`` rejects).
    """
    field = f"{init}_config"
    if value is None:
        if init_lora_weights != init:
            return None
        warnings.warn(f"`init_lora_weights` is '{init}' but `{field}` is not specified. Using default {label} config.",
                      stacklevel=5)
        return config_cls()
    if init_lora_weights != init:
        warnings.warn(f"`{field}` specified but will be ignored when `init_lora_weights` is not '{init}'.",
                      stacklevel=5)
    if isinstance(value, config_cls):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. PEFT's own class
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"LoraConfig.{field} must be a {config_cls.__name__}, a dict or None, got {value!r}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in value.items() if k in known})


def get_peft_model_with_data(model: nn.Module, config: object, batches: Iterable[Mapping[str, torch.Tensor]],
                             adapter_name: str = "default") -> PeftModel:
    """Create ``config``'s adapter on ``model`` (frozen), computing a data-driven initialisation from ``batches``;
    any other initialisation ignores the data and is plain ``get_peft_model``."""
    from deltatune.mapping import get_peft_model  # the generic creation; the init modules get it from here

    module = init_module(getattr(config, "init_lora_weights", True))
    if module is None:
        check_creatable(model, config)
        return get_peft_model(model, config, adapter_name=adapter_name)
    return module.get_peft_model_with_data(model, config, batches, adapter_name, create=get_peft_model)


def rebuild_base(model: nn.Module, adapter_name: str, config: object) -> None:
    """After loading ``adapter_name`` as saved: the init module's ``rebuild_base`` where it has one (LoftQ), which
    rewrites the base as PEFT's load does; nothing for the other inits (their A, B are all a load needs)."""
    rebuild = getattr(init_module(getattr(config, "init_lora_weights", True)), "rebuild_base", None)
    if rebuild is not None:
        rebuild(model, adapter_name, config)


def check_creatable(model: nn.Module, config: object) -> None:
    """Refuse, before the model changes, to *create* an adapter whose initialisation cannot be computed as asked
    (loading such an adapter does not come here: the loader builds it with the default init, then overwrites it),
    and ``orthogonal`` with an odd rank (its A and B take half the rank each)."""
    init = getattr(config, "init_lora_weights", True)
    module = init_module(init)
    if module is not None:
        module.check_creatable(model, config)
    if init == "orthogonal":
        ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in (config.rank_pattern or {}).items()}}
        odd = {k: v for k, v in ranks.items() if v % 2}
        if odd:
            name, value = next(iter(odd.items()))
            raise ConfigError(f"Orthogonal initialization requires the LoRA rank to be even, got {value} instead. "
                              f"init_lora_weights='orthogonal' gives A and B half each: {name}={value}; use "
                              f"{value + 1}")


@torch.no_grad()
def orthogonal_factors(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, in)``, ``B: (out, r)`` with ``B A = 0`` exactly in exact arithmetic (the model is unchanged) but
    both non-zero: the rows of one random orthogonal ``r x r`` matrix ``Q`` are split into odd (for ``A``) and even
    (for ``B``) halves, which are orthogonal to each other (https://datta0.github.io/posts/rethink-lora-init/).
    Draws ``Q``'s seed matrix, then ``A``'s, then ``B``'s Gaussian from torch's global generator in PEFT's order,
    so the same ``torch.manual_seed`` gives PEFT's factors."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    a = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return a.contiguous(), b.contiguous()


def init_orthogonal(layer: nn.Module, adapter_name: str) -> None:
    """``init_lora_weights='orthogonal'`` on a LoRA layer: Linear gets :func:`orthogonal_factors`; Embedding gets
    the default embedding init (A zero, B normal), as PEFT; Conv is refused (PEFT raises too)."""
    if adapter_name in layer.lora_embedding_A:
        nn.init.zeros_(layer.lora_embedding_A[adapter_name])
        nn.init.normal_(layer.lora_embedding_B[adapter_name])
        return
    a_mod, b_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    if not isinstance(a_mod, nn.Linear):
        raise ConfigError(f"init_lora_weights='orthogonal' is supported on Linear layers only, not "
                          f"{type(layer.base_layer).__name__}; exclude it or use init_lora_weights=True")
    r = layer.r[adapter_name]
    if r % 2:
        raise ConfigError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead. "
                          "(init_lora_weights='orthogonal' gives A and B half each.)")
    a, b = orthogonal_factors(r, layer.in_features, layer.out_features)
    a_mod.weight.data = a.to(a_mod.weight.device, a_mod.weight.dtype)
    b_mod.weight.data = b.to(b_mod.weight.device, b_mod.weight.dtype)
    if b_mod.bias is not None:
        nn.init.zeros_(b_mod.bias)
