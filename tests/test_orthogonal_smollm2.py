"""Slow: OFT and BOFT learn a real task on the real SmolLM2-135M (Llama, 30 layers, hidden 576).

Task: BBC News topic from the headline, as text (``"Headline: <h>\\nTopic: <label><|im_end|>"``), loss on the
label tokens only. Four Adam steps of four examples on every linear layer must bring the held-out loss (8
validation headlines) down by more than one nat; the trained adapter then merges into the weights with the
same held-out loss, and unloading gives back the plain model (whose loss the adapter started from).
"""

from __future__ import annotations

import random

import pytest
import torch

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


@pytest.fixture(scope="module")
def smollm2():
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.models import load_builtin_model

    try:
        return load_builtin_model("smollm2-135m")
    except BuiltinNotInstalledError as exc:
        pytest.skip(f"SmolLM2-135M is not installed ({exc})")


@pytest.fixture(scope="module")
def bbc():
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.datasets import load_bbc_news

    try:
        train, val = load_bbc_news("train"), load_bbc_news("validation")
    except BuiltinNotInstalledError as exc:
        pytest.skip(f"the BBC News corpus is not installed ({exc})")
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(val)
    return train, val


def _batch(tokenizer, examples) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (-100 everywhere but the topic and the end-of-turn token)."""
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(f"Headline: {ex['text'].splitlines()[0]}\nTopic:")["input_ids"]
        answer = tokenizer(f" {ex['label']}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_short_training_lowers_held_out_loss_on_smollm2(method, smollm2, bbc):
    model, tokenizer = smollm2
    train, val = bbc
    make_config, lr = METHODS[method]
    held_out = _batch(tokenizer, val[:HELD_OUT])
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
            loss = peft_model(**_batch(tokenizer, train[BATCH * step : BATCH * (step + 1)])).loss
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
