"""``transformers.Trainer`` with deltatune models: AdapterTrainer, and the refusal of a plain Trainer."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import ConfigError
from deltatune.integrations.transformers import AdapterTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDS = [[1, 5, 9, 23, 42, 7, 8, 11, 3, 4], [1, 6, 12, 30, 44, 9, 3, 2, 17, 18]]


def tiny_llama(tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def lora(model, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kw)
    return deltatune.get_peft_model(model, deltatune.LoraConfig(**cfg))


def lm_data(n: int = 8) -> list[dict]:
    return [{"input_ids": IDS[i % 2], "attention_mask": [1] * 10, "labels": IDS[i % 2]} for i in range(n)]


def args(out, steps: int, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


def test_plain_trainer_refuses_a_deltatune_model_at_construction_naming_the_fix(tmp_path):
    from transformers import Trainer

    with pytest.raises(ConfigError, match="deltatune.integrations.transformers.AdapterTrainer"):
        Trainer(model=lora(tiny_llama()), args=args(tmp_path, 1), train_dataset=lm_data())


def test_tied_embeddings_checkpoints_are_peft_adapter_files_and_resume_bit_for_bit(tmp_path):
    """Tied embeddings (SmolLM2, Llama 3.2): checkpoints and save_model are adapter files that peft and deltatune
    load with equal logits; only adapter tensors change; resuming at step 2 ends where the 4-step run ends."""
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)

    def fresh():
        return lora(AutoModelForCausalLM.from_pretrained(base_dir))

    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = AdapterTrainer(model=model, args=args(tmp_path / "run", 4, save_strategy="steps", save_steps=2),
                         train_dataset=lm_data())
    run.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    run.save_model(str(tmp_path / "saved"))
    for d in (tmp_path / "saved", tmp_path / "run" / "checkpoint-2"):
        files = set(os.listdir(d))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    assert {"optimizer.pt", "scheduler.pt"} <= set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    want = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))

    import peft

    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "saved"))
    ours = deltatune.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                               str(tmp_path / "saved"))
    x = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5)

    resumed = AdapterTrainer(model=fresh(), args=args(tmp_path / "run", 4, save_strategy="steps", save_steps=2),
                             train_dataset=lm_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    resumed.save_model(str(tmp_path / "resumed"))
    got = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_label_smoothing_loss_equals_peft_on_the_same_batch(tmp_path):
    """Causal LMs shift labels before smoothing; Trainer decides that from the model's class name."""
    import peft
    from transformers import Trainer

    batch = {"input_ids": torch.tensor(IDS), "attention_mask": torch.ones(2, 10, dtype=torch.long),
             "labels": torch.tensor(IDS)}
    smooth = dict(label_smoothing_factor=0.1)
    ours = AdapterTrainer(model=lora(tiny_llama()), args=args(tmp_path / "a", 1, **smooth))
    torch.manual_seed(0)
    theirs_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    theirs = Trainer(model=theirs_model, args=args(tmp_path / "b", 1, **smooth))
    with torch.no_grad():
        got = ours.compute_loss(ours.model, dict(batch))
        want = theirs.compute_loss(theirs.model, dict(batch))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_load_best_model_at_end_reloads_the_best_checkpoints_adapter(tmp_path):
    model = lora(tiny_llama())
    trainer = AdapterTrainer(model=model, train_dataset=lm_data(), eval_dataset=lm_data(2),
                             args=args(tmp_path, 3, save_strategy="steps", save_steps=1, eval_strategy="steps",
                                       eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                                       greater_is_better=True))  # "best" = the highest loss: not the last step
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    want = load_file(os.path.join(best, "adapter_model.safetensors"))
    trainer.save_model(str(tmp_path / "final"))
    got = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_signature_columns_come_from_the_base_models_forward_question_answering(tmp_path):
    """remove_unused_columns=True keeps start_positions/end_positions, which only the base model's forward names."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    bert = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=64))
    torch.manual_seed(0)
    model = deltatune.get_peft_model(bert, deltatune.LoraConfig(r=4, target_modules=["query", "value"],
                                                                task_type="QUESTION_ANS"))
    data = [{"input_ids": IDS[i % 2], "attention_mask": [1] * 10, "start_positions": 2, "end_positions": 4,
             "unused": "dropped"} for i in range(4)]
    trainer = AdapterTrainer(model=model, args=args(tmp_path, 2, remove_unused_columns=True), train_dataset=data)
    out = trainer.train()
    assert out.training_loss > 0
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert any("qa_outputs" in k for k in saved)  # the QA head trains in full (modules_to_save), as in PEFT


@pytest.mark.parametrize("how", ["BitsAndBytesConfig", "deltatune.quantize"])
def test_quantized_base_trains_and_saves_only_the_adapter(tmp_path, how):
    """transformers refuses "purely quantized models" unless they carry adapters it recognises."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(tied=False).save_pretrained(tmp_path / "base")
    if how == "BitsAndBytesConfig":
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    else:
        base = deltatune.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "nf4")
    model = lora(base)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainer = AdapterTrainer(model=model, args=args(tmp_path / "run", 2), train_dataset=lm_data(4))
    trainer.train()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_a_peft_config_passed_to_deltatune_names_both_libraries():
    import peft

    with pytest.raises(ConfigError, match=r"^got peft\.LoraConfig; use deltatune\.LoraConfig \(same fields\)$"):
        deltatune.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))


