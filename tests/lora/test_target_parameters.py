"""LoRA on parameters, ``LoraConfig(target_parameters=[...])`` (issue 19 item 4): mixture-of-experts weights stored as
3-D ``nn.Parameter`` (Qwen3-MoE ``(E, out, in)``, GPT-OSS ``(E, in, out)``) and 2-D ones (the router's weight).

Files cross with PEFT 0.21.2 both ways (same keys and shapes, equal logits); merge, unmerge, merge_and_unload,
disable_adapter, several adapters, delete, training and the CLI work.
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, TargetModuleError
from deltatune.lora import LoraParam

IDS = torch.tensor([[1, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe(seed: int = 0):
    """Qwen3-MoE: hidden 32, 2 layers, 4 experts of width 8 (gate_up_proj (4, 16, 32), down_proj (4, 32, 8))."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg).eval()


def tiny_gpt_oss(seed: int = 0):
    """GPT-OSS: experts stored transposed, gate_up_proj (4, 32, 16), down_proj (4, 8, 32) (``is_transposed``)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=2,
                       tie_word_embeddings=False)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # torch.empty parameters: give every expert tensor defined values
        for name, p in model.named_parameters():
            if "experts" in name or "sinks" in name:
                p.normal_(0, 0.1)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


CASES = {
    "qwen3_moe": (tiny_qwen3_moe, EXPERTS),
    "gpt_oss": (tiny_gpt_oss, EXPERTS),
    "qwen3_moe_router_2d": (tiny_qwen3_moe, ["mlp.experts.down_proj", "mlp.gate.weight"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_load_in_deltatune_and_back_with_equal_logits(tmp_path, case):
    make, targets = CASES[case]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=5, target_parameters=targets,
                                                         init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    expected, base = _logits(theirs), _logits(make())
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output

    ours = dt.PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(targets)
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=1e-5)


def test_created_in_deltatune_equals_peft_on_the_same_tensors():
    ours = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS,
                                                             init_lora_weights=False))
    theirs = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
    assert ours.peft_config["default"].target_modules == set()  # no default modules on an MoE without a default
    ours_sd = dt.get_peft_model_state_dict(ours)
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    peft.set_peft_model_state_dict(theirs, ours_sd)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
    experts = ours.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraParam) and experts.parameter_name == "down_proj"  # PEFT's nesting order
    assert experts.base_layer.parameter_name == "gate_up_proj"


def test_default_init_is_an_identity_and_only_the_adapter_trains():
    model = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(r=2, target_parameters=EXPERTS))
    torch.testing.assert_close(_logits(model), _logits(tiny_qwen3_moe()), atol=0, rtol=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 parameters x (A, B)


@pytest.mark.parametrize("make", [tiny_qwen3_moe, tiny_gpt_oss], ids=["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_disable_and_merge_and_unload(make):
    base_logits = _logits(make())
    model = dt.get_peft_model(make(), dt.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS,
                                                    init_lora_weights=False))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert experts.transposed == (make is tiny_gpt_oss)  # GPT-OSS stores (E, in, out) and says is_transposed
    w0 = experts.get_param().detach().clone()
    adapted = _logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_logits, atol=1e-6, rtol=0)
    model.merge_adapter()
    assert not torch.equal(experts.get_param(), w0)
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(experts.get_param(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model), adapted, atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, dt.lora.LoraLayer) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-5, rtol=1e-5)


def test_two_adapters_switch_delete_and_unload():
    model = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(r=2, target_parameters=EXPERTS,
                                                              init_lora_weights=False))
    first = _logits(model)
    torch.manual_seed(3)
    model.add_adapter("other", dt.LoraConfig(r=4, target_parameters=EXPERTS, init_lora_weights=False))
    model.set_adapter("other")
    other = _logits(model)
    assert (other - first).abs().max() > 1e-3
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert experts.base_layer.lora_A["other"].weight.shape == (4 * 4, 32)  # r * experts rows, reused wrapper
    model.delete_adapter("default")
    torch.testing.assert_close(_logits(model), other, atol=1e-6, rtol=0)
    plain = model.unload()
    assert not any(isinstance(m, LoraParam) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), _logits(tiny_qwen3_moe()), atol=0, rtol=0)


def test_training_moves_the_output():
    model = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_configs_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="lora_dropout=0.1 does not work with target_parameters"):
        dt.LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="use_dora=True does not work with target_parameters"):
        dt.LoraConfig(target_parameters=EXPERTS, use_dora=True)
    with pytest.raises(ConfigError, match="must be a list"):
        dt.LoraConfig(target_parameters="mlp.experts.down_proj")
    model = tiny_qwen3_moe()
    with pytest.raises(TargetModuleError, match=r"matched no parameter"):
        dt.get_peft_model(model, dt.LoraConfig(target_parameters=["mlp.experts.nope"]))
    assert not any(isinstance(m, dt.lora.LoraLayer) for m in model.modules())  # nothing left behind
    with pytest.raises(ConfigError, match="mixed-adapter batches"):
        peft_model = dt.get_peft_model(tiny_qwen3_moe(), dt.LoraConfig(target_parameters=EXPERTS))
        peft_model(input_ids=IDS, adapter_names=["default", "__base__"])


def test_cli_trains_target_parameters_and_peft_loads_it(tmp_path, capsys):
    from support import tinymodels
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from deltatune.cli import main

    tokenizer = tinymodels.make_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_dir = str(tmp_path / "moe")
    Qwen3MoeForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = str(tmp_path / "pc.jsonl")
    tinymodels.write_jsonl(data, tinymodels.prompt_records(16))
    out = tmp_path / "adapter"
    code = main(["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "3",
                 "--lr", "1e-2", "--target-parameters", ",".join(EXPERTS), "--precision", "fp32", "--no-progress",
                 "--batch-size", "4", "--eval-batch-size", "4"])
    _, err = capsys.readouterr()
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    assert not config["target_modules"]  # only the experts: qwen3_moe has no default target_modules
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]
    ids = torch.tensor([[5, 6, 7, 8]])
    ours = dt.PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(model_dir), str(out))
    theirs = peft.PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(model_dir), str(out))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert os.path.exists(out / "adapter_model.safetensors")
