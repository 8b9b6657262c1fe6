"""get_layer_status/get_model_status, the modules_to_save / trainable-token wrappers' API, inject_adapter_in_model's
``peft_config`` and ``low_cpu_mem_usage``, and targets never inside adapter layers: each against peft 0.21.2 on the
same model (issue 18)."""

from __future__ import annotations

import dataclasses
import warnings
from operator import attrgetter

import peft
import pytest
import torch
from torch import nn

import deltatune as dt


class Net(nn.Module):
    """One layer of each base type the methods adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv1d(8, 8, 3)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.lin(self.emb(x))))


class GPT2Like(nn.Module):
    """transformers' Conv1D (GPT-2's linear layer): PEFT adapts it with its ``Linear`` class."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_attn(x)


STATUS_CASES = [
    ("LoraConfig", dict(target_modules=["emb", "conv", "lin", "conv1"])),
    ("LoraConfig", dict(target_modules=["emb", "conv", "lin"], use_dora=True)),
    ("LoraConfig", dict(target_modules=["lin"], modules_to_save=["head"])),
    ("LoraConfig", dict(target_modules=["lin"], trainable_token_indices={"emb": [0, 1]})),
    ("IA3Config", dict(target_modules=["conv", "lin"], feedforward_modules=["lin"])),
    ("LoHaConfig", dict(target_modules=["conv", "lin"])),
    ("LoKrConfig", dict(target_modules=["conv", "lin"])),
    ("VeraConfig", dict(target_modules=["lin"], r=4)),
    ("BOFTConfig", dict(target_modules=["lin"], boft_block_size=2)),
    ("OFTConfig", dict(target_modules=["lin", "conv"], r=2, oft_block_size=0)),
    ("AdaLoraConfig", dict(target_modules=["lin"], total_step=10)),
    ("LNTuningConfig", dict(target_modules=["ln"])),
    ("TrainableTokensConfig", dict(target_modules=["emb"], token_indices=[0, 1])),
]


def _both(build):
    """``build(lib)`` for peft and deltatune, from the same seed (warnings of either library are not the point)."""
    out = []
    for lib in (peft, dt):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(build(lib))
    return out


def _status(model) -> tuple[list[dict], dict]:
    return [dataclasses.asdict(s) for s in model.get_layer_status()], dataclasses.asdict(model.get_model_status())


@pytest.mark.parametrize("cls,kwargs", STATUS_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(STATUS_CASES)])
def test_status_fields_equal_peft(cls, kwargs):
    """Every field of every layer's status and of the model's, module_type included ("lora.Linear",
    "adalora.SVDLinear", IA3's bare "Linear", "ln_tuning.LNTuningLayer", ...), as peft 0.21.2 reports them."""
    theirs, ours = _both(lambda lib: _status(lib.get_peft_model(Net(), getattr(lib, cls)(**kwargs))))
    assert ours == theirs
    assert [s["module_type"] for s in ours[0]]  # not vacuous


