"""Targeting and config warnings, side by side with real ``peft`` 0.21.2 (issue 18).

Each check does the same thing under deltatune and under ``peft`` and compares what calling code sees: the
warning's category and the start of its text, the exception type, the names the tuner records as targeted.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.config import PeftRuntimeWarning
from deltatune.core.targeting import check_target_module_exists

LIBS = (dt, peft)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.lin0(x)))


class TiedLM(nn.Module):
    """An LM whose output layer shares the input embedding's weight (PEFT reads ``_tied_weights_keys``)."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 8)
        self.linear = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def _caught(fn: Callable[[], object]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn()
    return record


def _one(record: list[warnings.WarningMessage], start: str) -> warnings.WarningMessage:
    hits = [w for w in record if str(w.message).startswith(start)]
    assert len(hits) == 1, [str(w.message) for w in record]
    return hits[0]


def _same_warning(build: Callable[[object], object], start: str, category: type[Warning]) -> None:
    """``build(lib)`` warns with text starting ``start`` in both libraries, of ``category``."""
    for lib in LIBS:
        hit = _one(_caught(lambda lib=lib: build(lib)), start)
        assert issubclass(hit.category, category), (lib.__name__, hit.category)


# ---- RuntimeWarning: patterns and targets that matched nothing --------------------------------------------------
def test_unmatched_rank_and_alpha_pattern_keys_are_runtime_warnings_as_in_peft() -> None:
    def build(lib):
        return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0", "lin1"], rank_pattern={"lin0": 2,
                                  "other.typo": 4}, alpha_pattern={"typo_key": 3}))

    for attr, keys in (("rank_pattern", "['other.typo']"), ("alpha_pattern", "['typo_key']")):
        start = f"The following {attr} keys did not match any targeted module and were ignored: {keys}"
        _same_warning(build, start, RuntimeWarning)
    assert issubclass(PeftRuntimeWarning, dt.PeftWarning)  # a filter on PeftWarning still catches them


def test_target_modules_matching_nothing_beside_matched_target_parameters_warns() -> None:
    def build(lib):
        return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["foobar"], target_parameters=["lin0.weight"]))

    _same_warning(build, "target_modules={'foobar'} were set but no module was matched.", RuntimeWarning)
    assert dt.get_peft_model(MLP(), dt.LoraConfig(target_modules=["foobar"], target_parameters=["lin0.weight"])
                             ).targeted_parameter_names == ["lin0.weight"]


def test_target_parameters_matching_nothing_beside_matched_target_modules_warns() -> None:
    def build(lib):
        return lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], target_parameters=["foobar.weight"]))

    _same_warning(build, "target_parameters=['foobar.weight'] were set but no parameter was matched.", RuntimeWarning)


def test_neither_target_modules_nor_target_parameters_matching_raises_as_peft() -> None:
    for lib in LIBS:
        with pytest.raises(ValueError, match="Target modules {'foobar'} not found in the base model"):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["foobar"], target_parameters=["x.weight"]))


# ---- target_parameters: type and consistency across adapters ----------------------------------------------------
def test_target_parameters_as_a_string_is_a_type_error_as_in_peft() -> None:
    for lib in LIBS:
        with pytest.raises(TypeError, match="`target_parameters` must be a list of strings or None."):
            lib.LoraConfig(target_parameters="lin0.weight")
    with pytest.raises(dt.ConfigError):  # still deltatune's config error for code that catches that
        dt.LoraConfig(target_parameters="lin0.weight")


def test_adapters_with_different_target_parameters_are_refused_as_in_peft() -> None:
    for lib in LIBS:
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=[], target_parameters=["lin0.weight"]))
        with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
            model.add_adapter("other", lib.LoraConfig(target_modules=[], target_parameters=["lin1.weight"]))
        assert list(model.peft_config) == ["default"]  # nothing half-added
        model.add_adapter("same", lib.LoraConfig(target_modules=[], target_parameters=["lin0.weight"]))


# ---- the tuner's record of targeted names ------------------------------------------------------------------------
def test_targeted_names_match_peft_in_order_across_adapters() -> None:
    names = {}
    for lib in LIBS:
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin1"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0", "lin1"]))
        params = lib.get_peft_model(MLP(), lib.LoraConfig(target_parameters=["lin1.weight", "lin0.weight"]))
        names[lib] = (model.targeted_module_names, model.base_model.targeted_module_names,
                      params.targeted_parameter_names, params.targeted_module_names)
    assert names[dt] == names[peft]
    assert names[dt][0] == ["lin1", "lin0"] and names[dt][2] == ["lin0.weight", "lin1.weight"]


@pytest.mark.parametrize("key,layers,pattern", [
    ("layers.1.layers.0.up_proj", [1], ["layers"]), ("layers.1.layers.0.up_proj", [0], ["layers"]),
    ("model.layers.1.layers.0.up_proj", [1], ["layers"]), ("model.layers.1.layers.0.up_proj", [0], ["layers"]),
    ("layers.1.layers.0.up_proj", [0], [r"\d+\.layers"]), ("layers.1.layers.0.up_proj", [1], [r"\d+\.layers"]),
    ("model.h.3.mlp.up_proj", [3], "h"), ("model.blocks.3.up_proj", [3], ["h", "blocks"]),
])
def test_layers_to_transform_picks_the_outer_layer_index_as_peft(key, layers, pattern) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists as theirs

    config = dict(target_modules=["up_proj"], layers_to_transform=layers, layers_pattern=pattern)
    assert bool(check_target_module_exists(dt.LoraConfig(**config), key)) == bool(theirs(peft.LoraConfig(**config),
                                                                                           key))


