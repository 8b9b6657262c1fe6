"""The chunked head + cross-entropy equals the plain loss and its gradients; the trainer uses it and compiles."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from support import tinymodels

from deltatune import LoraConfig, get_peft_model
from deltatune.errors import DeltatuneError
from deltatune.training.data import IGNORE_INDEX, Encoder, collate
from deltatune.training.loss import chunkable_head, linear_cross_entropy
from deltatune.training.metrics import loss_sum
from deltatune.training.trainer import TrainConfig, Trainer


def _plain(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float().flatten(0, -2), t.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _case(seed=0, n=(3, 13), hidden=16, vocab=50, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.5).requires_grad_() if bias else None
    t = torch.randint(0, vocab, n, generator=g)
    t[torch.rand(n, generator=g) < 0.3] = IGNORE_INDEX   # label masking
    return h, w, b, t


def _grads(loss_fn, *tensors):
    loss = loss_fn()
    grads = torch.autograd.grad(loss * 0.7, [x for x in tensors if x is not None and x.requires_grad])
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 5, 8, None, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk_size, bias):
    h, w, b, t = _case(bias=bias)
    ref_loss, ref = _grads(lambda: _plain(h, w, b, t), h, w, b)
    loss, got = _grads(lambda: linear_cross_entropy(h, w, b, t, chunk_size=chunk_size), h, w, b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # Masked positions get exactly zero gradient.
    assert got[0][t == IGNORE_INDEX].abs().max() == 0


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none():
    h, w, b, t = _case()
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = linear_cross_entropy(h, w, b, t, chunk_size=4)
    (g_h,) = torch.autograd.grad(loss, [h])
    (r_h,) = torch.autograd.grad(_plain(h, w, b, t), [h])
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        quiet = linear_cross_entropy(h, w, b, t, chunk_size=4)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, loss.detach())


def test_all_targets_masked_gives_zero_loss_and_zero_gradient():
    h, w, b, t = _case()
    t.fill_(IGNORE_INDEX)
    loss = linear_cross_entropy(h, w, b, t)
    (g_h,) = torch.autograd.grad(loss, [h])
    assert float(loss.detach()) == 0.0 and g_h.abs().max() == 0


def test_chunked_loss_under_bf16_autocast_matches_the_plain_autocast_loss():
    h, w, b, t = _case(seed=1, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _grads(lambda: _plain(h, w, b, t), h, w, b)
        loss, got = _grads(lambda: linear_cross_entropy(h, w, b, t, chunk_size=7), h, w, b)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-2)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=5e-2, atol=2e-2)


# ---- through a model --------------------------------------------------------------------------------
def _lora(llama_dir, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM", **kw)
    return get_peft_model(model, config)


def _batch(tok, n=4):
    records = tinymodels.prompt_records(n)
    for i, r in enumerate(records):  # different lengths: left padding and masked prompts
        r["prompt"] = "the team won " * i + r["prompt"]
    return collate(Encoder(tok, "prompt", 64)(records), tok.pad_token_id, left_pad=True)


def _loss_and_grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    loss, n = loss_sum(model, batch, chunked=chunked)
    loss.backward()
    return float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_loss_sum_chunked_equals_plain_on_a_tied_causal_lm(llama_dir, tok, train_embeddings):
    """Tiny Llama ties ``lm_head`` to the embeddings; with them trainable the gradient has both paths' sum."""
    model = _lora(llama_dir)
    head = chunkable_head(model)
    assert head is not None and head.weight is model.get_input_embeddings().weight
    head.weight.requires_grad_(train_embeddings)
    batch = _batch(tok)
    assert (batch["labels"] == IGNORE_INDEX).any()
    plain = _loss_and_grads(model, batch, chunked=False)
    chunked = _loss_and_grads(model, batch, chunked=True)
    assert chunked[1] == plain[1] > 0
    assert chunked[0] == pytest.approx(plain[0], rel=1e-5)
    assert chunked[2].keys() == plain[2].keys()
    assert any("embed_tokens" in k for k in plain[2]) == train_embeddings
    for k in plain[2]:
        torch.testing.assert_close(chunked[2][k], plain[2][k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(head(torch.ones(1, head.in_features)).abs().sum()) > 0  # the head is itself again


def test_heads_the_chunked_loss_must_not_replace(llama_dir):
    adapted = _lora(llama_dir, modules_to_save=None)
    assert chunkable_head(adapted) is not None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    lora_head = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    assert chunkable_head(lora_head) is None            # the head is a LoRA layer: plain path
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.config.final_logit_softcapping = 30.0         # logits change after the head: plain path
    assert chunkable_head(model) is None


def _metric_losses(path):
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r and "split" not in r]


def _train(llama_dir, tok, tmp_path, **kw):
    model = _lora(llama_dir, lora_dropout=0.1)
    examples = Encoder(tok, "prompt", 64)(tinymodels.prompt_records(8))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-2, save_steps=0, seed=3,
                      precision="fp32", progress=False, **kw)
    Trainer(model, examples, cfg, pad_id=tok.pad_token_id).train()
    return _metric_losses(str(tmp_path))


def test_trainer_chunked_and_compiled_runs_match_the_plain_run(llama_dir, tok, tmp_path):
    """Same seed, dropout on: the chunked loss and ``torch.compile`` (aot_eager) change nothing measurable."""
    plain = _train(llama_dir, tok, tmp_path / "plain", chunked_loss=False)
    chunked = _train(llama_dir, tok, tmp_path / "chunked")
    compiled = _train(llama_dir, tok, tmp_path / "compiled", compile="aot_eager")
    assert len(plain) == 3 and plain[0] > plain[-1]
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert compiled == pytest.approx(plain, rel=1e-4)


def test_unknown_compile_backend_is_a_clear_error(llama_dir, tok, tmp_path):
    examples = Encoder(tok, "prompt", 64)(tinymodels.prompt_records(2))
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, compile="no-such-backend")
    with pytest.raises(DeltatuneError, match="not a torch.compile backend"):
        Trainer(_lora(llama_dir), examples, cfg, pad_id=tok.pad_token_id)
