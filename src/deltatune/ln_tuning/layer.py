"""LN tuning layers: a trainable copy of a normalisation layer per adapter.

For ``y = γ ⊙ norm(x) + β`` (LayerNorm; RMSNorm has no ``β``) the adapter is a copy ``(γ', β')`` that starts
equal to ``(γ, β)``, so the model is unchanged at init. ``forward`` runs the active copy; the frozen original
runs when adapters are disabled. One active adapter at a time (two copies of one layer do not compose).
Merging copies ``(γ', β')`` into the base layer (the original values are kept to unmerge).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.core.features import in_out_features
from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, MergeError


class LNTuningLayer(AdapterLayer):
    """Wraps any module with parameters (usually ``LayerNorm``/``RMSNorm``).

    Attributes:
        ln_tuning_layers: ``adapter -> copy of base_layer`` (trainable).
    """

    adapter_layer_names = ("ln_tuning_layers",)
    peft_class_name = "LNTuningLayer"  # PEFT has one LN-tuning class for every base type

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self._originals: dict[str, torch.Tensor] = {}  # base parameters while a copy is merged in
        # PEFT's public attributes: the base layer's features (None for a norm layer; see core.features)
        self.in_features, self.out_features = in_out_features(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def update_layer(self, adapter_name: str) -> None:
        """Create ``ln_tuning_layers[adapter_name]``: a copy of the (unmerged) base layer."""
        if not any(True for _ in self.base_layer.parameters()):
            raise ConfigError(f"{type(self.base_layer).__name__} has no parameters to tune; LN tuning needs an "
                              "affine norm (elementwise_affine=True) or another layer with weights")
        base = copy.deepcopy(self.base_layer)
        if self._originals:  # a merged copy sits in base_layer: start from the original values
            with torch.no_grad():
                for name, p in base.named_parameters():
                    p.copy_(self._originals[name])
        base.requires_grad_(True)
        self.ln_tuning_layers[adapter_name] = base
        self.set_adapter(self.active_adapters or [adapter_name])

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``copy[active](x)``; the base layer with no active adapter (disabled and merged: see ``forward``)."""
        active = [a for a in self.active_adapters if a in self.ln_tuning_layers]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ConfigError(f"LN tuning runs one adapter at a time, {active} are active; set_adapter() one of them")
        return self.ln_tuning_layers[active[0]](x, *args, **kwargs)

    # ---- merging: copy the adapter's parameters into the base layer -----------------------------
    def _names_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.ln_tuning_layers and n not in self.merged_adapters]
        if len(names) + len(self.merged_adapters) > 1:
            raise MergeError(f"LN tuning merges one adapter at a time (asked for {names}, merged "
                             f"{self.merged_adapters}); each adapter replaces the norm's parameters")
        return names

    def check_merge(self, adapter_names: list[str] | None = None, where: str = "") -> None:
        for name in self._names_to_merge(adapter_names):
            if not all(torch.isfinite(p).all() for p in self.ln_tuning_layers[name].parameters()):
                raise MergeError(f"adapter {name!r} at {where or 'a norm layer'} has NaN/Inf parameters; nothing "
                                 "was merged")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if safe_merge:
            self.check_merge(adapter_names)
        for name in self._names_to_merge(adapter_names):
            copy_params = dict(self.ln_tuning_layers[name].named_parameters())
            with torch.no_grad():
                for pname, p in self.base_layer.named_parameters():
                    self._originals[pname] = p.data.clone()
                    p.data.copy_(copy_params[pname].data.to(p.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        with torch.no_grad():
            for pname, p in self.base_layer.named_parameters():
                p.data.copy_(self._originals[pname])
        self._originals.clear()
        self.merged_adapters.clear()


def make_ln_tuning_layer(target: nn.Module) -> LNTuningLayer:
    return LNTuningLayer(target)


def supported_types() -> tuple[type, ...]:
    return (nn.Module,)
