"""AutoPeftModel*: the adapter directory alone loads base + adapter, as PEFT's classes (offline, tiny local bases)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.models import tiny_bert, tiny_llama

import deltatune as dt

IDS = torch.tensor([[1, 5, 7, 9, 11]])


def _adapter_on_local_base(tmp_path, make_base, config, auto_base_cls):
    """Save a tiny base to a directory, load it from there (so its name_or_path is that directory, which
    get_peft_model records), train-free random adapter, save it. Returns (adapter dir, expected logits)."""
    base_dir = tmp_path / "base"
    make_base().save_pretrained(base_dir)
    base = auto_base_cls.from_pretrained(base_dir).eval()
    model = dt.get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    return adapter_dir, base_dir, expected


def test_auto_causal_lm_loads_base_and_adapter_like_peft(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    config = dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir, base_dir, expected = _adapter_on_local_base(tmp_path, tiny_llama, config, AutoModelForCausalLM)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ours = dt.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    assert isinstance(ours, dt.PeftModelForCausalLM) and not ours.training
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, expected)
        torch.testing.assert_close(theirs(IDS).logits, expected)
    assert dt.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, is_trainable=True).get_nb_trainable_parameters()[0]
    half = dt.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, torch_dtype=torch.bfloat16)  # to the base
    assert half.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_auto_sequence_classification_and_wrong_task_class(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    config = dt.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], init_lora_weights=False)
    adapter_dir, _, expected = _adapter_on_local_base(tmp_path, tiny_bert, config, AutoModelForSequenceClassification)
    ours = dt.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    assert isinstance(ours, dt.PeftModelForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, expected)  # the classifier head came from the adapter file
    wrong = "SEQ_CLS adapter; load it with AutoPeftModelForSequenceClassification, not AutoPeftModelForCausalLM"
    with pytest.raises(dt.AdapterLoadError, match=wrong):
        dt.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    with pytest.raises(dt.AdapterLoadError, match="use AutoPeftModelForSequenceClassification"):
        dt.AutoPeftModel.from_pretrained(adapter_dir)


def test_auto_peft_model_uses_auto_mapping_within_the_allowlist(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    config = dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)  # no task_type
    adapter_dir, _, expected = _adapter_on_local_base(tmp_path, tiny_llama, config, AutoModelForCausalLM)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    ours = dt.AutoPeftModel.from_pretrained(adapter_dir)
    assert type(ours.get_base_model()).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, expected)
    saved["auto_mapping"]["parent_library"] = "os"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(dt.ConfigError, match="asks to import 'os', which is not in the import allowlist"):
        dt.AutoPeftModel.from_pretrained(adapter_dir)


def test_auto_without_base_name_is_one_clear_error(tmp_path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)  # a from-config model has no name: nothing recorded
    with pytest.raises(dt.AdapterLoadError, match="names no base_model_name_or_path"):
        dt.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="from_pretrained"):
        dt.AutoPeftModelForCausalLM()


# ---- inject_adapter_in_model ------------------------------------------------------------------
def test_inject_adapter_in_model_matches_peft() -> None:
    ours = dt.inject_adapter_in_model(dt.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False),
                                          tiny_llama())
    assert type(ours).__name__ == "LlamaForCausalLM"  # the model itself, no wrapper
    our_keys = sorted(k for k in ours.state_dict() if "lora_" in k)
    assert our_keys == sorted(k for k in theirs.state_dict() if "lora_" in k)
    assert our_keys[0] == "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits)
    assert dt.get_model_status(ours).peft_types == {} and dt.get_model_status(ours).num_adapter_layers == 2


def test_inject_adapter_in_model_targets_from_a_state_dict() -> None:
    source = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["v_proj"]))
    state = peft.get_peft_model_state_dict(source)  # base_model.model.<module>.lora_A.weight
    model = dt.inject_adapter_in_model(dt.LoraConfig(target_modules=["q_proj"]), tiny_llama(), state_dict=state)
    adapted = sorted({k.split(".lora_")[0] for k in model.state_dict() if "lora_" in k})
    assert adapted == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_inject_adapter_in_model_refuses_what_needs_the_wrapper() -> None:
    with pytest.raises(dt.ConfigError, match="virtual tokens, which need the wrapper: use get_peft_model"):
        dt.inject_adapter_in_model(dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tiny_llama())
    with pytest.raises(dt.ConfigError, match="does not support (PeftType\.)?VERA"):
        dt.inject_adapter_in_model(dt.VeraConfig(target_modules=["q_proj"]), tiny_llama())