def test_adapter_trainer_and_sft_run_without_peft_installed(tmp_path):
    """deltatune needs no peft at run time: `import peft` is blocked in a subprocess that trains and saves."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any `import peft` now raises ImportError
        import torch, deltatune
        from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        from deltatune.integrations.transformers import AdapterTrainer
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        lora = deltatune.LoraConfig(r=4, target_modules=["q_proj"])
        model = deltatune.get_peft_model(LlamaForCausalLM(cfg), lora)
        ids = list(range(3, 13))
        data = [{{"input_ids": ids, "attention_mask": [1] * 10, "labels": ids}}] * 4
        args = TrainingArguments(output_dir={str(tmp_path)!r}, max_steps=2, per_device_train_batch_size=2,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = AdapterTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        trainer.save_model({str(tmp_path / "saved")!r})
        try:
            import trl  # noqa: F401
        except ImportError:
            print("OK no trl")
        else:
            import datasets
            from deltatune.integrations.trl import SFTTrainer
            from trl import SFTConfig
            sys.path.append({os.path.dirname(os.path.dirname(__file__))!r})
            from support import tinymodels
            lora = deltatune.LoraConfig(r=4, target_modules=["q_proj"])
            tok = tinymodels.make_tokenizer()
            sft = SFTTrainer(model=LlamaForCausalLM(cfg), processing_class=tok, peft_config=lora,
                             args=SFTConfig(output_dir={str(tmp_path / "sft")!r}, max_steps=1, report_to=[],
                                            per_device_train_batch_size=2, use_cpu=True, bf16=False,
                                            disable_tqdm=True),
                             train_dataset=datasets.Dataset.from_list([{{"input_ids": ids}}] * 2))
            sft.train()
            sft.save_model({str(tmp_path / "sft_saved")!r})
            print("OK sft")
        assert "peft" not in {{k for k, v in sys.modules.items() if v is not None}}
    """)
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    import importlib.util

    assert ("OK sft" if importlib.util.find_spec("trl") else "OK no trl") in out.stdout, out.stdout
    assert os.path.exists(tmp_path / "saved" / "adapter_model.safetensors")


def test_fsdp_through_trainer_is_refused_with_the_reason(tmp_path, monkeypatch):
    """Trainer + Accelerate's FSDP plugin would checkpoint the whole base model for a deltatune model (its
    adapter-only path is for peft.PeftModel); refused at construction, naming what to use instead. Accelerate makes
    the plugin DDP on CPU, so the FSDP state is set here as Trainer sets it on a GPU launch."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def as_on_gpu(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_on_gpu)
    with pytest.raises(ConfigError, match=r"FSDP through transformers\.Trainer.*'deltatune train --fsdp'") as info:
        AdapterTrainer(model=lora(tiny_llama()), args=args(tmp_path, 1), train_dataset=lm_data())
    assert "\n" not in str(info.value)
    # A plain model still goes through (the refusal is about deltatune's adapter saving only).
    AdapterTrainer(model=tiny_llama(), args=args(tmp_path, 1), train_dataset=lm_data())
