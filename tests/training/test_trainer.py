"""The trainer: gradient accumulation equals one large batch, resume is exact, the schedule is as stated."""

import json
import math
import os
import signal

import pytest
import torch
from support import tinymodels

from deltatune import LoraConfig, get_peft_model
from deltatune.training.data import Encoder
from deltatune.training.trainer import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    lr_factor,
)


def _peft_model(llama_dir, dropout=0.0, seed=0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def _examples(tok, n):
    records = tinymodels.prompt_records(n)
    for i, r in enumerate(records):  # vary lengths so padding is exercised
        r["prompt"] = "the team won " * (i % 3) + r["prompt"]
    return Encoder(tok, "prompt", 64)(records)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=8, batch_size=2, grad_accum=2, lr=5e-3, warmup_ratio=0.25,
                save_steps=3, seed=1, precision="fp32", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_grad_accumulation_equals_one_large_batch(llama_dir, tok, tmp_path):
    examples = _examples(tok, 16)
    a = _peft_model(llama_dir)
    Trainer(a, examples, _cfg(tmp_path / "a", batch_size=4, grad_accum=1), pad_id=tok.pad_token_id).train()
    b = _peft_model(llama_dir)
    Trainer(b, examples, _cfg(tmp_path / "b", batch_size=2, grad_accum=2), pad_id=tok.pad_token_id).train()
    pa, pb = _trainable(a), _trainable(b)
    assert pa.keys() == pb.keys()
    moved = max(float((pa[k] - _trainable(_peft_model(llama_dir))[k]).abs().max()) for k in pa if "lora_B" in k)
    assert moved > 1e-3  # training did something
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_fused_adamw_trains_as_the_default_adamw(llama_dir, tok, tmp_path, monkeypatch):
    """The trainer picks the fused AdamW kernel on CPU; it makes the same updates as the default (foreach) one."""
    examples = _examples(tok, 8)
    a = _peft_model(llama_dir)
    trainer = Trainer(a, examples, _cfg(tmp_path / "a", max_steps=4, batch_size=2, grad_accum=1),
                      pad_id=tok.pad_token_id)
    assert trainer.optimizer.defaults["fused"] is True
    trainer.train()

    adamw = torch.optim.AdamW

    def unfused(params, **kw):
        kw.pop("fused", None)
        return adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", unfused)
    b = _peft_model(llama_dir)
    plain = Trainer(b, examples, _cfg(tmp_path / "b", max_steps=4, batch_size=2, grad_accum=1),
                    pad_id=tok.pad_token_id)
    assert not plain.optimizer.defaults["fused"]
    plain.train()
    pa, pb, p0 = _trainable(a), _trainable(b), _trainable(_peft_model(llama_dir))
    assert max(float((pa[k] - p0[k]).abs().max()) for k in pa) > 1e-3  # training moved the weights
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh) if "loss" in r]