def test_status_after_switches_equal_peft():
    """Two adapters, one merged, one layer disabled by hand, modules_to_save: the irregular values agree too."""

    def build(lib):
        model = lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["lin", "conv"], modules_to_save=["head"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"]))
        states = [_status(model)]
        model.merge_adapter(["default"])
        states.append(_status(model))
        model.unmerge_adapter()
        model.set_adapter("other")
        states.append(_status(model))
        model.base_model.model.lin.enable_adapters(False)
        states.append(_status(model))
        return states

    theirs, ours = _both(build)
    assert ours == theirs
    assert ours[3][1]["enabled"] == "irregular" and ours[1][1]["merged_adapters"] == "irregular"


def test_status_irregular_active_adapter_set_by_hand():
    """PEFT's tests fake an inconsistent layer through ``_active_adapter``; ours reads it the same way."""

    def build(lib):
        model = lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["lin", "conv"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin", "conv"]))
        model.base_model.model.lin._active_adapter = "other"
        return model.base_model.model.lin.active_adapters, model.get_model_status().active_adapters

    theirs, ours = _both(build)
    assert ours == theirs == (["other"], "irregular")


def test_module_type_conv1d_gpt2():
    theirs, ours = _both(lambda lib: _status(lib.get_peft_model(GPT2Like(), lib.LoraConfig(target_modules=["c_attn"]))))
    assert ours == theirs
    assert ours[0][0]["module_type"] == "lora.Linear"


def test_printed_model_names_layers_as_peft():
    """``repr`` prints PEFT's class names, so a printed model reads the same in both libraries."""
    model = dt.get_peft_model(Net(), dt.LoraConfig(target_modules=["lin"]))
    assert repr(model.base_model.model.lin).startswith("lora.Linear(\n  (base_layer): Linear(")


def test_status_refusals_are_peft_types():
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        dt.get_layer_status(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        dt.get_model_status(nn.Linear(2, 2))

    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = dt.get_peft_model(base, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match=r"get_layer_status\(\) got an invalid PeftModel instance"):
        model.get_layer_status()
    with pytest.raises(TypeError, match=r"get_model_status\(\) got an invalid PeftModel instance"):
        model.get_model_status()


# ---- wrappers ---------------------------------------------------------------------------------------
def _wrapped(lib):
    model = lib.get_peft_model(Net(), lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"],
                                                     trainable_token_indices={"emb": [0, 1]}))
    model.add_adapter("other", lib.LoraConfig(target_modules=["lin"], modules_to_save=["head"],
                                              trainable_token_indices={"emb": [2, 3]}))
    return model


def _attrs(wrapper) -> dict:
    """What PEFT's tests read generically: the attribute names and what attrgetter finds under them."""
    names = getattr(wrapper, "adapter_layer_names", []) + getattr(wrapper, "other_param_names", [])
    return {"names": names, "keys": {n: sorted(attrgetter(n)(wrapper)) for n in names},
            "active": wrapper.active_adapters, "merged": list(wrapper.merged_adapters),
            "available": sorted(wrapper._get_available_adapters()), "disabled": wrapper.disable_adapters}


def test_wrapper_attributes_equal_peft():
    theirs, ours = _both(lambda lib: [_attrs(_wrapped(lib).base_model.model.get_submodule(n)) for n in ("head", "emb")])
    assert ours == theirs
    assert ours[1]["names"] == ("token_adapter.trainable_tokens_delta",
                                "token_adapter.token_indices", "token_adapter.trainable_tokens_original")


def test_wrapper_set_adapter_and_delete_as_peft():
    """set_adapter on a wrapper by hand (PEFT's tests do it to fake an irregular model), PEFT's inference_mode,
    set_requires_grad, delete_adapter with new_active_adapters."""

    def build(lib):
        model = _wrapped(lib)
        head, emb = model.base_model.model.head, model.base_model.model.emb
        out = []
        emb.set_adapter("other")
        out.append((emb.active_adapters, model.get_model_status().active_adapters))
        head.set_adapter("other", inference_mode=True)
        out.append((head.active_adapters, [p.requires_grad for p in head.modules_to_save["other"].parameters()]))
        head.set_requires_grad("default", True)
        out.append(_status(model)[0][-2:] if lib is peft else None)
        head.delete_adapter("other", new_active_adapters=["default"])
        out.append((head.active_adapters, sorted(head.modules_to_save)))
        return out, head.unload_and_optionally_merge_module(False, False, None) is head.modules_to_save["default"]

    (theirs, t_unload), (ours, o_unload) = _both(build)
    assert ours[0] == theirs[0] == (["other"], "irregular")
    assert ours[1] == theirs[1] == (["other"], [False, False])
    assert ours[3] == theirs[3] == (["default"], ["default"])
    assert o_unload and t_unload


def test_modules_to_save_state_dict_maps_as_peft():
    def build(lib):
        head = _wrapped(lib).base_model.model.head
        return head.adapter_state_dict_load_map("other"), sorted(head.adapter_state_dict("other", head.state_dict()))

    theirs, ours = _both(build)
    assert ours == theirs == ({"weight": "modules_to_save.other.weight", "bias": "modules_to_save.other.bias"},
                              ["bias", "weight"])


def test_token_wrapper_overlapping_rows_refused_in_peft_words():
    model = dt.get_peft_model(Net(), dt.LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": [0]}))
    model.add_adapter("other", dt.LoraConfig(target_modules=["lin"], trainable_token_indices={"emb": [0, 5]}))
    emb = model.base_model.model.emb
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
        emb.check_set_adapter(["default", "other"])
    assert emb.check_set_adapter("other") == "other"


# ---- inject_adapter_in_model ------------------------------------------------------------------------
def test_injected_model_carries_peft_config_as_peft():
    def build(lib):
        model = Net()
        first = lib.LoraConfig(target_modules=["lin"])
        out = lib.inject_adapter_in_model(first, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["conv"]), model, adapter_name="other")
        texts = [str(w.message) for w in caught if "peft_config" in str(w.message)]
        keys = sorted(lib.get_peft_model_state_dict(model, adapter_name="other"))
        return out is model, model.peft_config["default"] is first, sorted(model.peft_config), texts, keys

    theirs, ours = _both(build)
    assert ours == theirs
    assert ours[2] == ["default", "other"] and ours[4] == ["conv.lora_A.weight", "conv.lora_B.weight"]


@pytest.mark.parametrize("cls,kwargs", [("LoraConfig", {}), ("BOFTConfig", {"boft_block_size": 2}),
                                        ("OFTConfig", {"r": 2, "oft_block_size": 0}), ("LoHaConfig", {})])
def test_inject_low_cpu_mem_usage_is_meta_then_loads(cls, kwargs):
    """PEFT's low_cpu_mem_usage: the injected adapter is on the meta device; loading puts the file's tensors in
    its place, and the model then computes what the trained one does."""
    config = getattr(dt, cls)(target_modules=["lin"], **kwargs)
    torch.manual_seed(0)
    trained = dt.get_peft_model(Net(), config)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    base = Net()
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in trained.base_model.model.state_dict().items()
                          if not any(s in k for s in ("lora_", "boft_", "oft_", "hada_"))})
    model = dt.inject_adapter_in_model(getattr(dt, cls)(target_modules=["lin"], **kwargs), base,
                                       low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in model.parameters()}
    dt.set_peft_model_state_dict(model, dt.get_peft_model_state_dict(trained))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(x), trained(x))


