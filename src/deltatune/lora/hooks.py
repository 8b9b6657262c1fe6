"""LoRA's registry hooks for the generic ``PeftModel``: what ``peft_model.py`` did by importing LoRA's modules.

Each function here is one :class:`deltatune.registry.Hooks` entry of the LoRA method (see ``lora/__init__.py``),
so generic code asks the registry (``method_for(config.peft_type).hooks.<name>``) instead of naming LoRA:

* :func:`activate` (``hooks.activate``): aLoRA's invocation offsets around each forward / generate call.
* :func:`add_weighted_adapter` (``hooks.add_weighted_adapter``): the combinations of :mod:`.arithmetic`.
* :func:`convert_on_save` (``hooks.convert_on_save``): PiSSA/OLoRA/CorDA/LoRA-GA to a plain LoRA of rank ``2r``
  for the original base (:mod:`.conversion`), PEFT's ``path_initial_model_for_weight_conversion``.
* :func:`loading` (``hooks.loading``): while a saved adapter is built, skip initialisations the file overwrites.
* :func:`after_load` (``hooks.after_load``): rebuild the residual base PiSSA/OLoRA/LoftQ adapters were trained on.
* :func:`create_with_data` (``hooks.create_with_data``): data-driven initialisations (EVA, CorDA, LoRA-GA, LoftQ),
  and :func:`data_init` (``hooks.data_init``): which of them a config asks for.
* :func:`saves_initial` (``hooks.saves_initial``): whether training keeps the adapter as created, for
  :func:`convert_on_save`; :func:`rewrites_base_on_load` (``hooks.rewrites_base_on_load``): whether loading an
  adapter rewrites the base it is loaded onto (so it cannot share that base).
* :func:`serve_refusal` (``hooks.serve_refusal``): the LoRA adapters ``deltatune serve`` cannot batch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.errors import ConfigError
from deltatune.lora import alora, arithmetic, conversion
from deltatune.lora import init as lora_init
from deltatune.lora.config import LoraConfig

activate = alora.activated
add_weighted_adapter = arithmetic.add_weighted_adapter


def serve_refusal(config: PeftConfig) -> str:
    """Why ``deltatune serve`` cannot run this LoRA adapter in a mixed-adapter batch (``adapter_names``), and
    what to use instead; empty: it can. aLoRA finds each row's invocation in the call's whole input, and LoRA on
    ``target_parameters`` has no per-row path: both refuse ``adapter_names`` (see ``alora.activated``,
    ``param.py``)."""
    if getattr(config, "alora_invocation_tokens", None):
        return ("it is an aLoRA adapter (alora_invocation_tokens), and mixed-adapter batches with aLoRA are not "
                "implemented yet; use `deltatune generate --adapter` for it")
    if getattr(config, "target_parameters", None):
        return ("it adapts parameters (target_parameters), which mixed-adapter batches do not support yet; use "
                "`deltatune generate --adapter` for it")
    return ""


def convert_on_save(configs: Mapping[str, PeftConfig], names: list[str], initial_dir: str | os.PathLike
                    ) -> Callable[[str, dict[str, torch.Tensor], PeftConfig], tuple[dict[str, torch.Tensor], Any]]:
    """Check that ``names`` can be written as plain LoRA for the original base, then return the converter
    ``(name, state, config) -> (state, config)`` that ``save_pretrained`` applies to each adapter's file state.

    The initial adapter of ``name`` is read from ``initial_dir/<name>`` when that exists (a non-default adapter),
    else from ``initial_dir`` itself, as PEFT does.

    Raises:
        ConfigError: an adapter of ``names`` is not a LoRA adapter.
    """
    from deltatune.core.io import load_adapter_weights

    not_lora = [n for n in names if not isinstance(configs[n], LoraConfig)]
    if not_lora:
        raise ConfigError(f"path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA, OLoRA, "
                          f"CorDA, LoRA-GA) to plain LoRA; {not_lora} are not LoRA adapters")
    # PEFT's recipe sets init_lora_weights=True on the model before saving the initial adapter, so True
    # converts too (the difference [B, -B0][A; A0] is exact for any LoRA); other inits get PEFT's warning.
    odd = [n for n in names if not conversion.converts_to_plain_lora(configs[n])
           and configs[n].init_lora_weights is not True]
    if odd:
        warnings.warn(f"path_initial_model_for_weight_conversion only works for converting a PiSSA/CorDA/"
                      f"OLoRA/LoRA-GA adapter to a LoRA adapter; {odd} have init_lora_weights="
                      f"{configs[odd[0]].init_lora_weights!r}", stacklevel=3)

    def convert(name: str, state: dict[str, torch.Tensor], config: PeftConfig) -> tuple[dict[str, torch.Tensor], Any]:
        sub = os.path.join(initial_dir, name)
        where = sub if name != "default" and os.path.isdir(sub) else os.fspath(initial_dir)
        return conversion.to_plain_lora(state, load_adapter_weights(where), config, where)

    return convert


@contextlib.contextmanager
def loading(config: PeftConfig) -> Iterator[None]:
    """Held while a saved adapter is built from ``config``: EVA/CorDA/LoftQ/LoRA-GA/orthogonal/PiSSA/OLoRA only
    decide the starting ``A, B``, which loading overwrites, so the adapter is built with the default init (nothing
    of the base changes before the file is checked); :func:`after_load` then rebuilds what can be rebuilt, and a
    warning names the inits whose rewritten base cannot be (CorDA, LoRA-GA)."""
    init = getattr(config, "init_lora_weights", True)
    if conversion.mutates_base(config) or lora_init.is_data_driven(config) or init == "orthogonal":
        # a base-rewriting init whose module cannot rebuild that base on load (LoftQ's can: after_load)
        if lora_init.rewrites_base(config) and getattr(lora_init.init_module(init), "rebuild_base", None) is None:
            warnings.warn(
                f"adapter was initialised with {init!r}: it expects the residual base model saved at training "
                "time, not the original one (save it with path_initial_model_for_weight_conversion to get a plain "
                "LoRA for the original base)", stacklevel=3,
            )
        config.init_lora_weights = True
        try:
            yield
        finally:
            config.init_lora_weights = init
    else:
        yield


def after_load(model: nn.Module, adapter_name: str) -> None:
    """A PiSSA/OLoRA adapter loaded as saved (not converted): rewrite its layers' base weights into the residual
    ``W - s B0 A0`` it was trained on, as PEFT's load does (:func:`.conversion.rebuild_residual`); LoftQ: its
    quantised base ``Q`` from the weights given."""
    config = model.peft_config[adapter_name]
    if getattr(config, "init_lora_weights", True) is not True:
        conversion.rebuild_residual(model, adapter_name, config)
        lora_init.rebuild_base(model, adapter_name, config)


def create_with_data(model: nn.Module, config: PeftConfig, batches: Iterable[Mapping[str, torch.Tensor]],
                     adapter_name: str = "default") -> nn.Module:
    """``config``'s adapter on ``model`` with its data-driven initialisation computed from ``batches``
    (:func:`.init.get_peft_model_with_data`)."""
    return lora_init.get_peft_model_with_data(model, config, batches, adapter_name)


def data_init(config: PeftConfig) -> str | None:
    """The data-driven ``init_lora_weights`` ``config`` asks for (``"eva"``, ``"corda"``, ``"lora_ga"``, ``"loftq"``:
    :data:`.init.DATA_DRIVEN_INITS`), which :func:`create_with_data` computes; ``None`` for any other."""
    init = getattr(config, "init_lora_weights", True)
    return init if lora_init.init_module(init) is not None else None


def saves_initial(config: PeftConfig) -> bool:
    """Whether ``config``'s initialisation moved ``s B0 A0`` out of the base (PiSSA, OLoRA, CorDA, LoRA-GA), so the
    adapter as created must be kept for :func:`convert_on_save` to write the trained one as plain LoRA for the
    original base (:func:`.conversion.converts_to_plain_lora`)."""
    return conversion.converts_to_plain_lora(config)


def rewrites_base_on_load(config: PeftConfig) -> bool:
    """Whether ``config``'s adapter, saved as created, works only on the base its initialisation rewrote (PiSSA/OLoRA/
    CorDA/LoRA-GA's residual, LoftQ's ``Q``): loading it rewrites the base it is loaded onto, so that base cannot be
    shared with other adapters (:func:`.conversion.expects_rewritten_base`)."""
    return conversion.expects_rewritten_base(getattr(config, "init_lora_weights", True))


__all__ = ["activate", "add_weighted_adapter", "after_load", "convert_on_save", "create_with_data", "data_init",
           "loading", "rewrites_base_on_load", "saves_initial"]
