"""Loss, label scoring and accuracy against direct computations on a tiny random Llama."""

import pytest
import torch
import torch.nn.functional as F
from support import tinymodels
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.training.data import IGNORE_INDEX, Encoder, collate
from deltatune.training.metrics import (
    accuracy,
    evaluate_loss,
    general_text_blocks,
    loss_sum,
    score_labels,
)


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tinymodels.make_llama(str(tmp_path_factory.mktemp("m") / "llama"))
    # A larger init than the default makes the random model's predictions far from uniform.
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model, AutoTokenizer.from_pretrained(path)


def _reference_loss_sum(model, examples):
    """One example at a time, full logits, no padding: sum of -log p(token) over labelled tokens."""
    total, n = 0.0, 0
    for e in examples:
        with torch.no_grad():
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float()
        targets = torch.tensor(e["labels"][1:])
        total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        n += int((targets != IGNORE_INDEX).sum())
    return total, n


def test_loss_sum_matches_unpadded_reference_with_prompt_masks(model_and_tok):
    model, tok = model_and_tok
    enc = Encoder(tok, "prompt", 64)
    examples = enc([{"prompt": "what is your name?", "completion": " my name is bot."},
                    {"prompt": "how are you? i am", "completion": " fine"},
                    {"prompt": "a", "completion": " the team won the match"}])
    ref, n_ref = _reference_loss_sum(model, examples)
    with torch.no_grad():
        loss, n = loss_sum(model, collate(examples, tok.pad_token_id))  # left padded, only the last columns' logits
    assert n == n_ref
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_loss_sum_equals_transformers_mean_loss_times_count(model_and_tok):
    model, tok = model_and_tok
    ids = torch.tensor([tok("the team won the match and the coach praised the players")["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(ids.shape[1])[None],
             "labels": ids}
    with torch.no_grad():
        loss, n = loss_sum(model, batch)
        hf = model(input_ids=ids, labels=ids).loss
    assert n == ids.shape[1] - 1
    assert float(loss) / n == pytest.approx(float(hf), rel=1e-5)


def test_evaluate_loss_is_the_token_weighted_mean(model_and_tok):
    model, tok = model_and_tok
    examples = Encoder(tok, "text", 12)([{"text": t} for t in tinymodels.corpus()[:6]])
    ref, n = _reference_loss_sum(model, examples)
    assert evaluate_loss(model, examples, batch_size=4, pad_id=tok.pad_token_id) == pytest.approx(ref / n, rel=1e-5)


def _brute_force_scores(model, examples, label_ids):
    scores = torch.empty(len(examples), len(label_ids))
    for i, e in enumerate(examples):
        prompt = e["input_ids"][: e["prompt_len"]]
        for c, ids in enumerate(label_ids):
            logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
            scores[i, c] = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(ids))
    return scores


@pytest.fixture(scope="module")
def classification(model_and_tok):
    _, tok = model_and_tok
    labels = ["politics", "sport", "tech"]
    enc = Encoder(tok, "classification", 96, labels=labels, template="{text}\nTopic ({labels}):")
    return enc, enc(tinymodels.classification_records(7))


def test_score_labels_with_kv_cache_matches_brute_force(model_and_tok, classification):
    model, tok = model_and_tok
    enc, examples = classification
    assert max(map(len, enc.label_ids)) > 2  # multi-token labels exercise the cached continuation
    with torch.no_grad():
        scores = score_labels(model, examples, enc.label_ids, batch_size=3, pad_id=tok.pad_token_id)
        ref = _brute_force_scores(model, examples, enc.label_ids)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)


class _NoCache(nn.Module):
    """A model wrapper that never returns a KV cache: scoring must fall back to full sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False, **kw):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, use_cache=False)


def test_score_labels_without_cache_matches_brute_force(model_and_tok, classification):
    model, tok = model_and_tok
    enc, examples = classification
    with torch.no_grad():
        scores = score_labels(_NoCache(model), examples, enc.label_ids, batch_size=4, pad_id=tok.pad_token_id)
        ref = _brute_force_scores(model, examples, enc.label_ids)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)


def test_accuracy():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(scores, [1, 0, 0, 0]) == 0.75


def test_disabled_adapter_gives_base_loss_and_zero_init_adapter_forgets_nothing(model_and_tok):
    import copy

    model, tok = model_and_tok
    blocks = general_text_blocks(tok, tinymodels.corpus(), block_size=16, max_blocks=4)
    assert len(blocks) == 4 and all(len(b["input_ids"]) == 16 for b in blocks)
    base = evaluate_loss(model, blocks, batch_size=2, pad_id=tok.pad_token_id)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert evaluate_loss(peft, blocks, batch_size=2, pad_id=tok.pad_token_id) == pytest.approx(base, abs=1e-6)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = evaluate_loss(peft, blocks, batch_size=2, pad_id=tok.pad_token_id)
    assert abs(adapted - base) > 1e-3
    with peft.disable_adapter():
        assert evaluate_loss(peft, blocks, batch_size=2, pad_id=tok.pad_token_id) == pytest.approx(base, abs=1e-6)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "multitask_prompt_tuning", "lora"])
def test_scoring_and_loss_through_every_kind_of_adapter(model_and_tok, classification, method):
    """Virtual tokens (prepended or in the cache) must not break left padding, the KV-cache continuation,
    or the last-positions-only logits: compare with one-example-at-a-time full forwards."""
    import copy

    from deltatune.cli.options import build_peft_config, fill_method_defaults, method_table

    model, tok = model_and_tok
    enc, examples = classification
    options = fill_method_defaults(method_table()[method][0], {}, total_steps=1, model_path="")
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), build_peft_config(method, options, "CAUSAL_LM")).eval()
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)  # not a no-op adapter

    def full(ids):
        x = torch.tensor([ids])
        kw = {"task_ids": torch.zeros(1, dtype=torch.long)} if method == "multitask_prompt_tuning" else {}
        return peft(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits[0, -len(ids):].float()

    with torch.no_grad():
        scores = score_labels(peft, examples, enc.label_ids, batch_size=4, pad_id=tok.pad_token_id)
        ref = torch.empty_like(scores)
        for i, e in enumerate(examples):
            prompt = e["input_ids"][: e["prompt_len"]]
            for c, ids in enumerate(enc.label_ids):
                logp = torch.log_softmax(full(prompt + ids), -1)
                ref[i, c] = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(ids))
        torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
        loss, n = loss_sum(peft, collate(examples, tok.pad_token_id))
        ref_loss = sum(float(F.cross_entropy(full(e["input_ids"])[:-1], torch.tensor(e["labels"][1:]),
                                             ignore_index=IGNORE_INDEX, reduction="sum")) for e in examples)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert abs(float(scores.sum()) - float(score_labels(model, examples, enc.label_ids, batch_size=4,
                                                        pad_id=tok.pad_token_id).sum())) > 1e-2
