"""The trainer is safe by default: checkpoints never run code, damaged ones fail with one line, divergence stops."""

import json
import os
import pathlib

import pytest
import torch
from support import tinymodels

from deltatune import AdaLoraConfig, LoraConfig, get_peft_model
from deltatune.training.data import Encoder
from deltatune.training.trainer import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
)


def _peft_model(llama_dir, config=None, seed=0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(seed)
    return get_peft_model(model, config or LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))


def _examples(tok, n):
    return Encoder(tok, "prompt", 64)(tinymodels.prompt_records(n))


def _cfg(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, batch_size=2, grad_accum=1, lr=5e-3, warmup_ratio=0.25,
                save_steps=2, seed=1, precision="fp32", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _interrupted_run(llama_dir, tok, out, at_step=2, config=None, **kw):
    """A run stopped after ``at_step`` steps: ``out`` holds its checkpoint."""
    t = Trainer(_peft_model(llama_dir, config), _examples(tok, 8), _cfg(out, **kw), pad_id=tok.pad_token_id)
    t.on_step_end = lambda step: t.request_stop() if step == at_step else None
    with pytest.raises(TrainingInterrupted):
        t.train()
    return out / CHECKPOINT_NAME


class _WritesAFile:
    """Unpickling this creates ``path``: what a crafted checkpoint could do with any code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_never_runs(llama_dir, tok, tmp_path):
    ckpt = _interrupted_run(llama_dir, tok, tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra"]["note"] = _WritesAFile(str(marker))
    torch.save(state, ckpt)
    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(tmp_path / "run"), pad_id=tok.pad_token_id)
    with pytest.raises(CheckpointError) as info:
        t.train(resume=True)
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message and "never runs code" in message
    assert "weights_only=False" not in message  # torch's advice to unpickle anyway is not passed on
    assert not marker.exists()


def test_every_part_of_a_checkpoint_loads_without_unpickling_code(llama_dir, tok, tmp_path):
    """Optimizer, scheduler, RNG, AdaLoRA allocator state and ``extra`` all pass ``weights_only=True``."""
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ckpt = _interrupted_run(llama_dir, tok, tmp_path / "run", at_step=3, config=config)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["optimizer_by_name"]["state"] and state["scheduler"]["last_epoch"] == 3
    assert state["method_state"]["allocators"]["default"]["exp_avg_ipt"]
    assert isinstance(state["rng"]["python"], tuple) and isinstance(state["rng"]["torch"], torch.Tensor)


@pytest.mark.parametrize("key", ["optimizer_by_name", "scheduler", "rng", "trainable", "schedule", "step"])
def test_a_checkpoint_missing_a_key_is_refused_with_one_line(llama_dir, tok, tmp_path, key):
    ckpt = _interrupted_run(llama_dir, tok, tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)
    del state[key]
    torch.save(state, ckpt)
    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(tmp_path / "run"), pad_id=tok.pad_token_id)
    with pytest.raises(CheckpointError) as info:
        t.train(resume=True)
    assert str(info.value) == (f"checkpoint {ckpt} lacks {key!r}; it is damaged or from another version; "
                               "delete it and start again")


def test_a_checkpoint_that_is_not_a_dict_is_refused(llama_dir, tok, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save([1, 2, 3], out / CHECKPOINT_NAME)
    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(out), pad_id=tok.pad_token_id)
    with pytest.raises(CheckpointError, match="is not a deltatune checkpoint"):
        t.train(resume=True)
    assert os.path.exists(out / CHECKPOINT_NAME)  # refused, not deleted: the user decides


def _strict_json_lines(path):
    """Parse every line as JSON that real parsers accept: bare NaN/Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh]