def test_min_target_modules_for_optimization_has_peft_value() -> None:
    from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION

    from deltatune.utils import MIN_TARGET_MODULES_FOR_OPTIMIZATION as ours

    assert ours == MIN_TARGET_MODULES_FOR_OPTIMIZATION


# ---- UserWarnings of get_peft_model and disable_adapter ----------------------------------------------------------
def test_renamed_base_model_name_warns_and_takes_the_models_name_as_peft() -> None:
    for name in (None, "foobar"):
        configs = {}
        for lib in LIBS:
            model = MLP()
            if name is not None:
                model.name_or_path = name
            config = lib.LoraConfig(target_modules=["lin0"], base_model_name_or_path="custom_name")
            hit = _one(_caught(lambda lib=lib, model=model, config=config: lib.get_peft_model(model, config)),
                       f"The PEFT config's `base_model_name_or_path` was renamed from 'custom_name' to '{name}'")
            assert issubclass(hit.category, UserWarning)
            configs[lib] = config.base_model_name_or_path
        assert configs[dt] == configs[peft] == name


def test_get_peft_model_on_a_peft_model_warns_as_peft() -> None:
    def build(lib):
        first = lib.get_peft_model(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4)),
                                   lib.LoraConfig(target_modules=["0"]))
        return lib.get_peft_model(first, lib.LoraConfig(target_modules="base_model.model.1"))

    _same_warning(build, "You are trying to modify a model with PEFT for a second time", UserWarning)


def test_disable_adapter_with_mixed_enabled_layers_warns_as_peft() -> None:
    for lib in LIBS:
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
        layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")]
        layers[0].enable_adapters(False)

        def enter(model=model):
            with model.disable_adapter():
                pass

        hit = _one(_caught(enter), "The model contains some adapter layers that are enabled and others that are "
                                   "disabled")
        assert issubclass(hit.category, UserWarning)
        assert {m.disable_adapters for m in layers} == {False}  # all enabled after the block, as PEFT
        assert not [w for w in _caught(enter) if "enabled and others" in str(w.message)]  # regular now: silent


def _untied_lm() -> TiedLM:
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model._tied_weights_keys = []
    return model


@pytest.mark.parametrize("targets", [["linear", "lm_head"], ["lm_head"]])
def test_tied_layer_in_a_non_lora_adapter_warns_as_peft(targets) -> None:
    def build(lib):
        return lib.get_peft_model(TiedLM(), lib.LoKrConfig(target_modules=targets))

    _same_warning(build, "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but no "
                         "implementation exists to tie the adapters.", UserWarning)
    for lib in LIBS:  # nothing tied: no warning
        record = _caught(lambda lib=lib: lib.get_peft_model(_untied_lm(), lib.LoKrConfig(target_modules=targets)))
        assert not [w for w in record if "tie_word_embeddings" in str(w.message)], lib.__name__


# ---- DoRA at init is the base layer bit for bit (PEFT's test_lora_use_dora_linear) -----------------------------
@pytest.mark.parametrize("zero_row", [False, True])  # a zero magnitude row takes the kernel's other branch
def test_dora_linear_with_bias_is_exactly_the_base_at_init_and_trains_as_peft(zero_row) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48))
    x = torch.rand(5, 64)
    expected = base(x)
    models = {lib: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(target_modules=["0"], use_dora=True,
                                                                          init_lora_weights=False))
              for lib in LIBS}
    ours = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(target_modules=["0"], use_dora=True))
    assert torch.equal(ours(x), expected)  # B = 0 and m = ||W||: no rounding apart from the base layer's
    # trained state (init_lora_weights=False: B random), same tensors in both; outputs and gradients agree
    state = {k: v for k, v in models[peft].state_dict().items() if "lora_" in k}
    if zero_row:
        key = next(k for k in state if "magnitude" in k)
        state[key][3] = 0.0
    for model in models.values():
        model.load_state_dict(state, strict=False)
    outs, grads = {}, {}
    for lib, model in models.items():
        y = model(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs[lib] = y.detach()
        grads[lib] = {n.split("0.")[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outs[dt], outs[peft], rtol=1e-5, atol=1e-6)
    assert grads[dt].keys() == grads[peft].keys()
    for name in grads[peft]:
        torch.testing.assert_close(grads[dt][name], grads[peft][name], rtol=1e-4, atol=1e-5, msg=name)


def test_target_parameter_of_a_target_module_is_refused_with_peft_sentence() -> None:
    msg = "Trying to wrap an `nn.Parameter` of layer 'lin0' of type Linear, which is not a valid target."
    for lib in LIBS:
        with pytest.raises(ValueError, match=re.escape(msg)):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0"], target_parameters=["lin0.weight"]))