def _stop_on_forward(trainer, at_call, use_signal=False):
    """Stop in the middle of an optimizer step: on the ``at_call``-th forward pass (a first micro-batch)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == at_call:
            if use_signal:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                trainer.request_stop()

    return trainer.model.register_forward_hook(hook)


@pytest.mark.parametrize("how", ["mid-step", "end-of-step", "sigint"])
def test_resume_is_exact(llama_dir, tok, tmp_path, how):
    """An interrupted and resumed run ends with the same weights and losses as an uninterrupted one.

    Dropout is on (RNG state matters), epochs do not divide evenly (data order matters), and two
    micro-batches make a step (a stop can land between them).
    """
    examples = _examples(tok, 10)  # 5 micro-batches per epoch, 2 per step: steps straddle epochs
    ref = _peft_model(llama_dir, dropout=0.2)
    Trainer(ref, examples, _cfg(tmp_path / "ref"), pad_id=tok.pad_token_id).train()

    out = tmp_path / "run"
    first = Trainer(_peft_model(llama_dir, dropout=0.2), examples, _cfg(out), pad_id=tok.pad_token_id)
    if how == "end-of-step":
        first.on_step_end = lambda step: first.request_stop() if step == 5 else None
    else:
        _stop_on_forward(first, at_call=11, use_signal=how == "sigint")  # step 6's first micro-batch
    with pytest.raises(TrainingInterrupted) as info:
        first.train()
    assert info.value.step == 5
    assert os.path.exists(out / CHECKPOINT_NAME)
    # A crash after the checkpoint may have logged more steps; resume drops them.
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 6, "loss": 123.0}) + "\n" + '{"step": 7, "lo')

    # A fresh process: different model init and RNG, restored from the checkpoint.
    torch.manual_seed(999)
    resumed_model = _peft_model(llama_dir, dropout=0.2, seed=7)
    resumed = Trainer(resumed_model, examples, _cfg(out), pad_id=tok.pad_token_id)
    result = resumed.train(resume=True)
    assert result.steps == 8
    for k, v in _trainable(ref).items():
        assert torch.equal(v, _trainable(resumed_model)[k]), k
    assert _losses(out) == _losses(tmp_path / "ref")


def test_resume_with_other_settings_is_refused(llama_dir, tok, tmp_path):
    examples = _examples(tok, 8)
    t = Trainer(_peft_model(llama_dir), examples, _cfg(tmp_path), pad_id=tok.pad_token_id)
    t.on_step_end = lambda step: t.request_stop() if step == 3 else None
    with pytest.raises(TrainingInterrupted):
        t.train()
    other = Trainer(_peft_model(llama_dir), examples, _cfg(tmp_path, lr=1e-2), pad_id=tok.pad_token_id)
    with pytest.raises(CheckpointError, match=r"lr 0\.005 -> 0\.01"):
        other.train(resume=True)
    empty = Trainer(_peft_model(llama_dir), examples, _cfg(tmp_path / "none"), pad_id=tok.pad_token_id)
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        empty.train(resume=True)


def test_checkpoint_files_are_replaced_atomically(llama_dir, tok, tmp_path):
    examples = _examples(tok, 8)
    t = Trainer(_peft_model(llama_dir), examples, _cfg(tmp_path, save_steps=1, max_steps=3), pad_id=tok.pad_token_id)
    seen = []
    t.on_step_end = lambda step: seen.append(sorted(os.listdir(tmp_path)))
    t.train()
    assert all(not any(name.startswith(".tmp-") for name in names) for names in seen)


def test_lr_schedule_warmup_then_cosine_to_zero():
    total, warmup = 20, 4
    assert [lr_factor(s, warmup, total) for s in range(warmup)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert lr_factor(warmup, warmup, total) == 1.0
    assert lr_factor(12, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lr_factor(total, warmup, total) == pytest.approx(0.0)


def test_trainer_steps_follow_epochs_when_max_steps_is_none(llama_dir, tok, tmp_path):
    examples = _examples(tok, 10)
    t = Trainer(_peft_model(llama_dir), examples, _cfg(tmp_path, max_steps=None, epochs=2, batch_size=3, grad_accum=2),
                pad_id=tok.pad_token_id)
    assert t.micro_per_epoch == 4 and t.total_steps == 4
    # Each epoch visits every example exactly once.
    seen = [id(e) for m in range(4) for e in t.micro_batch(m)]
    assert sorted(seen) == sorted(id(e) for e in examples)


def test_loraplus_gives_lora_b_a_larger_learning_rate(llama_dir, tok, tmp_path):
    t = Trainer(_peft_model(llama_dir), _examples(tok, 4), _cfg(tmp_path, loraplus_lr_ratio=16),
                pad_id=tok.pad_token_id)
    lrs = {g["lr"] for g in t.optimizer.param_groups if g["params"]}
    base = t.config.lr * lr_factor(0, 2, 8)
    assert min(lrs) == pytest.approx(base) and max(lrs) == pytest.approx(16 * base)


@pytest.mark.parametrize("remove_unused_columns", [False, True])
def test_peft_model_trains_under_transformers_trainer(llama_dir, tok, tmp_path, remove_unused_columns):
    """A plain ``transformers.Trainer`` refuses a deltatune PeftModel when built (its checkpoints would be full models
    of internal key names); ``AdapterTrainer`` trains it and only the adapter changes."""
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    from deltatune.errors import ConfigError
    from deltatune.integrations.transformers import AdapterTrainer

    model = _peft_model(llama_dir)
    before = _trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = tok("what is your name? my name is bot.")["input_ids"]
    data = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             remove_unused_columns=remove_unused_columns)
    with pytest.raises(ConfigError, match="AdapterTrainer"):
        HFTrainer(model=model, args=args, train_dataset=data)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 6 and losses[-1] < losses[0]
    after = _trainable(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    # Atomic saves go through a temporary file; the result still gets an ordinary file's mode (not 0600).
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_resume_is_exact_for_adalora_rank_allocation(llama_dir, tok, tmp_path):
    """AdaLoRA keeps importance averages and a rank pattern outside its parameters; they are checkpointed."""
    from transformers import AutoModelForCausalLM

    from deltatune.adalora import AdaLoraConfig

    def model():
        torch.manual_seed(0)
        config = AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                               target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), config)

    examples = _examples(tok, 10)
    ref = model()
    Trainer(ref, examples, _cfg(tmp_path / "ref"), pad_id=tok.pad_token_id).train()
    first = Trainer(model(), examples, _cfg(tmp_path / "run"), pad_id=tok.pad_token_id)
    first.on_step_end = lambda step: first.request_stop() if step == 4 else None
    with pytest.raises(TrainingInterrupted):
        first.train()
    resumed = model()
    Trainer(resumed, examples, _cfg(tmp_path / "run"), pad_id=tok.pad_token_id).train(resume=True)
    assert ref.peft_config["default"].rank_pattern == resumed.peft_config["default"].rank_pattern
    assert ref.peft_config["default"].rank_pattern  # the schedule did mask something
    for k, v in _trainable(ref).items():
        assert torch.equal(v, _trainable(resumed)[k]), k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_adalora_is_refused_in_a_distributed_run(llama_dir, tok, tmp_path, parallel):
    """AdaLoRA's config says it trains in one process only; the trainer refuses before touching the model."""
    from transformers import AutoModelForCausalLM

    from deltatune.adalora import AdaLoraConfig
    from deltatune.errors import DeltatuneError

    config = AdaLoraConfig(init_r=6, target_r=2, total_step=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    assert "distributed_refusal" not in config.to_dict()  # a class property, not a file field
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), config)
    with pytest.raises(DeltatuneError, match="AdaLoRA's rank allocation runs in one process only"):
        Trainer(model, _examples(tok, 4), _cfg(tmp_path), pad_id=tok.pad_token_id, parallel=parallel)


