"""Loss, accuracy and forgetting.

* **Loss** is the mean cross-entropy over the tokens that have a label (``labels != -100``), after the
  usual one-token shift: position ``t`` predicts token ``t + 1``.
* **Accuracy for a causal LM** scores each class by the log-probability of its words after the prompt,

      score(c) = sum_k log p(w_c,k | prompt, w_c,<k)        (w_c = " label" + EOS)

  and predicts ``argmax_c score(c)``: the model never has to produce free text.
* **Accuracy for a sequence classifier** is ``argmax`` of the head's logits.
* **Forgetting** is ``loss_adapted(general text) - loss_base(general text)`` in nats per token: how much
  worse the fine-tuned model predicts ordinary text than the model it started from (0 is none).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.registry import task_count
from deltatune.training.data import IGNORE_INDEX, SHAPE_BUCKET, collate
from deltatune.training.loss import chunkable_head, head_returns_hidden, linear_cross_entropy


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device`` when ``dtype`` is set (weights stay fp32, matmuls run in ``dtype``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _hf_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _accepts(forward_cls: type, name: str) -> bool:
    return name in inspect.signature(forward_cls.forward).parameters


def causal_forward(model: nn.Module, batch: dict[str, torch.Tensor], keep: int | None = None,
                   run: nn.Module | None = None, **kwargs):
    """Run a causal LM on a collated batch; with ``keep``, compute logits for the last ``keep`` positions only.

    ``run`` is called instead of ``model`` when given (a compiled wrapper of it).

    The LM head is a ``(hidden, vocab)`` matmul at every position; a classification completion needs it at
    three or four, so skipping the rest saves about a fifth of the work of a small model.
    """
    inner = _hf_model(model)
    if keep is not None and _accepts(type(inner), "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    if _accepts(type(inner), "position_ids"):
        kwargs["position_ids"] = batch["position_ids"]
    kwargs.update(task_kwargs(model, batch))
    return (model if run is None else run)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           **kwargs)


def task_kwargs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"task_ids": zeros}`` for a model whose adapters route by task (multitask prompt tuning, Poly: the
    registry's ``task_count``): the CLI trains one task, index 0; else nothing."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not task_count(configs.values()):
        return {}
    ids = batch["input_ids"]
    return {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)}


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], sequence_classifier: bool = False,
             chunked: bool = False, forward_model: nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of a batch and the number of terms in it.

    Summing (not averaging) lets gradient accumulation divide by the token count of the whole
    accumulated batch, so ``grad_accum`` micro-batches give exactly the gradient of one large batch.

    Args:
        batch: From :func:`~deltatune.training.data.collate`; ``labels: (B, T)`` token ids with ``-100``,
            or ``(B,)`` class ids for a sequence classifier.
        chunked: For a causal LM whose head allows it (:func:`~deltatune.training.loss.chunkable_head`), the
            head and the cross-entropy run chunk by chunk (:func:`~deltatune.training.loss.linear_cross_entropy`):
            the same loss and gradients without the ``(B, T, V)`` logits and their gradient in memory.
        forward_model: What to call instead of ``model`` (e.g. its ``torch.compile`` wrapper).

    Returns:
        ``(loss_sum, n)``: a scalar tensor and the number of labelled tokens (or examples).
    """
    labels = batch["labels"]
    run = model if forward_model is None else forward_model
    if sequence_classifier:
        logits = run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **task_kwargs(model, batch)).logits  # (B, C)
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    targets = labels[:, 1:]                                   # (B, T-1): token t+1 is predicted at t
    # A left-padded row's first token would be "predicted" from a pad position: no loss there.
    targets = targets.masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)
    labelled = (targets != IGNORE_INDEX).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else targets.shape[1] - 1
    keep = labels.shape[1] - first                            # positions first .. T-1 (the last predicts nothing)
    targets = targets[:, first:]                                         # (B, keep-1)
    head = chunkable_head(model) if chunked else None
    if head is not None:
        with head_returns_hidden(head):
            hidden = causal_forward(model, batch, keep=keep, run=run).logits[:, -keep:]   # (B, keep, H)
        loss = linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, targets)
        return loss, int((targets != IGNORE_INDEX).sum())
    logits = causal_forward(model, batch, keep=keep, run=run).logits[:, -keep:]   # (B, keep, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[dict], *, batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu", amp: torch.dtype | None = None,
                  sequence_classifier: bool = False) -> float:
    """Mean loss per labelled token (or per example) over ``examples``; ``nan`` when there are none."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = _to(collate(list(examples[start:start + batch_size]), pad_id, not sequence_classifier,
                                SHAPE_BUCKET), device)
            with autocast(device, amp):
                loss, n = loss_sum(model, batch, sequence_classifier)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def score_labels(model: nn.Module, examples: Sequence[dict], label_ids: list[list[int]], *, batch_size: int,
                 pad_id: int, device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> torch.Tensor:
    """Log-probability of each class's words after each example's prompt.

    The prompt runs once with a KV cache; each class's words then run on top of it (and the cache is
    cropped back), so five labels cost little more than one forward pass.

    Args:
        examples: Encoded classification examples (``input_ids`` and ``prompt_len``).
        label_ids: Token ids of each class's completion (``" business" + EOS``).

    Returns:
        ``scores: (N, C)``: ``scores[i, c] = log p(label c | prompt i)``.
    """
    was_training = model.training
    model.eval()
    scores = torch.empty(len(examples), len(label_ids))
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            heads = [e["input_ids"][: e["prompt_len"]] for e in chunk]
            prompts = [{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)} for ids in heads]
            batch = _to(collate(prompts, pad_id, multiple_of=SHAPE_BUCKET), device)
            with autocast(device, amp):
                scores[start:start + len(chunk)] = _score_batch(model, batch, label_ids)
    finally:
        model.train(was_training)
    return scores


def _score_batch(model: nn.Module, batch: dict[str, torch.Tensor], label_ids: list[list[int]]) -> torch.Tensor:
    out = causal_forward(model, batch, keep=1, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)            # (B, V): p(first word | prompt)
    # transformers 5.x names the KV cache ``cache``; earlier versions ``past_key_values``.
    cache_arg = "cache" if _accepts(type(_hf_model(model)), "cache") else "past_key_values"
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    B = batch["input_ids"].shape[0]
    scores = torch.empty(B, len(label_ids))
    for c, ids in enumerate(label_ids):
        score = first[:, ids[0]].cpu()
        if len(ids) > 1:
            rest = torch.tensor(ids, device=first.device).expand(B, -1)    # (B, L)
            if cache is not None and hasattr(cache, "crop"):
                cont = {"input_ids": rest[:, :-1],
                        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(rest[:, :-1])], 1),
                        "position_ids": batch["position_ids"][:, -1:] + 1 + torch.arange(len(ids) - 1,
                                                                                       device=first.device)}
                logits = causal_forward(model, cont, use_cache=True, **{cache_arg: cache}).logits
                cache.crop(-(len(ids) - 1))  # drop the words again: the cache holds the prompt only
            else:  # no reusable cache: run prompt + words again
                full = {"input_ids": torch.cat([batch["input_ids"], rest[:, :-1]], 1),
                        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(rest[:, :-1])], 1)}
                full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = causal_forward(model, full, keep=len(ids) - 1).logits[:, -(len(ids) - 1):]
            logp = torch.log_softmax(logits.float(), dim=-1)                  # (B, L-1, V)
            score = score + logp.gather(-1, rest[:, 1:, None]).squeeze(-1).sum(-1).cpu()
        scores[:, c] = score
    return scores


@torch.no_grad()
def classifier_logits(model: nn.Module, examples: Sequence[dict], *, batch_size: int, pad_id: int,
                      device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> torch.Tensor:
    """``(N, C)`` head logits of a sequence classifier."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = _to(collate(list(examples[start:start + batch_size]), pad_id, left_pad=False,
                                multiple_of=SHAPE_BUCKET), device)
            with autocast(device, amp):
                out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **task_kwargs(model, batch)).logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(scores: torch.Tensor, gold: Sequence[int]) -> float:
    """Share of rows whose highest score is the gold class."""
    return float((scores.argmax(-1) == torch.as_tensor(list(gold))).float().mean())


def general_text_blocks(tokenizer, texts: Sequence[str] | str, block_size: int, max_blocks: int) -> list[dict]:
    """Cut held-out general text into ``max_blocks`` blocks of ``block_size`` tokens, for forgetting."""
    if isinstance(texts, str):
        texts = [texts]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if len(stream) >= block_size * max_blocks:
            break
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)][:max_blocks]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def _to(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