# ---- targets are never inside adapter layers ----------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [("VeraConfig", {"r": 2}), ("BOFTConfig", {"boft_block_size": 2}),
                                        ("IA3Config", {"feedforward_modules": []}), ("LoHaConfig", {}),
                                        ("OFTConfig", {"r": 2, "oft_block_size": 0}), ("LoraConfig", {})])
@pytest.mark.parametrize("target", [".*", "all-linear"])
def test_second_adapter_regex_skips_adapter_internals(cls, kwargs, target):
    """A regex (or all-linear) second adapter adapts the model's layers, not the first adapter's containers,
    dropout or copies, as in PEFT."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.lin1(self.lin0(x)))

    def build(lib):
        model = lib.get_peft_model(MLP(), getattr(lib, cls)(target_modules=target, **kwargs))
        model.add_adapter("other", getattr(lib, cls)(target_modules=target, **kwargs))
        model(torch.randn(2, 8))
        return sorted(model.base_model.targeted_module_names), [s.available_adapters for s in
                                                                 model.get_layer_status()]

    theirs, ours = _both(build)
    assert ours == theirs
    assert ours[0] == ["head", "lin0", "lin1"]


@pytest.mark.parametrize("cls,prefix", [("LoraConfig", "lora_"), ("LoKrConfig", "lokr_")])
def test_base_module_named_like_an_adapter_stays_the_models(cls, prefix):
    """A base module called ``lora_head`` is the model's: frozen, out of the adapter file, and trainable in full
    through modules_to_save (PEFT decides by structure, not by name)."""

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(5, 5)
            setattr(self, f"{prefix}head", nn.Linear(5, 5))

        def forward(self, x):
            return getattr(self, f"{prefix}head")(self.lin0(x))

    def build(lib):
        plain = lib.get_peft_model(MyModel(), getattr(lib, cls)(target_modules=["lin0"]))
        saved = lib.get_peft_model(MyModel(), getattr(lib, cls)(target_modules=["lin0"],
                                                                 modules_to_save=[f"{prefix}head"]))
        return (getattr(plain.base_model.model, f"{prefix}head").weight.requires_grad,
                sorted(lib.get_peft_model_state_dict(plain)), sorted(lib.get_peft_model_state_dict(saved)))

    theirs, ours = _both(build)
    assert ours == theirs
    assert f"base_model.model.{prefix}head.weight" in ours[2]
