"""TRL's SFT and DPO trainers with deltatune models (tiny Llama from a config, a tokenizer trained in-process)."""

from __future__ import annotations

import os

import pytest
import torch

import deltatune

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from support import tinymodels  # noqa: E402

from deltatune.integrations.trl import AdapterDisabledReference, DPOTrainer, SFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tinymodels.make_llama(str(tmp_path_factory.mktemp("llama")))  # tied embeddings, like SmolLM2


def fresh(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def lora_config():
    return deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=32, logging_steps=1)
    base.update(kw)
    return SFTConfig(**base)


def check_adapter_dir(directory, base_dir):
    files = set(os.listdir(directory))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    import peft

    x = torch.tensor([[1, 5, 9, 23, 42, 7]])
    theirs = peft.PeftModel.from_pretrained(fresh(base_dir), str(directory))
    ours = deltatune.PeftModel.from_pretrained(fresh(base_dir), str(directory))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["text", "prompt-completion", "messages"])
def test_sft_trains_only_the_adapter_and_saves_peft_files(tmp_path, base_dir, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    records = tinymodels.prompt_records(4)
    if kind == "text":
        rows, model, extra = [{"text": r["prompt"] + r["completion"]} for r in records], None, {}
    elif kind == "prompt-completion":
        rows, model, extra = records, None, {"completion_only_loss": True}
    else:
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"]}]} for r in records]
        model, extra = None, {}
    torch.manual_seed(0)
    if kind == "prompt-completion":  # peft_config=deltatune.LoraConfig, as with PEFT
        trainer = SFTTrainer(model=fresh(base_dir), args=sft_args(tmp_path, **extra), processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows), peft_config=lora_config())
        model = trainer.deltatune_model
    else:
        model = deltatune.get_peft_model(fresh(base_dir), lora_config())
        trainer = SFTTrainer(model=model, args=sft_args(tmp_path, **extra), processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    trainer.save_model(str(tmp_path / "saved"))
    check_adapter_dir(tmp_path / "saved", base_dir)


def test_sft_resume_from_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = datasets.Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in tinymodels.prompt_records(8)])

    def run(resume=None):
        torch.manual_seed(0)
        model = deltatune.get_peft_model(fresh(base_dir), lora_config())
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows,
                             args=sft_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2))
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    want = run()
    assert {"optimizer.pt", "scheduler.pt", "adapter_model.safetensors"} <= set(
        os.listdir(tmp_path / "run" / "checkpoint-2"))
    got = run(str(tmp_path / "run" / "checkpoint-2"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sft_refuses_a_peft_config_with_a_deltatune_model_naming_both_libraries(tmp_path, base_dir):
    import peft

    model = deltatune.get_peft_model(fresh(base_dir), lora_config())
    with pytest.raises(ValueError, match=r"got peft\.LoraConfig; use deltatune\.LoraConfig"):
        SFTTrainer(model=model, args=sft_args(tmp_path), peft_config=peft.LoraConfig(r=4),
                   train_dataset=datasets.Dataset.from_list([{"text": "a b"}]))


def test_dpo_reference_is_the_policy_with_its_adapter_disabled(tmp_path, base_dir):
    from transformers import AutoTokenizer
    from trl import DPOConfig

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [{"prompt": "what is your name?", "chosen": " my name is bot.", "rejected": " i am fine."}] * 4
    torch.manual_seed(0)
    model = deltatune.get_peft_model(fresh(base_dir), lora_config())
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
                     bf16=False)  # fp32, so the reference's logits can be compared with the base model's exactly
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=datasets.Dataset.from_list(rows))
    assert isinstance(trainer.ref_model, AdapterDisabledReference)
    assert sum(1 for _ in trainer.ref_model.parameters()) == 0  # no second copy of the base model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    # At step 1 the policy equals the reference (LoRA B = 0): DPO's loss is log 2 exactly.
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    # The reference really is the base: its log-probs equal the un-adapted model's.
    x = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        ref_logits = trainer.ref_model(input_ids=x).logits
        base_logits = fresh(base_dir)(input_ids=x).logits
        policy_logits = model(input_ids=x).logits
    torch.testing.assert_close(ref_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits)
    trainer.save_model(str(tmp_path / "saved"))
    check_adapter_dir(tmp_path / "saved", base_dir)


