"""Slow: each virtual-token method learns a real task on the real SmolLM2-135M (Llama, 9 query / 3 key-value heads).

Task: BBC News topic from the headline, as text (``"Headline: <h>\\nTopic: <label><|im_end|>"``), loss on the
label tokens only. Six Adam steps of six examples must bring the held-out loss (12 validation headlines)
below both the adapter's starting point and the plain model's, each by more than one nat.
"""

from __future__ import annotations

import pytest
import torch
from support.smollm2 import headline_topic_batch

import deltatune as dt

pytestmark = pytest.mark.slow

# method -> (config class, config kwargs, Adam learning rate)
METHODS = {
    "prompt_tuning": (dt.PromptTuningConfig, {"prompt_tuning_init": "SAMPLE_VOCAB"}, 3e-2),
    "p_tuning": (dt.PromptEncoderConfig, {"encoder_hidden_size": 128}, 3e-3),
    "prefix_tuning": (dt.PrefixTuningConfig, {}, 3e-2),
    "multitask_prompt_tuning": (dt.MultitaskPromptTuningConfig, {"num_tasks": 1}, 3e-2),
}


HELD_OUT = 12


@pytest.fixture(scope="module")
def plain_loss(smollm2, bbc) -> float:
    """The held-out loss of SmolLM2 itself."""
    model, tokenizer = smollm2
    with torch.no_grad():
        return model.eval()(**headline_topic_batch(tokenizer, bbc[1][:HELD_OUT])).loss.item()


@pytest.mark.parametrize("method", list(METHODS))
def test_short_training_lowers_held_out_loss_on_smollm2(method, smollm2, bbc, plain_loss):
    model, tokenizer = smollm2
    train, val = bbc
    cls, kwargs, lr = METHODS[method]
    torch.manual_seed(0)
    peft_model = dt.get_peft_model(model, cls(task_type="CAUSAL_LM", num_virtual_tokens=8, **kwargs))
    try:
        held_out = headline_topic_batch(tokenizer, val[:HELD_OUT])
        tasks = {"task_ids": torch.zeros(HELD_OUT, dtype=torch.long)} if method == "multitask_prompt_tuning" else {}

        def held_out_loss() -> float:
            peft_model.eval()
            with torch.no_grad():
                return peft_model(**held_out, **tasks).loss.item()

        start = held_out_loss()
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        peft_model.train()
        for step in range(6):
            batch = headline_topic_batch(tokenizer, train[6 * step : 6 * step + 6])
            step_tasks = {"task_ids": torch.zeros(6, dtype=torch.long)} if tasks else {}
            loss = peft_model(**batch, **step_tasks).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        end = held_out_loss()
        assert end < start - 1.0 and end < plain_loss - 1.0, (method, start, plain_loss, end)
    finally:
        peft_model.unload()  # the base model is shared by the module's tests; prompt learning never changed it


def test_prefix_generation_on_gqa_model_with_left_padding(smollm2):
    """The real GQA cache (3 key-value heads of 64) takes the prefix; a left-padded row generates what it
    generates alone."""
    model, tokenizer = smollm2
    torch.manual_seed(0)
    peft_model = dt.get_peft_model(model, dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    side = tokenizer.padding_side
    try:
        config = peft_model.peft_config["default"]
        assert (config.token_dim, config.num_attention_heads, config.num_layers) == (3 * 64, 3, 30)
        texts = ["The capital of France is", "Hi"]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        peft_model.eval()
        both = peft_model.generate(**batch, max_new_tokens=4, do_sample=False)
        short = tokenizer(texts[1:], return_tensors="pt")
        alone = peft_model.generate(**short, max_new_tokens=4, do_sample=False)
        pads = batch["input_ids"].shape[1] - short["input_ids"].shape[1]
        assert pads > 0 and torch.equal(both[1, pads : pads + alone.shape[1]], alone[0])
    finally:
        tokenizer.padding_side = side
        peft_model.unload()
