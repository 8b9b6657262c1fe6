"""End to end on a real model: SmolLM2-135M-Instruct + LoRA r=8 on q_proj/v_proj.

Ten AdamW steps on a few fixed sentences lower the loss; the saved adapter reloads in deltatune with
identical logits and in PEFT with the same logits.
"""

from __future__ import annotations

import gc

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters train a small number of parameters.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b",
]


@pytest.mark.slow
def test_smollm2_lora_train_save_load_and_peft(tmp_path):
    models = pytest.importorskip("deltatune.builtin.models", reason="deltatune.builtin.models (infra) not there yet")
    torch.manual_seed(0)
    base, tok = models.load_builtin_model("smollm2-135m")
    batch = tok(SENTENCES, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
    trainable, total = pm.get_nb_trainable_parameters()
    # 30 layers x (q: 576 -> 576, v: 576 -> 192) at r = 8.
    assert trainable == 30 * (8 * (576 + 576) + 8 * (576 + 192))
    assert total > 134_000_000

    def eval_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    start = eval_loss(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    pm.train()
    for _ in range(10):
        opt.zero_grad()
        pm(**batch, labels=labels).loss.backward()
        opt.step()
    end = eval_loss(pm)
    assert end < start - 0.05, f"loss went {start:.4f} -> {end:.4f}"

    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path)
    del pm, base, opt
    gc.collect()

    fresh, _ = models.load_builtin_model("smollm2-135m")
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
    del loaded, fresh
    gc.collect()

    import peft

    ref = peft.PeftModel.from_pretrained(models.load_builtin_model("smollm2-135m")[0], tmp_path).eval()
    with torch.no_grad():
        theirs = ref(**batch).logits
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)