def test_grpo_generates_with_the_adapter_on_and_its_reference_is_the_adapter_disabled(tmp_path, base_dir):
    """GRPO with beta > 0: the reference is the policy with its adapter disabled (no second model); generation runs
    with the adapter on; only adapter tensors change; the saved files load in peft and deltatune alike."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from deltatune.integrations.trl import GRPOTrainer

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in tinymodels.prompt_records(4)])

    def reward_len(completions, **_kw):  # a tiny reward: shorter completions score higher
        return [-float(len(c)) for c in completions]

    torch.manual_seed(0)
    model = deltatune.get_peft_model(fresh(base_dir), lora_config())
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, learning_rate=5e-2, beta=0.1, report_to=[], save_strategy="no",
                      use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, processing_class=tok, train_dataset=rows)
    assert isinstance(trainer.ref_model, AdapterDisabledReference)
    assert sum(1 for _ in trainer.ref_model.parameters()) == 0  # no second copy of the base model
    assert args.beta == 0.1 and trainer.beta == 0.1

    # Which calls ran with the adapter on: one-token decode steps are generation, full-length calls are scoring.
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    seen: list[tuple[int, bool]] = []
    layer.register_forward_pre_hook(lambda mod, inp: seen.append((inp[0].shape[1], mod.disable_adapters)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    decode = [off for length, off in seen if length == 1]
    assert decode and not any(decode)  # generation: adapter on at every step
    assert any(off for length, off in seen if length > 1)  # the reference: adapter off
    assert not layer.disable_adapters
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    # Step 1: the policy equals its reference (LoRA B = 0), so the KL term is exactly 0; after an update it is not.
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-7) and kls[1] > 0
    trainer.save_model(str(tmp_path / "saved"))
    check_adapter_dir(tmp_path / "saved", base_dir)


def test_grpo_refuses_sync_ref_model_with_a_deltatune_model(tmp_path, base_dir):
    from trl import GRPOConfig

    from deltatune.integrations.trl import GRPOTrainer

    model = deltatune.get_peft_model(fresh(base_dir), lora_config())
    args = GRPOConfig(output_dir=str(tmp_path), beta=0.1, sync_ref_model=True, use_cpu=True, report_to=[],
                      per_device_train_batch_size=2, num_generations=2)
    with pytest.raises(ValueError, match="pass sync_ref_model=False"):
        GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                    train_dataset=datasets.Dataset.from_list([{"prompt": "a"}]))


@pytest.mark.parametrize("how", ["BitsAndBytesConfig", "deltatune.quantize"])
def test_sft_on_a_4bit_base_trains_only_the_adapter_and_saves_peft_files(tmp_path, base_dir, how):
    """QLoRA under SFT: an NF4 base (transformers' BitsAndBytesConfig or deltatune.quantize) trains; only adapter
    tensors change; the saved adapter loads in peft and deltatune over the full-precision base with equal logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(base_dir)
    if how == "BitsAndBytesConfig":
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    else:
        base = deltatune.quantize(fresh(base_dir), "nf4")
    torch.manual_seed(0)
    model = deltatune.get_peft_model(base, lora_config())
    rows = datasets.Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in tinymodels.prompt_records(4)])
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path), processing_class=tok, train_dataset=rows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    trainer.save_model(str(tmp_path / "saved"))
    check_adapter_dir(tmp_path / "saved", base_dir)


def test_sft_gradient_checkpointing_gives_the_same_first_loss_and_trains(tmp_path, base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = datasets.Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in tinymodels.prompt_records(4)])

    def run(checkpointing):
        torch.manual_seed(0)
        model = deltatune.get_peft_model(fresh(base_dir), lora_config())
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows,
                             args=sft_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing))
        before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
        trainer.train()
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        moved = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], moved, len(before)

    plain, moved_plain, n = run(False)
    ckpt, moved_ckpt, _ = run(True)
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert len(moved_ckpt) == n and len(moved_plain) == n  # every LoRA B got a gradient through the checkpoints
    assert ckpt[1] == pytest.approx(plain[1], rel=1e-4)  # and the same one: step 2 starts from the same weights


@pytest.mark.parametrize("name", ["SFTTrainer", "DPOTrainer", "GRPOTrainer"])
def test_trls_own_trainers_refuse_a_deltatune_model_at_construction_naming_ours(tmp_path, base_dir, name):
    """TRL's trainers subclass transformers.Trainer, whose construction reads the model's
    is_distributed_loading_by_transformers: a deltatune model is refused there in one line naming the fix (before
    TRL loads a second reference model or trains anything)."""
    import trl
    from transformers import AutoTokenizer

    from deltatune.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = deltatune.get_peft_model(fresh(base_dir), lora_config())
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    if name == "SFTTrainer":
        rows, args, extra = [{"text": "a b c"}] * 2, trl.SFTConfig(**common), {}
    elif name == "DPOTrainer":
        rows, args, extra = [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2, trl.DPOConfig(**common), {}
    else:
        rows = [{"prompt": "a"}] * 2
        args = trl.GRPOConfig(**common, num_generations=2, beta=0.1)
        extra = {"reward_funcs": lambda completions, **kw: [0.0] * len(completions)}
    with pytest.raises(ConfigError) as info:
        getattr(trl, name)(model=model, args=args, processing_class=tok,
                           train_dataset=datasets.Dataset.from_list(rows), **extra)
    message = str(info.value)
    assert "\n" not in message and "deltatune.integrations.trl.SFTTrainer/DPOTrainer/GRPOTrainer" in message
