"""Behaviour that PEFT users rely on, checked side by side with ``peft`` 0.21.2 on the same tiny models: which tensors
train after loading (``from_pretrained`` / ``load_adapter`` / ``add_adapter``), ``modules_to_save`` refusals, and
the warnings/exception types of ``lora_bias`` over a bias-less layer and AdaLoRA's unused ``r``."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import deltatune as dt


class DeepMLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"lin0": nn.Linear(16, 16, bias=bias), "lin1": nn.Linear(16, 16, bias=bias)})
            for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer["lin1"](torch.relu(layer["lin0"](x)))
        return x


def _base(bias: bool = True) -> DeepMLP:
    torch.manual_seed(0)
    return DeepMLP(bias)


CONFIGS = {
    "lora": lambda lib, **kw: lib.LoraConfig(target_modules=["layers.0.lin0"], **kw),
    "dora": lambda lib, **kw: lib.LoraConfig(target_modules=["layers.0.lin0"], use_dora=True, **kw),
    "adalora": lambda lib, **kw: lib.AdaLoraConfig(target_modules=["layers.0.lin0"], total_step=1, **kw),
    "ia3": lambda lib, **kw: lib.IA3Config(target_modules=["layers.0.lin0"], feedforward_modules=[], **kw),
    "loha": lambda lib, **kw: lib.LoHaConfig(target_modules=["layers.0.lin0"], **kw),
}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _load_sequence(lib, method: str, is_trainable: bool, tmp_path, modules_to_save: bool) -> list[set[str]]:
    """from_pretrained, then load_adapter('other') as trainable as the first, then 'opposite' the other way round,
    then add_adapter('added'): the trainable parameter names after each step."""
    kw = {"modules_to_save": ["layers.0.lin1"]} if modules_to_save else {}
    model = _quiet(lib.get_peft_model, _base(), CONFIGS[method](lib, **kw))
    model.save_pretrained(tmp_path)
    model = _quiet(lib.PeftModel.from_pretrained, _base(), tmp_path, is_trainable=is_trainable)
    steps = [_trainable(model)]
    if method == "adalora" and is_trainable:  # one trainable AdaLoRA adapter at most
        with pytest.raises(ValueError, match="AdaLoraModel supports only 1 trainable adapter"):
            _quiet(model.load_adapter, tmp_path, adapter_name="other", is_trainable=True)
        assert "other" not in model.peft_config
        return steps + [_trainable(model)]
    _quiet(model.load_adapter, tmp_path, adapter_name="other", is_trainable=is_trainable)
    steps.append(_trainable(model))
    _quiet(model.load_adapter, tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    steps.append(_trainable(model))
    if method != "adalora":
        _quiet(model.add_adapter, "added", CONFIGS[method](lib, **kw))
        steps.append(_trainable(model))
    return steps


@pytest.mark.parametrize("modules_to_save", [False, True])
@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_requires_grad_after_loading_equals_peft(tmp_path, method, is_trainable, modules_to_save):
    ours = _load_sequence(dt, method, is_trainable, tmp_path / "dt", modules_to_save)
    theirs = _load_sequence(peft, method, is_trainable, tmp_path / "peft", modules_to_save)
    assert ours == theirs
    # and the sets mean what PEFT's test says: a loaded-trainable adapter trains even when it is not active
    if not is_trainable and method != "adalora":
        assert ours[0] == ours[1] == set()
        assert ours[2] and all(".opposite" in n for n in ours[2])


def test_load_adapter_keeps_flags_the_user_set():
    """A base weight the user unfroze and an adapter tensor they froze stay so across load_adapter (as PEFT)."""
    def run(lib, path):
        model = lib.get_peft_model(_base(), CONFIGS["lora"](lib))
        model.save_pretrained(path)
        lin = model.base_model.model.layers[0]["lin0"]
        lin.base_layer.weight.requires_grad_(True)
        lin.lora_A["default"].weight.requires_grad_(False)
        before = _trainable(model)
        model.load_adapter(path, adapter_name="other", is_trainable=False)
        return before, _trainable(model)

    import tempfile

    ours, theirs = run(dt, tempfile.mkdtemp()), run(peft, tempfile.mkdtemp())
    assert ours == theirs
    assert ours[0] == ours[1]
    assert "base_model.model.layers.0.lin0.base_layer.weight" in ours[1]


@pytest.mark.parametrize("method", ["lora", "ia3", "loha"])
def test_set_adapter_inference_mode_freezes_like_peft(method):
    def run(lib):
        kw = {"modules_to_save": ["layers.0.lin1"]}
        model = _quiet(lib.get_peft_model, _base(), CONFIGS[method](lib, **kw))
        _quiet(model.add_adapter, "b", CONFIGS[method](lib, **kw))
        sets = []
        for name, frozen in (("default", False), ("b", False), ("default", True), ("b", True)):
            model.set_adapter(name, inference_mode=frozen)
            sets.append(_trainable(model))
        return sets

    ours, theirs = run(dt), run(peft)
    assert ours == theirs
    assert ours[2] == ours[3] == set()


@pytest.mark.parametrize("overlap", ["same", "partly"])
def test_two_active_adapters_with_copies_of_one_module_refused(overlap):
    second = ["layers.0.lin1"] if overlap == "same" else ["layers.2.lin1", "layers.1.lin1"]
    first = ["layers.0.lin1"] if overlap == "same" else ["layers.0.lin1", "layers.1.lin1"]
    errors = []
    def state(model):
        return {n: list(m.active_adapters) for n, m in model.named_modules()
                if hasattr(m, "active_adapters") and m is not model and m is not model.base_model}

    for lib in (peft, dt):
        model = lib.get_peft_model(_base(), lib.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=first))
        model.add_adapter("other", lib.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=second))
        before = state(model)
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper") as err:
            model.base_model.set_adapter(["default", "other"])
        errors.append(err.value)
    assert isinstance(errors[1], dt.errors.ConfigError)
    # the refusal changed nothing: no layer was switched before the overlap was found (PEFT switches some first)
    assert model.active_adapters == ["default"] and state(model) == before
    # distinct modules_to_save may be active together
    config = dt.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"])
    model = dt.get_peft_model(_base(), config)
    model.add_adapter("other", dt.LoraConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.1.lin1"]))
    model.base_model.set_adapter(["default", "other"])
    assert sorted(model.active_adapters) == ["default", "other"]


class WithContainers(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.other_layer = nn.Linear(4, 4)
        self.module = {"ModuleDict": lambda: nn.ModuleDict({"a": nn.Linear(4, 4)}),
                       "ModuleList": lambda: nn.ModuleList([nn.Linear(4, 4)]),
                       "ParameterDict": lambda: nn.ParameterDict({"a": nn.Parameter(torch.ones(2))}),
                       "ParameterList": lambda: nn.ParameterList([nn.Parameter(torch.ones(2))])}[kind]()


@pytest.mark.parametrize("kind", ["ModuleDict", "ModuleList", "ParameterDict", "ParameterList"])
def test_modules_to_save_on_a_container_refused_like_peft(kind):
    for lib in (peft, dt):
        model = WithContainers(kind)
        config = lib.LoraConfig(target_modules=["other_layer"], modules_to_save=["module"])
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
            lib.get_peft_model(model, config)
    assert type(model.other_layer) is nn.Linear  # deltatune's failed call changed nothing


def test_lora_bias_without_base_bias_warns_and_merge_raises_like_peft():
    results = []
    for lib in (peft, dt):
        with pytest.warns(lib.PeftWarning, match=r"`lora_bias=True` was passed but the targeted layer of type Linear "
                                                 r"has no bias\. This means that merging LoRA weights won't be"):
            model = lib.get_peft_model(_base(bias=False), lib.LoraConfig(target_modules=["lin0"], lora_bias=True))
        layer = model.base_model.model.layers[0]["lin0"]
        layer.lora_B["default"].weight.data.fill_(1)
        w0 = layer.base_layer.weight.detach().clone()
        for safe in (True, False):
            with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True` because the base "
                                                   "layer has no bias"):
                model.merge_adapter(safe_merge=safe)
            if lib is dt or safe:  # deltatune refuses before writing, also without safe_merge
                assert torch.equal(layer.base_layer.weight, w0)
                assert layer.merged_adapters == []
        results.append(model)
    assert issubclass(dt.PeftWarning, UserWarning)


def test_adalora_r_warning_like_peft():
    for lib in (peft, dt):
        with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored"):
            lib.AdaLoraConfig(r=10, total_step=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lib.AdaLoraConfig(init_r=12, lora_alpha=32, total_step=1)
