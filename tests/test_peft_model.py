"""``PeftModel`` behaviour: training touches only the adapter, parameter counts, named adapters,
save/load, task classes, generate, unload, LoRA+ and ``PeftConfig.from_pretrained``.

Where PEFT defines the answer (counts, trainable names, optimizer groups, printed text) the test runs
PEFT on the same model and config and asserts deltatune gives the same.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from support.models import make_inputs, output, perturb_trainable, tiny_bert, tiny_gpt2, tiny_llama, tiny_net, tiny_t5
from torch import nn

import deltatune
from deltatune import LoraConfig, PeftConfig, PeftModel, get_peft_model

ATOL = 1e-6


def _trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# ---- training touches only the adapter -----------------------------------------------------------

@pytest.mark.parametrize("factory,cfg", [
    (tiny_llama, {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    (tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    (tiny_gpt2, {"target_modules": ["c_attn"], "use_dora": True, "fan_in_fan_out": True}),
    (tiny_llama, {"target_modules": ["q_proj"], "lora_bias": True}),
], ids=["llama-mts", "bert-seqcls", "gpt2-dora", "llama-lora-bias"])
def test_training_changes_only_adapter_and_saved_modules(factory, cfg):
    base_state = {k: v.clone() for k, v in factory(0).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # init_lora_weights=False: with B = 0 the gradient of A is zero at first and A barely moves.
        pm = get_peft_model(factory(0), LoraConfig(r=4, init_lora_weights=False, **copy.deepcopy(cfg)))
        ref = peft.get_peft_model(factory(0), peft.LoraConfig(r=4, **copy.deepcopy(cfg)))
    assert _trainable(pm) == _trainable(ref), "the trainable parameter names must be PEFT's"
    names = _trainable(pm)
    assert names and all("lora_" in n or ".modules_to_save.default." in n for n in names), names
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}

    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    inputs = make_inputs("bert" if factory is tiny_bert else "llama")
    labels = torch.tensor([0, 1]) if factory is tiny_bert else inputs["input_ids"]
    for _ in range(2):
        opt.zero_grad()
        pm(**inputs, labels=labels).loss.backward()
        for n, p in pm.named_parameters():
            has_grad = p.grad is not None
            assert has_grad == p.requires_grad, f"{n}: grad={has_grad}, trainable={p.requires_grad}"
        opt.step()
    for n, p in pm.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in names), f"{n}: changed={changed}, trainable={n in names}"
    # The frozen base (and the frozen originals of modules_to_save) are bit-identical to a fresh base.
    merged_keys = {k.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", ""): v
                   for k, v in pm.state_dict().items()
                   if "lora_" not in k and ".modules_to_save." not in k}
    assert sorted(merged_keys) == sorted(base_state)
    for k, v in base_state.items():
        assert torch.equal(merged_keys[k], v), f"base tensor {k} changed"


def test_inference_mode_load_has_no_grads(tmp_path):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    pm.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert _trainable(frozen) == []
    assert not frozen.training
    inputs = make_inputs("llama")
    out = frozen(**inputs, labels=inputs["input_ids"])
    assert not out.loss.requires_grad
    trainable = PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert _trainable(trainable) == _trainable(pm)
    assert trainable.peft_config["default"].inference_mode is False
    assert frozen.peft_config["default"].inference_mode is True


# ---- parameter counts ----------------------------------------------------------------------------

COUNT_CASES = [
    (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "r": 4}),
    (tiny_llama, {"target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"], "r": 2}),
    (tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "r": 4, "bias": "all"}),
    (tiny_gpt2, {"target_modules": "all-linear", "use_dora": True, "fan_in_fan_out": True, "r": 3}),
    (tiny_net, {"target_modules": ["conv2d", "lin1", "head"], "r": 2, "lora_bias": True}),
    (tiny_net, {"target_modules": ["emb", "conv3d", "conv1d"], "r": 2, "bias": "lora_only"}),
]


@pytest.mark.parametrize("factory,cfg", COUNT_CASES, ids=["llama", "llama-emb-mts", "bert-bias-all", "gpt2-dora",
                                                          "net-lora-bias", "net-bias-lora-only"])
def test_nb_trainable_parameters_match_manual_and_peft(factory, cfg, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(factory(0), LoraConfig(**copy.deepcopy(cfg)))
        ref = peft.get_peft_model(factory(0), peft.LoraConfig(**copy.deepcopy(cfg)))
    trainable, total = pm.get_nb_trainable_parameters()
    manual_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    manual_total = sum(p.numel() for p in pm.parameters())
    assert (trainable, total) == (manual_trainable, manual_total)
    assert (trainable, total) == ref.get_nb_trainable_parameters()
    assert 0 < trainable < total

    pm.print_trainable_parameters()
    ours = capsys.readouterr().out
    ref.print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs
    assert f"trainable params: {trainable:,d}" in ours


def test_lora_param_count_formula():
    """r (in + out) per Linear; r (num + dim) per Embedding; for q/v on the tiny Llama: 2 layers x 2 modules."""
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads x head_dim 8)
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert pm.get_nb_trainable_parameters()[0] == expected
    base_total = sum(p.numel() for p in tiny_llama(0).parameters())
    assert pm.get_nb_trainable_parameters()[1] == base_total + expected


# ---- named adapters ------------------------------------------------------------------------------

def _two_adapter_model():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["v_proj", "o_proj"],
                                       init_lora_weights=False))
    return pm.eval()


def test_add_set_delete_adapter():
    inputs = make_inputs("llama")
    base_out = output(tiny_llama(0), inputs)
    pm = _two_adapter_model()
    assert set(pm.peft_config) == {"default", "other"}
    assert pm.active_adapter == "default", "add_adapter must not switch the active adapter (PEFT)"
    out_default = output(pm, inputs)
    assert all(".other." not in n for n in _trainable(pm))

    pm.set_adapter("other")
    assert pm.active_adapter == "other"
    assert pm.active_adapters == ["other"]
    out_other = output(pm, inputs)
    assert (out_default - out_other).abs().max() > 1e-3
    assert (out_other - base_out).abs().max() > 1e-3
    trainable = _trainable(pm)
    assert trainable and all(".other." in n for n in trainable)

    pm.set_adapter("default")
    torch.testing.assert_close(output(pm, inputs), out_default, atol=0, rtol=0)

    pm.delete_adapter("other")
    assert set(pm.peft_config) == {"default"}
    assert not any(".other" in n for n, _ in pm.named_parameters())
    assert not any(".other" in n for n in pm.state_dict())
    # o_proj only had "other": it is a plain nn.Linear again.
    assert type(pm.base_model.model.model.layers[0].self_attn.o_proj) is nn.Linear
    torch.testing.assert_close(output(pm, inputs), out_default, atol=0, rtol=0)


def test_delete_active_adapter_switches_to_remaining():
    inputs = make_inputs("llama")
    pm = _two_adapter_model()
    out_default = output(pm, inputs)
    pm.set_adapter("other")
    pm.delete_adapter("other")
    assert pm.active_adapter == "default"
    torch.testing.assert_close(output(pm, inputs), out_default, atol=0, rtol=0)


def test_second_adapter_equals_a_model_with_only_it():
    """Adapters are independent: "other" in a two-adapter model computes what a model with only it computes."""
    inputs = make_inputs("llama")
    pm = _two_adapter_model()
    pm.set_adapter("other")
    single = get_peft_model(tiny_llama(0), LoraConfig(r=3, lora_alpha=5, target_modules=["v_proj", "o_proj"]))
    sd = {k.replace(".other.", ".default."): v for k, v in pm.state_dict().items() if ".other." in k}
    missing, unexpected = single.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all("lora_" not in k for k in missing)
    torch.testing.assert_close(output(single.eval(), inputs), output(pm, inputs), atol=ATOL, rtol=1e-5)


def test_adapter_name_errors():
    pm = _two_adapter_model()
    with pytest.raises(ValueError, match="other"):
        pm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises((ValueError, KeyError), match="nope"):
        pm.set_adapter("nope")
    with pytest.raises((ValueError, KeyError), match="nope"):
        pm.delete_adapter("nope")
    assert set(pm.peft_config) == {"default", "other"}


# ---- save / load ---------------------------------------------------------------------------------

def test_save_load_round_trip_all_adapters(tmp_path):
    inputs = make_inputs("llama")
    pm = _two_adapter_model()
    out_default = output(pm, inputs)
    pm.set_adapter("other")
    out_other = output(pm, inputs)
    pm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")], "no temp files may be left"

    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert loaded.active_adapter == "default"
    assert torch.equal(output(loaded, inputs), out_default)
    loaded.set_adapter("other")
    assert torch.equal(output(loaded, inputs), out_other)
    for k, v in pm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_save_selected_adapters(tmp_path):
    pm = _two_adapter_model()
    pm.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path)) == ["README.md", "other"]
    cfg = PeftConfig.from_pretrained(tmp_path / "other")
    assert cfg.r == 3 and cfg.lora_alpha == 5
    with pytest.raises((ValueError, KeyError), match="nope"):
        pm.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_save_load_named_adapter_with_modules_to_save(tmp_path):
    inputs = make_inputs("bert")
    pm = get_peft_model(tiny_bert(0), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"),
                        adapter_name="cls")
    perturb_trainable(pm)
    pm.eval()
    expected = output(pm, inputs)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "cls", adapter_name="cls")
    assert isinstance(loaded, deltatune.PeftModelForSequenceClassification)
    assert torch.equal(output(loaded, inputs), expected)


def test_peft_config_from_pretrained(tmp_path):
    cfg = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, use_rslora=True,
                     task_type="CAUSAL_LM", rank_pattern={"q_proj": 2})
    get_peft_model(tiny_llama(0), cfg).save_pretrained(tmp_path)
    read = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(read, LoraConfig)
    assert read.peft_type == deltatune.PeftType.LORA and str(read.peft_type) == "LORA"
    assert read.task_type == deltatune.TaskType.CAUSAL_LM
    assert (read.r, read.lora_alpha, read.lora_dropout, read.use_rslora) == (6, 12, 0.1, True)
    assert set(read.target_modules) == {"q_proj", "v_proj"}
    assert read.rank_pattern == {"q_proj": 2}
    assert LoraConfig.from_pretrained(tmp_path).r == 6
    # PEFT's own file.
    peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=5, target_modules=["k_proj"], use_dora=True)).save_pretrained(
        tmp_path / "p")
    read = PeftConfig.from_pretrained(tmp_path / "p")
    assert isinstance(read, LoraConfig) and read.r == 5 and read.use_dora is True
    with open(tmp_path / "p" / "adapter_config.json") as fh:
        assert json.load(fh)["peft_type"] == "LORA"


# ---- task classes, generate, base model, unload --------------------------------------------------

@pytest.mark.parametrize("task,cls_name", [
    ("CAUSAL_LM", "PeftModelForCausalLM"), ("SEQ_CLS", "PeftModelForSequenceClassification"),
    ("SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"), ("TOKEN_CLS", "PeftModelForTokenClassification"),
    ("QUESTION_ANS", "PeftModelForQuestionAnswering"), ("FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
    (None, "PeftModel"),
])
def test_task_type_picks_class(task, cls_name, tmp_path):
    factory = {"SEQ_2_SEQ_LM": tiny_t5, "SEQ_CLS": tiny_bert}.get(task, tiny_llama)
    targets = ["q", "v"] if factory is tiny_t5 else ["query"] if factory is tiny_bert else ["q_proj"]
    pm = get_peft_model(factory(0), LoraConfig(r=2, target_modules=targets, task_type=task))
    assert type(pm) is getattr(deltatune, cls_name)
    assert type(pm).__name__ == type(peft.get_peft_model(
        factory(0), peft.LoraConfig(r=2, target_modules=targets, task_type=task))).__name__
    pm.save_pretrained(tmp_path)
    assert type(PeftModel.from_pretrained(factory(0), tmp_path)) is getattr(deltatune, cls_name)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_t5], ids=["llama", "gpt2", "t5"])
def test_generate_matches_merged_and_peft(factory, tmp_path):
    targets = {tiny_llama: ["q_proj", "v_proj"], tiny_gpt2: ["c_attn"], tiny_t5: ["q", "v"]}[factory]
    task = "SEQ_2_SEQ_LM" if factory is tiny_t5 else "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(factory(0), LoraConfig(r=4, target_modules=targets, task_type=task,
                                                   init_lora_weights=False, fan_in_fan_out=factory is tiny_gpt2))
    pm.eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    base = factory(0).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert out.shape[0] == 2 and out.shape[1] > (1 if factory is tiny_t5 else ids.shape[1])
    with pm.disable_adapter():
        assert torch.equal(pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), base)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(factory(0), tmp_path).eval()
    assert torch.equal(ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), out)
    merged = pm.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), out)


def test_get_base_model_is_the_wrapped_model():
    base = tiny_llama(0)
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert pm.get_base_model() is base
    assert pm.base_model.model is base


def test_unload_restores_original_types_and_output():
    inputs = make_inputs("net")
    base_out = output(tiny_net(0), inputs)
    pm = get_peft_model(tiny_net(0), LoraConfig(r=2, target_modules=["emb", "conv1d", "lin1", "conv2d", "conv3d"],
                                                modules_to_save=["head"], init_lora_weights=False))
    pm.eval()
    assert (output(pm, inputs) - base_out).abs().max() > 1e-3
    model = pm.unload()
    fresh = tiny_net(0)
    for name, module in fresh.named_modules():
        assert type(model.get_submodule(name)) is type(module), name
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())
    torch.testing.assert_close(output(model, inputs), base_out, atol=0, rtol=0)


def test_get_peft_model_twice_and_bad_config():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="You are trying to modify a model with PEFT for a second time"):
        get_peft_model(pm, LoraConfig(r=2, target_modules=["k_proj"]))  # PEFT warns, then wraps the PeftModel
    with pytest.raises(ValueError):
        get_peft_model(tiny_llama(0), {"r": 2})


# ---- LoRA+ ---------------------------------------------------------------------------------------

def _groups_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = (g["lr"], g["weight_decay"])
    return out


@pytest.mark.parametrize("factory,cfg", [
    (tiny_llama, {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}),
    (tiny_bert, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS", "use_dora": True}),
    (tiny_llama, {"target_modules": ["q_proj"], "lora_bias": True}),
], ids=["llama-emb-mts", "bert-dora", "llama-lora-bias"])
def test_loraplus_groups_match_peft(factory, cfg):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    pm = get_peft_model(factory(0), LoraConfig(r=4, **copy.deepcopy(cfg)))
    ref = peft.get_peft_model(factory(0), peft.LoraConfig(r=4, **copy.deepcopy(cfg)))
    kw = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_weight_decay": 0.1}
    ours = deltatune.create_loraplus_optimizer(pm, torch.optim.AdamW, **kw)
    theirs = peft_loraplus(ref, torch.optim.AdamW, **kw)
    got, want = _groups_by_name(pm, ours), _groups_by_name(ref, theirs)
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n] == pytest.approx(want[n]), f"{n}: (lr, weight_decay) {got[n]} vs PEFT {want[n]}"
    # The LoRA+ rule itself: B learns ratio x faster than A.
    for n, (lr, _) in got.items():
        if "lora_B" in n:
            assert lr == pytest.approx(16e-3), n
        elif "lora_A" in n:
            assert lr == pytest.approx(1e-3), n
        elif "lora_embedding" in n:
            assert lr == pytest.approx(1e-6), n


def test_loraplus_trains():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = deltatune.create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0)
    inputs = make_inputs("llama")
    pm.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---- mixed-adapter batches (adapter_names) -------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "dora", "lora_bias"])
def test_mixed_adapter_batch_rows_match_single_adapter_runs(kind):
    """``forward(adapter_names=[...])``: row i equals a whole-batch run with adapter_names[i] active
    (``"__base__"``: adapters disabled)."""
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                  init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=4, target_modules=["v_proj", "o_proj"], init_lora_weights=False,
                                       use_dora=kind == "dora", lora_bias=kind == "lora_bias"))
    if kind == "lora_bias":
        with torch.no_grad():
            for m in pm.modules():
                if hasattr(m, "lora_B") and "other" in m.lora_B:
                    m.lora_B["other"].bias.normal_()
    pm.eval()
    inputs = make_inputs("llama", batch=3)
    rows = ["other", "__base__", "default"]
    mixed = pm(**inputs, adapter_names=rows).logits
    for i, name in enumerate(rows):
        if name == "__base__":
            with pm.disable_adapter():
                want = output(pm, inputs)[i]
        else:
            pm.set_adapter(name)
            want = output(pm, inputs)[i]
        torch.testing.assert_close(mixed[i], want, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")


def test_mixed_adapter_batch_matches_peft(tmp_path):
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj", "k_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    ref.load_adapter(tmp_path / "other", adapter_name="other")
    ref.eval()
    pm.eval()
    inputs = make_inputs("llama", batch=4)
    rows = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs, adapter_names=rows).logits, ref(**inputs, adapter_names=rows).logits,
                                   atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batch_errors():
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    inputs = make_inputs("llama", batch=2)
    with pytest.raises(ValueError, match="nope"):
        pm(**inputs, adapter_names=["default", "nope"])
    pm.train()
    with pytest.raises(ValueError):
        pm(**inputs, adapter_names=["default", "default"])