def test_gradient_checkpointing_recomputes_each_block_in_backward(llama_dir, tok, tmp_path):
    """With ``gradient_checkpointing`` a decoder block's layers run twice per micro-batch (once more in backward),
    switched on through transformers' current API (no deprecation warning), and the losses do not change."""
    import warnings

    calls = []
    losses = {}
    for ckpt in (False, True):
        model = _peft_model(llama_dir)
        mlp = model.get_base_model().model.layers[0].mlp
        inner_forward = mlp.forward  # counted by replacing it (module hooks do not run again in the recompute)

        def counted(*args, _forward=inner_forward, _ckpt=ckpt, **kwargs):
            calls.append(_ckpt)
            return _forward(*args, **kwargs)

        mlp.forward = counted
        trainer = Trainer(model, _examples(tok, 4), _cfg(tmp_path / str(ckpt), max_steps=1, batch_size=2,
                                                          grad_accum=1, gradient_checkpointing=ckpt),
                          pad_id=tok.pad_token_id)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            trainer.train()
        losses[ckpt] = _losses(tmp_path / str(ckpt))
    assert calls.count(False) == 1 and calls.count(True) == 2
    assert [s for s, _ in losses[True]] == [s for s, _ in losses[False]] == [1]
    assert [v for _, v in losses[True]] == pytest.approx([v for _, v in losses[False]], rel=1e-6)
