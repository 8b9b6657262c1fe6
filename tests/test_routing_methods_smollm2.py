"""The composition and routing methods of issue 22 (X-LoRA, ShadowPEFT, Poly) on a real model (SmolLM2-135M).

X-LoRA: two frozen LoRA experts on q/v, one that changes nothing (``B = 0``) and one that hurts (random ``A``, ``B``);
the classifier starts near an even mix, and a few AdamW steps on short sentences of one pattern teach it to weigh
the harmless expert, which lowers the loss on *held-out* sentences of the same pattern. The adapter then reloads
with the same logits (in deltatune: peft 0.21.2 leaves the classifier's ``layers.0`` out of its files).

ShadowPEFT: a parallel shadow network routes a learned correction into every decoder block; a few steps lower the
held-out loss, cached decoding equals full passes, and peft loads the file with the same logits.
"""

from __future__ import annotations

import gc

import pytest
import torch
from support.smollm2 import load_smollm2, sentence_batch, smollm2_with_texts

from deltatune import LoraConfig, PeftModel, XLoraConfig, get_peft_model

TRAIN = [f"Order {n}: {n} red apples, shipped on Monday." for n in (3, 8, 15, 21)]
HELD_OUT = [f"Order {n}: {n} red apples, shipped on Monday." for n in (5, 12)]


@pytest.mark.slow
def test_xlora_classifier_learns_to_weigh_the_better_expert_and_reloads(tmp_path):
    base, tok, (train, train_labels), (held, held_labels) = smollm2_with_texts(TRAIN, HELD_OUT)
    adapters = {}
    for i, harmful in enumerate((False, True)):
        expert = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        if harmful:
            with torch.no_grad():
                for name, p in expert.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.3)
        adapters[str(i)] = str(tmp_path / f"expert{i}")
        expert.save_pretrained(adapters[str(i)])
        base = expert.unload()
    model = get_peft_model(base, XLoraConfig(hidden_size=base.config.hidden_size, adapters=adapters,
                                             task_type="CAUSAL_LM"))

    def held_out_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return model(**held, labels=held_labels).loss.item()

    start = held_out_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        model(**train, labels=train_labels).loss.backward()
        opt.step()
    end = held_out_loss(model)
    assert end < start - 0.05, f"xlora: held-out loss went {start:.4f} -> {end:.4f}"
    weights = model.base_model.get_latest_scalings()  # (batch, seq, layers, experts) of the last held-out pass
    assert weights[..., 0].mean() > 0.5 > weights[..., 1].mean()

    with torch.no_grad():
        expected = model(**held).logits
    model.save_pretrained(tmp_path / "xlora")
    del model, base, opt
    gc.collect()
    loaded = PeftModel.from_pretrained(load_smollm2()[0], tmp_path / "xlora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_shadow_lowers_held_out_loss_and_reloads_in_peft(tmp_path):
    """ShadowPEFT with PEFT's defaults (r=8 in every block, a 1-layer mirror backbone on the shared embeddings, the
    auxiliary loss): a few AdamW steps lower the task loss on held-out sentences; peft loads the file with the same
    logits, and deltatune's cached greedy decoding equals decoding by full forward passes."""
    peft = pytest.importorskip("peft")
    from deltatune import ShadowConfig

    base, tok, (train, train_labels), (held, held_labels) = smollm2_with_texts(TRAIN, HELD_OUT)
    model = get_peft_model(base, ShadowConfig(task_type="CAUSAL_LM"))

    def held_out_loss(model) -> float:  # the task loss alone (the output's loss adds λ · the shadow loss)
        model.eval()
        with torch.no_grad():
            logits = model(**held).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 held_labels[:, 1:].reshape(-1), ignore_index=-100).item()

    start = held_out_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        out = model(**train, labels=train_labels)
        assert out.shadow_loss is not None
        out.loss.backward()
        opt.step()
    end = held_out_loss(model)
    assert end < start - 0.05, f"shadow: held-out loss went {start:.4f} -> {end:.4f}"

    prompt = tok(["Order 7: 7 red"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**held).logits
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        ids = prompt["input_ids"]
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    model.save_pretrained(tmp_path / "shadow")
    del model, base, opt
    gc.collect()
    loaded = peft.PeftModel.from_pretrained(load_smollm2()[0], tmp_path / "shadow").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held).logits, expected, atol=1e-4, rtol=1e-4)


POLY_TASKS = {  # task id -> (training sentences, held-out sentences): two patterns, one per task
    0: ([f"Order {n}: {n} red apples, shipped on Monday." for n in (3, 8, 15, 21)],
        [f"Order {n}: {n} red apples, shipped on Monday." for n in (5, 12)]),
    1: ([f"Ticket {n} closed: the printer on floor {n} works again." for n in (2, 7, 14, 30)],
        [f"Ticket {n} closed: the printer on floor {n} works again." for n in (4, 11)]),
}


@pytest.mark.slow
def test_poly_learns_two_tasks_and_reloads_in_peft(tmp_path):
    """Poly (2 tasks, 4 skills, 2 splits, r=4 on q/v): a few AdamW steps on rows of both tasks, each row with its
    task id, lower the held-out loss of each task; peft 0.21.2 loads the files with equal logits for the same
    task_ids."""
    import peft

    from deltatune import PolyConfig

    base, tok = smollm2_with_texts()

    def rows(part: int):
        texts = [t for task in (0, 1) for t in POLY_TASKS[task][part]]
        ids = torch.tensor([task for task in (0, 1) for _ in POLY_TASKS[task][part]])
        batch, labels = sentence_batch(tok, texts)
        return batch, labels, ids

    (train, train_labels, train_ids), (held, held_labels, held_ids) = rows(0), rows(1)
    model = get_peft_model(base, PolyConfig(r=4, n_tasks=2, n_skills=4, n_splits=2, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))

    def held_out_losses(model) -> list[float]:
        model.eval()
        with torch.no_grad():
            logits = model(**held, task_ids=held_ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), held_labels[:, 1:], reduction="none")
            per_row = loss.sum(1) / (held_labels[:, 1:] != -100).sum(1)
        return [per_row[held_ids == task].mean().item() for task in (0, 1)]

    start = held_out_losses(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        model(**train, labels=train_labels, task_ids=train_ids).loss.backward()
        opt.step()
    end = held_out_losses(model)
    for task in (0, 1):
        assert end[task] < start[task] - 0.05, f"task {task}: held-out loss {start[task]:.4f} -> {end[task]:.4f}"

    with torch.no_grad():
        expected = model(**held, task_ids=held_ids).logits
    model.save_pretrained(tmp_path / "poly")
    del model, base, opt
    gc.collect()
    theirs = peft.PeftModel.from_pretrained(load_smollm2()[0], tmp_path / "poly").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**held, task_ids=held_ids).logits, expected, atol=1e-5, rtol=1e-5)
