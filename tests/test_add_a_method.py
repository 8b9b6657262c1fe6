"""Adding a method, walked through: a toy weight method defined in this file, registered with one call.

The toy is a learnable per-output scale ("OutputScale"): for a frozen ``nn.Linear`` ``y = W x + b`` it trains
``γ: (out,)`` and computes ``y' = exp(γ) ⊙ (W x + b)``; ``γ = 0`` at init, so the model is unchanged until it
trains. Merged, ``W' = diag(exp(γ)) W`` and ``b' = exp(γ) ⊙ b`` give the same function at no extra cost (the
exponential keeps every factor positive, so unmerging divides it out again).

What a real method touches (the count the registry's design aims at):

1. its package, ``src/deltatune/<method>/`` (``config.py``, ``layer.py``, ``__init__.py`` defining one
   :class:`deltatune.registry.Method`), like the three parts below;
2. one line in :data:`deltatune.registry.BUILTIN` (the package name), which loads and registers it;
3. one member of :class:`deltatune.config.PeftType` (the name its ``adapter_config.json`` carries). This test
   adds that member for its own run only.

Nothing else: ``get_peft_model``, saving and loading, merging, ``disable_adapter`` and ``deltatune inspect`` find
the method through the registry. The shared contract (:func:`support.family_checks.check_model_contract`) runs on
it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from support.family_checks import check_model_contract
from support.models import Holder, tiny_llama
from torch import nn

import deltatune
from deltatune import registry
from deltatune.cli.inspect import describe
from deltatune.config import CONFIG_CLASSES, PeftConfig, PeftType
from deltatune.core.layer import AdapterLayer
from deltatune.core.tuner import tuner_class


# ---- 1. the config: the fields adapter_config.json holds ------------------------------------------------------
@dataclass
class OutputScaleConfig(PeftConfig):
    """A trainable log-scale per output feature of each targeted ``nn.Linear``.

    Args:
        target_modules: Names/suffixes, a regex string (full match) or ``"all-linear"``.
        exclude_modules: Same forms; matching modules are skipped.
        modules_to_save: Modules trained in full and saved with the adapter.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType("OUTPUT_SCALE")
        super().__post_init__()


# ---- 2. the layer: the method's math ---------------------------------------------------------------------------
class OutputScaleLayer(AdapterLayer):
    """``y = exp(γ) ⊙ (W x + b)`` over a frozen ``nn.Linear`` (``x: (..., in)``, ``γ: (out,)``).

    ``AdapterLayer.forward`` picks the path (disabled, mixed-adapter rows, merged); the layer gives the equation
    (:meth:`forward_adapters`) and the merge (:meth:`merged_weight`, :meth:`merged_bias`).
    """

    adapter_layer_names = ("scale_gamma",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.scale_gamma = nn.ParameterDict()

    def update_layer(self, adapter_name: str) -> None:
        self.scale_gamma[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        self._place_adapter(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _factor(self, adapter_name: str) -> torch.Tensor:
        return self.scale_gamma[adapter_name].exp()

    def forward_adapters(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.scale_gamma:
                result = result * self._factor(name).to(result.dtype)
        return result

    def merged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight * self._factor(adapter_name).to(weight.dtype)[:, None]  # W: (out, in)

    def unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight / self._factor(adapter_name).to(weight.dtype)[:, None]

    def merged_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        return None if bias is None else bias * self._factor(adapter_name).detach().to(bias.dtype)

    def _merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = self.base_layer.bias
        if bias is not None:
            factor = self._factor(adapter_name).detach().to(bias.dtype)
            bias.data = bias.data * factor if sign > 0 else bias.data / factor


# ---- 3. the registry entry: how the shared machinery builds it ---------------------------------------------------
def create_or_update(target: nn.Module, adapter_name: str, config: OutputScaleConfig,
                     module_name: str) -> OutputScaleLayer | None:
    """Add ``adapter_name`` to ``target`` (wrapping a plain ``nn.Linear`` first); ``None``: not a type it adapts."""
    if isinstance(target, OutputScaleLayer):
        layer = target
    elif type(target) is nn.Linear:
        layer = OutputScaleLayer(target)
    else:
        return None
    layer.update_layer(adapter_name)
    return layer


def _add_peft_type(name: str) -> PeftType:
    """What a real method writes in ``config.py`` (``OUTPUT_SCALE = "OUTPUT_SCALE"``), done at run time: ``PeftType``
    is a closed enum, so its tables are extended by hand (and restored by :func:`_remove_peft_type`)."""
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def _remove_peft_type(name: str) -> None:
    PeftType._member_names_.remove(name)
    del PeftType._member_map_[name]
    del PeftType._value2member_map_[name]


@pytest.fixture
def output_scale():
    """Register the toy method (the one call a method defined outside deltatune makes); unregister afterwards."""
    peft_type = _add_peft_type("OUTPUT_SCALE")
    method = registry.register(registry.Method(
        peft_type=peft_type,
        config_cls=OutputScaleConfig,
        prefix="scale_",  # in every trainable parameter's name
        layer_cls=OutputScaleLayer,
        create_or_update=create_or_update,
        supported_types=lambda: (nn.Linear,),
        cli_names={"output_scale": {}},  # deltatune train --method output_scale
    ))
    try:
        yield method
    finally:
        registry.METHODS.pop(peft_type, None)
        CONFIG_CLASSES.pop(peft_type, None)
        _remove_peft_type("OUTPUT_SCALE")


def test_the_math_on_one_layer(output_scale):
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    model = deltatune.get_peft_model(Holder(linear), OutputScaleConfig(target_modules=["layer"]))
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), F.linear(x, w, b))  # γ = 0: the base model
    gamma = model.base_model.model.layer.scale_gamma["default"]
    with torch.no_grad():
        gamma.normal_(std=0.3)
    want = F.linear(x, w, b) * gamma.exp()
    torch.testing.assert_close(model(x), want)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), F.linear(x, w, b))
    model.merge_adapter()
    torch.testing.assert_close(model(x), want)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.layer.base_layer.weight, w)
    plain = model.merge_and_unload()
    assert type(plain.layer) is nn.Linear
    torch.testing.assert_close(plain(x), want)


def test_the_shared_contract_holds(output_scale, tmp_path):
    """Identity at init, disable, merge == unmerged, unmerge restores, gradients only on ``scale_``, files."""
    check_model_contract(tiny_llama, "llama", lambda: OutputScaleConfig(target_modules=["q_proj", "v_proj"]),
                         "scale_", tmp_path)


def test_files_name_the_method_and_load_back(output_scale, tmp_path):
    torch.manual_seed(0)
    model = deltatune.get_peft_model(tiny_llama(), OutputScaleConfig(target_modules=["o_proj"]))
    assert isinstance(model.base_model, tuner_class(output_scale))  # PEFT's tuner class, made from the entry
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "OUTPUT_SCALE"
    assert isinstance(PeftConfig.from_pretrained(tmp_path), OutputScaleConfig)

    ids = torch.tensor([[1, 2, 3, 4]])
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    info = describe(str(tmp_path))  # deltatune inspect: the method's layers found by its containers
    assert info["method"] == "OUTPUT_SCALE"
    assert info["module_suffixes"] == ["o_proj"] and info["adapted_modules"] == 2


def test_every_builtin_method_comes_from_one_line_of_the_registry():
    """The built-in methods are exactly the entries their packages define, loaded from ``registry.BUILTIN``."""
    packages = {m.config_cls.__module__.rsplit(".", 1)[0] for m in registry.METHODS.values()}
    assert packages == set(registry.BUILTIN)
