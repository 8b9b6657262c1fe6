"""AdaLoRA on SmolLM2-135M, BBC News topic as text (``"Article: ...\\nTopic: sports"``), on CPU.

16 optimizer steps of 4 examples with the whole schedule (warm-up, cubic budget, fixed pattern); the held-out
loss on the topic word must fall and the final pattern must hold exactly ``target_r`` per layer on average,
spread unevenly over the 60 adapted projections. Prints the pattern (``pytest -s``). About a minute on an idle
2-core CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import deltatune as dt

STEPS, BATCH, EVAL, CHARS = 16, 4, 16, 150

pytestmark = pytest.mark.slow


def _load():
    if importlib.util.find_spec("deltatune.builtin.models") is None:
        pytest.skip("deltatune.builtin.models (the infra helper's loader) is not there")
    from deltatune.builtin.datasets import load_bbc_news
    from deltatune.builtin.models import load_builtin_model

    try:
        model, tokenizer = load_builtin_model("smollm2-135m")
        train, held_out = load_bbc_news("train"), load_bbc_news("validation")
    except Exception as exc:  # the packages are optional: say which one is missing
        pytest.skip(f"SmolLM2 or BBC News not available: {exc}")
    return model, tokenizer, train, held_out


def _encode(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    out = []
    for r in records:
        prompt = tokenizer(f"Article: {r['text'][:CHARS]}\nTopic:")["input_ids"]
        answer = tokenizer(f" {r['label']}")["input_ids"]
        out.append((prompt, answer))
    return out


def _batch(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask``; ``labels`` only on the answer tokens."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        labels[i, width - len(a):] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def _held_out_loss(model, pairs, pad_id: int) -> float:
    model.eval()
    losses = [float(model(**_batch(pairs[i:i + 8], pad_id)).loss) for i in range(0, len(pairs), 8)]
    return sum(losses) / len(losses)


def test_adalora_smollm2_bbc_news():
    base, tokenizer, train, held_out = _load()
    pad_id = tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    train_pairs = _encode(tokenizer, [train[i] for i in torch.randperm(len(train), generator=g)[:STEPS * BATCH]])
    eval_pairs = _encode(tokenizer, [held_out[i] for i in torch.randperm(len(held_out), generator=g)[:EVAL]])

    torch.manual_seed(0)
    config = dt.AdaLoraConfig(init_r=8, target_r=4, tinit=2, tfinal=3, deltaT=2, total_step=STEPS, lora_alpha=16,
                              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_peft_model(base, config)
    before = _held_out_loss(model, eval_pairs, pad_id)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, STEPS + 1):
        model.train()
        model(**_batch(train_pairs[(step - 1) * BATCH:step * BATCH], pad_id)).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    after = _held_out_loss(model, eval_pairs, pad_id)

    pattern = config.rank_pattern
    ranks = {k.removeprefix("model.layers.").removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    print(f"\nheld-out loss on the topic word: {before:.3f} -> {after:.3f}")
    print("final rank pattern (layer.proj: kept triplets of 8):")
    print(", ".join(f"{k.replace('self_attn.', '')}={v}" for k, v in ranks.items()))
    assert len(ranks) == 60
    assert sum(ranks.values()) == 4 * 60
    assert len(set(ranks.values())) > 1, "a uniform allocation means the scores did not steer anything"
    assert after < 0.5 * before
