"""The trainer is safe by default: checkpoints never run code, damaged ones fail with one line, divergence stops."""

import os
import pathlib

import pytest
import tinymodels
import torch

from deltatune import AdaLoraConfig, LoraConfig, get_peft_model
from deltatune.training.data import Encoder
from deltatune.training.trainer import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tinymodels.make_llama(str(tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


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
