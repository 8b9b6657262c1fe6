"""Slow: OFT and BOFT learn a real task on the real SmolLM2-135M (Llama, 30 layers, hidden 576).

Task: BBC News topic from the headline, as text (``"Headline: <h>\\nTopic: <label><|im_end|>"``), loss on the
label tokens only. Four Adam steps of four examples on every linear layer must bring the held-out loss (8
validation headlines) down by more than one nat; the trained adapter then merges into the weights with the
same held-out loss, and unloading gives back the plain model (whose loss the adapter started from).
"""

from __future__ import annotations

import pytest
import torch
from support.smollm2 import headline_topic_batch

import deltatune as dt

pytestmark = pytest.mark.slow

# method -> (config, Adam learning rate)
METHODS = {
    "oft": (lambda: dt.OFTConfig(oft_block_size=32, target_modules="all-linear", task_type="CAUSAL_LM"), 3e-3),
    "oft-exact-cayley": (lambda: dt.OFTConfig(oft_block_size=16, use_cayley_neumann=False,
                                              target_modules="all-linear", task_type="CAUSAL_LM"), 5e-3),
    "boft": (lambda: dt.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules="all-linear",
                                   task_type="CAUSAL_LM"), 3e-3),
}
HELD_OUT = 8
STEPS, BATCH = 4, 4


@pytest.mark.parametrize("method", list(METHODS))
def test_short_training_lowers_held_out_loss_on_smollm2(method, smollm2, bbc):
    model, tokenizer = smollm2
    train, val = bbc
    make_config, lr = METHODS[method]
    held_out = headline_topic_batch(tokenizer, val[:HELD_OUT])
    torch.manual_seed(0)
    peft_model = dt.get_peft_model(model, make_config())
    try:
        def held_out_loss() -> float:
            peft_model.eval()
            with torch.no_grad():
                return peft_model(**held_out).loss.item()

        start = held_out_loss()  # the plain model's: OFT/BOFT start as the identity (checked after unload)
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        peft_model.train()
        for step in range(STEPS):
            loss = peft_model(**headline_topic_batch(tokenizer, train[BATCH * step : BATCH * (step + 1)])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        end = held_out_loss()
        print(f"{method}: held-out loss {start:.3f} -> {end:.3f}")
        assert end < start - 1.0, (method, start, end)
        peft_model.merge_adapter()
        assert abs(held_out_loss() - end) < 1e-3, "merged equals unmerged on the real model"
        peft_model.unmerge_adapter()
    finally:
        peft_model.unload()  # the base model is shared by the module's tests
    with torch.no_grad():
        plain = model.eval()(**held_out).loss.item()
    assert abs(plain - start) < 1e-4, "identity at init, and unload gives back the plain model"
