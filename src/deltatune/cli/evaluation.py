"""Evaluating a model on a task: a data set prepared for one model (:class:`Task`), its metric, and the general
text that measures forgetting."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.cli.common import UsageError
from deltatune.cli.loading import ModelSpec
from deltatune.training import data as data_mod
from deltatune.training import metrics


@dataclass
class Task:
    """One data set prepared for one model.

    Attributes:
        dataset: The records.
        encoder: Turns records into examples for this model's tokenizer.
        sequence_classifier: Encoder + head (``True``) or causal LM.
        metric_name: ``"accuracy"`` for classification, else ``"loss"`` (lower is better).
    """

    dataset: data_mod.Dataset
    encoder: data_mod.Encoder
    tokenizer: Any
    sequence_classifier: bool
    pad_id: int

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.dataset.format == "classification" else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.metric_name == "accuracy"

    def examples(self, records: list[dict], limit: int | None = None, seed: int = 0) -> list[dict]:
        """Encode ``records`` (a fixed, seeded sample of ``limit`` of them when given)."""
        if limit and len(records) > limit:
            records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), limit))]
        return self.encoder(records)

    def evaluate(self, model: nn.Module, examples: list[dict], *, batch_size: int, device: torch.device,
                 amp: torch.dtype | None) -> dict[str, float]:
        """``{"accuracy", "loss"}`` for classification, ``{"loss", "perplexity"}`` otherwise."""
        if not examples:
            return {}
        kw = {"batch_size": batch_size, "pad_id": self.pad_id, "device": device, "amp": amp}
        gold = [e["label"] for e in examples] if self.dataset.format == "classification" else None
        if self.sequence_classifier:
            logits = metrics.classifier_logits(model, examples, **kw)
            loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(gold)))
            return {"accuracy": metrics.accuracy(logits, gold), "loss": loss}
        if gold is not None:
            label_ids = self.encoder.label_ids
            scores = metrics.score_labels(model, examples, label_ids, **kw)
            # The gold label's words are exactly the completion tokens, so their log-probs give the loss too.
            n_tokens = sum(len(label_ids[g]) for g in gold)
            loss = -float(sum(scores[i, g] for i, g in enumerate(gold))) / n_tokens
            return {"accuracy": metrics.accuracy(scores, gold), "loss": loss}
        loss = metrics.evaluate_loss(model, examples, **kw)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


def make_task(dataset: data_mod.Dataset, spec: ModelSpec, tokenizer, max_length: int) -> Task:
    if spec.kind == "encoder" and dataset.format != "classification":
        raise UsageError(f"--model {spec.name} is an encoder: it can only learn classification (text+label) data, "
                         f"and {dataset.name} is {dataset.format} data; use a causal LM such as smollm2-135m")
    encoder = data_mod.Encoder(tokenizer, dataset.format, max_length, labels=dataset.labels,
                               template=dataset.template, sequence_classifier=spec.kind == "encoder")
    return Task(dataset=dataset, encoder=encoder, tokenizer=tokenizer, sequence_classifier=spec.kind == "encoder",
                pad_id=int(tokenizer.pad_token_id))



def general_text_examples(tokenizer, n_tokens: int, block: int = 256,
                          path: str | None = None) -> tuple[list[dict], str | None]:
    """Held-out general text for the forgetting measure, and why there is none when there is none.

    The text is ``path`` (``--forgetting-data``) when given, else the built-in ChatterBot answers. Without
    either, training still runs: forgetting is an extra measure, not a reason to refuse a job, so the
    summary says it was not measured and how to measure it.

    Returns:
        ``(blocks, reason)``: ``blocks`` of ``block`` tokens for :func:`metrics.evaluate_loss`, about ``n_tokens``
        in all; ``reason`` is ``None`` when there are blocks, else one line saying why not.

    Raises:
        DataError: ``path`` does not exist or holds no text.
    """
    if n_tokens <= 0:
        return [], "off (--forgetting-tokens 0)"
    max_blocks = max(1, n_tokens // block)
    if path:
        texts = forgetting_texts(path)
        blocks = metrics.general_text_blocks(tokenizer, texts, block, max_blocks)
        if not blocks:
            raise data_mod.DataError(f"--forgetting-data {path}: holds too little text to measure forgetting "
                                     "(under two tokens); pass a file of general text")
        return blocks, None
    from deltatune.builtin import BuiltinNotInstalledError
    from deltatune.builtin.datasets import general_text

    try:
        texts = general_text()
    except BuiltinNotInstalledError:
        return [], ("not measured: the built-in general text ships in the package 'chatterbot-corpus', which is "
                    "not installed; pass --forgetting-data FILE (held-out general text, .txt or .jsonl) or "
                    "pip install chatterbot-corpus")
    return metrics.general_text_blocks(tokenizer, texts, block, max_blocks), None


def forgetting_texts(path: str) -> list[str]:
    """The texts of a ``--forgetting-data`` file, read as ``--data`` is (.txt paragraphs, .jsonl/.csv records):
    a record's ``text``, its prompt and completion, or its chat messages, joined by newlines.

    Raises:
        DataError: the file is missing or empty, or its records have no text field.
    """
    try:
        records = data_mod.read_records(path)
        fmt = data_mod.detect_format(records[0], data_mod.alias_columns(records[0], {}))
        rows = data_mod.normalise(records, fmt, data_mod.alias_columns(records[0], {}), path)
    except data_mod.DataError as exc:
        raise data_mod.DataError(f"--forgetting-data: {exc}") from None
    if fmt == "chat":
        return ["\n".join(m["content"] for m in r["messages"]) for r in rows]
    if fmt == "prompt":
        return [f"{r['prompt']}\n{r['completion']}" for r in rows]
    return [str(r["text"]) for r in rows]


