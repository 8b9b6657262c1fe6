"""Issue 19 item 1 through the CLI: ``--adapter`` and ``inspect`` take a PEFT adapter whatever it was initialised
with (EVA, CorDA, LoftQ, LoRA-GA, orthogonal); the output is that of the same A, B saved as plain LoRA."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import pytest
import torch

from .reliability import run


@pytest.fixture(scope="module")
def peft_adapter(llama_dir, tmp_path_factory) -> str:
    """A LoRA adapter with random A and B, written by PEFT on the tiny Llama directory."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    d = tmp_path_factory.mktemp("adapters") / "plain"
    model.save_pretrained(d)
    return str(d)


def _with_init(src: str, dst: str, init: str, extra: dict) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_config.json")
    with open(path) as fh:
        config = json.load(fh)
    config.update(init_lora_weights=init, **extra)
    with open(path, "w") as fh:
        json.dump(config, fh)
    return dst


# loftq: its load rebuilds LoftQ's quantised base, so it is not the plain adapter (tests/cli/test_init_loftq_cli.py)
@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga", "orthogonal"])
def test_generate_with_any_init_equals_the_plain_adapter(capsys, peft_adapter, tmp_path, init):
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig

    extra = {"eva": {"eva_config": dataclasses.asdict(EvaConfig())},
             "corda": {"corda_config": dataclasses.asdict(CordaConfig())},
             "loftq": {"loftq_config": dataclasses.asdict(LoftQConfig())},
             "lora_ga": {"lora_ga_config": dataclasses.asdict(LoraGAConfig())}, "orthogonal": {}}[init]
    other = _with_init(peft_adapter, str(tmp_path / init), init, extra)
    argv = ("generate", "--max-new-tokens", 6, "--raw", "the news today")
    code, plain, err = run(capsys, argv[0], "--adapter", peft_adapter, *argv[1:])
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CorDA/LoftQ/LoRA-GA: "expects the residual base"
        code, ours, err = run(capsys, argv[0], "--adapter", other, *argv[1:])
    assert code == 0, err
    assert ours == plain and ours.strip()
    code, out, err = run(capsys, "inspect", other)
    assert code == 0 and f"init_lora_weights={init}" in out, err
