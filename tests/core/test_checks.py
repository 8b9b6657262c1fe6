"""core/checks.py (issue 16): an adapter config's sizes are bounded by its file before anything is built, and
non-finite tensors are found by key; an empty adapter_config.json is called empty, not missing."""

from __future__ import annotations

import pytest
import torch
from support.adapters import edit_adapter_config
from support.models import tiny_llama

from deltatune import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from deltatune.core.checks import check_config_fits_file, check_finite, first_non_finite
from deltatune.errors import AdapterLoadError


def _save(tmp_path, config, name="a") -> str:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    out = str(tmp_path / name)
    model.save_pretrained(out)
    return out




def forbid_building(monkeypatch) -> None:
    """From here on, building any adapter from a config fails the test: a refusal must come before it."""
    from deltatune.core.tuner import AdapterModel
    from deltatune.prompt.tuner import PromptTuner

    def built(*args, **kwargs):
        raise AssertionError("the adapter was built before its config was checked against the file")

    monkeypatch.setattr(AdapterModel, "inject_adapter", built)
    monkeypatch.setattr(PromptTuner, "inject_adapter", built)


@pytest.mark.parametrize("changes, field", [
    ({"r": 1_000_000_000}, "r=1000000000"),
    ({"rank_pattern": {"q_proj": 10**9}}, "rank_pattern['q_proj']=1000000000"),
])
def test_a_lora_config_larger_than_its_file_is_refused_before_building(tmp_path, monkeypatch, changes, field):
    directory = _save(tmp_path, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    forbid_building(monkeypatch)
    edit_adapter_config(directory, **changes)
    with pytest.raises(AdapterLoadError) as caught:
        PeftModel.from_pretrained(tiny_llama(), directory)
    message = str(caught.value)
    assert field in message and directory in message and "shape" in message, message


def test_a_prompt_config_larger_than_its_file_is_refused_before_building(tmp_path, monkeypatch):
    directory = _save(tmp_path, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    forbid_building(monkeypatch)
    edit_adapter_config(directory, num_virtual_tokens=10**8)
    with pytest.raises(AdapterLoadError, match="num_virtual_tokens=100000000"):
        PeftModel.from_pretrained(tiny_llama(), directory)


def test_the_bound_never_refuses_a_matching_config():
    """The check is a bound by the file's largest dimension: a rank larger than r but inside it passes, a size one
    above it does not."""
    config = LoraConfig(r=8, rank_pattern={"v_proj": 16})
    weights = {"x.lora_A.weight": torch.zeros(8, 16), "y.lora_A.weight": torch.zeros(16, 16)}
    check_config_fits_file(config, weights, "here")
    config.rank_pattern = {"v_proj": 17}
    with pytest.raises(AdapterLoadError, match=r"rank_pattern\['v_proj'\]=17, .*the largest is 16"):
        check_config_fits_file(config, weights, "here")


def test_first_non_finite_names_the_first_bad_float_tensor():
    tensors = {"ok": torch.ones(3), "ids": torch.tensor([1, 2]), "inf": torch.tensor([1.0, float("inf")]),
               "nan": torch.tensor([float("nan")], dtype=torch.bfloat16)}
    assert first_non_finite(tensors) == "inf"
    assert first_non_finite({"nan": tensors["nan"]}) == "nan"
    assert first_non_finite({"ok": tensors["ok"], "ids": tensors["ids"]}) is None
    with pytest.raises(AdapterLoadError, match="f.safetensors: tensor inf holds Inf values"):
        check_finite(tensors, "f.safetensors")


@pytest.mark.parametrize("text, expected", [("{}", "is empty: it names no peft_type"),
                                            ('{"r": 8}', "names no peft_type")])
def test_an_adapter_config_without_peft_type_says_so(tmp_path, text, expected):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterLoadError, match=expected):
        PeftConfig.from_pretrained(str(tmp_path))
