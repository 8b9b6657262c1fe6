"""LoRA variants: what an adapter does differently from plain ``y = W x + b + s · B A x``, behind one interface.

A variant (DoRA, :mod:`deltatune.lora.dora`; aLoRA, :mod:`deltatune.lora.alora`) is a small class that a LoRA
layer asks, once per adapter, at each point where the variant's math differs from LoRA's:

=====================  ============================================================================
``check_target``       refuse a module by its name before an adapter is created on it (aLoRA: Linear only)
``for_layer``          the variant's form for this kind of layer, or a refusal (DoRA: Linear, Embedding, Conv)
``init``               create the variant's own tensors (DoRA: the magnitude ``m``), after ``A, B``
``delta_weight``       ``ΔW`` as the adapter's update (default: the layer's ``s · B A``)
``merged_weight``      ``W`` with the adapter merged in (default ``W + ΔW``); ``unmerged_weight`` undoes it
``forward``            the composed path: the running output ``y`` plus (or rescaled by) this adapter
``fast_path``          one autograd node for the whole layer when this is the only active adapter, or ``None``
``row_scale``          mixed-adapter batches: the ``(out,)`` factor of ``y_i = c ⊙ (W x_i + ΔW x_i) + b``
=====================  ============================================================================

plus what the refusals elsewhere need to know (``merge_refusal``, ``weighted_merge_refusal``, ``adalora``,
``lora_bias``), so that merging, ``add_weighted_adapter``, ``AdaLoraConfig`` and ``inspect`` ask the variant
instead of naming it, and ``after_others``: the variant's ``forward`` runs after every other active adapter
(which keep their fused path), on the raw layer input (aLoRA, which adapts only some positions).

Which variant an adapter uses is written once: :data:`BUILT_IN` (a layer flag, such as ``use_dora``, to the class
that implements it) and :func:`variants_of`. A config asks for a variant through the field ``config_field``
(by default the flag itself; aLoRA's is ``alora_invocation_tokens``, a list: non-empty asks). Adding a variant is
one module with its class, one line in :data:`BUILT_IN` and its field in :class:`~deltatune.lora.config.LoraConfig`
(``tests/lora/test_variants.py`` walks through one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, MixedBatchTypeError

# flag -> "module:Class". Strings, so that this module (which every variant imports for the base class) does not
# import its implementations; each is imported the first time it is asked for.
BUILT_IN: dict[str, str] = {
    "use_dora": "deltatune.lora.dora:Dora",
    "use_alora": "deltatune.lora.alora:Alora",
}
_LOADED: dict[str, type[LoraVariant]] = {}


class LoraVariant:
    """How one adapter on one LoRA layer differs from plain LoRA. Every method takes the layer and the adapter's
    name; the variant keeps no per-adapter state of its own (its tensors live in the layer's containers, so they
    are saved, moved and deleted with the adapter's).

    Class attributes:
        flag: The ``update_layer`` keyword that asks for it, e.g. ``"use_dora"`` (also the ``LoraConfig`` field,
            unless ``config_field`` names another).
        config_field: The ``LoraConfig`` field that asks for it where that is not ``flag`` (aLoRA's
            ``alora_invocation_tokens``); any true value (a non-empty list) asks.
        label: Its name in messages and ``inspect``, e.g. ``"DoRA"``.
        containers: Names of the per-adapter ``nn.ModuleDict`` containers it fills (saved as ``<name>.<adapter>``).
        merge_refusal: Why the adapter cannot be merged into the base weights at all, or ``None`` where it can.
        weighted_merge_refusal: Why ``add_weighted_adapter`` cannot combine it, or ``None`` where it can.
        adalora: Whether AdaLoRA's SVD form can carry it.
        lora_bias: Whether it combines with ``lora_bias=True``.
        after_others: Whether the layer runs its other active adapters first (as if this one were absent, so one
            plain adapter keeps its fused node), then this variant's :meth:`forward` on their output and the raw
            layer input (not cast to the adapter's dtype: the variant casts what it uses).
    """

    flag: ClassVar[str] = ""
    config_field: ClassVar[str] = ""
    label: ClassVar[str] = ""
    containers: ClassVar[tuple[str, ...]] = ()
    merge_refusal: ClassVar[str | None] = None
    weighted_merge_refusal: ClassVar[str | None] = None
    adalora: ClassVar[bool] = True
    lora_bias: ClassVar[bool] = True
    after_others: ClassVar[bool] = False

    @classmethod
    def asked_by(cls, config: Any) -> bool:
        """Whether ``config`` (a config object or an ``adapter_config.json`` dict) asks for this variant."""
        field = cls.config_field or cls.flag
        return bool(config.get(field) if isinstance(config, Mapping) else getattr(config, field, False))

    @classmethod
    def check_target(cls, layer: nn.Module, module_name: str) -> None:
        """Refuse the LoRA layer ``layer`` (``module_name`` in the model) before an adapter of this variant is
        created on it, naming the module (default: accept; :meth:`for_layer` still refuses inside
        ``update_layer``).

        Raises:
            ConfigError: the variant does not apply to this module.
        """

    @classmethod
    def for_layer(cls, layer: nn.Module) -> LoraVariant:
        """The variant's implementation for ``layer`` (DoRA's differs for Linear, Embedding and Conv layers).

        Raises:
            ConfigError: the variant does not apply to this kind of layer.
        """
        return cls()

    # ---- creating an adapter -------------------------------------------------------------------------------
    def init(self, layer: nn.Module, name: str) -> None:
        """Create the variant's tensors for adapter ``name`` (``A``, ``B`` are initialised already)."""

    # ---- weights ---------------------------------------------------------------------------------------------
    def delta_weight(self, layer: nn.Module, name: str) -> torch.Tensor:
        """``ΔW`` in the base weight's storage layout (default: the layer's ``s · B A``)."""
        return layer.get_delta_weight(name)

    def merged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` with adapter ``name`` merged in, out of place (default ``W + ΔW``). What the unmerge needs
        besides the adapter's tensors goes in ``layer._merge_state[name]`` (dropped when the merge is undone)."""
        return weight + self.delta_weight(layer, name).to(weight.dtype)

    def unmerged_weight(self, layer: nn.Module, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` with the merged adapter ``name`` taken out, out of place (default ``W - ΔW``)."""
        return weight - self.delta_weight(layer, name).to(weight.dtype)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The composed path: ``result: (..., out)`` (the base output plus the adapters before this one) with
        adapter ``name`` applied. ``x: (..., in)`` is the layer input in the adapter's dtype (as given, for an
        ``after_others`` variant); an embedding, whose input is token ids, passes the looked-up update
        ``ΔW[ids]: (..., dim)`` instead."""
        raise NotImplementedError

    def fast_path(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer's output as one fused node when ``name`` is the only active adapter, or ``None`` where
        the fused kernel does not apply (then :meth:`forward` runs)."""
        return None

    def row_scale(self, layer: nn.Module, name: str) -> torch.Tensor:
        """For mixed-adapter batches: ``c`` such that a row through adapter ``name`` is
        ``c ⊙ (W x + s B A x) + b``, shaped like the layer's per-output-channel tensors.

        Raises:
            MixedBatchTypeError: the variant's output has no such form (the default).
        """
        raise MixedBatchTypeError(f"{self.label} adapters cannot run in mixed-adapter batches (adapter_names); "
                                  "run one adapter per call (set_adapter)")

    def row_scale_inputs(self, layer: nn.Module, name: str) -> list[torch.Tensor]:
        """The tensors :meth:`row_scale` reads, so that a cached mixed-batch slot notices when one changes."""
        return []


def register_variant(cls: type[LoraVariant]) -> type[LoraVariant]:
    """Make ``cls`` known under ``cls.flag`` (for variants defined outside :data:`BUILT_IN`, e.g. in a test)."""
    _LOADED[cls.flag] = cls
    return cls


def unregister_variant(flag: str) -> None:
    """Forget a variant added by :func:`register_variant` (a built-in one is loaded again when asked for)."""
    _LOADED.pop(flag, None)


def known_variants() -> dict[str, type[LoraVariant]]:
    """Every variant by its flag: the built-in ones (imported on first use), then the registered ones."""
    for flag, where in BUILT_IN.items():
        if flag not in _LOADED:
            module, _, cls = where.partition(":")
            _LOADED[flag] = getattr(importlib.import_module(module), cls)
    return dict(_LOADED)


def variants_of(config: Any) -> list[type[LoraVariant]]:
    """The variants ``config`` asks for (a config object or an ``adapter_config.json`` dict, read through each
    variant's ``config_field``); empty for plain LoRA."""
    return [cls for cls in known_variants().values() if cls.asked_by(config)]


def variant_for(flags: Mapping[str, Any]) -> type[LoraVariant] | None:
    """The one variant ``update_layer``'s flags (``{"use_dora": False, "use_alora": True}``) ask for, or ``None``.

    Raises:
        ConfigError: several at once.
    """
    chosen = [cls for flag, cls in known_variants().items() if flags.get(flag)]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(c.label for c in chosen)} cannot be combined on one adapter; pick one")
    return chosen[0] if chosen else None


def variant_containers() -> tuple[str, ...]:
    """The containers of every known variant, in order (DoRA's ``lora_magnitude_vector`` first)."""
    names: list[str] = []
    for cls in known_variants().values():
        names += [c for c in cls.containers if c not in names]
    return tuple(names)


def variant_flags(config: Any) -> dict[str, bool]:
    """Every known variant's flag as ``config`` asks for it: the keywords ``LoraLayer.update_layer`` takes."""
    return {flag: cls.asked_by(config) for flag, cls in known_variants().items()}
