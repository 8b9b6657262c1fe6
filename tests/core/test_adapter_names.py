"""Adapter names are checked once, the same way, wherever a name enters: no name can write outside the save
directory, collide with torch's module paths, or shadow ``"__base__"`` (no adapter, in mixed batches)."""

from __future__ import annotations

import os

import pytest
import torch
from support.models import tiny_llama

from deltatune import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from deltatune.core.tuner import validate_adapter_name
from deltatune.errors import AdapterNameError

BAD = {
    "absolute": "/tmp/deltatune-escape",
    "parent": "..",
    "parent_path": "../escape",
    "separator": "a/b",
    "backslash": "a\\b",
    "dot": "v1.2",
    "empty": "",
    "base": "__base__",
    "nul": "a\x00b",
}


def _cfg() -> LoraConfig:
    return LoraConfig(r=2, target_modules=["q_proj"])


@pytest.mark.parametrize("name", BAD.values(), ids=BAD.keys())
def test_validate_refuses_in_one_line(name):
    with pytest.raises(AdapterNameError) as info:
        validate_adapter_name(name)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message


def test_validate_refuses_non_strings():
    with pytest.raises(AdapterNameError, match="string"):
        validate_adapter_name(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["default", "task_1", "my-adapter", "Ünïcode", "x" * 100])
def test_validate_accepts_ordinary_names(name):
    validate_adapter_name(name)


@pytest.mark.parametrize("name", BAD.values(), ids=BAD.keys())
def test_get_peft_model_refuses(name):
    with pytest.raises(AdapterNameError):
        get_peft_model(tiny_llama(0), _cfg(), adapter_name=name)


@pytest.mark.parametrize("name", BAD.values(), ids=BAD.keys())
def test_add_adapter_refuses_and_changes_nothing(name):
    pm = get_peft_model(tiny_llama(0), _cfg())
    before = sorted(pm.state_dict())
    with pytest.raises(AdapterNameError):
        pm.add_adapter(name, _cfg())
    assert list(pm.peft_config) == ["default"] and sorted(pm.state_dict()) == before


def test_absolute_name_cannot_escape_the_save_directory(tmp_path):
    outside = tmp_path / "outside"
    pm = get_peft_model(tiny_llama(0), _cfg())
    with pytest.raises(AdapterNameError):
        pm.add_adapter(str(outside), _cfg())
    pm.save_pretrained(tmp_path / "out")
    assert not outside.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_save_pretrained_refuses_a_bad_name_that_got_in(tmp_path):
    """A name put straight into ``peft_config`` (bypassing add_adapter) still cannot steer the writes."""
    pm = get_peft_model(tiny_llama(0), _cfg())
    outside = tmp_path / "outside"
    pm.peft_config[str(outside)] = pm.peft_config["default"]
    with pytest.raises(AdapterNameError):
        pm.save_pretrained(tmp_path / "out")
    assert not outside.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../x", "a.b", "__base__"])
def test_load_adapter_and_from_pretrained_refuse(tmp_path, name):
    get_peft_model(tiny_llama(0), _cfg()).save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    with pytest.raises(AdapterNameError):
        pm.load_adapter(tmp_path, adapter_name=name)
    assert list(pm.peft_config) == ["default"]
    with pytest.raises(AdapterNameError):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path, adapter_name=name)


def test_add_weighted_adapter_refuses():
    pm = get_peft_model(tiny_llama(0), _cfg())
    with pytest.raises(AdapterNameError):
        pm.add_weighted_adapter(["default"], [1.0], "../merged", combination_type="linear")
    assert list(pm.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["../p", "p.1", "__base__", ""])
def test_prompt_learning_refuses(name):
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(AdapterNameError):
        get_peft_model(tiny_llama(0), cfg, adapter_name=name)
    pm = get_peft_model(tiny_llama(0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(AdapterNameError):
        pm.add_adapter(name, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert list(pm.peft_config) == ["default"]
    assert isinstance(pm.prompt_encoder["default"].embedding.weight, torch.Tensor)
