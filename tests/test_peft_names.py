"""Small PEFT public names deltatune offers under the same name and meaning: targeting checks, the base model's
state dict, the modules_to_save wrapper's attributes, ``get_base_layer`` and the features every layer carries."""

from __future__ import annotations

import torch
from support.models import tiny_bert, tiny_llama
from torch import nn

import deltatune
from deltatune import LoraConfig, OFTConfig, TaskType, get_peft_model
from deltatune.core.layer import AdapterLayer
from deltatune.core.modules_to_save import ModulesToSaveWrapper
from deltatune.core.tuner import AdapterModel


# ---- check_target_module_exists -----------------------------------------------------------------
def test_check_target_module_exists_suffixes_layers_and_excludes():
    check = deltatune.check_target_module_exists
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"])
    assert check(cfg, "model.layers.0.self_attn.q_proj")
    assert check(cfg, "q_proj")
    assert not check(cfg, "model.layers.0.self_attn.k_proj")
    assert not check(cfg, "model.layers.0.self_attn.xq_proj")  # a suffix is a whole name part
    cfg = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert check(cfg, "model.layers.1.self_attn.q_proj")
    assert not check(cfg, "model.layers.0.self_attn.q_proj")
    cfg = LoraConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=["v_proj"])
    assert check(cfg, "model.layers.0.self_attn.q_proj")
    assert not check(cfg, "model.layers.0.self_attn.v_proj")


def test_check_target_module_exists_never_inside_modules_to_save():
    cfg = LoraConfig(target_modules=["dense"], modules_to_save=["classifier"])
    assert deltatune.check_target_module_exists(cfg, "bert.pooler.dense")
    assert not deltatune.check_target_module_exists(cfg, "classifier.dense")
    assert not deltatune.check_target_module_exists(cfg, "head.classifier.dense")


def test_layer_index_is_the_first_number_not_a_nested_expert():
    # "layers.1.experts.0.w1" is in layer 1; the expert index 0 is not the layer (PEFT takes the first index too)
    cfg = LoraConfig(target_modules=["w1"], layers_to_transform=[1])
    assert deltatune.check_target_module_exists(cfg, "model.layers.1.experts.0.w1")
    assert not deltatune.check_target_module_exists(cfg, "model.layers.0.experts.1.w1")


# ---- get_base_model_state_dict ------------------------------------------------------------------
def test_get_base_model_state_dict_has_the_plain_models_keys_and_tensors():
    plain = tiny_bert().state_dict()
    model = get_peft_model(tiny_bert(), LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"],
                                                   init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)  # the trained copy
    got = deltatune.get_base_model_state_dict(model)
    assert sorted(got) == sorted(plain)
    for key, value in plain.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k for k in got)
    tiny_bert().load_state_dict(got, strict=True)


# ---- ModulesToSaveWrapper -----------------------------------------------------------------------
def test_modules_to_save_wrapper_attributes_follow_the_active_copy():
    head = nn.Linear(4, 3)
    wrapper = ModulesToSaveWrapper(head, "a")
    assert wrapper.adapter_layer_names == ("modules_to_save",)
    assert wrapper.active_adapters == ["a"]
    assert wrapper.in_features == 4 and wrapper.out_features == 3
    assert wrapper.bias is wrapper.modules_to_save["a"].bias
    assert wrapper.weight is wrapper.modules_to_save["a"].weight
    wrapper.enable_adapters(False)
    assert wrapper.bias is head.bias and wrapper.weight is head.weight
    wrapper.enable_adapters(True)
    wrapper.delete_adapter("a")
    assert wrapper.active_adapters == [] and wrapper.bias is head.bias
    assert wrapper.get_base_layer() is head


# ---- get_model_config ---------------------------------------------------------------------------
def test_get_model_config():
    llama = tiny_llama()
    got = AdapterModel.get_model_config(llama)
    assert got == llama.config.to_dict() and got["model_type"] == "llama"
    first = AdapterModel.get_model_config(nn.Linear(2, 2))
    assert first == {"model_type": "custom"}
    first["model_type"] = "edited"
    assert AdapterModel.get_model_config(nn.Linear(2, 2)) == {"model_type": "custom"}  # not a shared dict
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert model.base_model.get_model_config(model.get_base_model())["model_type"] == "llama"


# ---- get_base_layer and in/out features ---------------------------------------------------------
def test_get_base_layer_and_features_on_every_layer():
    model = get_peft_model(tiny_llama(), OFTConfig(target_modules=["q_proj", "down_proj"], r=0,
                                                   oft_block_size=4))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(q, AdapterLayer)
    assert q.get_base_layer() is q.base_layer and isinstance(q.base_layer, nn.Linear)
    assert (q.in_features, q.out_features) == (32, 32)
    assert (down.in_features, down.out_features) == (64, 32)
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"]))
    k = lora.base_model.model.model.layers[1].self_attn.k_proj
    assert (k.in_features, k.out_features) == (32, 16)  # 2 kv heads of 8
    # a layer stacked on another adapter layer reports the innermost base
    stacked = AdapterLayer(k)
    assert stacked.get_base_layer() is k.base_layer
    assert (stacked.in_features, stacked.out_features) == (32, 16)
