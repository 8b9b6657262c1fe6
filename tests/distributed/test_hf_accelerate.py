"""The Hugging Face paths in one process: Accelerate's ``prepare`` and ``transformers.Trainer`` (via AdapterTrainer)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from deltatune import PeftModel
from tests.distributed import common


def _batch():
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 8, 11], [1, 6, 12, 30, 44, 9, 3, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_accelerate_prepare_trains_like_plain_pytorch_and_saves_the_adapter(tmp_path):
    """``Accelerator().prepare(model, optimizer)`` on CPU: the same steps as a plain loop; the unwrapped model saves."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    llama = common.tinymodels.make_llama(str(tmp_path / "llama"))
    states = []
    for use_accelerate in (False, True):
        model = common.peft_model(llama)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if use_accelerate:
            accelerator = Accelerator(cpu=True)
            model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        for _ in range(3):
            loss = model(**_batch()).loss
            accelerator.backward(loss) if use_accelerate else loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if use_accelerate:
            model = accelerator.unwrap_model(model)
            assert isinstance(model, PeftModel)
            accelerator.wait_for_everyone()
            model.save_pretrained(str(tmp_path / "acc"), is_main_process=accelerator.is_main_process)
        states.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-6, rtol=1e-5, msg=k)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), str(tmp_path / "acc"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert any(float(v.abs().max()) > 1e-4 for n, v in got.items() if "lora_B" in n)  # trained, not the zero init
    for n, p in got.items():
        torch.testing.assert_close(p, states[1][n], msg=n)


def test_adapter_trainer_saves_adapter_files_and_resumes_from_its_checkpoints(tmp_path):
    """Plain ``transformers.Trainer.save_model`` saves the whole ``state_dict()`` (it knows only its own classes
    and peft's), which safetensors refuses for tied embeddings; AdapterTrainer writes PEFT-format adapter
    files, and ``resume_from_checkpoint`` reads them back."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from deltatune.training.hf import AdapterTrainer

    llama = common.tinymodels.make_llama(str(tmp_path / "llama"))
    ids = list(range(3, 15))
    data = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}] * 8

    def args(out, steps, save="steps"):
        return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy=save, save_steps=2,
                                 use_cpu=True, disable_tqdm=True, seed=0)

    # Why AdapterTrainer exists: the plain one would save state_dict() as one file (internal key names; it fails
    # on tied embeddings), so a deltatune model is refused when the Trainer is built, naming the fix.
    with pytest.raises(ValueError, match="AdapterTrainer"):
        Trainer(model=common.peft_model(llama), args=args(tmp_path / "plain", 1, "no"), train_dataset=data)

    ref = AdapterTrainer(model=common.peft_model(llama), args=args(tmp_path / "ref", 4), train_dataset=data)
    ref.train()
    ref.save_model(str(tmp_path / "saved"))
    files = os.listdir(tmp_path / "saved")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "ref" / "checkpoint-2")
    want = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    theirs = __import__("peft").PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama),
                                                          str(tmp_path / "saved"))
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), str(tmp_path / "saved"))
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    # Resume from checkpoint-2 in a fresh trainer: steps 3-4 give the uninterrupted run's adapter.
    resumed = AdapterTrainer(model=common.peft_model(llama), args=args(tmp_path / "ref", 4), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ref" / "checkpoint-2"))
    resumed.save_model(str(tmp_path / "resumed"))
    got = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