def test_a_non_finite_loss_stops_training_before_the_update_and_keeps_the_last_checkpoint(llama_dir, tok, tmp_path,
                                                                                          monkeypatch):
    from deltatune.training import trainer as trainer_mod
    from deltatune.training.trainer import TrainingDiverged

    calls = {"n": 0}
    original = trainer_mod.loss_sum

    def nan_from_step_3(*a, **kw):  # grad_accum 1: call n is step n
        calls["n"] += 1
        loss, n = original(*a, **kw)
        return (loss * float("nan") if calls["n"] >= 3 else loss), n

    monkeypatch.setattr(trainer_mod, "loss_sum", nan_from_step_3)
    out = tmp_path / "run"
    model = _peft_model(llama_dir)
    t = Trainer(model, _examples(tok, 8), _cfg(out, save_steps=2), pad_id=tok.pad_token_id)
    with pytest.raises(TrainingDiverged) as info:
        t.train()
    assert str(info.value) == (f"training diverged at step 3: the loss is nan; stopped without saving the adapter; "
                               f"the last checkpoint, of step 2, is kept in {out / CHECKPOINT_NAME}; lower --lr "
                               "(now 0.005) and train again with --overwrite")
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 2
    for name, p in model.named_parameters():  # no update from the NaN step: the weights are step 2's
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p.detach(), saved["trainable"][name]), name
    assert [r["step"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1, 2]


def test_weights_that_end_non_finite_are_not_a_result(llama_dir, tok, tmp_path):
    from deltatune.training.trainer import TrainingDiverged

    model = _peft_model(llama_dir)
    t = Trainer(model, _examples(tok, 8), _cfg(tmp_path, max_steps=2, save_steps=0), pad_id=tok.pad_token_id)
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)

    def poison(step):  # what one update with a huge learning rate does to the last step's weights
        if step == 2:
            with torch.no_grad():
                param[0, 0] = float("inf")

    t.on_step_end = poison
    with pytest.raises(TrainingDiverged, match=rf"after step 2 the weights of {name} are not finite; .*"
                                               "no checkpoint was written"):
        t.train()


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3, 0.0])
def test_the_trainer_refuses_a_learning_rate_that_is_not_positive_and_finite(llama_dir, tok, tmp_path, lr):
    from deltatune.errors import DeltatuneError

    with pytest.raises(DeltatuneError, match="--lr must be a positive finite number"):
        Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(tmp_path, lr=lr), pad_id=tok.pad_token_id)


def test_metrics_lines_are_valid_json_even_for_non_finite_values(llama_dir, tok, tmp_path):
    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(tmp_path), pad_id=tok.pad_token_id)
    t.log({"step": 1, "split": "validation", "loss": float("nan"), "perplexity": float("inf"), "accuracy": 0.5})
    assert _strict_json_lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "split": "validation", "loss": None, "perplexity": None, "accuracy": 0.5}]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_whole(llama_dir, tok, tmp_path, monkeypatch):
    from deltatune.errors import DiskFullError

    real_save, calls = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, f, *a, **kw):  # the second checkpoint finds the disk full, half written
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 basic_ios::clear")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(out, save_steps=2), pad_id=tok.pad_token_id)
    with pytest.raises(DiskFullError) as info:
        t.train()
    ckpt = out / CHECKPOINT_NAME
    assert str(info.value) == (f"no space left on device writing {ckpt}; the checkpoint of step 2 in {ckpt} is "
                               f"intact; free space, then continue with deltatune train --output-dir {out} --resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert sorted(os.listdir(out)) == [CHECKPOINT_NAME, "metrics.jsonl"]  # no half-written temporary file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_disk_full_while_logging_metrics_is_one_clear_error(llama_dir, tok, tmp_path):
    from deltatune.errors import DiskFullError

    t = Trainer(_peft_model(llama_dir), _examples(tok, 8), _cfg(tmp_path), pad_id=tok.pad_token_id)
    t.metrics_path = "/dev/full"
    with pytest.raises(DiskFullError, match="^no space left on device writing /dev/full; no earlier checkpoint "
                                            "exists; free space, then continue with"):
        t.train()


@pytest.mark.parametrize("name, content, line", [
    ("latin1.jsonl", '{"text": "a", "label": "x"}\n{"text": "caf\u00e9", "label": "y"}\n'.encode("latin-1"), 2),
    ("cp1252.csv", "text,label\na,x\nb,y\n\u201cquoted\u201d,x\n".encode("cp1252"), 4),
    ("latin1.txt", "first paragraph\n\nna\u00efve second\n".encode("latin-1"), 3),
])
def test_a_data_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, name, content, line):
    from deltatune.training.data import DataError, read_records

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert str(info.value).startswith(f"{path}:{line}: byte 0x")
    assert "is not UTF-8" in str(info.value) and "re-save it as UTF-8" in str(info.value)


def test_utf8_with_a_byte_order_mark_and_accents_still_reads(tmp_path):
    from deltatune.training.data import read_records

    path = tmp_path / "ok.jsonl"
    path.write_bytes('\ufeff{"text": "caf\u00e9 \u2014 na\u00efve", "label": "x"}\n'.encode())
    assert read_records(str(path)) == [{"text": "caf\u00e9 \u2014 na\u00efve", "label": "x"}]
