"""LoRA on parameters (``LoraConfig.target_parameters``): weights stored as ``nn.Parameter`` rather than in an
``nn.Linear``, such as the 3-D expert weights of mixture-of-experts models (Qwen3-MoE, Mixtral, GPT-OSS in
transformers 5).

The module holding the parameter is wrapped by :class:`LoraParam`; during that module's forward the parameter is
replaced by ``W + ΔW`` (the plain tensor sits where the parameter was, and the parameter is put back afterwards),
so the module's own code, whatever its expert kernel, computes with the adapted weight and autograd reaches ``A``
and ``B`` through ``ΔW``.

Layouts are PEFT's ``ParamWrapper``'s, so adapter files cross between the libraries unchanged:

- a 2-D parameter ``(out, in)``: ``A: (r, in)``, ``B: (out, r)``, ``ΔW = s · B A``;
- a 3-D parameter of ``E`` experts, ``(E, out, in)`` (Qwen3-MoE, Mixtral) or ``(E, in, out)`` when the experts
  module says ``is_transposed`` (GPT-OSS): ``A: (E·r, in)`` whose rows ``e·r .. e·r+r-1`` are expert ``e``'s
  ``A_e``, and ``B: (out, r·E)`` whose column ``j·E + e`` is column ``j`` of expert ``e``'s ``B_e``;
  ``ΔW_e = s · B_e A_e`` (transposed for ``(E, in, out)``).

Two parameters of one module are two nested wrappers (the first one registered innermost), as in PEFT, so the
state-dict keys read ``experts.lora_A`` (outer) and ``experts.base_layer.lora_A`` (inner).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.layer import AdapterLayer
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.lora.layer import LoraLayer


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


class LoraParam(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer``'s innermost module (see the module docstring)."""

    peft_class_name = "ParamWrapper"  # PEFT's name for LoRA on a parameter (target_parameters)

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.get_param().shape
        if len(shape) == 3:
            self.num_experts = shape[0]
            # (E, out, in) unless the experts module stores (E, in, out) and says so (transformers' is_transposed)
            self.transposed = bool(getattr(_innermost(base_layer), "is_transposed", False))
            self.in_features, self.out_features = (shape[1], shape[2]) if self.transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, self.transposed = 1, False
            self.out_features, self.in_features = shape
        else:
            raise TargetModuleError(f"target_parameters: {parameter_name} has {len(shape)} dimensions; LoRA adapts "
                                    "2-D (out, in) and 3-D (experts, ., .) parameters")

    # ---- the parameter -------------------------------------------------------------------------
    def get_param(self) -> nn.Parameter:
        return getattr(_innermost(self.base_layer), self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:  # AdapterLayer's _place_adapter/quantisation checks read .weight
        return self.get_param()

    def read_base_weight(self) -> torch.Tensor:
        return self.get_param().data

    def write_base_weight(self, weight: torch.Tensor) -> None:
        self._clear_row_cache()
        self.get_param().data = weight.contiguous()

    def _place_adapter(self, adapter_name: str) -> None:
        weight = self.get_param()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                container[adapter_name].to(weight.device, dtype)

    # ---- creating an adapter -------------------------------------------------------------------
    def _create_adapter(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise ConfigError("target_parameters does not work with lora_bias=True (as in PEFT)")
        if self.use_dora.get(adapter_name):
            raise ConfigError("target_parameters does not work with use_dora=True (as in PEFT)")
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={init!r} is not supported with target_parameters in deltatune; "
                              "use True, False or 'gaussian'")
        super()._init_weights(adapter_name, init)

    # ---- the update ----------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` shaped like the parameter: ``(out, in)``, ``(E, out, in)`` or ``(E, in, out)``."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        s = self.scaling[adapter_name]
        if self.num_experts == 1 and self.get_param().dim() == 2:
            return (b @ a) * s
        e = self.num_experts
        a_e = a.reshape(e, -1, a.shape[-1])                    # (E, r, in): rows e·r.. of A
        b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)    # (E, out, r): column j·E + e of B
        delta = torch.bmm(b_e, a_e) * s                        # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def _combined_weight(self) -> torch.Tensor:
        w = self.get_param()
        delta = None
        for name in self._active_lora():
            d = self.get_delta_weight(name)
            delta = d if delta is None else delta + d
        return w if delta is None else w + delta.to(w.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Refused before the usual choice of path (AdapterLayer.forward), so even with adapters disabled, as before.
        if self.row_adapters is not None:
            raise ConfigError("mixed-adapter batches (adapter_names) are not supported with target_parameters; run "
                              "one adapter per call (set_adapter)")
        return super().forward(x, *args, **kwargs)

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped module's forward with its parameter replaced by ``P + Σ ΔP`` of the active adapters."""
        if not self._active_lora():
            return self.base_layer(x, *args, **kwargs)
        owner, name = _innermost(self.base_layer), self.parameter_name
        param = owner._parameters[name]
        adapted = self._combined_weight()
        del owner._parameters[name]  # a plain tensor cannot be assigned over a registered parameter
        owner.__dict__[name] = adapted
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            del owner.__dict__[name]
            owner._parameters[name] = param

    # ---- nesting (two parameters of one module) --------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        """Delete here and in the nested wrappers of the same module; a nested one left empty is spliced out, so the
        model's walk (which replaces this wrapper by ``base_layer`` when it is empty) puts the plain module back."""
        super().delete_adapter(adapter_name)
        inner = self.base_layer
        if isinstance(inner, LoraParam):
            inner.delete_adapter(adapter_name)
            if not inner.adapter_names():
                self.base_layer = inner.base_layer

    def unloaded(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The plain module, the nested wrappers of the same module unloaded too (merged first if ``merge``)."""
        base = super().unloaded(merge, adapter_names)
        return base.unloaded(merge, adapter_names) if isinstance(base, LoraParam) else base

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"


def _strip_wrappers(name: str) -> str:
    while ".base_layer" in name:
        prefix, _, suffix = name.rpartition(".base_layer")
        name = prefix + suffix
    return name


def inject_parameters(adapter_model: nn.Module, adapter_name: str, config) -> list[str]:
    """Wrap every parameter ``config.target_parameters`` names (a full name, or a suffix after a ``.``, as PEFT
    matches them) and add adapter ``adapter_name`` to it. Returns the matched parameter names.

    Raises:
        TargetModuleError: nothing matched and ``target_modules`` is empty (with modules too, the tuner decides),
            a parameter of the model's top module, or a module that is already a ``target_modules`` layer.
    """
    from deltatune.core.tuner import replace_module

    targets = sorted(set(config.target_parameters))
    model = adapter_model.model
    matched: list[str] = []
    plain = [(n, m) for n, m in model.named_modules() if not isinstance(m, AdapterLayer)]
    for module_name, module in plain:
        if any(p.startswith("lora_") for p in module_name.split(".")):
            continue
        for param_name, _ in list(module.named_parameters(recurse=False)):
            key = f"{_strip_wrappers(module_name)}.{param_name}" if module_name else param_name
            if not any(key == t or key.endswith("." + t) for t in targets):
                continue
            if not module_name:
                raise TargetModuleError(f"target_parameters: {param_name!r} belongs to the top-level module, which "
                                        "cannot be wrapped; target a parameter of a submodule")
            holder_name = _strip_wrappers(module_name)
            holder = model.get_submodule(holder_name)  # the outermost wrapper of this module, or the module
            existing = holder
            while isinstance(existing, LoraParam) and existing.parameter_name != param_name:
                existing = existing.base_layer
            if isinstance(existing, AdapterLayer) and not isinstance(existing, LoraParam):
                kind = type(getattr(existing, "base_layer", existing)).__name__
                raise TargetModuleError(f"Trying to wrap an `nn.Parameter` of layer '{holder_name}' of type {kind}, "
                                        "which is not a valid target. target_parameters: it is also targeted by "
                                        "target_modules; target it one way only")
            layer = existing if isinstance(existing, LoraParam) else LoraParam(holder, param_name)
            layer.update_layer(adapter_name, r=config.rank_for(key), lora_alpha=config.alpha_for(key),
                               lora_dropout=config.lora_dropout, init_lora_weights=config.init_lora_weights,
                               use_rslora=config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias)
            if layer is not existing:
                replace_module(model, holder_name, layer)
            matched.append(key)
    if not matched and not config.target_modules:
        # With target_modules too, PEFT only warns (the tuner does, once it knows whether a module matched)
        raise TargetModuleError("No `target_modules` passed but also no `target_parameters` found. Please check the "
                                f"values for these arguments. target_parameters={targets} matched no parameter; give "
                                "the parameter's name with its module path suffix, e.g. 'mlp.experts.gate_up_proj'")
    return matched


def check_target_parameters(config) -> None:
    """PEFT's restrictions on LoRA over parameters (the update cannot take dropout on the input, and has no bias,
    DoRA magnitude or Conv1D layout); raised when the config is made."""
    for field, bad, why in (("lora_dropout", lambda v: float(v) != 0.0, "dropout on the input cannot be factored "
                                                                          "out of W + ΔW"),
                            ("fan_in_fan_out", bool, "parameters are read in their stored layout"),
                            ("lora_bias", bool, "there is no bias to train"),
                            ("use_dora", bool, "DoRA is not implemented for parameters")):
        if bad(getattr(config, field)):
            raise ConfigError(f"LoraConfig.{field}={getattr(config, field)!r} does not work with target_parameters "
                              f"({why}); drop it, as PEFT requires")


def prepare_config(model: nn.Module, config) -> None:
    """Before targeting: ``target_parameters`` alone, on a model without default ``target_modules``, targets no
    module (PEFT leaves ``target_modules`` empty then; with a default, PEFT adds it, and so do we)."""
    from deltatune.core.targeting import DEFAULT_LORA_TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if getattr(config, "target_parameters", None) and config.target_modules is None \
            and model_type not in DEFAULT_LORA_TARGETS:
        config.target_modules = set()


def after_inject(adapter_model: nn.Module, adapter_name: str, config) -> None:
    if getattr(config, "target_parameters", None):
        inject_parameters(adapter_model, adapter_name, config)
