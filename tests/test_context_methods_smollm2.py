"""The prompt/context methods of issue 22 (adaption prompts, cartridges) on a real model (SmolLM2-135M, a Llama).

Per method: a few AdamW steps on short sentences of one pattern lower the loss on *held-out* sentences of the
same pattern; the adapter reloads in PEFT with the same logits.
"""

from __future__ import annotations

import gc

import pytest
import torch
from support.smollm2 import load_smollm2, smollm2_with_texts

from deltatune import AdaptionPromptConfig, CartridgeConfig, get_peft_model, initialize_kv_prefix_from_text

TRAIN = [f"Order {n}: {n} red apples, shipped on Monday." for n in (3, 8, 15, 21)]
HELD_OUT = [f"Order {n}: {n} red apples, shipped on Monday." for n in (5, 12)]


def _from_text(model, tok) -> None:
    # the paper's recommended start: the cache of a prefill on text of the task (not the training sentences)
    initialize_kv_prefix_from_text(model, tok, text="Order 1: 1 red apple, shipped on Friday. Order 2: 2 red apples.")


CASES = [  # (id, config factory, initialisation after get_peft_model or None, lr, steps)
    # LLaMA-Adapter in the top 10 of the 30 blocks; the gates start at 0, so the first step opens them
    ("adaption_prompt", lambda: AdaptionPromptConfig(adapter_len=10, adapter_layers=10, task_type="CAUSAL_LM"),
     None, 3e-2, 4),
    ("cartridge", lambda: CartridgeConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"), _from_text, 1e-2, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("case_id, make_config, init, lr, steps", CASES, ids=[c[0] for c in CASES])
def test_method_lowers_held_out_loss_and_peft_reloads(case_id, make_config, init, lr, steps, tmp_path):
    base, tok, (train, train_labels), (held, held_labels) = smollm2_with_texts(TRAIN, HELD_OUT)
    model = get_peft_model(base, make_config())
    if init is not None:
        init(model, tok)

    def held_out_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return model(**held, labels=held_labels).loss.item()

    start = held_out_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**train, labels=train_labels).loss.backward()
        opt.step()
    end = held_out_loss(model)
    assert end < start - 0.05, f"{case_id}: held-out loss went {start:.4f} -> {end:.4f}"

    with torch.no_grad():
        expected = model(**held).logits
    model.save_pretrained(tmp_path)
    del model, base, opt
    gc.collect()
    import peft

    loaded = peft.PeftModel.from_pretrained(load_smollm2()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held).logits, expected, atol=1e-4, rtol=1e-4)
